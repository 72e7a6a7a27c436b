"""Chat chunks in, Responses events out, read back with the openai SDK's own parser and types.

Every stream here goes through the SDK's ``SSEDecoder`` (split at awkward byte boundaries, as a
network delivers it), each event is validated against the SDK's ``ResponseStreamEvent`` union,
and the events are accumulated by the SDK's ``ResponseStreamState`` (what
``client.responses.stream()`` uses), which asserts that every delta lands in an item it knows.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from openai import omit
from openai._streaming import SSEDecoder
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from tokenrelay.errors import RateLimited, UpstreamUnavailable
from tokenrelay.responses.events import (
    ResponseStream,
    response_from_completion,
    response_object,
)
from tokenrelay.responses.history import ToolName
from tokenrelay.responses.request import parse_request, translate

EVENT = TypeAdapter(ResponseStreamEvent)
USAGE = {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}
DONE = b"data: [DONE]\n\n"


def chunk(
    delta: dict[str, Any] | None = None,
    finish: str | None = None,
    usage: dict[str, Any] | None = None,
) -> bytes:
    """One chat-completion chunk event, as an OpenAI-compatible upstream sends it."""
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [],
    }
    if delta is not None or finish is not None:
        body["choices"] = [{"index": 0, "delta": delta or {}, "finish_reason": finish}]
    if usage is not None:
        body["usage"] = usage
    return b"data: " + orjson.dumps(body) + b"\n\n"


def call_delta(index: int, arguments: str, **start: str) -> bytes:
    """A tool-call delta; ``start`` (``id``, ``name``) only on a call's first piece."""
    call: dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
    if start:
        call.update(id=start["id"], type="function")
        call["function"]["name"] = start["name"]
    return chunk({"tool_calls": [call]})


def new_stream(**request: Any) -> ResponseStream:
    chat = translate(parse_request({"model": "m", "input": "hi", "stream": True, **request}))
    return ResponseStream("resp_test", fields=chat.fields, tool_names=chat.tool_names)


def run(stream: ResponseStream, *pieces: bytes) -> list[bytes]:
    events = stream.start()
    for piece in pieces:
        events.extend(stream.feed(piece))
    return events


