"""``POST /v1/completions``, OpenAI's legacy text completions, relayed like chat."""

from __future__ import annotations

import httpx
import openai

from conftest import (
    Relay,
    data_events,
    with_usage_asked,
    without_event_ids,
    without_usage_chunk,
)
from fake_upstream import FakeUpstream, expected_text


def test_unstreamed_completion_returns_text(
    openai_client: openai.OpenAI, fake_upstream: FakeUpstream
) -> None:
    completion = openai_client.completions.create(
        model="fake-model", prompt="Once upon a time", extra_body={"fake": {"tokens": 3}}
    )

    assert completion.object == "text_completion"
    assert completion.model == "fake-model"
    assert completion.choices[0].text == "word0 word1 word2 "
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (4, 3)
    assert fake_upstream.last_request().path == "/v1/completions"


def test_streamed_completion_reads_through_the_sdk(openai_client: openai.OpenAI) -> None:
    stream = openai_client.completions.create(
        model="fake-other", prompt="Say", stream=True, extra_body={"fake": {"tokens": 6}}
    )
    chunks = list(stream)

    assert {chunk.object for chunk in chunks} == {"text_completion"}
    assert "".join(chunk.choices[0].text for chunk in chunks) == expected_text(6)
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_streamed_completion_with_usage_through_the_async_sdk(
    async_openai_client: openai.AsyncOpenAI,
) -> None:
    stream = await async_openai_client.completions.create(
        model="fake-model",
        prompt="one two three",
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"fake": {"tokens": 2}},
    )
    chunks = [chunk async for chunk in stream]

    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected_text(2)
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == 5


def test_stream_bytes_and_request_bytes_pass_untouched(
    relay: Relay, fake_upstream: FakeUpstream
) -> None:
    raw = (
        b'{"prompt": ["first prompt", "second"], "model": "fake-model", "stream": true,'
        b' "echo": false, "suffix": "!", "best_of": 1, "logit_bias": {"50256": -100},'
        b' "vendor_option": {"nested": [true, null]}, "fake": {"tokens": 3}}'
    )
    with httpx.stream(
        "POST",
        f"{relay.v1}/completions",
        content=raw,
        headers={"Content-Type": "application/json"},
    ) as response:
        received = response.read()

    record = fake_upstream.last_request()
    # Every byte as sent, and the usage the client did not ask for asked for (and not shown).
    assert record.body == with_usage_asked(raw)
    assert record.wait_for_outcome(5) == "completed"
    assert without_event_ids(received) == without_usage_chunk(bytes(record.sent))
    assert b'"usage":{' in record.sent and b'"usage":{' not in received
    assert data_events(received)[-1] == "[DONE]"


def test_token_array_prompt_is_accepted(openai_client: openai.OpenAI) -> None:
    completion = openai_client.completions.create(
        model="fake-model", prompt=[1, 2, 3], extra_body={"fake": {"tokens": 1}}
    )
    assert completion.choices[0].text == "word0 "
