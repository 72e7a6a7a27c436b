"""``/api/conversations``: chats kept on the server, answered as EventStreams, and never lost.

Every test talks to a real ``tokenrelay serve`` over sockets. The conversation API builds the
upstream request itself, so a test shapes the fake upstream's answers with
``fake_upstream.defaults`` rather than per-request ``fake`` options. Streams are decoded with the
openai SDK's own SSE decoder and chunk type, the way our users' clients read them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai._streaming import ServerSentEvent, SSEDecoder
from openai.types.chat import ChatCompletionChunk

from conftest import Relay, assert_no_leak, assert_openai_error, relay_to
from fake_upstream import FakeUpstream, expected_text

FLUSH_LAG_LIMIT = 2.0
"""Seconds a streamed piece of text may take to reach the database (promised: ~1 s behind)."""

SLOW_TOKENS = 400
SLOW = {"tokens": SLOW_TOKENS, "delay": 0.05}
"""An answer that takes ~20 s: long enough to watch, stop or kill it half-way."""

CONTEXT_WINDOW = 2000
"""Tokens of the provider in the trimming tests: a few long turns overflow it."""


# -- fixtures and helpers ----------------------------------------------------------------------


@pytest.fixture
def api(relay: Relay) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=relay.url, timeout=30.0) as client:
        yield client


@contextmanager
def _own_api(
    fake: FakeUpstream, tmp_path: Path, **provider: str | float
) -> Iterator[tuple[Relay, httpx.Client]]:
    """A tokenrelay with its own database file in ``tmp_path``, and a client of it."""
    with (
        relay_to(fake, tmp_path, extra=provider) as relay,
        httpx.Client(base_url=relay.url, timeout=30.0) as client,
    ):
        yield relay, client


@pytest.fixture
def own_api(fake_upstream: FakeUpstream, tmp_path: Path) -> Iterator[httpx.Client]:
    """A client of a tokenrelay whose database only this test writes to."""
    with _own_api(fake_upstream, tmp_path) as (_, client):
        yield client


def _create(api: httpx.Client, **fields: Any) -> str:
    """Create a conversation; return its id."""
    response = api.post("/api/conversations", json=fields)
    assert response.status_code == 201, response.text
    conversation_id: str = response.json()["id"]
    return conversation_id


@pytest.fixture
def new_conversation(api: httpx.Client) -> Iterator[Callable[..., str]]:
    """Create conversations on the shared relay; any answer still running is stopped afterwards."""
    created: list[str] = []

    def create(**fields: Any) -> str:
        created.append(_create(api, **fields))
        return created[-1]

    yield create
    for conversation_id in created:
        api.post(f"/api/conversations/{conversation_id}/stop")


@dataclass
class Turn:
    """One answer's EventStream, decoded: the ``message`` event, then OpenAI chunks."""

    user_message: dict[str, Any] | None
    assistant_message: dict[str, Any]
    events: list[ServerSentEvent] = field(default_factory=list)

    @property
    def chunks(self) -> list[ChatCompletionChunk]:
        return [
            ChatCompletionChunk.model_validate(event.json())
            for event in self.events
            if event.data != "[DONE]" and "error" not in event.json()
        ]

    @property
    def errors(self) -> list[dict[str, Any]]:
        return [
            event.json()["error"]
            for event in self.events
            if event.data != "[DONE]" and "error" in event.json()
        ]

    @property
    def text(self) -> str:
        return "".join(
            chunk.choices[0].delta.content or "" for chunk in self.chunks if chunk.choices
        )

    @property
    def done(self) -> bool:
        return bool(self.events) and self.events[-1].data == "[DONE]"


class LiveTurn(Turn):
    """A turn still streaming to the test, read one event at a time."""

    def __init__(self, response: httpx.Response) -> None:
        assert response.status_code == 200, response.read().decode()
        assert response.headers["content-type"].startswith("text/event-stream")
        self._stream = SSEDecoder().iter_bytes(response.iter_bytes())
        first = next(self._stream)
        assert first.event == "message", first
        ids = first.json()
        super().__init__(ids["user_message"], ids["assistant_message"])

    def read_until_text(self) -> str:
        """Read until the answer has some text; return it."""
        for event in self._stream:
            assert event.event is None, event
            self.events.append(event)
            if self.text:
                return self.text
        raise AssertionError(f"the stream ended before any text: {self.events}")

    def read_to_end(self) -> None:
        self.events.extend(self._stream)


