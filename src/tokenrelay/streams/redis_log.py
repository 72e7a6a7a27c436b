"""The Redis backend: one Redis Stream per log, so any process can resume any answer.

Keys (all under ``prefix``, ``tokenrelay:`` by default):

- ``stream:<id>``: the entries, one per flush, XADDed with explicit ids ``0-<seq of the
  last chunk>`` so a reader's ``after`` is an XRANGE/XREAD position as it is, and an end
  marker (the layout is ``redis_format.py``'s). It expires ``ttl`` seconds after the end;
  while the answer runs its expiry is pushed forward with every write and lease renewal, so
  a crash never leaves it behind for good.
- ``stream:<id>:alive``: the writer's lease, expiring ``lease`` seconds after its last
  renewal. A reader elsewhere that finds neither new entries nor this key knows the writer
  died (its replica was killed) and ends with an ``interrupted`` error event, never a hang.

Writes never wait on Redis: ``append`` stores the chunk in the writer's local copy (which
readers in this process read directly) and marks the writer dirty. One flusher task per
``RedisEventLog`` waits ``flush_interval`` for more chunks, then sends everything pending, of
every stream of this process, in one pipeline round trip, and renews the leases that are due.
Readers elsewhere catch up with XRANGE and then follow the live rest through this process's
one ``Follower`` (``follower.py``), which notices a dead writer within about ``lease + 1`` s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator

from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import RedisError, ResponseError

from tokenrelay.errors import RedisUnavailable, StreamNotFound
from tokenrelay.sse import STREAM_ID_PATTERN
from tokenrelay.streams.base import check_stream_id
from tokenrelay.streams.follower import INTERRUPTED_EVENT, Follower
from tokenrelay.streams.local import LocalLog
from tokenrelay.streams.redis_format import END_FIELDS, PAGE, encode

__all__ = ["INTERRUPTED_EVENT", "RedisEventLog"]

logger = logging.getLogger(__name__)

_ALREADY_WRITTEN = "equal or smaller than the target stream top item"


class _RedisWriter(LocalLog):
    """A local log whose entries the ``RedisEventLog``'s flusher copies to Redis."""

    def __init__(
        self, log: RedisEventLog, stream_id: str, *, max_bytes: int, refreshed_at: float
    ) -> None:
        super().__init__(stream_id, max_bytes=max_bytes)
        self._log = log
        self.key = log._key(stream_id)
        self.alive_key = self.key + b":alive"
        self.flushed = 0  # entries already in Redis
        self.dirty = False  # queued for the next flush
        self.refreshed_at = refreshed_at  # when the lease was last renewed
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.keep_ms = 0  # set by ``end(keep=...)``: a shorter life than the log's ttl

    def append(self, chunk: bytes) -> int:
        # LocalLog.append inlined: this runs once per upstream chunk.
        size = self._size + len(chunk)
        if size > self._max_bytes or self._ended:
            self._refuse()
        self._size = size
        entries = self._entries
        entries.append(chunk)
        if self._waiters:
            self._wake()
        if not self.dirty:
            self.dirty = True
            self._log._queue(self)
        return len(entries)

    async def end(self, tail: bytes = b"", *, keep: float | None = None) -> None:
        if not self._finish(tail):
            return
        if keep is not None:
            self.keep_ms = max(1, int(keep * 1000))
        if not self.dirty:
            self.dirty = True
            self._log._queue(self)
        timeout = self._log.lease
        try:
            await asyncio.wait_for(asyncio.shield(self.closed), timeout)
        except TimeoutError:
            # Readers here already saw the end; readers elsewhere will see the lease expire
            # and end with `interrupted`. Nothing more can be done for this stream.
            logger.error(
                "stream %s: its end could not be written to Redis within %.0f s",
                self.stream_id,
                timeout,
            )
            self._log._forget(self)


