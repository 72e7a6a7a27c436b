"""The fake upstream must behave like OpenAI, since every relay test relies on it."""

from __future__ import annotations

import gzip
import json
import time
from typing import Any

import httpx
import openai
import pytest

from fake_upstream import (
    INTERNAL_SECRET,
    LEAKED_KEY,
    TOOL_ARGUMENTS,
    TOOL_NAME,
    FakeUpstream,
    expected_text,
)


def _events(raw: str) -> list[str]:
    """The ``data:`` payloads of a complete SSE body, in order."""
    return [
        block.removeprefix("data: ") for block in raw.split("\n\n") if block.startswith("data: ")
    ]


def _chat(fake: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {
        "model": "fake-model",
        "messages": [{"role": "user", "content": "say three words"}],
        "fake": fake,
        **fields,
    }


def test_streamed_chat_follows_openai_chunk_format(fake_upstream: FakeUpstream) -> None:
    body = _chat({"tokens": 3}, stream=True, stream_options={"include_usage": True})
    response = httpx.post(f"{fake_upstream.base_url}/chat/completions", json=body)

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = _events(response.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    assert {chunk["model"] for chunk in chunks} == {"fake-model"}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "word0 word1 word2 "
    assert chunks[-2]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert fake_upstream.last_request().wait_for_outcome(5) == "completed"


def test_openai_sdk_reads_the_fake_directly(fake_upstream: FakeUpstream) -> None:
    """If the SDK could not read the fake, relay tests would be testing the fake."""
    with openai.OpenAI(base_url=fake_upstream.base_url, api_key="x", max_retries=0) as client:
        stream = client.chat.completions.create(
            model="fake-model",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            extra_body={"fake": {"tokens": 4}},
        )
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        completion = client.completions.create(
            model="fake-other", prompt="one two", extra_body={"fake": {"tokens": 2}}
        )
    assert text == expected_text(4)
    assert completion.object == "text_completion"
    assert completion.model == "fake-other"
    assert completion.choices[0].text == "word0 word1 "
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 2


def test_legacy_completion_stream_uses_text_completion_chunks(fake_upstream: FakeUpstream) -> None:
    body = {"model": "fake-model", "prompt": "a b c d", "stream": True, "fake": {"tokens": 2}}
    response = httpx.post(f"{fake_upstream.base_url}/completions", json=body)

    chunks = [json.loads(event) for event in _events(response.text)[:-1]]
    assert {chunk["object"] for chunk in chunks} == {"text_completion"}
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == "word0 word1 "
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_tool_call_streams_in_pieces(fake_upstream: FakeUpstream) -> None:
    body = _chat({"tool_calls": True}, stream=True)
    response = httpx.post(f"{fake_upstream.base_url}/chat/completions", json=body)

    chunks = [json.loads(event) for event in _events(response.text)[:-1]]
    first = chunks[0]["choices"][0]["delta"]["tool_calls"][0]
    assert first["id"].startswith("call_")
    assert first["type"] == "function"
    assert first["function"] == {"name": TOOL_NAME, "arguments": ""}
    pieces = [
        chunk["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
        for chunk in chunks[1:-1]
    ]
    assert len(pieces) > 2
    assert "".join(pieces) == TOOL_ARGUMENTS
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("stream", [False, True])
def test_tool_arguments_replace_the_default_ones(fake_upstream: FakeUpstream, stream: bool) -> None:
    arguments = '{"cmd": "echo a fairly long command line"}'
    body = _chat({"tool_calls": True, "tool_arguments": arguments}, stream=stream)
    response = httpx.post(f"{fake_upstream.base_url}/chat/completions", json=body)

    if stream:
        chunks = [json.loads(event) for event in _events(response.text)[:-1]]
        calls = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks[:-1]]
        assert len(calls) > 2
        assert "".join(call["function"]["arguments"] for call in calls) == arguments
    else:
        [call] = response.json()["choices"][0]["message"]["tool_calls"]
        assert call["function"]["arguments"] == arguments


@pytest.mark.parametrize("stream", [False, True])
def test_tool_call_then_text_calls_the_tool_until_its_result_is_sent(
    fake_upstream: FakeUpstream, stream: bool
) -> None:
    fake_upstream.defaults = {"tool_call_then_text": True, "text": "It is sunny."}
    client = openai.OpenAI(base_url=fake_upstream.base_url, api_key=LEAKED_KEY, max_retries=0)
    tool: Any = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
    messages: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]

    def ask() -> tuple[str | None, list[Any], str]:
        if not stream:
            choice = client.chat.completions.create(
                model="fake-model", messages=messages, tools=[tool]
            ).choices[0]
            calls = [call.model_dump() for call in choice.message.tool_calls or []]
            return choice.message.content, calls, choice.finish_reason
        text, calls, finish = "", [], ""
        for chunk in client.chat.completions.create(
            model="fake-model", messages=messages, tools=[tool], stream=True
        ):
            delta = chunk.choices[0].delta
            text += delta.content or ""
            calls += [call.model_dump() for call in delta.tool_calls or [] if call.id]
            finish = chunk.choices[0].finish_reason or finish
        return text or None, calls, finish

    content, calls, finish = ask()
    assert (content, finish) == (None, "tool_calls")
    assert [call["function"]["name"] for call in calls] == ["get_weather"]

    messages += [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": calls[0]["id"], "type": "function", "function": calls[0]["function"]}
            ],
        },
        {"role": "tool", "tool_call_id": calls[0]["id"], "content": "sunny"},
    ]
    assert ask() == ("It is sunny.", [], "stop")


