"""One event-log suite, three ways: memory; Redis read in the writer's process (its local
copy); Redis read from a second log object with its own connection (another replica)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from redis_server import REDIS_URL, delete_prefix, new_prefix, require_redis
from tokenrelay.streams import EventLog, MemoryEventLog, RedisEventLog

LogPair = tuple[EventLog, EventLog]
MakeLogs = Callable[..., Awaitable[LogPair]]


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    require_redis()
    prefix = new_prefix()
    yield prefix
    await delete_prefix(prefix)


@pytest.fixture(params=["memory", "redis", "redis-remote"])
async def make_logs(request: pytest.FixtureRequest) -> AsyncIterator[MakeLogs]:
    """``await make_logs(**bounds)`` -> ``(log to write, log to read)`` on this backend."""
    backend: str = request.param
    prefix = ""
    if backend != "memory":
        require_redis()
        prefix = new_prefix()
    opened: list[EventLog] = []
    reader_clients: list[Redis] = []

    async def make(**bounds: Any) -> LogPair:
        if backend == "memory":
            bounds.pop("lease", None)
            log: EventLog = MemoryEventLog(**bounds)
            await log.start()
            opened.append(log)
            return log, log
        writer_log = RedisEventLog(REDIS_URL, prefix=prefix, **bounds)
        await writer_log.start()
        opened.append(writer_log)
        if backend == "redis":
            return writer_log, writer_log
        # Another process, as far as Redis can tell: its own pool, and RESP2 where the
        # writer speaks redis-py's default (RESP3), so both reply shapes are exercised.
        reader_client = Redis.from_url(REDIS_URL, protocol=2)
        reader_log = RedisEventLog(client=reader_client, prefix=prefix, **bounds)
        await reader_log.start()
        opened.append(reader_log)
        reader_clients.append(reader_client)
        return writer_log, reader_log

    yield make
    for log in opened:
        await log.aclose()
    for client in reader_clients:
        await client.aclose()
    if prefix:
        await delete_prefix(prefix)
