"""A client that leaves before its answer has started frees the upstream at once.

Streamed answers notice through ``EventStreamResponse``'s disconnect watcher; before a response
starts (a whole non-streamed answer, or a stream whose upstream has not answered its headers)
nothing is written, so ``api.relay`` races the work against the client's disconnect.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from conftest import Relay
from fake_upstream import FakeUpstream

CANCEL_DEADLINE = 0.2
"""Seconds from the client closing its connection to the upstream request being closed."""

_SLOW = 5
"""Seconds the fake upstream would take: far longer than the deadline."""


async def _leave_while_waiting(
    relay: Relay, fake: FakeUpstream, method: str, path: str, **request: Any
) -> None:
    """Send a request, close the connection once the upstream has it, and check the upstream
    request was closed within ``CANCEL_DEADLINE``."""
    async with httpx.AsyncClient(base_url=relay.url, timeout=30.0) as client:
        pending = asyncio.create_task(client.request(method, path, **request))
        record = await asyncio.to_thread(fake.last_request, 10)
        assert not pending.done(), pending.result().text
        left_at = time.monotonic()
        pending.cancel()  # httpx closes the connection of a cancelled request
        with pytest.raises(asyncio.CancelledError):
            await pending

    outcome = await asyncio.to_thread(record.wait_for_outcome, 10)
    assert outcome == "abandoned"
    assert record.outcome_at is not None
    waited = record.outcome_at - left_at
    assert waited < CANCEL_DEADLINE, f"the upstream request ran on for {waited:.3f} s"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (
            "/v1/chat/completions",
            {"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}]},
        ),
        ("/v1/completions", {"model": "fake-model", "prompt": "Once upon a time"}),
    ],
)
async def test_non_streamed_request_whose_client_leaves_closes_the_upstream_request(
    relay: Relay, fake_upstream: FakeUpstream, path: str, body: dict[str, Any]
) -> None:
    body = {**body, "fake": {"first_delay": _SLOW}}

    await _leave_while_waiting(relay, fake_upstream, "POST", path, json=body)


async def test_ask_whose_client_leaves_closes_the_upstream_request(
    relay: Relay, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.defaults = {"first_delay": _SLOW}

    await _leave_while_waiting(
        relay, fake_upstream, "GET", "/api/ask", params={"prompt": "Hi", "model": "fake-model"}
    )


async def test_stream_whose_client_leaves_before_the_upstream_answers_closes_it(
    relay: Relay, fake_upstream: FakeUpstream
) -> None:
    body = {
        "model": "fake-model",
        "messages": [{"role": "user", "content": "Hi"}],
        "stream": True,
        "fake": {"headers_delay": _SLOW},
    }

    await _leave_while_waiting(relay, fake_upstream, "POST", "/v1/chat/completions", json=body)