def test_fail_after_cuts_the_connection_mid_body(fake_upstream: FakeUpstream) -> None:
    body = _chat({"tokens": 5, "fail_after": 2}, stream=True)
    received: list[bytes] = []
    with (
        pytest.raises(httpx.RemoteProtocolError),
        httpx.stream("POST", f"{fake_upstream.base_url}/chat/completions", json=body) as response,
    ):
        for piece in response.iter_raw():
            received.append(piece)

    raw = b"".join(received).decode()
    assert "word1 " in raw
    assert "word2 " not in raw
    assert "[DONE]" not in raw
    assert fake_upstream.last_request().wait_for_outcome(5) == "failed"


def test_client_leaving_is_recorded_as_abandoned(fake_upstream: FakeUpstream) -> None:
    body = _chat({"tokens": 200, "delay": 0.02}, stream=True)
    with httpx.stream("POST", f"{fake_upstream.base_url}/chat/completions", json=body) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        closed_at = time.monotonic()
    # Leaving the block closed the connection; the fake is waiting between chunks then.

    record = fake_upstream.last_request()
    assert record.wait_for_outcome(5) == "abandoned"
    assert record.outcome_at is not None
    assert record.outcome_at - closed_at < 0.2


@pytest.mark.parametrize("gate_after", [2, 4], ids=["mid-stream", "before-the-end"])
def test_gate_holds_the_stream_until_opened(fake_upstream: FakeUpstream, gate_after: int) -> None:
    body = _chat({"tokens": 4, "gate": "g", "gate_after": gate_after}, stream=True)
    url = f"{fake_upstream.base_url}/chat/completions"
    with httpx.stream("POST", url, json=body, timeout=10) as response:
        lines = (line for line in response.iter_lines() if line.startswith("data: "))
        # The role chunk, then the content chunks before the gate.
        held = [next(lines) for _ in range(gate_after + 1)]
        assert expected_text(gate_after).split()[-1] in held[-1]
        record = fake_upstream.last_request()
        assert record.outcome is None
        fake_upstream.open_gate("g")
        rest = list(lines)

    assert rest[-1] == "data: [DONE]"
    assert record.wait_for_outcome(5) == "completed"
    text = "".join(
        json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
        for line in held + rest[:-1]
    )
    assert text == expected_text(4)


def test_reset_releases_streams_held_at_a_gate(fake_upstream: FakeUpstream) -> None:
    body = _chat({"tokens": 3, "gate": "g", "gate_after": 1}, stream=True)
    url = f"{fake_upstream.base_url}/chat/completions"
    with httpx.stream("POST", url, json=body, timeout=10) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        fake_upstream.reset()
        assert list(lines)[-2:] == ["data: [DONE]", ""]


def test_status_answers_in_openai_error_shape(fake_upstream: FakeUpstream) -> None:
    body = _chat({"status": 429, "retry_after": 7})
    response = httpx.post(f"{fake_upstream.base_url}/chat/completions", json=body)

    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "rate_limit_error"
    assert LEAKED_KEY in error["message"]