class RedisEventLog:
    """Event logs in Redis Streams; implements ``EventLog``.

    ``client`` (a ``redis.asyncio.Redis`` with ``decode_responses=False``) may be shared with
    other users and is then not closed by ``aclose``; without it one is made from ``url``.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        client: Redis | None = None,
        ttl: float = 600.0,
        max_bytes: int = 16 * 1024 * 1024,
        lease: float = 10.0,
        prefix: str = "tokenrelay:",
        flush_interval: float = 0.005,
        owner: str | None = None,
    ) -> None:
        if client is None:
            if url is None:
                raise ValueError("RedisEventLog needs a url or a client")
            # Waits for a free connection rather than failing when many readers catch up at once.
            pool = BlockingConnectionPool.from_url(url, max_connections=64, timeout=lease)
            client = Redis(connection_pool=pool)
            self._owns_client = True
        else:
            self._owns_client = False
        self._client = client
        self.ttl = ttl
        self.max_bytes = max_bytes
        self.lease = lease
        self.flush_interval = flush_interval
        self._prefix = prefix.encode() + b"stream:"
        self._owner = owner or f"{socket.gethostname()}:{os.getpid()}"
        self._ttl_ms = max(1, int(ttl * 1000))
        self._lease_ms = max(1, int(lease * 1000))
        # While running, a stream key outlives a lease renewal by far; after a crash it lasts
        # at most ``ttl + lease`` more.
        self._running_ttl_ms = self._ttl_ms + self._lease_ms
        self._renew_every = lease / 3
        self._follower = Follower(
            client, poll=0.1, check_every=min(1.0, lease / 4), linger=flush_interval
        )
        self._writers: dict[str, _RedisWriter] = {}
        self._pending: list[_RedisWriter] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._flusher: asyncio.Task[None] | None = None
        self.flushes = 0  # pipelines sent, for tests and the benchmark

    def _key(self, stream_id: str) -> bytes:
        return self._prefix + stream_id.encode()

    async def start(self) -> None:
        try:
            await self._client.ping()
        except RedisError as exc:
            raise RedisUnavailable("Redis (TOKENRELAY_REDIS_URL) cannot be reached.") from exc
        self._flusher = asyncio.create_task(self._flush_forever(), name="stream flusher")

    async def aclose(self) -> None:
        await self._follower.aclose()
        self._closing = True
        self._wake.set()
        if self._flusher is not None:
            try:
                await asyncio.wait_for(self._flusher, self.lease)
            except TimeoutError:
                logger.error("streams not written to Redis at shutdown: %d", len(self._pending))
        if self._owns_client:
            await self._client.aclose()

    async def open(self, stream_id: str) -> _RedisWriter:
        check_stream_id(stream_id)
        if stream_id in self._writers:
            raise ValueError(f"stream {stream_id} already exists")
        loop = asyncio.get_running_loop()
        writer = _RedisWriter(self, stream_id, max_bytes=self.max_bytes, refreshed_at=loop.time())
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.set(writer.alive_key, self._owner, nx=True, px=self._lease_ms)
                pipe.exists(writer.key)
                leased, exists = await pipe.execute()
            if not leased or exists:
                if leased:
                    await self._client.delete(writer.alive_key)
                raise ValueError(f"stream {stream_id} already exists")
        except RedisError as exc:
            raise RedisUnavailable("Redis cannot be reached to start a stream.") from exc
        self._writers[stream_id] = writer
        return writer

    async def read(self, stream_id: str, after: int = 0) -> AsyncIterator[tuple[int, bytes]]:
        writer = self._writers.get(stream_id)
        if writer is not None:
            return writer.iterate(after)
        if STREAM_ID_PATTERN.fullmatch(stream_id) is None:
            raise StreamNotFound(stream_id)
        key = self._key(stream_id)
        alive_key = key + b":alive"
        after = max(after, 0)
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.xrange(key, b"(0-%d" % after, b"+", count=PAGE)
                pipe.exists(key)
                pipe.exists(alive_key)
                entries, exists, alive = await pipe.execute()
        except RedisError as exc:
            raise RedisUnavailable("Redis cannot be reached to read the stream.") from exc
        if not (entries or exists or alive):
            raise StreamNotFound(stream_id)
        return self._follower.read(stream_id, key, alive_key, after, list(entries or ()))

    def _queue(self, writer: _RedisWriter) -> None:
        self._pending.append(writer)
        self._wake.set()

    def _forget(self, writer: _RedisWriter) -> None:
        if self._writers.get(writer.stream_id) is writer:
            del self._writers[writer.stream_id]

    async def _flush_forever(self) -> None:
        backoff = 0.05
        while True:
            if not self._pending and not self._closing:
                with contextlib.suppress(TimeoutError):  # then it is time to renew leases
                    await asyncio.wait_for(self._wake.wait(), self._renew_every)
            if self._pending and not self._closing:
                # Let the chunks of this moment, of every stream, join one round trip: at most
                # one pipeline per ``flush_interval``, however many streams are running.
                await asyncio.sleep(self.flush_interval)
            self._wake.clear()
            try:
                await self._flush()
            except RedisError:
                logger.exception("writing streams to Redis failed; retrying in %.2f s", backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            backoff = 0.05
            if self._closing and not self._pending:
                return

    async def _flush(self) -> None:
        """Send every pending entry and due lease renewal in one pipeline."""
        batch, self._pending = self._pending, []
        now = asyncio.get_running_loop().time()
        due = now - self._renew_every
        pipe = self._client.pipeline(transaction=False)
        # (writer, entries it had, whether it had ended, its first and last command index)
        plans: list[tuple[_RedisWriter, int, bool, int, int]] = []
        for writer in batch:
            writer.dirty = False
            first = len(pipe)
            entries = writer._entries
            stop = len(entries)
            if stop > writer.flushed:
                fields = encode(entries[writer.flushed : stop])
                pipe.xadd(writer.key, fields, id=b"0-%d" % stop)
            ended = writer.ended
            if ended:
                pipe.xadd(writer.key, END_FIELDS, id=b"0-%d" % (stop + 1))
                pipe.pexpire(writer.key, min(writer.keep_ms or self._ttl_ms, self._ttl_ms))
                pipe.delete(writer.alive_key)
            else:
                pipe.pexpire(writer.key, self._running_ttl_ms)
                pipe.set(writer.alive_key, self._owner, px=self._lease_ms)
            plans.append((writer, stop, ended, first, len(pipe)))
        renewed = []
        batched = set(batch)
        for writer in self._writers.values():
            if writer.refreshed_at <= due and not writer.ended and writer not in batched:
                pipe.pexpire(writer.key, self._running_ttl_ms)
                pipe.set(writer.alive_key, self._owner, px=self._lease_ms)
                renewed.append(writer)
        if not len(pipe):
            return
        try:
            results = await pipe.execute(raise_on_error=False)
        except BaseException:
            for writer, *_ in plans:
                self._requeue(writer)
            raise
        self.flushes += 1
        for writer in renewed:
            writer.refreshed_at = now
        for writer, stop, ended, first, last in plans:
            failed = [r for r in results[first:last] if _failed(r)]
            if failed:
                logger.error("stream %s: Redis refused a write: %s", writer.stream_id, failed[0])
                self._requeue(writer)
                continue
            writer.flushed = stop
            writer.refreshed_at = now
            if ended:
                self._forget(writer)
                if not writer.closed.done():
                    writer.closed.set_result(None)

    def _requeue(self, writer: _RedisWriter) -> None:
        if not writer.dirty and self._writers.get(writer.stream_id) is writer:
            writer.dirty = True
            self._pending.append(writer)


def _failed(result: object) -> bool:
    # A retried XADD of an entry that did reach Redis (the reply was lost) is not a failure.
    return isinstance(result, Exception) and not (
        isinstance(result, ResponseError) and _ALREADY_WRITTEN in str(result)
    )