def _read_turn(response: httpx.Response) -> Turn:
    live = LiveTurn(response)
    live.read_to_end()
    return live


@contextmanager
def _answering(
    api: httpx.Client, conversation_id: str, content: str, **fields: Any
) -> Iterator[LiveTurn]:
    """Send a message and hold its stream open, unread past the ``message`` event."""
    with api.stream(
        "POST",
        f"/api/conversations/{conversation_id}/messages",
        json={"content": content, **fields},
    ) as response:
        yield LiveTurn(response)


def _send(api: httpx.Client, conversation_id: str, content: str, **fields: Any) -> Turn:
    """Send a message and read the whole answer."""
    with _answering(api, conversation_id, content, **fields) as turn:
        turn.read_to_end()
        return turn


def _regenerate(api: httpx.Client, conversation_id: str, **fields: Any) -> Turn:
    """Answer the last question again and read the whole new answer."""
    with api.stream(
        "POST", f"/api/conversations/{conversation_id}/regenerate", json=fields or None
    ) as response:
        return _read_turn(response)


LongAnswer = Callable[[str], AbstractContextManager[tuple[str, LiveTurn]]]


@pytest.fixture
def long_answer(
    api: httpx.Client, fake_upstream: FakeUpstream, new_conversation: Callable[..., str]
) -> LongAnswer:
    """Ask ``question`` in a new conversation and get a SLOW answer, held open while it runs.

    ``with long_answer(question) as (conversation_id, turn)`` enters once the answer has some
    text and, on leaving, reads the stream to its end: the block must stop (or delete) it.
    """

    @contextmanager
    def ask(question: str) -> Iterator[tuple[str, LiveTurn]]:
        fake_upstream.defaults = dict(SLOW)
        conversation_id = new_conversation(model="fake-model")
        with _answering(api, conversation_id, question) as turn:
            turn.read_until_text()
            yield conversation_id, turn
            turn.read_to_end()

    return ask


def _get(api: httpx.Client, conversation_id: str) -> dict[str, Any]:
    response = api.get(f"/api/conversations/{conversation_id}")
    assert response.status_code == 200, response.text
    conversation: dict[str, Any] = response.json()
    return conversation


def _message(conversation: dict[str, Any], message_id: str) -> dict[str, Any]:
    found = [m for m in conversation["messages"] if m["id"] == message_id]
    assert found, f"message {message_id} is not in {conversation['messages']}"
    return found[0]


