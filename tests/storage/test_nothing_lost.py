"""Nothing a user typed or a model wrote is lost, and nothing runs for nobody, on either backend.

A real ``tokenrelay serve`` per backend (SQLite, then PostgreSQL), over real sockets, relaying to
the fake upstream: text PostgreSQL refuses, a database that refuses the answer, and Stop or DELETE
arriving before the upstream has even answered its headers.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from openai._streaming import SSEDecoder

from conftest import assert_openai_error, relay_to
from fake_upstream import FakeUpstream, RecordedRequest

from .conftest import execute_sql

ABANDON_DEADLINE = 1.0
"""Seconds from a Stop or DELETE until the fake upstream has seen its request closed."""

SLOW_HEADERS = {"headers_delay": 5}
"""An upstream that takes 5 s to answer its headers: Stop and DELETE must not wait for them."""


class Server:
    """A running tokenrelay on one backend, a client of it, and the URL of its database."""

    def __init__(self, database_url: str, api: httpx.Client) -> None:
        self.database_url = database_url
        self.backend = sa.make_url(database_url).get_backend_name()
        self.api = api

    def create(self, **fields: Any) -> str:
        response = self.api.post("/api/conversations", json=fields)
        assert response.status_code == 201, response.text
        conversation_id: str = response.json()["id"]
        return conversation_id

    def get(self, conversation_id: str) -> dict[str, Any]:
        response = self.api.get(f"/api/conversations/{conversation_id}")
        assert response.status_code == 200, response.text
        conversation: dict[str, Any] = response.json()
        return conversation

    def send(self, conversation_id: str, content: str) -> list[str]:
        """Send a message and read the whole answer; return its events' data, in order."""
        # A client of its own: this may run in a thread while the test uses ``api``.
        with (
            httpx.Client(base_url=self.api.base_url, timeout=30.0) as client,
            client.stream(
                "POST",
                f"/api/conversations/{conversation_id}/messages",
                json={"content": content},
            ) as response,
        ):
            assert response.status_code == 200, response.read()
            return [event.data for event in SSEDecoder().iter_bytes(response.iter_bytes())]

    def settled_answer(self, conversation_id: str, timeout: float = 15.0) -> dict[str, Any]:
        """The last message once it is no longer ``streaming``; fail after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            conversation = self.get(conversation_id)
            answer: dict[str, Any] = conversation["messages"][-1]
            if answer["status"] != "streaming" and not conversation["answering"]:
                return answer
            if time.monotonic() > deadline:
                pytest.fail(f"the answer is still {answer['status']} after {timeout} s: {answer}")
            time.sleep(0.05)  # the pause between polls, not a synchronisation


@pytest.fixture(scope="module")
def server(
    module_database_url: str,
    fake_upstream: FakeUpstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Server]:
    """One tokenrelay per backend for the whole module."""
    with (
        relay_to(
            fake_upstream,
            tmp_path_factory.mktemp("server"),
            env={"TOKENRELAY_DATABASE_URL": module_database_url},
        ) as relay,
        httpx.Client(base_url=relay.url, timeout=30.0) as api,
    ):
        yield Server(module_database_url, api)


# -- text PostgreSQL refuses ---------------------------------------------------------------------


def test_nul_in_anything_stored_is_400_naming_the_field(server: Server) -> None:
    api = server.api
    for body, param in [
        ({"title": "a\x00b"}, "title"),
        ({"system": "Be\x00 brief."}, "system"),
        ({"model": "tool-\x00"}, "model"),
    ]:
        error = assert_openai_error(api.post("/api/conversations", json=body), 400, param=param)
        assert "NUL" in str(error["message"])
    conversation_id = server.create(title="Kept", model="fake-model")

    rename = api.patch(f"/api/conversations/{conversation_id}", json={"title": "\x00"})
    assert_openai_error(rename, 400, param="title")
    message = api.post(
        f"/api/conversations/{conversation_id}/messages", json={"content": "hello\x00?"}
    )
    assert_openai_error(message, 400, param="content")
    regenerate = api.post(f"/api/conversations/{conversation_id}/regenerate", json={"model": "\0"})
    assert_openai_error(regenerate, 400, param="model")

    conversation = server.get(conversation_id)
    assert conversation["title"] == "Kept"
    assert conversation["messages"] == []


def test_nul_in_an_id_or_a_cursor_finds_nothing(server: Server) -> None:
    api = server.api
    for method, path in [
        ("GET", ""),
        ("PATCH", ""),
        ("DELETE", ""),
        ("POST", "/messages"),
        ("POST", "/regenerate"),
        ("POST", "/stop"),
    ]:
        body = {"title": "x"} if method == "PATCH" else {"content": "x"} if "mess" in path else None
        response = api.request(method, f"/api/conversations/conv_%00{path}", json=body)
        assert_openai_error(response, 404, code="conversation_not_found")

    cursor = base64.urlsafe_b64encode(b"2024-01-01T00:00:00+00:00|conv_\x00").decode()
    listed = api.get("/api/conversations", params={"after": cursor})
    assert listed.status_code == 200, listed.text


def test_nul_in_model_output_is_stored_as_a_replacement_character(
    server: Server, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.defaults = {"text": "before\x00after and\x00 more"}
    conversation_id = server.create(model="fake-model")

    events = server.send(conversation_id, "say something odd")

    assert events[-1] == "[DONE]"
    answer = server.settled_answer(conversation_id)
    assert answer["status"] == "complete"
    assert answer["content"] == "before\ufffdafter and\ufffd more"
    assert answer["error"] is None


# -- a database that refuses the answer ----------------------------------------------------------

_REFUSE = {
    "sqlite": """
        CREATE TRIGGER refuse_poison BEFORE UPDATE ON messages
        WHEN NEW.content LIKE '%poison%'
        BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;
    """,
    "postgresql": """
        CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS
        $$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$;
        CREATE TRIGGER refuse_poison BEFORE UPDATE ON messages FOR EACH ROW
        WHEN (NEW.content LIKE '%poison%') EXECUTE FUNCTION refuse_poison();
    """,
}
_ALLOW = {
    "sqlite": "DROP TRIGGER refuse_poison;",
    "postgresql": "DROP TRIGGER refuse_poison ON messages; DROP FUNCTION refuse_poison();",
}


def test_an_answer_the_database_refuses_is_never_left_streaming(
    server: Server, fake_upstream: FakeUpstream
) -> None:
    # A real failure, in the database itself: every write of the answer's text fails.
    execute_sql(server.database_url, _REFUSE[server.backend])
    try:
        fake_upstream.defaults = {"text": "poison pill, then the rest of a fine answer"}
        conversation_id = server.create(model="fake-model")

        events = server.send(conversation_id, "write something I cannot keep")

        assert events[-1] == "[DONE]"
        answer = server.settled_answer(conversation_id)
        assert answer["status"] == "error"
        assert answer["error"]
        assert "poison" not in answer["content"]
    finally:
        execute_sql(server.database_url, _ALLOW[server.backend])
    # The conversation goes on once the database accepts writes again.
    fake_upstream.defaults = {}
    server.send(conversation_id, "and now?")
    assert server.settled_answer(conversation_id)["status"] == "complete"


# -- Stop and DELETE before the upstream answers -------------------------------------------------


@contextmanager
def _question_waiting_for_upstream(
    server: Server, fake: FakeUpstream, conversation_id: str
) -> Iterator[tuple[RecordedRequest, Callable[[], list[str]]]]:
    """Send a question whose upstream is slow to answer its headers, in a thread.

    Yields once the upstream has the request, with a function returning the events the
    question's response carried once it ended.
    """
    fake.defaults = dict(SLOW_HEADERS)
    outcome: list[list[str] | BaseException] = []

    def ask() -> None:
        try:
            outcome.append(server.send(conversation_id, "are you there?"))
        except BaseException as exc:  # reported to the test by finished()
            outcome.append(exc)

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()

    def finished() -> list[str]:
        thread.join(10)
        assert outcome, "the question's response never ended"
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0]

    yield fake.last_request(10), finished


def test_stop_before_the_upstream_answers_closes_it_and_saves_stopped(
    server: Server, fake_upstream: FakeUpstream
) -> None:
    conversation_id = server.create(model="fake-model")
    with _question_waiting_for_upstream(server, fake_upstream, conversation_id) as (
        record,
        finished,
    ):
        stopped_at = time.monotonic()
        response = server.api.post(f"/api/conversations/{conversation_id}/stop")

        assert response.status_code == 200, response.text
        assert response.json() == {"stopped": True}
        assert record.wait_for_outcome(ABANDON_DEADLINE) == "abandoned"
        assert record.outcome_at is not None
        assert record.outcome_at - stopped_at < ABANDON_DEADLINE
        assert finished()[-1] == "[DONE]"

    conversation = server.get(conversation_id)
    assert conversation["answering"] is False
    question, answer = conversation["messages"]
    assert question["content"] == "are you there?"
    assert (answer["status"], answer["content"]) == ("stopped", "")
    # Nothing runs on: a second Stop finds nothing, and no other request reached the upstream.
    again = server.api.post(f"/api/conversations/{conversation_id}/stop")
    assert again.json() == {"stopped": False}
    assert len(fake_upstream.chat_requests()) == 1


def test_delete_before_the_upstream_answers_closes_it_and_removes_everything(
    server: Server, fake_upstream: FakeUpstream
) -> None:
    conversation_id = server.create(model="fake-model")
    with _question_waiting_for_upstream(server, fake_upstream, conversation_id) as (
        record,
        finished,
    ):
        deleted_at = time.monotonic()
        response = server.api.delete(f"/api/conversations/{conversation_id}")

        assert response.status_code == 204, response.text
        assert record.wait_for_outcome(ABANDON_DEADLINE) == "abandoned"
        assert record.outcome_at is not None
        assert record.outcome_at - deleted_at < ABANDON_DEADLINE
        assert finished()[-1] == "[DONE]"

    gone = server.api.get(f"/api/conversations/{conversation_id}")
    assert_openai_error(gone, 404, code="conversation_not_found")
    assert len(fake_upstream.chat_requests()) == 1
