"""What every event log backend offers: the ``EventLog`` and ``LogWriter`` protocols.

Kept apart from the backends so that the code using a log (the relay, the API) depends on these
two small types only, whichever backend the settings chose.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Protocol

from tokenrelay.sse import STREAM_ID_PATTERN

__all__ = ["EventLog", "LogWriter", "new_stream_id", "check_stream_id"]


def new_stream_id() -> str:
    """A fresh, unguessable stream id (``st_`` and 24 hex digits)."""
    return "st_" + secrets.token_hex(12)


def check_stream_id(stream_id: str) -> None:
    """Refuse an id that could not be written in an SSE ``id:`` line or a Redis key name.

    Ids come from ``new_stream_id`` (or the caller's own scheme); a bad one is a bug, not
    a client's mistake, hence ``ValueError``. Ids read from a request go through
    ``tokenrelay.sse.parse_event_id`` or the route's own validation first.
    """
    if STREAM_ID_PATTERN.fullmatch(stream_id) is None:
        raise ValueError(f"invalid stream id {stream_id!r}")


class LogWriter(Protocol):
    """The one writer of a log: the task generating the answer."""

    @property
    def stream_id(self) -> str: ...

    @property
    def seq(self) -> int:
        """The sequence number of the last entry appended (0 before the first)."""
        ...

    def append(self, chunk: bytes) -> int:
        """Add one entry (whole SSE events) and return its sequence number: 1, 2, 3...

        Synchronous and cheap: it only stores the chunk and wakes readers (the Redis backend
        queues it for its background flusher). Raises ``StreamTooLarge`` past
        ``stream_max_bytes`` and ``RuntimeError`` after ``end``.
        """
        ...

    async def end(self, tail: bytes = b"", *, keep: float | None = None) -> None:
        """Close the log: append ``tail`` (if any), mark it ended, start its expiry.

        ``tail`` is exempt from the size bound so that a log cut short by ``StreamTooLarge``
        can still end with an error event. ``keep`` shortens how long the ended log stays
        readable (``stream_ttl`` by default): an answer nobody can resume need not be kept.
        Idempotent; call it in a ``finally``.
        """
        ...


class EventLog(Protocol):
    """Numbered SSE event logs, one per streamed answer."""

    async def start(self) -> None:
        """Connect (Redis) and start background work; call once before use."""
        ...

    async def aclose(self) -> None:
        """Flush what is pending and release connections and timers."""
        ...

    async def open(self, stream_id: str) -> LogWriter:
        """Create the log ``stream_id`` and return its writer; ``ValueError`` if it exists."""
        ...

    async def read(self, stream_id: str, after: int = 0) -> AsyncIterator[tuple[int, bytes]]:
        """Every entry after sequence number ``after``, then the live rest until the log ends.

        Awaiting this raises ``StreamNotFound`` for an unknown or expired id, before anything
        is iterated, so a route can answer 404 before it starts its response. Any number of
        readers may read one log at once, each getting every entry.
        """
        ...
