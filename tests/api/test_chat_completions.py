"""``POST /v1/chat/completions``: answers pass through whole or streamed, requests untouched."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionFunctionToolParam, ChatCompletionMessageParam

from conftest import (
    NO_LOCAL_MODEL,
    Relay,
    data_events,
    fake_provider_toml,
    start_tokenrelay,
    without_event_ids,
    without_usage_chunk,
)
from fake_upstream import LEAKED_KEY, TOOL_ARGUMENTS, FakeUpstream, expected_text

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me three words"}]

WEATHER_TOOL: ChatCompletionFunctionToolParam = {
    "type": "function",
    "function": {
        "name": "lookup_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["location"],
        },
    },
}


def test_unstreamed_chat_returns_the_upstream_completion(
    openai_client: openai.OpenAI, fake_upstream: FakeUpstream
) -> None:
    completion = openai_client.chat.completions.create(
        model="fake-model", messages=MESSAGES, extra_body={"fake": {"tokens": 3}}
    )

    assert completion.object == "chat.completion"
    assert completion.model == "fake-model"
    assert completion.choices[0].message.content == "word0 word1 word2 "
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (4, 3)
    assert fake_upstream.last_request().path == "/v1/chat/completions"


def test_unstreamed_body_is_the_upstream_body_byte_for_byte(
    relay: Relay, fake_upstream: FakeUpstream
) -> None:
    response = httpx.post(
        f"{relay.v1}/chat/completions", json={"model": "fake-other", "messages": MESSAGES}
    )

    record = fake_upstream.last_request()
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.content == bytes(record.sent)


def test_streamed_chat_reads_through_the_sdk(
    openai_client: openai.OpenAI, fake_upstream: FakeUpstream
) -> None:
    stream = openai_client.chat.completions.create(
        model="fake-model", messages=MESSAGES, stream=True, extra_body={"fake": {"tokens": 7}}
    )
    chunks = list(stream)

    assert {chunk.object for chunk in chunks} == {"chat.completion.chunk"}
    assert {chunk.model for chunk in chunks} == {"fake-model"}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected_text(7)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert fake_upstream.last_request().wait_for_outcome(5) == "completed"


async def test_streamed_chat_reads_through_the_async_sdk(
    async_openai_client: openai.AsyncOpenAI,
) -> None:
    stream = await async_openai_client.chat.completions.create(
        model="fake-other", messages=MESSAGES, stream=True, extra_body={"fake": {"tokens": 4}}
    )
    text = ""
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""

    assert text == expected_text(4)


async def test_concurrent_streams_each_get_their_own_answer(
    async_openai_client: openai.AsyncOpenAI,
) -> None:
    """Pooled upstream connections must never mix two clients' chunks."""

    async def ask(tokens: int) -> str:
        stream = await async_openai_client.chat.completions.create(
            model="fake-model",
            messages=MESSAGES,
            stream=True,
            extra_body={"fake": {"tokens": tokens, "delay": 0.01}},
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    answers = await asyncio.gather(*(ask(tokens) for tokens in range(1, 21)))

    assert answers == [expected_text(tokens) for tokens in range(1, 21)]


def test_include_usage_adds_the_usage_chunk(openai_client: openai.OpenAI) -> None:
    stream = openai_client.chat.completions.create(
        model="fake-model",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"fake": {"tokens": 2}},
    )
    chunks = list(stream)

    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (4, 2)
    assert all(chunk.usage is None for chunk in chunks[:-1])


def test_every_field_reaches_the_upstream_untouched(
    relay: Relay, fake_upstream: FakeUpstream
) -> None:
    # Odd spacing, key order and escapes on purpose: re-encoding anywhere would change them.
    raw = (
        b'{"model":"fake-model",  "messages":[{"role":"user","content":"caf\\u00e9 \xe2\x98\x95"}],'
        b'"tools":[{"type":"function","function":{"name":"lookup_weather","parameters":{}}}],'
        b'"tool_choice":{"type":"function","function":{"name":"lookup_weather"}},'
        b'"response_format":{"type":"json_object"},"seed":42,"logprobs":true,"top_logprobs":2,'
        b'"temperature":0.50,"x_vendor_extension":{"keep":[1,2.0,"three",null]}}'
    )
    response = httpx.post(
        f"{relay.v1}/chat/completions",
        content=raw,
        headers={"Content-Type": "application/json"},
    )

    assert response.status_code == 200, response.text
    record = fake_upstream.last_request()
    assert record.body == raw
    assert record.headers["content-type"] == "application/json"


def test_sdk_request_arrives_as_the_sdk_sent_it(
    openai_client: openai.OpenAI, fake_upstream: FakeUpstream
) -> None:
    openai_client.chat.completions.create(
        model="fake-model",
        messages=MESSAGES,
        tools=[WEATHER_TOOL],
        tool_choice="auto",
        response_format={"type": "json_object"},
        seed=7,
        logprobs=True,
        max_completion_tokens=50,
        extra_body={"fake": {"tokens": 1}, "my_unknown_field": ["a", {"b": None}]},
    )

    assert fake_upstream.last_request().json == {
        "model": "fake-model",
        "messages": MESSAGES,
        "tools": [WEATHER_TOOL],
        "tool_choice": "auto",
        "response_format": {"type": "json_object"},
        "seed": 7,
        "logprobs": True,
        "max_completion_tokens": 50,
        "fake": {"tokens": 1},
        "my_unknown_field": ["a", {"b": None}],
    }


