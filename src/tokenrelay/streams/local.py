"""One log's entries in this process, with live readers: the memory backend's whole log and the
Redis backend's local copy (readers in the writer's process never wait on Redis).

The entries are a plain list (entry ``seq`` is ``entries[seq - base - 1]``; ``base`` is 0 but
for a remote reader's mirror, which starts mid-log), so resuming from any position is an index,
and a reader holds no per-entry state: it keeps its position and, while it is caught up, one
future that the next ``append`` resolves.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from tokenrelay.errors import StreamTooLarge

__all__ = ["LocalLog"]


class LocalLog:
    """Entries of one stream held in memory; implements ``LogWriter``."""

    def __init__(self, stream_id: str, *, max_bytes: int, base: int = 0) -> None:
        self._stream_id = stream_id
        self._base = base
        self._max_bytes = max_bytes
        self._size = 0
        self._entries: list[bytes] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._ended = False

    @property
    def stream_id(self) -> str:
        return self._stream_id

    @property
    def seq(self) -> int:
        return self._base + len(self._entries)

    @property
    def ended(self) -> bool:
        return self._ended

    def append(self, chunk: bytes) -> int:
        size = self._size + len(chunk)
        if size > self._max_bytes or self._ended:
            self._refuse()
        self._size = size
        entries = self._entries
        entries.append(chunk)
        if self._waiters:
            self._wake()
        return len(entries)

    def _refuse(self) -> None:
        if self._ended:
            raise RuntimeError(f"stream {self._stream_id} has ended")
        raise StreamTooLarge(
            f"The answer is longer than this server keeps per stream "
            f"({self._max_bytes} bytes of events); it was cut short here."
        )

    def _append_tail(self, tail: bytes) -> None:
        """Append the closing chunk, past the size bound (see ``LogWriter.end``)."""
        if tail:
            self._size += len(tail)
            self._entries.append(tail)

    def _finish(self, tail: bytes) -> bool:
        """Append ``tail``, mark ended and wake readers; False if it had already ended."""
        if self._ended:
            return False
        self._append_tail(tail)
        self._ended = True
        self._wake()
        return True

    async def end(self, tail: bytes = b"", *, keep: float | None = None) -> None:
        self._finish(tail)

    def _wake(self) -> None:
        waiters = self._waiters
        self._waiters = []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def iterate(self, after: int) -> AsyncIterator[tuple[int, bytes]]:
        """``(seq, chunk)`` for every entry after ``after``, live until the log ends."""
        entries = self._entries
        base = self._base
        index = max(after - base, 0)
        loop = asyncio.get_running_loop()
        while True:
            while index < len(entries):
                index += 1
                yield base + index, entries[index - 1]
            # No await between the last length check and this one: nothing can slip in.
            if self._ended:
                return
            # A reader cancelled here cancels its waiter too; ``_wake`` skips it.
            waiter = loop.create_future()
            self._waiters.append(waiter)
            await waiter
