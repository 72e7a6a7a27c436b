"""The Server-Sent Events wire format, written in one place.

Everything tokenrelay frames itself (local model chunks, error events, conversation preambles,
heartbeats) goes through ``encode_event`` or these constants; relayed upstream bytes are not
re-framed.
"""

from __future__ import annotations

from typing import Any

import orjson

__all__ = ["DONE", "PING", "encode_event"]

DONE = b"data: [DONE]\n\n"
PING = b": ping\n\n"


def encode_event(data: Any, *, event: str | None = None, id: str | None = None) -> bytes:
    """Frame one event; ``data`` is JSON-encoded unless it is already ``bytes`` or ``str``.

    A payload with newlines becomes several ``data:`` lines, as the HTML standard requires.
    """
    if isinstance(data, bytes):
        payload = data
    elif isinstance(data, str):
        payload = data.encode()
    else:
        payload = orjson.dumps(data)
    lines = []
    if id is not None:
        lines.append(b"id: " + id.encode())
    if event is not None:
        lines.append(b"event: " + event.encode())
    lines.extend(b"data: " + line for line in payload.splitlines() or [b""])
    return b"\n".join(lines) + b"\n\n"
