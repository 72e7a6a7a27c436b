"""Reading OpenAI chunk events for the text tokenrelay keeps (``tokenrelay.chunks``)."""

from __future__ import annotations

import json
import time

import pytest

from tokenrelay.chunks import ChunkSummary, StreamError


def _event(piece: str) -> bytes:
    chunk = {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": piece}}],
    }
    return f"data: {json.dumps(chunk)}\n\n".encode()


def test_text_is_every_piece_in_order_and_text_since_is_the_rest() -> None:
    summary = ChunkSummary()
    pieces = ["Hello", ", ", "wörld", "!"]

    added = [summary.feed(_event(piece)) for piece in pieces]
    summary.feed(b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\n')
    summary.feed(b'data: {"choices": [], "usage": {"completion_tokens": 4}}\n\ndata: [DONE]\n\n')

    assert added == pieces
    assert summary.text == "Hello, wörld!"
    assert summary.text_since(2) == "wörld!"
    assert summary.text_since(len(summary.parts)) == ""
    assert summary.finish_reason == "stop"
    assert summary.usage == {"completion_tokens": 4}


def test_an_error_event_raises_stream_error() -> None:
    summary = ChunkSummary()
    with pytest.raises(StreamError) as raised:
        summary.feed(b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n')
    assert raised.value.error["message"] == "overloaded"


def test_a_long_answer_is_accumulated_in_linear_time() -> None:
    # 20,000 chunks of 200 characters: 4 MB of text. Appending each to one growing string
    # copies everything so far every time, ~40 GB of copying in all (seconds); keeping the
    # pieces costs the parsing alone (tens of milliseconds).
    event = _event("x" * 199 + " ")
    summary = ChunkSummary()

    started = time.perf_counter()
    for _ in range(20_000):
        summary.feed(event)
    elapsed = time.perf_counter() - started

    assert len(summary.text) == 4_000_000
    assert elapsed < 1.5, f"feeding 20,000 chunks took {elapsed:.2f} s"