def test_tool_call_stream_is_relayed_chunk_for_chunk(
    relay: Relay, fake_upstream: FakeUpstream
) -> None:
    body = {
        "model": "tool-runner",
        "messages": MESSAGES,
        "tools": [WEATHER_TOOL],
        "stream": True,
        "fake": {"tool_calls": True},
    }
    with httpx.stream("POST", f"{relay.v1}/chat/completions", json=body) as response:
        received = response.read()

    record = fake_upstream.last_request()
    assert record.wait_for_outcome(5) == "completed"
    assert without_event_ids(received) == without_usage_chunk(bytes(record.sent))
    deltas = [json.loads(event)["choices"][0]["delta"] for event in data_events(received)[:-1]]
    assert deltas[0]["tool_calls"][0]["function"] == {"name": "lookup_weather", "arguments": ""}
    pieces = [d["tool_calls"][0]["function"]["arguments"] for d in deltas if d.get("tool_calls")]
    assert len(pieces) > 3
    assert "".join(pieces) == TOOL_ARGUMENTS


async def test_tool_call_arguments_assemble_in_the_async_sdk(
    async_openai_client: openai.AsyncOpenAI,
) -> None:
    stream = await async_openai_client.chat.completions.create(
        model="tool-runner",
        messages=MESSAGES,
        tools=[WEATHER_TOOL],
        stream=True,
        extra_body={"fake": {"tool_calls": True}},
    )
    name, arguments, finish = "", "", None
    async for chunk in stream:
        choice = chunk.choices[0]
        for call in choice.delta.tool_calls or ():
            assert call.index == 0
            if call.function and call.function.name:
                name = call.function.name
            if call.function and call.function.arguments:
                arguments += call.function.arguments
        finish = choice.finish_reason or finish

    assert name == "lookup_weather"
    assert json.loads(arguments) == json.loads(TOOL_ARGUMENTS)
    assert finish == "tool_calls"


def test_unstreamed_tool_call_and_json_mode_pass(
    openai_client: openai.OpenAI, fake_upstream: FakeUpstream
) -> None:
    tool = openai_client.chat.completions.create(
        model="tool-runner",
        messages=MESSAGES,
        tools=[WEATHER_TOOL],
        extra_body={"fake": {"tool_calls": True}},
    )
    calls = tool.choices[0].message.tool_calls
    assert calls is not None
    assert calls[0].type == "function"
    assert calls[0].function.name == "lookup_weather"
    assert tool.choices[0].finish_reason == "tool_calls"

    json_mode = openai_client.chat.completions.create(
        model="fake-model", messages=MESSAGES, response_format={"type": "json_object"}
    )
    assert json_mode.choices[0].message.content == expected_text(5)
    assert fake_upstream.last_request().json["response_format"] == {"type": "json_object"}


def test_upstream_receives_the_configured_bearer_key(
    openai_client: openai.OpenAI, fake_upstream: FakeUpstream
) -> None:
    openai_client.chat.completions.create(model="fake-model", messages=MESSAGES)

    headers = fake_upstream.last_request().headers
    assert headers["authorization"] == f"Bearer {LEAKED_KEY}"
    assert "api-key" not in headers
    assert "openai-organization" not in headers


@pytest.fixture(scope="module")
def configured_relay(
    fake_upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Relay]:
    """A relay with an OpenAI-style provider naming an org and project, and an Azure one."""
    toml = fake_provider_toml(
        fake_upstream.base_url,
        name="org",
        models=("org-model",),
        extra={"organization": "org-fake", "project": "proj_fake"},
    ) + fake_provider_toml(
        f"{fake_upstream.root_url}/openai/deployments/dep1",
        name="azure",
        models=("dep1",),
        extra={"azure_api_version": "2024-06-01"},
    )
    with start_tokenrelay(
        tmp_path_factory.mktemp("configured"), config_toml=toml, env=NO_LOCAL_MODEL
    ) as running:
        yield running


def test_organization_and_project_headers_are_sent(
    configured_relay: Relay, fake_upstream: FakeUpstream
) -> None:
    with openai.OpenAI(base_url=configured_relay.v1, api_key="unused", max_retries=0) as client:
        stream = client.chat.completions.create(model="org-model", messages=MESSAGES, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream) == expected_text(5)

    headers = fake_upstream.last_request().headers
    assert headers["authorization"] == f"Bearer {LEAKED_KEY}"
    assert headers["openai-organization"] == "org-fake"
    assert headers["openai-project"] == "proj_fake"


def test_azure_style_provider_sends_api_key_and_api_version(
    configured_relay: Relay, fake_upstream: FakeUpstream
) -> None:
    with openai.OpenAI(base_url=configured_relay.v1, api_key="unused", max_retries=0) as client:
        completion = client.chat.completions.create(model="dep1", messages=MESSAGES)
    assert completion.choices[0].message.content == expected_text(5)

    record = fake_upstream.last_request()
    assert record.path == "/openai/deployments/dep1/chat/completions"
    assert record.query == {"api-version": "2024-06-01"}
    assert record.headers["api-key"] == LEAKED_KEY
    assert "authorization" not in record.headers