def _split(data: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def read_with_sdk(frames: list[bytes], tools: list[dict[str, Any]] | None = None) -> list[Any]:
    """Decode and validate as the SDK does; check names, numbering and accumulation."""
    events = []
    state = ResponseStreamState(input_tools=tools or omit, text_format=omit)
    for sse in SSEDecoder().iter_bytes(_split(b"".join(frames), 7)):
        data = sse.json()
        event = EVENT.validate_python(data)
        assert sse.event == event.type
        state.handle_event(event)
        events.append(event)
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert len(events) == len(frames)  # one frame, one event
    return events


def types(events: list[Any]) -> list[str]:
    return [event.type for event in events]


def test_a_text_answer_streams_in_openai_order() -> None:
    stream = new_stream()
    frames = run(
        stream,
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Hello"}) + chunk({"content": ", "}),
        chunk({"content": "world"}),
        chunk({}, "stop") + chunk(usage=USAGE) + DONE,
    )
    events = read_with_sdk(frames)
    assert types(events) == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert events[0].response.status == "in_progress"
    assert events[0].response.output == []
    assert [e.delta for e in events if e.type == "response.output_text.delta"] == [
        "Hello",
        ", ",
        "world",
    ]
    assert events[7].text == "Hello, world"
    done_item = events[9].item
    assert done_item.status == "completed"
    assert done_item.content[0].text == "Hello, world"
    completed = events[-1].response
    assert completed.id == "resp_test"
    assert completed.status == "completed"
    assert completed.output_text == "Hello, world"
    assert completed.output[0].id == events[2].item.id
    assert completed.output[0].id.startswith("msg_")
    assert completed.usage is not None
    assert (completed.usage.input_tokens, completed.usage.output_tokens) == (12, 7)
    assert completed.usage.total_tokens == 19
    assert completed.usage.input_tokens_details.cached_tokens == 0
    assert completed.usage.output_tokens_details.reasoning_tokens == 0
    assert completed.completed_at is not None
    assert stream.done and stream.feed(chunk({"content": "late"})) == []


def test_one_event_per_piece_or_all_in_one_piece_give_the_same_events() -> None:
    pieces = [
        chunk({"content": "a"}),
        chunk({"content": "b"}),
        call_delta(0, '{"x"', id="call_1", name="f"),
        call_delta(0, ":1}"),
        chunk({}, "tool_calls"),
        chunk(usage=USAGE),
        DONE,
    ]
    tools = [{"type": "function", "name": "f"}]
    apart = read_with_sdk(run(new_stream(tools=tools), *pieces))
    together = read_with_sdk(run(new_stream(tools=tools), b"".join(pieces)))
    assert types(apart) == types(together)
    assert apart[-1].response.output[1].arguments == together[-1].response.output[1].arguments


def test_several_tool_calls_stream_their_arguments_piece_by_piece() -> None:
    tools: list[dict[str, Any]] = [
        {"type": "function", "name": "get_weather", "parameters": {"type": "object"}},
        {
            "type": "namespace",
            "name": "crm",
            "description": "CRM",
            "tools": [{"type": "function", "name": "lookup"}],
        },
    ]
    stream = new_stream(tools=tools)
    frames = run(
        stream,
        chunk({"role": "assistant", "content": "Checking."}),
        call_delta(0, "", id="call_a", name="get_weather"),
        call_delta(0, '{"city":'),
        call_delta(0, ' "Paris"}'),
        call_delta(1, '{"who"', id="call_b", name="crm__lookup"),
        call_delta(1, ': "Ann"}'),
        chunk({}, "tool_calls"),
        chunk(usage=USAGE),
        DONE,
    )
    sdk_tools = [
        {"type": "function", "name": "get_weather", "parameters": {}, "strict": False},
        {"type": "function", "name": "lookup", "parameters": {}, "strict": False},
    ]
    events = read_with_sdk(frames, sdk_tools)
    assert types(events)[7:] == [
        "response.output_item.done",  # the text message is done before the first call
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    first, second = events[8].item, events[13].item
    assert (first.type, first.name, first.call_id) == ("function_call", "get_weather", "call_a")
    assert first.id.startswith("fc_")
    assert (events[8].output_index, events[13].output_index) == (1, 2)
    assert [e.delta for e in events[9:11]] == ['{"city":', ' "Paris"}']
    assert events[11].arguments == '{"city": "Paris"}'
    assert events[11].name == "get_weather"
    assert (second.name, second.namespace, second.call_id) == ("lookup", "crm", "call_b")
    assert events[17].item.arguments == '{"who": "Ann"}'
    output = events[-1].response.output
    assert [item.type for item in output] == ["message", "function_call", "function_call"]
    assert [item.arguments for item in output[1:]] == ['{"city": "Paris"}', '{"who": "Ann"}']
    assert all(item.status == "completed" for item in output)
    assert events[-1].response.status == "completed"


def test_a_call_whose_name_comes_late_is_announced_with_its_arguments_so_far() -> None:
    stream = new_stream(tools=[{"type": "function", "name": "f"}])
    frames = run(
        stream,
        chunk({"tool_calls": [{"index": 0, "id": "call_1", "function": {"arguments": '{"a"'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": ":1}"}}]}),
        chunk({}, "tool_calls") + DONE,
    )
    events = read_with_sdk(
        frames, [{"type": "function", "name": "f", "parameters": {}, "strict": False}]
    )
    assert types(events)[2:4] == [
        "response.output_item.added",
        "response.function_call_arguments.delta",
    ]
    assert events[3].delta == '{"a":1}'
    assert events[-1].response.output[0].arguments == '{"a":1}'


def test_the_length_finish_reason_ends_incomplete() -> None:
    stream = new_stream(max_output_tokens=3)
    frames = run(
        stream, chunk({"content": "One two"}), chunk({}, "length"), chunk(usage=USAGE), DONE
    )
    events = read_with_sdk(frames)
    assert types(events)[-1] == "response.incomplete"
    response = events[-1].response
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].status == "incomplete"
    assert response.output_text == "One two"
    assert response.max_output_tokens == 3
    assert response.usage is not None and response.usage.output_tokens == 7


def test_an_error_event_mid_stream_fails_the_response() -> None:
    stream = new_stream()
    error = {"error": {"message": "The upstream broke.", "type": "upstream_error", "code": None}}
    frames = run(
        stream,
        chunk({"content": "Half an ans"}),
        b"data: " + orjson.dumps(error) + b"\n\n" + chunk({"content": "never"}) + DONE,
    )
    events = read_with_sdk(frames)
    assert types(events)[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.failed",
    ]
    response = events[-1].response
    assert response.status == "failed"
    assert response.error is not None
    assert (response.error.code, response.error.message) == ("server_error", "The upstream broke.")
    assert response.output[0].status == "incomplete"
    assert response.output_text == "Half an ans"
    assert stream.finish() == [] and stream.fail(UpstreamUnavailable("x")) == []


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (UpstreamUnavailable("The upstream could not be reached."), "server_error"),
        (RateLimited("Too many requests."), "rate_limit_exceeded"),
    ],
)
def test_a_provider_error_fails_the_response(error: Exception, code: str) -> None:
    stream = new_stream()
    frames = run(stream, chunk({"content": "x"}))
    assert isinstance(error, UpstreamUnavailable | RateLimited)
    frames += stream.fail(error)
    events = read_with_sdk(frames)
    response = events[-1].response
    assert response.status == "failed"
    assert response.error is not None
    assert (response.error.code, response.error.message) == (code, error.message)


def test_a_stream_cut_before_its_end_fails_rather_than_completes() -> None:
    stream = new_stream()
    frames = run(stream, chunk({"content": "cut"}))
    frames += stream.finish()
    events = read_with_sdk(frames)
    assert events[-1].type == "response.failed"
    assert events[-1].response.output_text == "cut"


def test_a_stream_that_finished_completes_even_without_done() -> None:
    stream = new_stream()
    frames = run(stream, chunk({"content": "whole"}), chunk({}, "stop"))
    frames += stream.finish()
    assert read_with_sdk(frames)[-1].type == "response.completed"


def test_usage_details_are_mapped() -> None:
    stream = new_stream()
    usage = {
        "prompt_tokens": 100,
        "completion_tokens": 40,
        "total_tokens": 140,
        "prompt_tokens_details": {"cached_tokens": 64},
        "completion_tokens_details": {"reasoning_tokens": 10},
    }
    frames = run(stream, chunk({"content": "x"}), chunk({}, "stop"), chunk(usage=usage), DONE)
    response = read_with_sdk(frames)[-1].response
    assert response.usage.input_tokens == 100
    assert response.usage.output_tokens == 40
    assert response.usage.total_tokens == 140
    assert response.usage.input_tokens_details.cached_tokens == 64
    assert response.usage.output_tokens_details.reasoning_tokens == 10


def test_an_answer_without_usage_completes_with_none() -> None:
    frames = run(new_stream(), chunk({"content": "x"}), chunk({}, "stop"), DONE)
    assert read_with_sdk(frames)[-1].response.usage is None


def test_a_refusal_streams_as_a_refusal_part() -> None:
    frames = run(
        new_stream(),
        chunk({"refusal": "I can't "}),
        chunk({"refusal": "help."}),
        chunk({}, "stop") + DONE,
    )
    events = read_with_sdk(frames)
    assert types(events)[3:8] == [
        "response.content_part.added",
        "response.refusal.delta",
        "response.refusal.delta",
        "response.refusal.done",
        "response.content_part.done",
    ]
    assert events[6].refusal == "I can't help."
    assert events[-1].response.output[0].content[0].type == "refusal"


def test_a_queued_background_response_moves_to_in_progress_with_its_first_chunk() -> None:
    stream = new_stream(background=True)
    frames = stream.start(queued=True)
    assert stream.response()["status"] == "queued"
    frames += stream.feed(chunk({"content": "x"}))
    frames += stream.feed(chunk({}, "stop") + DONE)
    events = read_with_sdk(frames)
    assert types(events)[:3] == ["response.created", "response.queued", "response.in_progress"]
    assert events[0].response.status == "queued"
    assert events[0].response.background is True
    assert events[2].response.status == "in_progress"


def test_the_response_object_at_any_moment_holds_the_answer_so_far() -> None:
    stream = new_stream(tools=[{"type": "function", "name": "f"}])
    run(stream, chunk({"content": "Thinking"}))
    now = Response.model_validate(stream.response())
    assert now.status == "in_progress"
    assert now.output_text == "Thinking"
    assert now.output[0].status == "in_progress"

    stream.feed(call_delta(0, '{"q":', id="call_1", name="f"))
    now = Response.model_validate(stream.response())
    assert [item.type for item in now.output] == ["message", "function_call"]
    assert now.output[0].status == "completed"
    assert now.output[1].arguments == '{"q":'
    assert stream.sequence_number == 10  # the next event's number: ten so far


def test_cancel_keeps_the_partial_output() -> None:
    stream = new_stream()
    frames = run(stream, chunk({"content": "Partial"}))
    frames += stream.cancel()
    events = read_with_sdk(frames)
    assert events[-1].type == "response.output_item.done"
    assert events[-1].item.status == "incomplete"
    cancelled = Response.model_validate(stream.response())
    assert cancelled.status == "cancelled"
    assert cancelled.output_text == "Partial"
    assert stream.done and stream.finish() == []


def test_a_whole_completion_becomes_a_response() -> None:
    chat = translate(
        parse_request(
            {
                "model": "m",
                "input": "hi",
                "tools": [
                    {
                        "type": "namespace",
                        "name": "crm",
                        "description": "CRM",
                        "tools": [{"type": "function", "name": "lookup"}],
                    }
                ],
            }
        )
    )
    completion = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "finish_reason": "tool_calls",
                "message": {
                    "role": "assistant",
                    "content": "Looking up.",
                    "tool_calls": [
                        {
                            "id": "call_9",
                            "type": "function",
                            "function": {"name": "crm__lookup", "arguments": '{"who":"Ann"}'},
                        }
                    ],
                },
            }
        ],
        "usage": USAGE,
    }
    response = Response.model_validate(
        response_from_completion(
            completion, response_id="resp_1", fields=chat.fields, tool_names=chat.tool_names
        )
    )
    assert response.status == "completed"
    assert response.output_text == "Looking up."
    call = response.output[1]
    assert call.type == "function_call"
    assert (call.name, call.namespace, call.call_id, call.arguments) == (
        "lookup",
        "crm",
        "call_9",
        '{"who":"Ann"}',
    )
    assert response.usage is not None and response.usage.total_tokens == 19


def test_a_whole_completion_cut_by_length_is_incomplete() -> None:
    completion = {
        "choices": [
            {
                "index": 0,
                "finish_reason": "length",
                "message": {"role": "assistant", "content": "One"},
            }
        ]
    }
    fields = new_stream().fields
    response = Response.model_validate(
        response_from_completion(completion, response_id="resp_1", fields=fields)
    )
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage is None


def test_response_object_names_its_status_and_reason() -> None:
    fields = new_stream().fields
    for status in ("queued", "in_progress", "completed", "incomplete", "failed", "cancelled"):
        response = Response.model_validate(
            response_object(
                response_id="resp_1", created_at=1, status=status, fields=fields, output=[]
            )
        )
        assert response.status == status


def test_tool_names_default_to_the_chat_name() -> None:
    stream = ResponseStream("resp_1", fields=new_stream().fields, tool_names={"a": ToolName("a")})
    frames = run(stream, call_delta(0, "{}", id="call_1", name="unknown"), chunk({}, "tool_calls"))
    frames += stream.finish()
    events = read_with_sdk(
        frames, [{"type": "function", "name": "unknown", "parameters": {}, "strict": False}]
    )
    assert events[-1].response.output[0].name == "unknown"