def test_invalid_json_is_a_400(fake_upstream: FakeUpstream) -> None:
    response = httpx.post(
        f"{fake_upstream.base_url}/chat/completions",
        content=b'{"model": ',
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert fake_upstream.last_request().json is None


def test_models_and_azure_paths_are_served(fake_upstream: FakeUpstream) -> None:
    models = httpx.get(f"{fake_upstream.base_url}/models").json()
    assert [model["id"] for model in models["data"]] == ["fake-model", "fake-other"]

    url = f"{fake_upstream.root_url}/openai/deployments/dep1/chat/completions"
    response = httpx.post(url, params={"api-version": "2024-06-01"}, json=_chat({"tokens": 1}))
    assert response.json()["choices"][0]["message"]["content"] == "word0 "
    record = fake_upstream.last_request()
    assert record.path == "/openai/deployments/dep1/chat/completions"
    assert record.query == {"api-version": "2024-06-01"}


def test_last_request_times_out_when_nothing_arrives(fake_upstream: FakeUpstream) -> None:
    with pytest.raises(TimeoutError):
        fake_upstream.last_request(timeout=0.05)


def test_defaults_apply_under_the_requests_own_options(fake_upstream: FakeUpstream) -> None:
    fake_upstream.defaults = {"tokens": 2, "finish_reason": "length"}
    url = f"{fake_upstream.base_url}/chat/completions"

    plain = httpx.post(url, json={"model": "fake-model", "messages": []}).json()
    overridden = httpx.post(url, json=_chat({"tokens": 3})).json()

    assert plain["choices"][0]["message"]["content"] == "word0 word1 "
    assert plain["choices"][0]["finish_reason"] == "length"
    assert overridden["choices"][0]["message"]["content"] == expected_text(3)
    assert overridden["choices"][0]["finish_reason"] == "length"
    fake_upstream.reset()
    assert fake_upstream.defaults == {}


# Leading whitespace, runs of spaces and newlines: the pieces must join back to the text exactly.
TEXT = "  Hello,  world!\n\n| a | b |\n```\ncode\n```"
TEXT_PIECES = [
    "  ",
    "Hello,  ",
    "world!\n\n",
    "| ",
    "a ",
    "| ",
    "b ",
    "|\n",
    "```\n",
    "code\n",
    "```",
]


def _request(chat: bool, fake: dict[str, Any], **fields: Any) -> tuple[str, dict[str, Any]]:
    """A chat or a legacy completion request with a three-word prompt: its path and body."""
    if chat:
        return "chat/completions", _chat(fake, **fields)
    body = {"model": "fake-model", "prompt": "say three words", "fake": fake, **fields}
    return "completions", body


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "legacy"])
def test_text_streams_a_word_per_chunk(fake_upstream: FakeUpstream, chat: bool) -> None:
    path, body = _request(chat, {"text": TEXT}, stream=True, stream_options={"include_usage": True})
    response = httpx.post(f"{fake_upstream.base_url}/{path}", json=body)

    events = _events(response.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    choices = [chunk["choices"][0] for chunk in chunks if chunk["choices"]]
    content = [choice["delta"].get("content") if chat else choice["text"] for choice in choices]
    assert [piece for piece in content if piece] == TEXT_PIECES
    assert "".join(TEXT_PIECES) == TEXT
    assert choices[-1]["finish_reason"] == "stop"
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 11, "total_tokens": 14}


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "legacy"])
def test_text_is_the_whole_unstreamed_answer(fake_upstream: FakeUpstream, chat: bool) -> None:
    path, body = _request(chat, {"text": TEXT})
    answer = httpx.post(f"{fake_upstream.base_url}/{path}", json=body).json()

    choice = answer["choices"][0]
    assert (choice["message"]["content"] if chat else choice["text"]) == TEXT
    assert answer["usage"] == {"prompt_tokens": 3, "completion_tokens": 11, "total_tokens": 14}