def _poll_message(
    api: httpx.Client,
    conversation_id: str,
    message_id: str,
    until: Callable[[dict[str, Any]], bool],
    *,
    timeout: float = 15.0,
) -> dict[str, Any]:
    """GET the conversation until the message satisfies ``until``; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        message = _message(_get(api, conversation_id), message_id)
        if until(message):
            return message
        if time.monotonic() > deadline:
            pytest.fail(f"message never reached the expected state within {timeout} s: {message}")
        time.sleep(0.05)  # the pause between polls, not a synchronisation


def _is_partial_answer(text: str, whole: str) -> bool:
    return 0 < len(text) < len(whole) and whole.startswith(text)


# -- creating, reading, renaming, deleting -----------------------------------------------------


def test_create_returns_201_with_the_conversation(api: httpx.Client) -> None:
    response = api.post(
        "/api/conversations",
        json={"title": "Trip", "model": "fake-model", "system": "Be brief."},
    )

    assert response.status_code == 201, response.text
    created = response.json()
    assert created["id"].startswith("conv_")
    assert created["title"] == "Trip"
    assert created["model"] == "fake-model"
    assert created["system"] == "Be brief."
    conversation = _get(api, created["id"])
    assert conversation["messages"] == []
    assert conversation["answering"] is False
    assert conversation["title"] == "Trip"


def test_create_with_an_empty_body_leaves_everything_unset(api: httpx.Client) -> None:
    response = api.post("/api/conversations", json={})

    assert response.status_code == 201, response.text
    created = response.json()
    assert (created["title"], created["model"], created["system"]) == (None, None, None)


def test_create_with_an_unknown_model_is_404_model_not_found(api: httpx.Client) -> None:
    response = api.post("/api/conversations", json={"model": "no-such-model"})

    assert_openai_error(response, 404, code="model_not_found", param="model")


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b'"a title"', None),
        (b'{"colour": "blue"}', "colour"),
        (b'{"title": 7}', "title"),
        (b'{"model": ""}', "model"),
        (b'{"system": ["a", "b"]}', "system"),
    ],
)
def test_create_with_a_bad_body_is_400(api: httpx.Client, raw: bytes, param: str | None) -> None:
    response = api.post(
        "/api/conversations", content=raw, headers={"Content-Type": "application/json"}
    )

    error = assert_openai_error(response, 400)
    if param is not None:
        assert error["param"] == param


@pytest.mark.parametrize(
    ("method", "suffix", "body"),
    [
        ("GET", "", None),
        ("PATCH", "", {"title": "x"}),
        ("DELETE", "", None),
        ("POST", "/messages", {"content": "hello?"}),
        ("POST", "/regenerate", None),
        ("POST", "/stop", None),
    ],
)
def test_unknown_conversation_is_404_in_openai_shape(
    api: httpx.Client, method: str, suffix: str, body: dict[str, Any] | None
) -> None:
    response = api.request(method, f"/api/conversations/conv_doesNotExist0000{suffix}", json=body)

    error = assert_openai_error(response, 404, code="conversation_not_found")
    assert "conv_doesNotExist0000" in str(error["message"])


def test_rename_changes_only_the_title(
    api: httpx.Client, new_conversation: Callable[..., str]
) -> None:
    conversation_id = new_conversation(title="Old", system="Be brief.")

    response = api.patch(f"/api/conversations/{conversation_id}", json={"title": "New name"})

    assert response.status_code == 200, response.text
    assert response.json()["title"] == "New name"
    conversation = _get(api, conversation_id)
    assert conversation["title"] == "New name"
    assert conversation["system"] == "Be brief."
    cleared = api.patch(f"/api/conversations/{conversation_id}", json={"title": None})
    assert cleared.status_code == 200, cleared.text
    assert _get(api, conversation_id)["title"] is None


@pytest.mark.parametrize("body", [{}, {"title": 3}, {"title": "x", "model": "fake-model"}])
def test_rename_with_a_bad_body_is_400(
    api: httpx.Client, new_conversation: Callable[..., str], body: dict[str, Any]
) -> None:
    conversation_id = new_conversation(title="Kept")

    response = api.patch(f"/api/conversations/{conversation_id}", json=body)

    assert_openai_error(response, 400)
    assert _get(api, conversation_id)["title"] == "Kept"


def test_delete_is_204_then_404(api: httpx.Client, new_conversation: Callable[..., str]) -> None:
    conversation_id = new_conversation(model="fake-model")
    _send(api, conversation_id, "something to delete")

    response = api.delete(f"/api/conversations/{conversation_id}")

    assert response.status_code == 204
    assert response.content == b""
    gone = api.get(f"/api/conversations/{conversation_id}")
    assert_openai_error(gone, 404, code="conversation_not_found")
    again = api.delete(f"/api/conversations/{conversation_id}")
    assert_openai_error(again, 404, code="conversation_not_found")


def test_delete_while_answering_stops_the_upstream_request(
    api: httpx.Client, fake_upstream: FakeUpstream, long_answer: LongAnswer
) -> None:
    with long_answer("long answer please") as (conversation_id, _):
        response = api.delete(f"/api/conversations/{conversation_id}")
        assert response.status_code == 204

    [record] = fake_upstream.chat_requests()
    assert record.wait_for_outcome(5) == "abandoned"
    assert api.get(f"/api/conversations/{conversation_id}").status_code == 404


# -- listing -----------------------------------------------------------------------------------


def test_list_is_newest_activity_first_and_pages_with_cursors(own_api: httpx.Client) -> None:
    a, b, c, d, e = [_create(own_api, title=name, model="fake-model") for name in "abcde"]
    _send(own_api, b, "b is active again")  # activity moves b to the top
    renamed = own_api.patch(f"/api/conversations/{c}", json={"title": "c2"})  # no activity
    assert renamed.status_code == 200

    whole = own_api.get("/api/conversations").json()
    assert [conv["id"] for conv in whole["data"]] == [b, e, d, c, a]
    assert whole["has_more"] is False
    assert whole["next_cursor"] is None

    pages: list[list[str]] = []
    params: dict[str, Any] = {"limit": 2}
    while True:
        response = own_api.get("/api/conversations", params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        pages.append([conv["id"] for conv in page["data"]])
        if not page["has_more"]:
            assert page["next_cursor"] is None
            break
        assert page["next_cursor"]
        params = {"limit": 2, "after": page["next_cursor"]}
    assert pages == [[b, e], [d, c], [a]]


def test_list_of_an_empty_database_is_empty(own_api: httpx.Client) -> None:
    response = own_api.get("/api/conversations")

    assert response.status_code == 200
    assert response.json() == {"data": [], "has_more": False, "next_cursor": None}


@pytest.mark.parametrize(
    "params",
    [{"limit": 0}, {"limit": 201}, {"limit": "ten"}, {"after": "not-a-cursor"}, {"after": "!!"}],
)
def test_list_with_bad_parameters_is_400(api: httpx.Client, params: dict[str, Any]) -> None:
    response = api.get("/api/conversations", params=params)

    assert_openai_error(response, 400, param=next(iter(params)))


# -- sending messages --------------------------------------------------------------------------


def test_message_streams_ids_then_openai_chunks_then_done(
    api: httpx.Client, fake_upstream: FakeUpstream, new_conversation: Callable[..., str]
) -> None:
    conversation_id = new_conversation(model="fake-model")

    with api.stream(
        "POST",
        f"/api/conversations/{conversation_id}/messages",
        json={"content": "What is Hyperf?"},
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        turn = _read_turn(response)
        stream_id = response.headers["x-tokenrelay-stream"]

    assert turn.user_message is not None
    assert turn.user_message["id"].startswith("msg_")
    assert turn.user_message["role"] == "user"
    assert turn.user_message["content"] == "What is Hyperf?"
    assert turn.assistant_message["id"].startswith("msg_")
    assert turn.assistant_message["role"] == "assistant"
    assert turn.assistant_message["status"] == "streaming"
    # The preamble names the answer's log, so a client that drops can resume it.
    assert turn.assistant_message["stream_id"] == stream_id
    assert turn.user_message["stream_id"] is None
    assert turn.done
    assert [event.event for event in turn.events] == [None] * len(turn.events)
    assert turn.errors == []
    assert {chunk.object for chunk in turn.chunks} == {"chat.completion.chunk"}
    assert turn.text == expected_text(5)

    conversation = _get(api, conversation_id)
    assert conversation["answering"] is False
    assert conversation["title"] == "What is Hyperf?"  # named after the first question
    user, assistant = conversation["messages"]
    assert user["id"] == turn.user_message["id"]
    assert (user["role"], user["content"], user["status"]) == (
        "user",
        "What is Hyperf?",
        "complete",
    )
    assert assistant["id"] == turn.assistant_message["id"]
    assert assistant["role"] == "assistant"
    assert assistant["content"] == expected_text(5)
    assert assistant["status"] == "complete"
    assert assistant["error"] is None
    assert assistant["model"] == "fake-model"
    assert assistant["completion_tokens"] == 5
    assert isinstance(assistant["prompt_tokens"], int)
    assert assistant["prompt_tokens"] > 0


def test_model_sees_the_system_prompt_then_the_whole_history_in_order(
    api: httpx.Client, fake_upstream: FakeUpstream, new_conversation: Callable[..., str]
) -> None:
    conversation_id = new_conversation(model="fake-model", system="You are terse.")
    fake_upstream.defaults = {"tokens": 2}
    _send(api, conversation_id, "first question")
    fake_upstream.defaults = {"tokens": 3}
    _send(api, conversation_id, "second question")
    fake_upstream.defaults = {}

    turn = _send(api, conversation_id, "third question")

    assert turn.text == expected_text(5)
    sent = fake_upstream.chat_requests()[-1].json
    assert sent["model"] == "fake-model"
    assert sent["stream"] is True
    assert sent["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": expected_text(2)},
        {"role": "user", "content": "second question"},
        {"role": "assistant", "content": expected_text(3)},
        {"role": "user", "content": "third question"},
    ]


def test_conversation_without_a_model_uses_the_first_listed(
    api: httpx.Client, fake_upstream: FakeUpstream, new_conversation: Callable[..., str]
) -> None:
    conversation_id = new_conversation()

    turn = _send(api, conversation_id, "anyone there?")

    assert turn.text == expected_text(5)
    assert fake_upstream.chat_requests()[-1].json["model"] == "fake-model"
    assert _get(api, conversation_id)["messages"][1]["model"] == "fake-model"


def test_message_model_overrides_the_conversations(
    api: httpx.Client, fake_upstream: FakeUpstream, new_conversation: Callable[..., str]
) -> None:
    conversation_id = new_conversation(model="fake-model")

    turn = _send(api, conversation_id, "ask the other one", model="fake-other")

    assert fake_upstream.chat_requests()[-1].json["model"] == "fake-other"
    assert _message(_get(api, conversation_id), turn.assistant_message["id"])["model"] == (
        "fake-other"
    )


def test_message_for_an_unknown_model_is_404_and_stores_nothing(
    api: httpx.Client, fake_upstream: FakeUpstream, new_conversation: Callable[..., str]
) -> None:
    conversation_id = new_conversation(model="fake-model")

    response = api.post(
        f"/api/conversations/{conversation_id}/messages",
        json={"content": "hello", "model": "no-such-model"},
    )

    assert_openai_error(response, 404, code="model_not_found")
    assert _get(api, conversation_id)["messages"] == []
    assert fake_upstream.chat_requests() == []


@pytest.mark.parametrize(
    "body",
    [{}, {"content": ""}, {"content": 5}, {"content": "hi", "role": "system"}, {"model": "x"}],
)
def test_message_with_a_bad_body_is_400_and_stores_nothing(
    api: httpx.Client, new_conversation: Callable[..., str], body: dict[str, Any]
) -> None:
    conversation_id = new_conversation(model="fake-model")

    response = api.post(f"/api/conversations/{conversation_id}/messages", json=body)

    assert_openai_error(response, 400)
    assert _get(api, conversation_id)["messages"] == []


def test_history_is_trimmed_to_the_context_window_oldest_first(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    # Each question is ~1200 characters, at least ~300 tokens: six overflow 2000 tokens.
    questions = [f"question {i}: " + "lorem ipsum dolor " * 66 for i in range(6)]
    with _own_api(fake_upstream, tmp_path, context_window=CONTEXT_WINDOW) as (_, client):
        conversation_id = _create(client, model="fake-model", system="Be brief.")
        for question in questions:
            _send(client, conversation_id, question)

        # Everything but the answer to the last question, which the model had not written yet.
        history = [
            {"role": m["role"], "content": m["content"]}
            for m in _get(client, conversation_id)["messages"][:-1]
        ]
        sent = fake_upstream.chat_requests()[-1].json["messages"]
        assert sent[0] == {"role": "system", "content": "Be brief."}
        assert sent[-1] == {"role": "user", "content": questions[-1]}
        kept = sent[1:]
        assert kept == history[-len(kept) :], "not a contiguous, newest part of the history"
        assert {"role": "user", "content": questions[0]} not in kept, "nothing was trimmed"
        assert {"role": "user", "content": questions[-2]} in kept, "trimmed more than needed"

        # A question longer than the whole window is still sent, with nothing before it.
        huge = "tell me everything about " + "this " * 3000
        turn = _send(client, conversation_id, huge)
        assert turn.text == expected_text(5)
        assert fake_upstream.chat_requests()[-1].json["messages"] == [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": huge},
        ]


# -- nothing lost --------------------------------------------------------------------------------


def test_upstream_error_keeps_the_question_and_records_the_error(
    api: httpx.Client, fake_upstream: FakeUpstream, new_conversation: Callable[..., str]
) -> None:
    conversation_id = new_conversation(model="fake-model")
    fake_upstream.defaults = {"status": 500}

    response = api.post(
        f"/api/conversations/{conversation_id}/messages", json={"content": "still there?"}
    )

    assert_openai_error(response, 502)
    conversation = _get(api, conversation_id)
    assert conversation["answering"] is False
    user, assistant = conversation["messages"]
    assert (user["role"], user["content"], user["status"]) == ("user", "still there?", "complete")
    assert assistant["role"] == "assistant"
    assert assistant["status"] == "error"
    assert assistant["content"] == ""
    assert assistant["error"]
    assert_no_leak(assistant["error"])


def test_upstream_cut_mid_answer_keeps_the_partial_text_as_an_error(
    api: httpx.Client, fake_upstream: FakeUpstream, new_conversation: Callable[..., str]
) -> None:
    conversation_id = new_conversation(model="fake-model")
    fake_upstream.defaults = {"tokens": 5, "fail_after": 2}

    turn = _send(api, conversation_id, "cut me off")

    assert turn.text == expected_text(2)
    assert len(turn.errors) == 1
    assert_no_leak(str(turn.errors))
    assistant = _message(_get(api, conversation_id), turn.assistant_message["id"])
    assert assistant["status"] == "error"
    assert assistant["content"] == expected_text(2)
    assert assistant["error"]


def test_answer_is_stored_as_it_grows(api: httpx.Client, long_answer: LongAnswer) -> None:
    whole = expected_text(SLOW_TOKENS)

    with long_answer("take your time") as (conversation_id, turn):
        first_text_at = time.monotonic()
        assistant_id = turn.assistant_message["id"]

        stored = _poll_message(api, conversation_id, assistant_id, lambda m: bool(m["content"]))
        lag = time.monotonic() - first_text_at
        assert lag < FLUSH_LAG_LIMIT, f"the first text reached the database {lag:.2f} s late"
        assert stored["status"] == "streaming"
        assert _is_partial_answer(stored["content"], whole), stored["content"]
        assert _get(api, conversation_id)["answering"] is True

        grown = _poll_message(
            api, conversation_id, assistant_id, lambda m: len(m["content"]) > len(stored["content"])
        )
        assert grown["status"] == "streaming"
        assert _is_partial_answer(grown["content"], whole), grown["content"]

        assert api.post(f"/api/conversations/{conversation_id}/stop").json() == {"stopped": True}


def test_client_leaving_does_not_lose_the_answer(
    api: httpx.Client, fake_upstream: FakeUpstream, new_conversation: Callable[..., str]
) -> None:
    fake_upstream.defaults = {"tokens": 40, "delay": 0.03}
    conversation_id = new_conversation(model="fake-model")

    with _answering(api, conversation_id, "answer even if I leave") as turn:
        turn.read_until_text()
        assistant_id = turn.assistant_message["id"]
    # The response is closed: this client has gone away half-way through the answer.

    assistant = _poll_message(
        api, conversation_id, assistant_id, lambda m: m["status"] != "streaming"
    )
    assert assistant["status"] == "complete"
    assert assistant["content"] == expected_text(40)
    assert assistant["completion_tokens"] == 40
    [record] = fake_upstream.chat_requests()
    assert record.wait_for_outcome(5) == "completed"


def test_stop_keeps_the_partial_text_and_closes_the_upstream_request(
    api: httpx.Client, fake_upstream: FakeUpstream, long_answer: LongAnswer
) -> None:
    with long_answer("a long story please") as (conversation_id, turn):
        response = api.post(f"/api/conversations/{conversation_id}/stop")
        assert response.status_code == 200, response.text
        assert response.json() == {"stopped": True}

    assert turn.done
    [record] = fake_upstream.chat_requests()
    assert record.wait_for_outcome(5) == "abandoned"
    conversation = _get(api, conversation_id)
    assert conversation["answering"] is False
    assistant = _message(conversation, turn.assistant_message["id"])
    assert assistant["status"] == "stopped"
    assert _is_partial_answer(assistant["content"], expected_text(SLOW_TOKENS))
    assert assistant["content"].startswith(turn.text)
    # Nothing is running any more: a second stop finds nothing, and the conversation goes on.
    assert api.post(f"/api/conversations/{conversation_id}/stop").json() == {"stopped": False}
    fake_upstream.defaults = {}
    assert _send(api, conversation_id, "and now briefly").text == expected_text(5)


def test_stop_with_nothing_running_says_so(
    api: httpx.Client, new_conversation: Callable[..., str]
) -> None:
    conversation_id = new_conversation(model="fake-model")

    response = api.post(f"/api/conversations/{conversation_id}/stop")

    assert response.status_code == 200
    assert response.json() == {"stopped": False}


def test_sending_while_answering_is_400_conversation_busy(
    api: httpx.Client, fake_upstream: FakeUpstream, long_answer: LongAnswer
) -> None:
    with long_answer("first") as (conversation_id, _):
        response = api.post(
            f"/api/conversations/{conversation_id}/messages", json={"content": "second"}
        )
        assert_openai_error(response, 400, code="conversation_busy")
        regenerate = api.post(f"/api/conversations/{conversation_id}/regenerate")
        assert_openai_error(regenerate, 400, code="conversation_busy")
        api.post(f"/api/conversations/{conversation_id}/stop")

    contents = [m["content"] for m in _get(api, conversation_id)["messages"]]
    assert "second" not in contents
    assert len(fake_upstream.chat_requests()) == 1


def test_two_messages_sent_at_once_start_one_answer(
    api: httpx.Client, fake_upstream: FakeUpstream, new_conversation: Callable[..., str]
) -> None:
    # Short: if both were let through, only one of them could be stopped afterwards.
    fake_upstream.defaults = {"tokens": 20, "delay": 0.05}
    conversation_id = new_conversation(model="fake-model")
    start = threading.Barrier(2)
    statuses: list[int] = []

    def send(content: str) -> None:
        with httpx.Client(base_url=api.base_url, timeout=30.0) as client:
            start.wait(10)
            with client.stream(
                "POST",
                f"/api/conversations/{conversation_id}/messages",
                json={"content": content},
            ) as response:
                statuses.append(response.status_code)

    threads = [threading.Thread(target=send, args=(text,)) for text in ("one", "two")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    api.post(f"/api/conversations/{conversation_id}/stop")

    assert sorted(statuses) == [200, 400]
    users = [m for m in _get(api, conversation_id)["messages"] if m["role"] == "user"]
    assert len(users) == 1
    assert len(fake_upstream.chat_requests()) == 1


# -- regenerate ----------------------------------------------------------------------------------


def test_regenerate_replaces_the_last_answer(
    api: httpx.Client, fake_upstream: FakeUpstream, new_conversation: Callable[..., str]
) -> None:
    conversation_id = new_conversation(model="fake-model", system="Be brief.")
    first = _send(api, conversation_id, "what is 2 + 2?")
    fake_upstream.defaults = {"tokens": 3}

    again = _regenerate(api, conversation_id)

    assert again.user_message is None
    assert again.assistant_message["id"] != first.assistant_message["id"]
    assert again.done
    assert again.text == expected_text(3)
    user, assistant = _get(api, conversation_id)["messages"]
    assert first.user_message is not None
    assert user["id"] == first.user_message["id"]
    assert assistant["id"] == again.assistant_message["id"]
    assert (assistant["content"], assistant["status"]) == (expected_text(3), "complete")
    # The model is asked the question again, without the answer being replaced.
    assert fake_upstream.chat_requests()[-1].json["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "what is 2 + 2?"},
    ]


def test_regenerate_with_a_model_uses_it(
    api: httpx.Client, fake_upstream: FakeUpstream, new_conversation: Callable[..., str]
) -> None:
    conversation_id = new_conversation(model="fake-model")
    _send(api, conversation_id, "hello")

    again = _regenerate(api, conversation_id, model="fake-other")

    assert fake_upstream.chat_requests()[-1].json["model"] == "fake-other"
    assistant = _message(_get(api, conversation_id), again.assistant_message["id"])
    assert assistant["model"] == "fake-other"


def test_regenerate_without_a_question_is_400(
    api: httpx.Client, new_conversation: Callable[..., str]
) -> None:
    conversation_id = new_conversation(model="fake-model")

    response = api.post(f"/api/conversations/{conversation_id}/regenerate")

    assert_openai_error(response, 400)


# -- many at once -------------------------------------------------------------------------------


def test_many_answers_at_once_all_finish_and_are_saved_whole(
    own_api: httpx.Client, fake_upstream: FakeUpstream
) -> None:
    # Each answer lasts about one flush interval (1 s), a little longer or shorter each round,
    # so answers end while their own and the others' periodic saves are being written.
    conversations = [_create(own_api, model="fake-model") for _ in range(30)]

    def send(conversation_id: str, question: str, finished: list[str]) -> None:
        # A stuck answer's connection is cut when the server stops, after the assertion below
        # has said what went wrong.
        with (
            httpx.Client(base_url=own_api.base_url, timeout=60.0) as client,
            suppress(httpx.TransportError),
        ):
            if _send(client, conversation_id, question).done:
                finished.append(conversation_id)

    delays = (0.045, 0.05, 0.055, 0.0475, 0.0525)
    for round_, delay in enumerate(delays):
        fake_upstream.defaults = {"tokens": 20, "delay": delay}
        finished: list[str] = []
        threads = [
            threading.Thread(target=send, args=(c, f"question {round_}", finished), daemon=True)
            for c in conversations
        ]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = sorted(set(conversations) - set(finished))
        assert not stuck, (
            f"round {round_}: {len(stuck)} answers never ended; one of them is stored as "
            f"{_get(own_api, stuck[0])['messages'][-1]}"
        )

    for conversation_id in conversations:
        answers = [
            m for m in _get(own_api, conversation_id)["messages"] if m["role"] == "assistant"
        ]
        assert [(m["status"], m["content"]) for m in answers] == [
            ("complete", expected_text(20))
        ] * len(delays)


# -- a crash -------------------------------------------------------------------------------------


def test_answer_cut_by_sigkill_is_kept_as_interrupted(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    fake_upstream.defaults = dict(SLOW)
    with _own_api(fake_upstream, tmp_path) as (relay, client):
        conversation_id = _create(client, model="fake-model")
        with _answering(client, conversation_id, "write until you crash") as turn:
            assistant_id = turn.assistant_message["id"]
            stored = _poll_message(
                client, conversation_id, assistant_id, lambda m: bool(m["content"])
            )
            relay.proc.kill()
            relay.proc.wait(10)
        [record] = fake_upstream.chat_requests()
        assert record.wait_for_outcome(5) == "abandoned"

    fake_upstream.defaults = {}
    with _own_api(fake_upstream, tmp_path) as (_, client):
        conversation = _get(client, conversation_id)
        assert conversation["answering"] is False
        user, assistant = conversation["messages"]
        assert (user["content"], user["status"]) == ("write until you crash", "complete")
        assert assistant["id"] == assistant_id
        assert assistant["status"] == "interrupted"
        assert assistant["content"].startswith(stored["content"])
        assert _is_partial_answer(assistant["content"], expected_text(SLOW_TOKENS))
        # The conversation goes on after the crash, and the cut answer is part of its history.
        assert _send(client, conversation_id, "go on").text == expected_text(5)
        assert fake_upstream.chat_requests()[-1].json["messages"][1] == {
            "role": "assistant",
            "content": assistant["content"],
        }
