"""Reading tokenrelay's resumable streams in tests: entries by id, resuming, the text they carry.

Every streamed answer is a numbered log; each entry reaches the client as ``id: <stream>:<n>``
followed by one SSE event. ``entries`` reads a response as ``(n, event)`` pairs as they arrive,
so a test can drop a connection after any entry and resume with ``Last-Event-ID`` from it, and
compare what it got, entry for entry, with an uninterrupted read.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

__all__ = [
    "RESUMABLE",
    "Entry",
    "chat_body",
    "entries",
    "error_of",
    "open_stream",
    "read_stream",
    "send_message",
    "text_of",
]

RESUMABLE = {"X-Tokenrelay-Resumable": "true"}
"""Asks for a stream that outlives its connection (for ``stream_grace`` seconds)."""

Entry = tuple[int, str]
"""One logged event: its number in the stream and its lines (without the ``id:`` line)."""


def chat_body(**fake: Any) -> dict[str, Any]:
    """A streamed chat request to the fake upstream, whose behaviour ``fake`` sets."""
    return {
        "model": "fake-model",
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "stream": True,
        "fake": fake,
    }


async def entries(response: httpx.Response, *, preamble: bool = False) -> AsyncIterator[Entry]:
    """The entries of a tokenrelay event stream as they arrive, each once its event is whole.

    Checks what every reader may rely on: each event is led by an ``id:`` line naming the
    response's stream, numbers follow one another, and nothing else arrives between events
    (``: ping`` comments aside; with ``preamble``, one event without an id comes first, as a
    conversation's answer starts with the stored messages).
    """
    stream_id = response.headers["x-tokenrelay-stream"]
    prefix = f"id: {stream_id}:"
    seq: int | None = None
    last: int | None = None
    lines: list[str] = []
    async for line in response.aiter_lines():
        if line.startswith(":"):
            continue  # a heartbeat comment, between entries
        if seq is None:
            if preamble:
                preamble = bool(line)  # its event ends at the first blank line
            elif line:
                assert line.startswith(prefix), f"expected an id line, got {line!r}"
                seq = int(line[len(prefix) :])
                # Consecutive; an error event tokenrelay adds at the end (``interrupted``) carries
                # the number of the last entry, as it is not in the log.
                assert last is None or last <= seq <= last + 1, f"entry {seq} after {last}"
            continue
        if line:
            lines.append(line)
            continue
        yield seq, "\n".join(lines)
        last, seq, lines = seq, None, []
    assert seq is None, "the stream ended inside an event"


def _payloads(events: list[Entry]) -> list[Any]:
    payloads = []
    for _, event in events:
        for line in event.split("\n"):
            if line.startswith("data: ") and line != "data: [DONE]":
                payloads.append(json.loads(line[6:]))
    return payloads


def text_of(events: list[Entry]) -> str:
    """The answer's text: every chat chunk's content, joined."""
    return "".join(
        choice["delta"].get("content") or ""
        for payload in _payloads(events)
        for choice in payload.get("choices") or ()
    )


def error_of(events: list[Entry]) -> dict[str, Any] | None:
    """The error an in-band error event reported, if the stream ended with one."""
    payloads = _payloads(events[-1:])
    if payloads and isinstance(payloads[-1], dict) and "error" in payloads[-1]:
        error: dict[str, Any] = payloads[-1]["error"]
        return error
    return None


@asynccontextmanager
async def open_stream(
    client: httpx.AsyncClient, body: dict[str, Any], *, resumable: bool = True
) -> AsyncIterator[tuple[str, AsyncIterator[Entry]]]:
    """POST a streamed chat request; its stream id and entries until the block ends (which
    closes the connection, a drop if the answer is not over)."""
    headers = RESUMABLE if resumable else {}
    async with client.stream(
        "POST", "/v1/chat/completions", json=body, headers=headers
    ) as response:
        assert response.status_code == 200, await response.aread()
        yield response.headers["x-tokenrelay-stream"], entries(response)


@asynccontextmanager
async def read_stream(
    client: httpx.AsyncClient, stream_id: str, after: int | None = None, *, query: bool = False
) -> AsyncIterator[AsyncIterator[Entry]]:
    """``GET /api/streams/{id}``, resuming after entry ``after`` (``Last-Event-ID``, or the
    ``last_event_id`` parameter with ``query``); its entries until the block ends."""
    headers, params = {}, {}
    if after is not None:
        if query:
            params["last_event_id"] = f"{stream_id}:{after}"
        else:
            headers["Last-Event-ID"] = f"{stream_id}:{after}"
    async with client.stream(
        "GET", f"/api/streams/{stream_id}", headers=headers, params=params
    ) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["x-tokenrelay-stream"] == stream_id
        yield entries(response)


@asynccontextmanager
async def send_message(
    client: httpx.AsyncClient, conversation_id: str, content: str
) -> AsyncIterator[tuple[str, AsyncIterator[Entry]]]:
    """Send a message in a conversation; the answer's stream id and entries (after the
    preamble naming the stored messages) until the block ends."""
    async with client.stream(
        "POST", f"/api/conversations/{conversation_id}/messages", json={"content": content}
    ) as response:
        assert response.status_code == 200, await response.aread()
        yield response.headers["x-tokenrelay-stream"], entries(response, preamble=True)
