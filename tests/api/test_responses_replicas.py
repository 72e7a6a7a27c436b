"""Two tokenrelay processes sharing PostgreSQL and Redis: a response made on one is read,
resumed, chained, cancelled and deleted through the other, as behind a load balancer.

Without PostgreSQL or Redis these tests are skipped, saying which is missing; under CI=true
they fail instead (CI starts both).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import sqlalchemy as sa
from openai.types.responses import Response, ResponseStreamEvent

from conftest import NO_LOCAL_MODEL, Relay, fake_provider_toml, start_tokenrelay
from fake_upstream import FakeUpstream, RecordedRequest, expected_text
from redis_server import REDIS_URL, require_redis
from storage.conftest import _postgres_execute, postgres_admin_url

__all__ = ["postgres_admin_url"]  # a fixture, shared with tests/storage

MODEL = "fake-model"
TEXT = "Every replica tells the same story, word for word, from any sequence number on."
DEADLINE = 20.0


@pytest.fixture(scope="module")
def shared_database_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A new PostgreSQL database for this module's servers, dropped afterwards."""
    require_redis()  # both are needed; say which is missing before starting anything
    admin_url: sa.URL = request.getfixturevalue("postgres_admin_url")
    name = f"tokenrelay_test_{secrets.token_hex(6)}"
    _postgres_execute(admin_url, f'CREATE DATABASE "{name}"')
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        _postgres_execute(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def replicas(
    fake_upstream: FakeUpstream,
    shared_database_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Relay, Relay]]:
    """Processes A and B: one database, one Redis, the same upstream."""
    env = {
        **NO_LOCAL_MODEL,
        "TOKENRELAY_DATABASE_URL": shared_database_url,
        "TOKENRELAY_REDIS_URL": REDIS_URL,
    }
    config = fake_provider_toml(fake_upstream.base_url)
    # One after the other: the second finds the database already migrated.
    with (
        start_tokenrelay(tmp_path_factory.mktemp("a"), config_toml=config, env=env) as a,
        start_tokenrelay(tmp_path_factory.mktemp("b"), config_toml=config, env=env) as b,
    ):
        yield a, b


@pytest.fixture
def clients(replicas: tuple[Relay, Relay]) -> Iterator[tuple[openai.OpenAI, openai.OpenAI]]:
    a, b = replicas
    with (
        openai.OpenAI(base_url=a.v1, api_key="unused", max_retries=0, timeout=DEADLINE) as on_a,
        openai.OpenAI(base_url=b.v1, api_key="unused", max_retries=0, timeout=DEADLINE) as on_b,
    ):
        yield on_a, on_b


def _ended(response: Response) -> bool:
    return response.status not in ("queued", "in_progress")


def _wait_until_ended(client: openai.OpenAI, response_id: str) -> Response:
    deadline = time.monotonic() + DEADLINE
    while not _ended(response := client.responses.retrieve(response_id)):
        assert time.monotonic() < deadline, f"still {response.status}"
        time.sleep(0.02)  # a poll interval, as a client would; nothing waits on it
    return response


def _only_request(fake: FakeUpstream) -> RecordedRequest:
    fake.last_request(timeout=DEADLINE)
    [record] = fake.chat_requests()
    return record


def _deltas(events: list[ResponseStreamEvent]) -> str:
    return "".join(e.delta for e in events if e.type == "response.output_text.delta")


def test_background_stream_dropped_on_one_replica_resumes_on_the_other(
    clients: tuple[openai.OpenAI, openai.OpenAI], fake_upstream: FakeUpstream
) -> None:
    on_a, on_b = clients
    fake_upstream.defaults = {"text": TEXT, "delay": 0.05}

    before: list[ResponseStreamEvent] = []
    with on_a.responses.create(model=MODEL, input="Hi", background=True, stream=True) as stream:
        for event in stream:
            before.append(event)
            if len(before) == 8:
                break
    response_id = before[0].response.id
    with on_b.responses.retrieve(
        response_id, stream=True, starting_after=before[-1].sequence_number
    ) as resumed:
        after = list(resumed)

    events = before + after
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert _deltas(events) == TEXT
    assert events[-1].type == "response.completed"
    assert events[-1].response.output_text == TEXT
    assert _only_request(fake_upstream).wait_for_outcome(DEADLINE) == "completed"
    # And B serves the stored result once it is done.
    assert _wait_until_ended(on_b, response_id).output_text == TEXT


