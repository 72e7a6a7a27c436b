"""The Responses API (``/v1/responses``) over a real server, through the official openai SDK.

The fake upstream only speaks chat completions, so every answer here is translated both ways.
The request's own ``fake`` options cannot be sent (unknown top-level fields are refused, as
OpenAI refuses them), so each test sets ``FakeUpstream.defaults`` instead. Raw bytes are read
with httpx only where the wire itself is the point (``event:`` names, error shapes).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent

from conftest import (
    Relay,
    assert_no_leak,
    assert_openai_error,
    relay_to,
    start_tokenrelay,
)
from fake_upstream import TOOL_ARGUMENTS, FakeUpstream, RecordedRequest, expected_text

MODEL = "fake-model"
TEXT = "The quick brown fox jumps over the lazy dog, then naps in the warm sun."
WORDS = len(TEXT.split())
"""The fake streams ``TEXT`` a word per chunk and counts a token per word."""
DEADLINE = 20.0
"""Seconds any wait for a response to reach a state may take."""

WEATHER_TOOL: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"location": {"type": "string"}, "unit": {"type": "string"}},
        "required": ["location"],
    },
}

STREAM_ORDER = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    # response.output_text.delta, one per word
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


def _kinds(events: list[ResponseStreamEvent]) -> list[str]:
    """Event types in order, the run of text deltas folded into none (see ``STREAM_ORDER``)."""
    return [event.type for event in events if event.type != "response.output_text.delta"]


def _deltas(events: list[ResponseStreamEvent]) -> str:
    return "".join(e.delta for e in events if e.type == "response.output_text.delta")


def _assert_numbered_from(events: list[ResponseStreamEvent], first: int) -> None:
    numbers = [event.sequence_number for event in events]
    assert numbers == list(range(first, first + len(events))), numbers


def _chat_requests(fake: FakeUpstream, count: int) -> list[RecordedRequest]:
    """Wait for the ``count`` chat requests a test expects the fake to have received."""
    deadline = time.monotonic() + DEADLINE
    while len(requests := fake.chat_requests()) < count:
        assert time.monotonic() < deadline, f"{len(requests)} of {count} upstream requests"
        fake.last_request(timeout=DEADLINE)
    return requests


def _wait_for(
    client: openai.OpenAI, response_id: str, done: Callable[[Response], bool]
) -> Response:
    """Poll ``GET /v1/responses/{id}`` until ``done`` says so, within ``DEADLINE``."""
    deadline = time.monotonic() + DEADLINE
    while True:
        response = client.responses.retrieve(response_id)
        if done(response):
            return response
        assert time.monotonic() < deadline, f"still {response.status}: {response.output}"
        time.sleep(0.02)  # a poll interval, as a client would; nothing waits on it


def _ended(response: Response) -> bool:
    return response.status not in ("queued", "in_progress")


def _messages(record: RecordedRequest) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = record.json["messages"]
    return messages


# --- whole and streamed ------------------------------------------------------------------------


def test_whole_response_is_a_response_object_in_openai_shape(
    openai_client: openai.OpenAI, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.defaults = {"text": TEXT}

    response = openai_client.responses.create(
        model=MODEL,
        input="Tell me about the fox.",
        instructions="Answer briefly.",
        max_output_tokens=50,
        temperature=0.5,
        metadata={"topic": "fox"},
    )

    assert response.id.startswith("resp_")
    assert response.object == "response"
    assert response.status == "completed"
    assert response.model == MODEL
    assert response.output_text == TEXT
    [message] = response.output
    assert message.type == "message"
    assert message.role == "assistant"
    assert [part.type for part in message.content] == ["output_text"]
    assert response.usage is not None
    assert response.usage.output_tokens == WORDS
    assert response.usage.input_tokens > 0
    assert response.usage.total_tokens == response.usage.input_tokens + WORDS
    assert response.metadata == {"topic": "fox"}
    assert response.instructions == "Answer briefly."

    upstream = fake_upstream.last_request()
    assert upstream.path == "/v1/chat/completions"
    assert _messages(upstream) == [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Tell me about the fox."},
    ]
    assert upstream.json["max_tokens"] == 50
    assert upstream.json["temperature"] == 0.5
    assert "stream" not in upstream.json


def test_streamed_response_reads_through_the_sdks_own_parser(
    openai_client: openai.OpenAI, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.defaults = {"text": TEXT}

    with openai_client.responses.create(model=MODEL, input="Hi", stream=True) as stream:
        events = list(stream)

    assert _kinds(events) == STREAM_ORDER
    _assert_numbered_from(events, 0)
    assert _deltas(events) == TEXT
    assert len([e for e in events if e.type == "response.output_text.delta"]) == WORDS
    done = next(e for e in events if e.type == "response.output_item.done")
    assert done.item.type == "message"
    assert done.item.content[0].text == TEXT
    completed = events[-1]
    assert completed.type == "response.completed"
    assert completed.response.output_text == TEXT
    assert completed.response.usage is not None
    assert completed.response.usage.output_tokens == WORDS
    # The stored response is the one the stream ended with.
    stored = openai_client.responses.retrieve(completed.response.id)
    assert stored.status == "completed"
    assert stored.output_text == TEXT


def test_every_streamed_event_is_named_by_its_type(
    relay: Relay, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.defaults = {"tokens": 3}
    body = {"model": MODEL, "input": "Hi", "stream": True}

    response = httpx.post(f"{relay.v1}/responses", json=body, timeout=DEADLINE)

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    blocks = [block for block in response.text.split("\n\n") if block.strip()]
    for block in blocks:
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        assert fields["event"] == json.loads(fields["data"])["type"], block
    assert json.loads(dict(line.split(": ", 1) for line in blocks[-1].split("\n"))["data"])[
        "response"
    ]["output"][0]["content"][0]["text"] == expected_text(3)


def test_stream_helper_gives_the_final_response(
    openai_client: openai.OpenAI, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.defaults = {"text": TEXT}

    with openai_client.responses.stream(model=MODEL, input="Hi") as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()

    assert "".join(deltas) == TEXT
    assert final.status == "completed"
    assert final.output_text == TEXT
    assert final.id.startswith("resp_")


def test_answer_cut_by_max_output_tokens_is_incomplete(
    openai_client: openai.OpenAI, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.defaults = {"text": TEXT, "finish_reason": "length"}

    whole = openai_client.responses.create(model=MODEL, input="Hi", max_output_tokens=15)
    with openai_client.responses.create(
        model=MODEL, input="Hi", max_output_tokens=15, stream=True
    ) as stream:
        events = list(stream)

    assert whole.status == "incomplete"
    assert whole.incomplete_details is not None
    assert whole.incomplete_details.reason == "max_output_tokens"
    assert whole.output_text == TEXT
    last = events[-1]
    assert last.type == "response.incomplete"
    assert last.response.status == "incomplete"
    assert last.response.incomplete_details is not None
    assert last.response.incomplete_details.reason == "max_output_tokens"
    assert last.response.output_text == TEXT
    assert openai_client.responses.retrieve(last.response.id).status == "incomplete"


@pytest.mark.parametrize("failure", [{"error_after": 3}, {"fail_after": 3}])
def test_upstream_failing_mid_answer_ends_with_response_failed(
    openai_client: openai.OpenAI, fake_upstream: FakeUpstream, failure: dict[str, int]
) -> None:
    # The upstream's error quotes its key in every field: none of it may reach the client.
    fake_upstream.defaults = {"text": TEXT, "leak_everywhere": True, **failure}

    with openai_client.responses.create(model=MODEL, input="Hi", stream=True) as stream:
        events = list(stream)

    _assert_numbered_from(events, 0)
    assert _deltas(events) == "The quick brown "
    failed = events[-1]
    assert failed.type == "response.failed"
    assert failed.response.status == "failed"
    assert failed.response.error is not None
    assert failed.response.error.code == "server_error"
    assert_no_leak(failed.response.model_dump_json())
    stored = openai_client.responses.retrieve(failed.response.id)
    assert stored.status == "failed"
    assert stored.error == failed.response.error
    assert stored.output_text == "The quick brown "


def test_upstream_refusing_gives_its_error_in_openai_shape(
    relay: Relay, openai_client: openai.OpenAI, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.defaults = {"status": 429, "retry_after": "7"}

    for stream in (False, True):
        body = {"model": MODEL, "input": "Hi", "stream": stream}
        response = httpx.post(f"{relay.v1}/responses", json=body, timeout=DEADLINE)
        assert_openai_error(response, 429, code="rate_limit_exceeded")
        assert response.headers["retry-after"] == "7"

    # In the background the refusal comes later: the response fails, saying why.
    started = openai_client.responses.create(model=MODEL, input="Hi", background=True)
    failed = _wait_for(openai_client, started.id, _ended)
    assert failed.status == "failed"
    assert failed.error is not None
    assert failed.error.code == "rate_limit_exceeded"
    assert_no_leak(failed.model_dump_json())


# --- tools -------------------------------------------------------------------------------------


def test_function_tool_call_is_a_function_call_item(
    openai_client: openai.OpenAI, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.defaults = {"tool_calls": True}

    response = openai_client.responses.create(
        model=MODEL, input="Weather in Paris?", tools=[WEATHER_TOOL], tool_choice="auto"
    )

    assert response.status == "completed"
    [call] = response.output
    assert call.type == "function_call"
    assert call.name == "get_weather"
    assert call.arguments == TOOL_ARGUMENTS
    assert call.call_id.startswith("call_")
    upstream = fake_upstream.last_request().json
    assert upstream["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The weather in a city.",
                "parameters": WEATHER_TOOL["parameters"],
            },
        }
    ]
    assert upstream["tool_choice"] == "auto"


def test_streamed_function_tool_call_sends_its_arguments_in_pieces(
    openai_client: openai.OpenAI, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.defaults = {"tool_calls": True}

    with openai_client.responses.create(
        model=MODEL, input="Weather in Paris?", tools=[WEATHER_TOOL], stream=True
    ) as stream:
        events = list(stream)

    _assert_numbered_from(events, 0)
    pieces = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert len(pieces) > 1
    assert "".join(pieces) == TOOL_ARGUMENTS
    done = next(e for e in events if e.type == "response.output_item.done")
    assert done.item.type == "function_call"
    assert (done.item.name, done.item.arguments) == ("get_weather", TOOL_ARGUMENTS)
    assert events[-1].type == "response.completed"
    assert [item.type for item in events[-1].response.output] == ["function_call"]


def test_hosted_tool_is_refused_naming_it(
    relay: Relay, openai_client: openai.OpenAI, fake_upstream: FakeUpstream
) -> None:
    body = {"model": MODEL, "input": "News today?", "tools": [{"type": "web_search"}]}

    error = assert_openai_error(
        httpx.post(f"{relay.v1}/responses", json=body, timeout=DEADLINE),
        400,
        param="tools[0].type",
    )
    assert "web_search" in str(error["message"])
    with pytest.raises(openai.BadRequestError) as raised:
        openai_client.responses.create(
            model=MODEL, input="News today?", tools=[{"type": "web_search"}]
        )
    assert raised.value.param == "tools[0].type"
    assert fake_upstream.chat_requests() == []


# --- stored and chained ------------------------------------------------------------------------


def test_previous_response_id_sends_the_earlier_turns_upstream(
    openai_client: openai.OpenAI, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.defaults = {"text": "Hello Ada."}
    first = openai_client.responses.create(
        model=MODEL, input="My name is Ada.", instructions="Be kind."
    )
    fake_upstream.defaults = {"text": "You are Ada."}
    with openai_client.responses.stream(
        model=MODEL, input="What is my name?", previous_response_id=first.id
    ) as stream:
        second = stream.get_final_response()
    fake_upstream.defaults = {"text": "Goodbye."}
    third = openai_client.responses.create(
        model=MODEL, input="Bye.", previous_response_id=second.id
    )

    assert (second.output_text, third.output_text) == ("You are Ada.", "Goodbye.")
    assert second.previous_response_id == first.id
    first_turn, second_turn, third_turn = _chat_requests(fake_upstream, 3)
    assert _messages(first_turn)[0] == {"role": "system", "content": "Be kind."}
    # The earlier turns' input and output, without their instructions (as OpenAI does).
    assert _messages(second_turn) == [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Hello Ada."},
        {"role": "user", "content": "What is my name?"},
    ]
    assert _messages(third_turn) == [
        *_messages(second_turn),
        {"role": "assistant", "content": "You are Ada."},
        {"role": "user", "content": "Bye."},
    ]


def test_function_call_output_continues_a_chain(
    openai_client: openai.OpenAI, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.defaults = {"tool_call_then_text": True, "text": "Sunny in Paris."}
    first = openai_client.responses.create(
        model=MODEL, input="Weather in Paris?", tools=[WEATHER_TOOL]
    )
    [call] = first.output
    assert call.type == "function_call"

    second = openai_client.responses.create(
        model=MODEL,
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
        tools=[WEATHER_TOOL],
    )

    assert second.output_text == "Sunny in Paris."
    assert _messages(_chat_requests(fake_upstream, 2)[1]) == [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.call_id,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": TOOL_ARGUMENTS},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"},
    ]


def test_unstored_response_cannot_be_retrieved_nor_chained(
    openai_client: openai.OpenAI, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.defaults = {"text": TEXT}

    response = openai_client.responses.create(model=MODEL, input="Hi", store=False)

    assert response.output_text == TEXT
    assert response.store is False
    with pytest.raises(openai.NotFoundError):
        openai_client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError) as raised:
        openai_client.responses.create(model=MODEL, input="Hi", previous_response_id=response.id)
    assert raised.value.param == "previous_response_id"


def test_input_items_are_listed_newest_first_in_pages(
    openai_client: openai.OpenAI, fake_upstream: FakeUpstream
) -> None:
    response = openai_client.responses.create(
        model=MODEL,
        input=[
            {"role": "developer", "content": "Be terse."},
            {"role": "user", "content": "One."},
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "Two."}],
            },
        ],
    )

    listed = openai_client.responses.input_items.list(response.id)
    texts = [item.content[0].text for item in listed.data]
    assert texts == ["Two.", "One.", "Be terse."]
    assert [item.role for item in listed.data] == ["user", "user", "developer"]
    assert all(item.id for item in listed.data)

    page = openai_client.responses.input_items.list(response.id, order="asc", limit=2)
    assert [item.content[0].text for item in page.data] == ["Be terse.", "One."]
    assert page.has_more
    rest = openai_client.responses.input_items.list(
        response.id, order="asc", limit=2, after=page.data[-1].id
    )
    assert [item.content[0].text for item in rest.data] == ["Two."]
    assert not rest.has_more


def test_deleted_response_is_gone(
    openai_client: openai.OpenAI, fake_upstream: FakeUpstream
) -> None:
    response = openai_client.responses.create(model=MODEL, input="Hi")

    openai_client.responses.delete(response.id)

    with pytest.raises(openai.NotFoundError):
        openai_client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        openai_client.responses.input_items.list(response.id)
    with pytest.raises(openai.NotFoundError):
        openai_client.responses.delete(response.id)


def test_deleted_running_response_is_gone_and_its_answer_stopped(
    openai_client: openai.OpenAI, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.defaults = {"tokens": 400, "delay": 0.05}
    started = openai_client.responses.create(model=MODEL, input="Count.", background=True)
    [upstream] = _chat_requests(fake_upstream, 1)

    openai_client.responses.delete(started.id)

    with pytest.raises(openai.NotFoundError):
        openai_client.responses.retrieve(started.id)
    assert upstream.wait_for_outcome(DEADLINE) == "abandoned"


def test_previous_response_still_running_is_refused(
    openai_client: openai.OpenAI, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.defaults = {"tokens": 400, "delay": 0.05}
    running = openai_client.responses.create(model=MODEL, input="Count.", background=True)

    # Its answer is not written yet: chaining now would leave it out of the history.
    with pytest.raises(openai.BadRequestError) as raised:
        openai_client.responses.create(
            model=MODEL, input="And then?", previous_response_id=running.id
        )

    assert raised.value.param == "previous_response_id"
    assert running.id in raised.value.message
    # The background answer's own request reaches the upstream (in its own time); the refused
    # chain's never does.
    deadline = time.monotonic() + DEADLINE
    while not fake_upstream.chat_requests():
        assert time.monotonic() < deadline, "the background answer never reached the upstream"
        time.sleep(0.02)
    assert len(fake_upstream.chat_requests()) == 1
    openai_client.responses.cancel(running.id)


def test_streaming_a_response_that_has_no_events_names_the_reason(
    relay: Relay, openai_client: openai.OpenAI, fake_upstream: FakeUpstream
) -> None:
    whole = openai_client.responses.create(model=MODEL, input="Hi")

    response = httpx.get(
        f"{relay.v1}/responses/{whole.id}", params={"stream": "true"}, timeout=DEADLINE
    )

    error = assert_openai_error(response, 400, param="stream")
    assert whole.id in str(error["message"])


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/responses/resp_0123456789abcdef"),
        ("GET", "/v1/responses/resp_0123456789abcdef?stream=true&starting_after=3"),
        ("GET", "/v1/responses/resp_0123456789abcdef/input_items"),
        ("POST", "/v1/responses/resp_0123456789abcdef/cancel"),
        ("DELETE", "/v1/responses/resp_0123456789abcdef"),
        ("GET", "/v1/responses/not-an-id"),
    ],
)
def test_unknown_response_id_is_a_404_in_openai_shape(relay: Relay, method: str, path: str) -> None:
    response = httpx.request(method, f"{relay.url}{path}", timeout=DEADLINE)

    error = assert_openai_error(response, 404)
    assert path.split("/")[3].split("?")[0] in str(error["message"])


def test_unknown_response_id_raises_the_sdks_not_found(openai_client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        openai_client.responses.retrieve("resp_0123456789abcdef")
    assert raised.value.status_code == 404
    assert "resp_0123456789abcdef" in raised.value.message


# --- background, resume, cancel ----------------------------------------------------------------


def test_background_response_is_polled_until_completed(
    openai_client: openai.OpenAI, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.defaults = {"text": TEXT, "delay": 0.05}

    started = openai_client.responses.create(model=MODEL, input="Hi", background=True)

    assert started.status in ("queued", "in_progress")
    assert started.background is True
    finished = _wait_for(openai_client, started.id, _ended)
    assert finished.status == "completed"
    assert finished.output_text == TEXT
    assert finished.usage is not None and finished.usage.output_tokens == WORDS
    [upstream] = _chat_requests(fake_upstream, 1)
    assert upstream.wait_for_outcome(DEADLINE) == "completed"


def test_background_stream_dropped_then_resumed_gives_exactly_the_rest(
    openai_client: openai.OpenAI, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.defaults = {"text": TEXT, "delay": 0.05}

    before: list[ResponseStreamEvent] = []
    with openai_client.responses.create(
        model=MODEL, input="Hi", background=True, stream=True
    ) as stream:
        for event in stream:
            before.append(event)
            if len(before) == 8:
                break  # the connection closes here, mid-answer
    response_id = before[0].response.id
    assert before[0].type == "response.created"
    assert before[0].response.background is True

    with openai_client.responses.retrieve(
        response_id, stream=True, starting_after=before[-1].sequence_number
    ) as resumed:
        after = list(resumed)

    events = before + after
    _assert_numbered_from(events, 0)
    assert _deltas(events) == TEXT
    assert events[-1].type == "response.completed"
    assert events[-1].response.output_text == TEXT
    assert not any(e.type == "response.created" for e in after)
    # Nobody read while it was dropped: it ran on all the same (a background answer).
    [upstream] = _chat_requests(fake_upstream, 1)
    assert upstream.wait_for_outcome(DEADLINE) == "completed"


def test_finished_background_response_can_be_replayed_from_any_event(
    openai_client: openai.OpenAI, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.defaults = {"tokens": 4}
    started = openai_client.responses.create(model=MODEL, input="Hi", background=True)
    _wait_for(openai_client, started.id, lambda r: r.status == "completed")

    with openai_client.responses.retrieve(started.id, stream=True) as whole:
        everything = list(whole)
    with openai_client.responses.stream(response_id=started.id, starting_after=5) as helper:
        tail = list(helper)
        final = helper.get_final_response()

    _assert_numbered_from(everything, 0)
    assert _deltas(everything) == expected_text(4)
    assert [e.sequence_number for e in tail] == [e.sequence_number for e in everything[6:]]
    assert final.output_text == expected_text(4)


def test_cancelled_background_response_keeps_its_partial_output(
    openai_client: openai.OpenAI, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.defaults = {"tokens": 400, "delay": 0.05}  # 20 s if nobody stops it
    started = openai_client.responses.create(model=MODEL, input="Count.", background=True)
    [upstream] = _chat_requests(fake_upstream, 1)
    # Wait until some text was written, then stop it.
    with openai_client.responses.retrieve(started.id, stream=True) as stream:
        for event in stream:
            if event.type == "response.output_text.delta" and event.sequence_number >= 6:
                break

    cancelled = openai_client.responses.cancel(started.id)

    assert cancelled.status == "cancelled"
    partial = cancelled.output_text
    assert partial
    assert expected_text(400).startswith(partial)
    assert len(partial) < len(expected_text(400))
    assert upstream.wait_for_outcome(DEADLINE) == "abandoned"
    again = openai_client.responses.retrieve(started.id)
    assert (again.status, again.output_text) == ("cancelled", partial)
    # Cancelling what has ended changes nothing.
    assert openai_client.responses.cancel(started.id).status == "cancelled"


def test_streamed_foreground_response_whose_client_leaves_is_cancelled(
    openai_client: openai.OpenAI, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.defaults = {"tokens": 400, "delay": 0.05}

    with openai_client.responses.create(model=MODEL, input="Count.", stream=True) as stream:
        created = next(iter(stream))
        for event in stream:
            if event.type == "response.output_text.delta":
                break
    assert created.type == "response.created"
    response_id = created.response.id

    [upstream] = _chat_requests(fake_upstream, 1)
    assert upstream.wait_for_outcome(DEADLINE) == "abandoned"
    stopped = _wait_for(openai_client, response_id, _ended)
    assert stopped.status == "cancelled"
    assert expected_text(400).startswith(stopped.output_text)


def test_response_left_running_by_a_killed_server_is_failed_at_the_next_start(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    fake_upstream.defaults = {"tokens": 400, "delay": 0.05}
    with relay_to(fake_upstream, tmp_path) as first:
        with openai.OpenAI(base_url=first.v1, api_key="unused", max_retries=0) as client:
            started = client.responses.create(model=MODEL, input="Count.", background=True)
            _chat_requests(fake_upstream, 1)
        first.proc.kill()  # no shutdown: nothing of the answer's end is written
        first.proc.wait()

    with (
        relay_to(fake_upstream, tmp_path) as second,
        openai.OpenAI(base_url=second.v1, api_key="unused", max_retries=0) as client,
    ):
        after = client.responses.retrieve(started.id)

    assert after.status == "failed"
    assert after.error is not None
    assert after.error.code == "server_error"
    assert "stopped" in after.error.message


# --- the embedded model ------------------------------------------------------------------------

LOCAL_MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def local_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    """A server with no upstream: the embedded model answers."""
    env = {"TOKENRELAY_LOCAL__CONTEXT_SIZE": "512"}
    with (
        start_tokenrelay(tmp_path_factory.mktemp("local-responses"), env=env) as relay,
        openai.OpenAI(base_url=relay.v1, api_key="unused", max_retries=0, timeout=60) as client,
    ):
        yield client


def test_embedded_model_answers_through_the_responses_api(local_client: openai.OpenAI) -> None:
    whole = local_client.responses.create(
        model=LOCAL_MODEL, input="Write a haiku about rivers.", max_output_tokens=8
    )
    with local_client.responses.create(
        model=LOCAL_MODEL,
        input="Count from 1 to 10.",
        max_output_tokens=8,
        previous_response_id=whole.id,
        stream=True,
    ) as stream:
        events = list(stream)
    # The SDK's `responses.stream` helper wants `response.completed`; eight tokens may end
    # the answer `incomplete` instead, so the events are read as they come.
    _assert_numbered_from(events, 0)
    last = events[-1]
    assert last.type in ("response.completed", "response.incomplete")
    streamed = last.response
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]

    for response in (whole, streamed):
        assert response.output_text
        assert response.usage is not None
        assert 0 < response.usage.output_tokens <= 8
        # Eight tokens rarely finish a haiku: then the answer is incomplete, and says why.
        if response.status == "incomplete":
            assert response.incomplete_details is not None
            assert response.incomplete_details.reason == "max_output_tokens"
        else:
            assert response.status == "completed"
    assert "".join(deltas) == streamed.output_text
    assert local_client.responses.retrieve(streamed.id).output_text == streamed.output_text
