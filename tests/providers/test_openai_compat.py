"""``OpenAICompatibleProvider`` against the fake upstream over TCP, without a server in between.

The end-to-end behaviour (what a client sees) is tested in ``tests/api``; here are the properties
only the provider's own thread can show, such as how much CPU it spends on what it reads.
"""

from __future__ import annotations

import time

import orjson
import pytest

from fake_upstream import LEAKED_KEY, FakeUpstream
from tokenrelay.config import ProviderSettings
from tokenrelay.errors import UpstreamUnavailable
from tokenrelay.providers.base import ProviderRequest
from tokenrelay.providers.openai_compat import OpenAICompatibleProvider


def _stream_request(**fake: object) -> ProviderRequest:
    body = {"model": "fake-model", "messages": [], "stream": True, "fake": fake}
    return ProviderRequest("chat/completions", "fake-model", body, orjson.dumps(body))


async def test_bytes_without_a_newline_are_buffered_in_linear_time(
    fake_upstream: FakeUpstream,
) -> None:
    # A bound far above what is sent, so that only the buffering's own cost is measured.
    settings = ProviderSettings(
        name="fake",
        base_url=fake_upstream.base_url,
        api_key=LEAKED_KEY,
        max_event_bytes=64 * 1024 * 1024,
    )
    provider = OpenAICompatibleProvider(settings)
    size = 2 * 1024 * 1024
    # 1 KiB a millisecond: the provider reads every piece on its own, 2048 reads in all.
    request = _stream_request(no_newline=size, write_size=1024, delay=0.001)
    received = 0
    try:
        started = time.thread_time()  # this thread's CPU: the fake upstream runs in another
        stream = await provider.open_stream(request)
        with pytest.raises(UpstreamUnavailable):  # the one "event" never finished an answer
            async for chunk in stream:
                received += len(chunk)
        spent = time.thread_time() - started
    finally:
        await provider.aclose()

    assert received >= size
    # Copying the pending bytes at every read (quadratic) took 2.2 s of CPU here; linear, 0.1 s.
    assert spent < 0.6, f"{spent:.2f} s of CPU to buffer {size} bytes"
