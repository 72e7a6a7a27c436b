"""Reading OpenAI's streamed chunk events for the few fields tokenrelay itself needs.

The relay forwards bytes; only consumers that keep or show the text (the CLI, stored
conversations) parse them, and only the ``data:`` lines, with orjson.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

__all__ = [
    "ChunkSummary",
    "StreamError",
    "ends_with_error",
    "Usage",
    "is_usage_only",
    "iter_data",
    "usage_in_answer",
    "usage_in_stream",
]

Usage = tuple[int, int]
"""``(prompt_tokens, completion_tokens)`` as an answer reported them."""


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


def _tokens(usage: object) -> Usage | None:
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    # The Responses API's names, for an upstream that uses them.
    prompt = usage.get("input_tokens") if prompt is None else prompt
    completion = usage.get("output_tokens") if completion is None else completion
    return (
        prompt if type(prompt) is int and prompt > 0 else 0,
        completion if type(completion) is int and completion > 0 else 0,
    )


def usage_in_stream(*last_chunks: bytes) -> Usage | None:
    """The usage a stream reported in its last chunks (``stream_options.include_usage``; the
    chunks before it may say ``"usage": null``): only a chunk naming ``"usage"`` is parsed."""
    for chunk in reversed(last_chunks):
        if b'"usage"' in chunk:
            try:  # bytes an upstream sent: maybe not JSON
                usages = [data["usage"] for data in iter_data(chunk) if data.get("usage")]
            except ValueError:
                continue
            if usages:
                return _tokens(usages[-1])
    return None


def usage_in_answer(body: bytes) -> Usage | None:
    """The usage of a whole (non-streamed) answer's JSON body."""
    if b'"usage"' not in body:
        return None
    try:
        data = orjson.loads(body)
    except ValueError:
        return None
    return _tokens(data.get("usage")) if isinstance(data, dict) else None


def is_usage_only(event: bytes) -> bool:
    """Whether ``event`` is the chunk ``include_usage`` adds: usage, and no choices.

    Run only for clients that did not ask for that chunk (the gateway asked for them): two
    searches per event, and a parse only for an event that has both an empty list and usage.
    """
    if b"[]" not in event or b'"usage"' not in event:
        return False
    try:
        chunks = list(iter_data(event))
    except ValueError:
        return False
    return bool(chunks) and all(
        c.get("choices") == [] and isinstance(c.get("usage"), dict) for c in chunks
    )


def ends_with_error(last_chunk: bytes) -> bool:
    """Whether a stream's last chunk is an in-band error event (``data: {"error": ...}``): the
    relay forwards such an event without parsing it, so its outcome is read here, once."""
    if b'"error"' not in last_chunk:
        return False
    try:
        return any("error" in data for data in iter_data(last_chunk))
    except ValueError:
        return False
