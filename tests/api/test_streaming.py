"""Streams behave as an SSE relay must: unbuffered, kept alive, closed when the client leaves."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from conftest import Relay, data_events, relay_to
from fake_upstream import FakeUpstream, RecordedRequest, expected_text

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "stream please"}]

ABANDON_NOTICED_WITHIN = 0.2
"""Seconds between a client closing its stream and the upstream connection being closed."""


def _stream_body(**fake: object) -> dict[str, object]:
    return {"model": "fake-model", "messages": MESSAGES, "stream": True, "fake": fake}


def _assert_abandoned_at_once(record: RecordedRequest, closed_at: float) -> None:
    """The relay dropped the upstream request within moments of its client leaving."""
    assert record.wait_for_outcome(5) == "abandoned"
    assert record.outcome_at is not None
    assert record.outcome_at - closed_at < ABANDON_NOTICED_WITHIN


def test_stream_headers_tell_proxies_not_to_buffer(relay: Relay) -> None:
    with httpx.stream("POST", f"{relay.v1}/chat/completions", json=_stream_body()) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        body = response.read()

    assert body.endswith(b"data: [DONE]\n\n")
    assert data_events(body)[-1] == "[DONE]"


def test_chunks_arrive_as_the_upstream_writes_them(relay: Relay) -> None:
    arrivals: list[tuple[float, str]] = []
    with httpx.stream(
        "POST", f"{relay.v1}/chat/completions", json=_stream_body(tokens=5, delay=0.2)
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                arrivals.append((time.monotonic(), line))
    ended = time.monotonic()

    content = [at for at, line in arrivals if '"content":"word' in line]
    assert len(content) == 5
    # Buffered anywhere, the chunks would arrive together at the end (~1.2 s in).
    assert ended - arrivals[0][0] > 0.8
    assert ended - content[0] > 0.6
    gaps = [later - earlier for earlier, later in itertools.pairwise(content)]
    assert min(gaps) > 0.1, gaps
    assert arrivals[-1][1] == "data: [DONE]"


async def test_async_sdk_sees_chunks_spread_over_time(
    async_openai_client: openai.AsyncOpenAI,
) -> None:
    stream = await async_openai_client.chat.completions.create(
        model="fake-model",
        messages=MESSAGES,
        stream=True,
        extra_body={"fake": {"tokens": 4, "delay": 0.2}},
    )
    arrivals = [time.monotonic() async for chunk in stream if chunk.choices[0].delta.content]

    assert len(arrivals) == 4
    assert arrivals[-1] - arrivals[0] > 0.45


def test_client_disconnect_closes_upstream(relay: Relay, fake_upstream: FakeUpstream) -> None:
    with httpx.stream(
        "POST", f"{relay.v1}/chat/completions", json=_stream_body(tokens=200, delay=0.02)
    ) as response:
        events = (line for line in response.iter_lines() if line.startswith("data: "))
        next(events)
        next(events)
        closed_at = time.monotonic()
    # Leaving the block closed the connection mid-stream.

    _assert_abandoned_at_once(fake_upstream.last_request(), closed_at)


def test_sdk_closing_a_stream_closes_upstream(
    openai_client: openai.OpenAI, fake_upstream: FakeUpstream
) -> None:
    stream = openai_client.chat.completions.create(
        model="fake-model",
        messages=MESSAGES,
        stream=True,
        extra_body={"fake": {"tokens": 200, "delay": 0.02}},
    )
    next(stream)
    next(stream)
    closed_at = time.monotonic()
    stream.close()

    _assert_abandoned_at_once(fake_upstream.last_request(), closed_at)


def test_disconnect_while_upstream_is_silent_closes_upstream(
    relay: Relay, fake_upstream: FakeUpstream
) -> None:
    """No bytes flow to reveal the closed socket, so the relay must watch for the disconnect."""
    with httpx.stream(
        "POST", f"{relay.v1}/chat/completions", json=_stream_body(first_delay=30)
    ) as response:
        assert response.status_code == 200
        record = fake_upstream.last_request()
        closed_at = time.monotonic()

    _assert_abandoned_at_once(record, closed_at)


@pytest.fixture(scope="module")
def pinging_relay(
    fake_upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Relay]:
    with relay_to(
        fake_upstream, tmp_path_factory.mktemp("pinging"), env={"TOKENRELAY_PING_INTERVAL": "0.2"}
    ) as running:
        yield running


def test_idle_stream_gets_ping_comments(pinging_relay: Relay) -> None:
    received = b""
    with httpx.stream(
        "POST",
        f"{pinging_relay.v1}/chat/completions",
        json=_stream_body(tokens=2, first_delay=1.0),
    ) as response:
        for piece in response.iter_raw():
            received += piece
            if b"data:" in received:
                break

    # The first event starts with its id line; comments sit between events, never inside one.
    before_data = received[: received.index(b"id: ")]
    assert b": ping\n" in before_data
    assert before_data.replace(b": ping\n", b"") == b""


def test_sdk_reads_a_stream_with_pings(pinging_relay: Relay) -> None:
    with openai.OpenAI(base_url=pinging_relay.v1, api_key="unused", max_retries=0) as client:
        stream = client.chat.completions.create(
            model="fake-model",
            messages=MESSAGES,
            stream=True,
            extra_body={"fake": {"tokens": 3, "first_delay": 0.5, "delay": 0.3}},
        )
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)

    assert text == expected_text(3)


def test_an_unresumable_streams_log_is_dropped_soon_after_its_end(relay: Relay) -> None:
    """A plain /v1 stream is cancelled when its client leaves, so nobody can resume it: its log
    is not kept for `stream_ttl` (memory per answer), while a resumable one's is."""
    ids = {}
    for name, headers in (("plain", {}), ("resumable", {"X-Tokenrelay-Resumable": "true"})):
        answer = httpx.post(
            f"{relay.v1}/chat/completions", json=_stream_body(tokens=3), headers=headers
        )
        assert data_events(answer.text)[-1] == "[DONE]"
        ids[name] = answer.headers["x-tokenrelay-stream"]
    deadline = time.monotonic() + 30
    while httpx.get(f"{relay.url}/api/streams/{ids['plain']}").status_code != 404:
        assert time.monotonic() < deadline, "the plain stream's log was kept"
        time.sleep(0.2)
    kept = httpx.get(f"{relay.url}/api/streams/{ids['resumable']}")
    assert kept.status_code == 200
    assert data_events(kept.text)[-1] == "[DONE]"
