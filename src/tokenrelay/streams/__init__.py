"""Numbered SSE event logs, one per streamed answer: written once, read by anyone, resumable.

A generation (owned by no connection) opens a log and appends the answer's SSE bytes to it;
connections only read. Entries are numbered 1, 2, 3...; a reader starts after any number
(0 for the whole log, or the number in a ``Last-Event-ID``), gets every later entry, then follows
the live rest until the log ends. An ended log stays readable for ``stream_ttl`` seconds.

Two backends, one interface (``EventLog``, ``LogWriter``), chosen by ``create_event_log``:

- ``MemoryEventLog`` (the default): logs in this process.
- ``RedisEventLog`` (``redis_url`` set): Redis Streams, so a client may resume on any worker or
  replica. One flusher per process sends what every stream appended in one pipeline at most
  every 5 ms (one XADD per stream per flush, never a round trip per chunk); readers in the
  writer's process read its local copy; readers elsewhere share one XREAD connection per
  process; a log whose writer died ends its readers with an ``interrupted`` error event once
  the writer's lease (``lease_seconds``) has expired.

Wiring it into the request path::

    log = create_event_log(settings)           # once, in the app's lifespan
    await log.start()                          # ... and ``await log.aclose()`` at shutdown

    # the generation (a task owned by no connection):
    stream_id = new_stream_id()
    writer = await log.open(stream_id)
    tail = b""
    try:
        async for chunk in provider_stream:    # whole SSE events
            writer.append(chunk)               # sync, cheap; may raise StreamTooLarge
    except TokenrelayError as exc:             # ... and StreamTooLarge itself
        tail = encode_event(exc.to_dict())
    finally:
        await writer.end(tail)                 # tail may pass the size bound

    # a connection (first read, resume, a second tab):
    after = 0 if header is None else parse_event_id(header, stream_id=stream_id)[1]
    entries = await log.read(stream_id, after)   # StreamNotFound (404) before any byte
    prefix = event_id_prefix(stream_id)
    body = (with_event_id(prefix, seq, chunk) async for seq, chunk in entries)

``RedisUnavailable`` (503) is raised by ``open``/``read`` and during a remote read when Redis
cannot be reached. ``read`` may yield a final synthetic chunk that is not in the log
(``INTERRUPTED_EVENT``, carrying the last real entry's number) when the writer died. The writer
itself never raises for Redis trouble: ``append`` only queues, the flusher retries with backoff,
and ``end`` gives up after ``lease_seconds`` (logged), leaving remote readers to see the lease
expire. A ``client`` passed in should have ``decode_responses=False`` and preferably a
``BlockingConnectionPool`` (redis-py's default pool fails at once when its connections are busy).
"""

from __future__ import annotations

from redis.asyncio import Redis

from tokenrelay.config import Settings
from tokenrelay.streams.base import EventLog, LogWriter, check_stream_id, new_stream_id
from tokenrelay.streams.memory import MemoryEventLog
from tokenrelay.streams.redis_log import INTERRUPTED_EVENT, RedisEventLog

__all__ = [
    "INTERRUPTED_EVENT",
    "EventLog",
    "LogWriter",
    "MemoryEventLog",
    "RedisEventLog",
    "check_stream_id",
    "create_event_log",
    "new_stream_id",
]


def create_event_log(
    source: Settings | str | None = None,
    *,
    client: Redis | None = None,
    prefix: str = "tokenrelay:",
) -> EventLog:
    """The backend ``source`` asks for: ``Settings`` (``redis_url`` set or not), a Redis URL,
    or ``None`` for memory with the default bounds. ``client`` reuses a Redis connection pool
    (with ``decode_responses=False``) instead of opening one from the URL.
    """
    if not isinstance(source, Settings):
        if source is None and client is None:
            return MemoryEventLog()
        return RedisEventLog(source, client=client, prefix=prefix)
    url = source.redis_url.get_secret_value() if source.redis_url is not None else None
    if url is None and client is None:
        return MemoryEventLog(ttl=source.stream_ttl, max_bytes=source.stream_max_bytes)
    return RedisEventLog(
        url,
        client=client,
        ttl=source.stream_ttl,
        max_bytes=source.stream_max_bytes,
        lease=source.lease_seconds,
        prefix=prefix,
    )
