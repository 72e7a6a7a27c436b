"""Reading Redis logs written by other processes, for any number of readers on one connection.

A reader first catches up with XRANGE (pages of ``PAGE`` entries), then follows the live rest
from a *mirror*: a local copy of the stream from that point on, shared by every reader of that
stream in this process. One follower task per process fills all mirrors with a single
XREAD BLOCK over all followed streams, so a thousand readers cost one Redis connection (a
blocking XREAD per reader would hold a pooled connection each, and exhaust the pool).

A mirror ends at the stream's end marker or, when the writer's lease key has gone with no end
marker (its process died), with a final synthetic ``INTERRUPTED_EVENT``: the follower checks
the lease of every mirror that has been silent for ``check_every`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from tokenrelay.errors import RedisUnavailable, StreamInterrupted
from tokenrelay.sse import encode_event
from tokenrelay.streams.local import LocalLog
from tokenrelay.streams.redis_format import PAGE, decode, xread_by_key

__all__ = ["INTERRUPTED_EVENT", "Follower"]

logger = logging.getLogger(__name__)


def _interrupted_event() -> bytes:
    error = StreamInterrupted(
        "The answer was interrupted: the server writing it stopped before it ended."
    ).to_dict()
    error["error"]["status"] = StreamInterrupted.status  # as api/sse.py sends in-band errors
    return encode_event(error)


INTERRUPTED_EVENT = _interrupted_event()
"""The last chunk a reader gets from a log whose writer died without ending it."""


class _Mirror(LocalLog):
    """The live rest of one remote stream, from ``base`` on, for this process's readers."""

    def __init__(self, stream_id: str, key: bytes, alive_key: bytes, base: int, now: float) -> None:
        super().__init__(stream_id, max_bytes=1 << 62, base=base)
        self.key = key
        self.alive_key = alive_key
        self.base = base
        self.readers = 0
        self.heard = now  # when the follower last saw an entry or a live lease
        self.interrupted = False
        self.failed = False

    def feed(self, entries: list[Any]) -> None:
        """Add XRANGE/XREAD entries after what it holds; end it at the end marker."""
        chunks, ended = decode(entries, self.seq)
        self._entries.extend(chunk for _, chunk in chunks)
        if ended:
            self._finish(b"")
        elif self._waiters:
            self._wake()

    def stop(self, *, interrupted: bool = False, failed: bool = False) -> None:
        self.interrupted = interrupted
        self.failed = failed
        self._finish(b"")


class Follower:
    """Serves reads of Redis streams whose writer is not in this process."""

    def __init__(self, client: Redis, *, poll: float, check_every: float, linger: float) -> None:
        self._client = client
        self._poll_ms = max(1, int(poll * 1000))
        self._check_every = check_every
        self._linger = linger
        self._mirrors: dict[str, _Mirror] = {}
        self._task: asyncio.Task[None] | None = None

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for mirror in self._mirrors.values():
            mirror.stop(failed=True)

    async def entries_after(self, key: bytes, seq: int) -> list[Any]:
        """One page of the entries holding chunks after ``seq``."""
        return list(await self._client.xrange(key, b"(0-%d" % seq, b"+", count=PAGE) or ())

    async def read(
        self, stream_id: str, key: bytes, alive_key: bytes, seq: int, entries: list[Any]
    ) -> AsyncIterator[tuple[int, bytes]]:
        """Yield ``entries`` (the first page after ``seq``), catch up, then follow a mirror."""
        try:
            # Catch up on what is already in Redis.
            while True:
                chunks, ended = decode(entries, seq)
                for entry in chunks:
                    seq = entry[0]
                    yield entry
                if ended:
                    return
                if len(entries) < PAGE:
                    break
                entries = await self.entries_after(key, seq)
            mirror = self._mirror(stream_id, key, alive_key, seq)
            mirror.readers += 1
            try:
                # A mirror started by an earlier reader may begin after us: fill the gap.
                while seq < mirror.base:
                    entries = await self.entries_after(key, seq)
                    chunks, _ = decode(entries, seq)
                    if not chunks:  # the stream expired under us
                        yield seq, INTERRUPTED_EVENT
                        return
                    for entry in chunks:
                        if entry[0] > mirror.base:
                            break
                        seq = entry[0]
                        yield entry
                async for entry in mirror.iterate(seq):
                    seq = entry[0]
                    yield entry
            finally:
                mirror.readers -= 1
                if mirror.readers == 0 and self._mirrors.get(stream_id) is mirror:
                    del self._mirrors[stream_id]
        except RedisError as exc:
            raise RedisUnavailable("Redis stopped answering while reading the stream.") from exc
        if mirror.failed:
            raise RedisUnavailable("Redis stopped answering while reading the stream.")
        if mirror.interrupted:
            yield seq, INTERRUPTED_EVENT

    def _mirror(self, stream_id: str, key: bytes, alive_key: bytes, seq: int) -> _Mirror:
        mirror = self._mirrors.get(stream_id)
        if mirror is None or mirror.failed:
            now = asyncio.get_running_loop().time()
            mirror = self._mirrors[stream_id] = _Mirror(stream_id, key, alive_key, seq, now)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._follow(), name="stream follower")
        return mirror

    async def _follow(self) -> None:
        """Fill every live mirror from one XREAD BLOCK over all of them, until none is left."""
        client = self._client
        loop = asyncio.get_running_loop()
        while live := [m for m in self._mirrors.values() if not m.ended]:
            try:
                reply = await client.xread(
                    {m.key: b"0-%d" % m.seq for m in live}, count=PAGE, block=self._poll_ms
                )
                now = loop.time()
                by_key = xread_by_key(reply)
                for mirror in live:
                    got = by_key.get(mirror.key)
                    if got:
                        mirror.feed(got)
                        mirror.heard = now
                silent = [m for m in live if not m.ended and now - m.heard >= self._check_every]
                if silent:
                    await self._check_writers(silent, now)
            except RedisError:
                logger.exception("following streams in Redis failed")
                for mirror in live:
                    mirror.stop(failed=True)
                return
            if by_key:
                # Let more entries gather before the next round trip.
                await asyncio.sleep(self._linger)

    async def _check_writers(self, mirrors: list[_Mirror], now: float) -> None:
        """End the mirrors whose writer's lease expired, after reading what it had flushed."""
        async with self._client.pipeline(transaction=False) as pipe:
            for mirror in mirrors:
                pipe.exists(mirror.alive_key)
            alive = await pipe.execute()
        for mirror, is_alive in zip(mirrors, alive, strict=True):
            mirror.heard = now
            if is_alive:
                continue
            # Its lease is gone, so it writes no more: whatever it flushed is in Redis now.
            while not mirror.ended:
                entries = await self.entries_after(mirror.key, mirror.seq)
                mirror.feed(entries)
                if len(entries) < PAGE:
                    break
            if not mirror.ended:
                mirror.stop(interrupted=True)
