"""What only the Redis backend promises: batched writes, keys that expire, resume from another
process, and readers that end with `interrupted` when the writing process is killed."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import Connection

from redis_server import REDIS_URL
from tokenrelay.streams import INTERRUPTED_EVENT, RedisEventLog, new_stream_id

_SRC = Path(__file__).resolve().parents[2] / "src"
_DEADLINE = 10.0


@pytest.fixture
async def redis(redis_prefix: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


async def _collect(log: RedisEventLog, stream_id: str, after: int = 0) -> list[tuple[int, bytes]]:
    return [entry async for entry in await log.read(stream_id, after)]


async def test_appends_are_batched_not_one_round_trip_each(redis_prefix: str) -> None:
    round_trips = 0

    class CountingConnection(Connection):
        async def send_packed_command(self, *args: Any, **kwargs: Any) -> None:
            nonlocal round_trips
            round_trips += 1
            await super().send_packed_command(*args, **kwargs)

    pool = BlockingConnectionPool.from_url(REDIS_URL, connection_class=CountingConnection)
    client = Redis(connection_pool=pool)
    log = RedisEventLog(client=client, prefix=redis_prefix)
    await log.start()
    stream_id = new_stream_id()
    writer = await log.open(stream_id)
    before = round_trips
    started = time.monotonic()
    for n in range(1000):
        writer.append(b"data: %d\n\n" % n)
        # Chunks arrive over many loop turns and at least 50 ms, as from an upstream.
        await asyncio.sleep(0.001 if n % 20 == 19 else 0)
    await writer.end()
    writes = round_trips - before
    elapsed = time.monotonic() - started
    await log.aclose()
    await client.aclose()

    assert elapsed >= 0.05
    assert writes <= 100, f"{writes} round trips for 1000 chunks in {elapsed:.3f} s"
    other = RedisEventLog(REDIS_URL, prefix=redis_prefix)
    await other.start()
    try:
        entries = await asyncio.wait_for(_collect(other, stream_id), _DEADLINE)
    finally:
        await other.aclose()
    assert entries == [(n + 1, b"data: %d\n\n" % n) for n in range(1000)]


async def test_keys_expire_while_running_and_after_the_end(redis_prefix: str, redis: Redis) -> None:
    log = RedisEventLog(REDIS_URL, prefix=redis_prefix, ttl=30.0, lease=2.0)
    await log.start()
    try:
        stream_id = new_stream_id()
        writer = await log.open(stream_id)
        key = f"{redis_prefix}stream:{stream_id}".encode()
        alive = key + b":alive"
        assert key.startswith(b"tokenrelay:")
        writer.append(b"data: 1\n\n")
        deadline = time.monotonic() + _DEADLINE
        while await redis.xlen(key) < 1:  # the flusher's round trip
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        # A crash now would leave neither key behind for good.
        assert 0 < await redis.pttl(alive) <= 2000
        assert 0 < await redis.pttl(key) <= 32000
        await writer.end()
        assert not await redis.exists(alive)
        assert 0 < await redis.pttl(key) <= 30000
    finally:
        await log.aclose()


async def test_another_process_resumes_a_log_written_here(redis_prefix: str) -> None:
    here = RedisEventLog(REDIS_URL, prefix=redis_prefix)
    elsewhere = RedisEventLog(REDIS_URL, prefix=redis_prefix)  # its own connection pool
    await here.start()
    await elsewhere.start()
    try:
        stream_id = new_stream_id()
        writer = await here.open(stream_id)
        for n in range(1, 31):
            writer.append(b"data: %d\n\n" % n)
        reader = asyncio.create_task(_collect(elsewhere, stream_id, after=20))
        for n in range(31, 41):
            writer.append(b"data: %d\n\n" % n)
            await asyncio.sleep(0)
        await writer.end()
        entries = await asyncio.wait_for(reader, _DEADLINE)
        assert entries == [(n, b"data: %d\n\n" % n) for n in range(21, 41)]
    finally:
        await here.aclose()
        await elsewhere.aclose()


_ORPHAN_WRITER = """
import asyncio, sys
from redis.asyncio import Redis
from tokenrelay.streams import RedisEventLog

