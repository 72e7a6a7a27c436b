"""Reading OpenAI's streamed chunk events for the few fields tokenrelay itself needs.

The relay forwards bytes; only consumers that keep or show the text (the CLI, stored
conversations) parse them, and only the ``data:`` lines, with orjson.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

__all__ = ["ChunkSummary", "iter_data", "StreamError"]


class StreamError(Exception):
    """An error event arrived in the stream; ``error`` is its OpenAI-shaped body."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(str(error.get("message", "The stream failed.")))
        self.error = error


def iter_data(events: bytes) -> Iterator[dict[str, Any]]:
    """The JSON objects of the ``data:`` lines in whole events (``[DONE]`` and comments skipped)."""
    for line in events.splitlines():
        if line.startswith(b"data:"):
            payload = line[5:].strip()
            if payload and payload != b"[DONE]":
                data = orjson.loads(payload)
                if isinstance(data, dict):
                    yield data


@dataclass
class ChunkSummary:
    """What a stream said so far: text, finish reason and usage, built up chunk by chunk.

    The text is kept as the list of pieces it arrived in, joined only when asked for: appending
    to one growing string costs a copy of everything so far per chunk, quadratic in the answer.
    """

    parts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def text_since(self, part: int) -> str:
        """The text of the pieces from index ``part`` on (``len(parts)`` marks where it ends)."""
        return "".join(self.parts[part:])

    def feed(self, events: bytes) -> str:
        """Take whole events; return the text they added. Raises ``StreamError`` on an error,
        after keeping the text of the events before it."""
        added: list[str] = []
        for data in iter_data(events):
            if "error" in data:
                if added:  # the text of the events before the error is kept
                    self.parts.append("".join(added))
                error = data["error"]
                raise StreamError(error if isinstance(error, dict) else {"message": str(error)})
            if data.get("usage"):
                self.usage = data["usage"]
            for choice in data.get("choices") or ():
                delta = choice.get("delta")
                piece = delta.get("content") if delta is not None else choice.get("text")
                if piece:
                    added.append(piece)
                if choice.get("finish_reason"):
                    self.finish_reason = choice["finish_reason"]
        if not added:
            return ""
        text = added[0] if len(added) == 1 else "".join(added)
        self.parts.append(text)
        return text