def test_text_set_in_defaults_replaces_tokens(fake_upstream: FakeUpstream) -> None:
    fake_upstream.defaults = {"text": "one two three four", "tokens": 40}
    url = f"{fake_upstream.base_url}/chat/completions"

    answer = httpx.post(url, json={"model": "fake-model", "messages": []}).json()
    assert answer["choices"][0]["message"]["content"] == "one two three four"
    assert answer["usage"]["completion_tokens"] == 4

    # fail_after counts the text's words like any other content chunks.
    received: list[bytes] = []
    with (
        pytest.raises(httpx.RemoteProtocolError),
        httpx.stream("POST", url, json=_chat({"fail_after": 2}, stream=True)) as response,
    ):
        for piece in response.iter_raw():
            received.append(piece)
    raw = b"".join(received).decode()
    assert '"content":"two "' in raw
    assert "three" not in raw
    assert fake_upstream.last_request().wait_for_outcome(5) == "failed"


# -- misbehaviours: each must really happen, or the tests that rely on it prove nothing ----------


def _raw_stream(fake_upstream: FakeUpstream, **fake: Any) -> httpx.Response:
    body = _chat(fake, stream=True)
    return httpx.post(f"{fake_upstream.base_url}/chat/completions", json=body, timeout=30)


def test_end_after_ends_cleanly_with_no_finish_and_no_done(fake_upstream: FakeUpstream) -> None:
    response = _raw_stream(fake_upstream, tokens=5, end_after=2)

    assert response.status_code == 200
    assert '"content":"word1 "' in response.text
    assert "word2" not in response.text
    assert '"finish_reason":"stop"' not in response.text
    assert "[DONE]" not in response.text


def test_error_after_sends_an_in_band_error_quoting_the_key_everywhere(
    fake_upstream: FakeUpstream,
) -> None:
    response = _raw_stream(fake_upstream, tokens=5, error_after=1, leak_everywhere=True)

    events = _events(response.text)
    error = json.loads(events[-1])["error"]
    assert all(LEAKED_KEY in error[field] for field in ("message", "type", "param", "code"))
    assert "word1" not in response.text


def test_pings_come_before_the_first_chunk(fake_upstream: FakeUpstream) -> None:
    response = _raw_stream(fake_upstream, tokens=1, pings=3)

    assert response.text.startswith(": ping\n\n" * 3 + "data: ")


def test_event_bytes_and_no_newline_send_what_they_say(fake_upstream: FakeUpstream) -> None:
    big = _raw_stream(fake_upstream, tokens=2, event_bytes=100_000)
    content = json.loads(_events(big.text)[1])["choices"][0]["delta"]["content"]
    assert content == "x" * 100_000

    endless = _raw_stream(fake_upstream, no_newline=100_000, write_size=1000)
    assert endless.content == b"data: " + b"x" * 100_000


def test_gzip_bomb_inflates_a_thousandfold(fake_upstream: FakeUpstream) -> None:
    url = f"{fake_upstream.base_url}/chat/completions"
    with httpx.stream("POST", url, json=_chat({"gzip_bomb": True})) as response:
        compressed = b"".join(response.iter_raw())
    assert response.headers["content-encoding"] == "gzip"
    assert len(compressed) < 100_000
    assert len(gzip.decompress(compressed)) == 50 * 1024 * 1024


def test_redirect_body_and_raw_answers(fake_upstream: FakeUpstream) -> None:
    url = f"{fake_upstream.base_url}/chat/completions"
    moved = httpx.post(url, json=_chat({"redirect": "http://example.invalid/x"}))
    assert moved.status_code == 307
    assert moved.headers["location"] == "http://example.invalid/x"

    page = httpx.post(url, json=_chat({"body": "<html></html>", "content_type": "text/html"}))
    assert (page.status_code, page.text) == (200, "<html></html>")
    assert page.headers["content-type"] == "text/html"

    raw = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nhi"
    assert httpx.post(url, json=_chat({"raw": raw})).text == "hi"
    assert httpx.get(f"{fake_upstream.base_url}/secret").text == INTERNAL_SECRET


@pytest.mark.parametrize("kind", ["html", "garbage", "not_a_list", "error"])
def test_models_answer_breaks_the_model_list(fake_upstream: FakeUpstream, kind: str) -> None:
    fake_upstream.defaults = {"models_answer": kind}
    response = httpx.get(f"{fake_upstream.base_url}/models")

    try:
        listed = response.json()["data"]
    except (ValueError, KeyError):
        listed = None
    assert not isinstance(listed, list) or response.status_code != 200