def test_response_made_on_one_replica_is_retrieved_on_the_other(
    clients: tuple[openai.OpenAI, openai.OpenAI], fake_upstream: FakeUpstream
) -> None:
    on_a, on_b = clients
    fake_upstream.defaults = {"text": TEXT}
    whole = on_a.responses.create(model=MODEL, input="Hi", metadata={"made": "on a"})
    fake_upstream.defaults = {"tokens": 20, "delay": 0.05}
    background = on_a.responses.create(model=MODEL, input="Count.", background=True)

    seen = on_b.responses.retrieve(whole.id)
    assert (seen.status, seen.output_text, seen.metadata) == ("completed", TEXT, {"made": "on a"})
    assert seen.usage == whole.usage
    listed = on_b.responses.input_items.list(whole.id)
    assert [item.content[0].text for item in listed.data] == ["Hi"]
    # B reads the status from the database: queued, then in progress once the model answers.
    deadline = time.monotonic() + DEADLINE
    while (running := on_b.responses.retrieve(background.id)).status == "queued":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert running.status == "in_progress"
    finished = _wait_until_ended(on_b, background.id)
    assert (finished.status, finished.output_text) == ("completed", expected_text(20))


def test_previous_response_id_on_one_replica_chains_a_response_made_on_the_other(
    clients: tuple[openai.OpenAI, openai.OpenAI], fake_upstream: FakeUpstream
) -> None:
    on_a, on_b = clients
    fake_upstream.defaults = {"text": "Hello Ada."}
    first = on_a.responses.create(model=MODEL, input="My name is Ada.")
    fake_upstream.defaults = {"text": "You are Ada."}

    with on_b.responses.stream(
        model=MODEL, input="What is my name?", previous_response_id=first.id
    ) as stream:
        second = stream.get_final_response()

    assert second.output_text == "You are Ada."
    messages: list[dict[str, Any]] = fake_upstream.chat_requests()[-1].json["messages"]
    assert messages == [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Hello Ada."},
        {"role": "user", "content": "What is my name?"},
    ]
    assert on_a.responses.retrieve(second.id).previous_response_id == first.id


def test_cancel_on_one_replica_stops_the_answer_running_on_the_other(
    clients: tuple[openai.OpenAI, openai.OpenAI], fake_upstream: FakeUpstream
) -> None:
    on_a, on_b = clients
    fake_upstream.defaults = {"tokens": 400, "delay": 0.05}  # 20 s if nobody stops it
    started = on_a.responses.create(model=MODEL, input="Count.", background=True)
    upstream = _only_request(fake_upstream)
    with on_b.responses.retrieve(started.id, stream=True) as stream:
        for event in stream:
            if event.type == "response.output_text.delta" and event.sequence_number >= 6:
                break

    cancelled = on_b.responses.cancel(started.id)

    assert cancelled.status == "cancelled"
    assert cancelled.output_text
    assert expected_text(400).startswith(cancelled.output_text)
    assert upstream.wait_for_outcome(DEADLINE) == "abandoned"
    assert on_a.responses.retrieve(started.id).output_text == cancelled.output_text


def test_response_deleted_on_one_replica_is_gone_from_the_other(
    clients: tuple[openai.OpenAI, openai.OpenAI], fake_upstream: FakeUpstream
) -> None:
    on_a, on_b = clients
    response = on_a.responses.create(model=MODEL, input="Hi")

    on_b.responses.delete(response.id)

    with pytest.raises(openai.NotFoundError):
        on_a.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError) as raised:
        on_a.responses.create(model=MODEL, input="Again", previous_response_id=response.id)
    assert raised.value.param == "previous_response_id"


def test_response_running_on_one_replica_deleted_on_the_other_stops(
    clients: tuple[openai.OpenAI, openai.OpenAI], fake_upstream: FakeUpstream
) -> None:
    on_a, on_b = clients
    fake_upstream.defaults = {"tokens": 400, "delay": 0.05}  # 20 s if nobody stops it
    started = on_a.responses.create(model=MODEL, input="Count.", background=True)
    upstream = _only_request(fake_upstream)

    on_b.responses.delete(started.id)

    assert upstream.wait_for_outcome(DEADLINE) == "abandoned"
    # A shows the answer it runs until it has ended, a moment after the upstream was closed.
    deadline = time.monotonic() + DEADLINE
    with pytest.raises(openai.NotFoundError):
        while time.monotonic() < deadline:
            on_a.responses.retrieve(started.id)
            time.sleep(0.02)
