"""The memory backend: logs live in this process only (the default, one process).

An ended log stays readable for ``ttl`` seconds, then a timer drops it. Nothing here can be
orphaned: the owner of a writer ends it in a ``finally``, and if the process dies its readers
die with it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from tokenrelay.errors import StreamNotFound
from tokenrelay.streams.base import check_stream_id
from tokenrelay.streams.local import LocalLog

__all__ = ["MemoryEventLog"]


class _MemoryWriter(LocalLog):
    def __init__(self, log: MemoryEventLog, stream_id: str, *, max_bytes: int) -> None:
        super().__init__(stream_id, max_bytes=max_bytes)
        self._log = log

    async def end(self, tail: bytes = b"", *, keep: float | None = None) -> None:
        if self._finish(tail):
            self._log._expire_later(self, keep)


class MemoryEventLog:
    """Event logs in a dict of this process; implements ``EventLog``."""

    def __init__(self, *, ttl: float = 600.0, max_bytes: int = 16 * 1024 * 1024) -> None:
        self.ttl = ttl
        self.max_bytes = max_bytes
        self._logs: dict[str, _MemoryWriter] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._logs.clear()

    async def open(self, stream_id: str) -> _MemoryWriter:
        check_stream_id(stream_id)
        if stream_id in self._logs:
            raise ValueError(f"stream {stream_id} already exists")
        writer = _MemoryWriter(self, stream_id, max_bytes=self.max_bytes)
        self._logs[stream_id] = writer
        return writer

    async def read(self, stream_id: str, after: int = 0) -> AsyncIterator[tuple[int, bytes]]:
        log = self._logs.get(stream_id)
        if log is None:
            raise StreamNotFound(stream_id)
        return log.iterate(after)

    def _expire_later(self, log: _MemoryWriter, keep: float | None) -> None:
        # Readers already iterating hold the log itself: expiry only stops new ones.
        ttl = self.ttl if keep is None else min(keep, self.ttl)
        loop = asyncio.get_running_loop()
        self._timers[log.stream_id] = loop.call_later(ttl, self._expire, log)

    def _expire(self, log: _MemoryWriter) -> None:
        self._timers.pop(log.stream_id, None)
        if self._logs.get(log.stream_id) is log:
            del self._logs[log.stream_id]