async def main(url, prefix, stream_id, lease):
    log = RedisEventLog(url, prefix=prefix, lease=lease)
    await log.start()
    writer = await log.open(stream_id)
    for n in range(1, 4):
        writer.append(b"data: %d\\n\\n" % n)
    redis = Redis.from_url(url)
    while not await redis.xrange(f"{prefix}stream:{stream_id}", "0-3", "+"):
        await asyncio.sleep(0.01)
    print("written", flush=True)
    await asyncio.Event().wait()  # writing, as far as anyone can tell, until killed

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])))
"""


async def test_a_killed_writer_ends_its_readers_with_interrupted(redis_prefix: str) -> None:
    """The replica writing an answer is SIGKILLed: readers elsewhere get what it had written,
    then one `interrupted` error event once its lease expired, never a hang."""
    lease = 1.0
    stream_id = new_stream_id()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _ORPHAN_WRITER,
        REDIS_URL,
        redis_prefix,
        stream_id,
        str(lease),
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(_SRC)},
    )
    log = RedisEventLog(REDIS_URL, prefix=redis_prefix, lease=lease)
    await log.start()
    try:
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"written\n"
        received: list[tuple[int, bytes]] = []

        async def read() -> None:
            async for entry in await log.read(stream_id):
                received.append(entry)

        reader = asyncio.create_task(read())
        # While the writer lives (idle, renewing its lease), its readers wait for more.
        await asyncio.sleep(2.5 * lease)  # the passage of time is what is tested here
        assert not reader.done()
        assert [seq for seq, _ in received] == [1, 2, 3]

        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        killed = time.monotonic()
        await asyncio.wait_for(reader, 3 * lease + 2)
        waited = time.monotonic() - killed
        assert received[:3] == [(n, b"data: %d\n\n" % n) for n in (1, 2, 3)]
        assert received[3:] == [(3, INTERRUPTED_EVENT)]
        event = json.loads(INTERRUPTED_EVENT.removeprefix(b"data: "))
        assert event["error"]["code"] == "interrupted"
        assert event["error"]["type"] == "server_error"
        assert waited < 2 * lease + 1.5

        # A client resuming later gets the same clear end, at once rather than after a lease.
        started = time.monotonic()
        again = await asyncio.wait_for(_collect(log, stream_id, after=3), _DEADLINE)
        assert again == [(3, INTERRUPTED_EVENT)]
        assert time.monotonic() - started < lease + 1.5
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await log.aclose()


async def test_a_reader_behind_the_shared_mirror_fills_the_gap(
    redis_prefix: str, redis: Redis
) -> None:
    """Readers of one remote stream share a live mirror that starts where the first of them
    caught up; one whose catch-up ended earlier reads the entries in between from Redis."""
    here = RedisEventLog(REDIS_URL, prefix=redis_prefix)
    elsewhere = RedisEventLog(REDIS_URL, prefix=redis_prefix)
    await here.start()
    await elsewhere.start()
    try:
        stream_id = new_stream_id()
        key = f"{redis_prefix}stream:{stream_id}"
        writer = await here.open(stream_id)

        async def append_flushed(numbers: range) -> None:
            for n in numbers:
                writer.append(b"data: %d\n\n" % n)
            deadline = time.monotonic() + _DEADLINE
            while not await redis.xrange(key, f"0-{numbers[-1]}", "+"):  # flushed
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)

        await append_flushed(range(1, 11))
        behind = await elsewhere.read(stream_id)  # has fetched entries 1..10 already
        await append_flushed(range(11, 21))
        ahead = await elsewhere.read(stream_id)
        got_ahead = [await anext(ahead) for _ in range(20)]
        await append_flushed(range(21, 31))
        got_ahead.append(await anext(ahead))  # now following the mirror, from 20 on
        got_behind = [entry async for entry in _until(behind, 25)]
        await writer.end()
        got_ahead += [entry async for entry in ahead]
        got_behind += [entry async for entry in behind]
        expected = [(n, b"data: %d\n\n" % n) for n in range(1, 31)]
        assert got_ahead == expected
        assert got_behind == expected
    finally:
        await here.aclose()
        await elsewhere.aclose()


async def _until(
    entries: AsyncIterator[tuple[int, bytes]], seq: int
) -> AsyncIterator[tuple[int, bytes]]:
    async for entry in entries:
        yield entry
        if entry[0] == seq:
            return
