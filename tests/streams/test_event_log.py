"""The event log's promises, on every backend (see conftest.py): numbered entries, resume from
any position with exactly the bytes an uninterrupted read gives, live readers, several readers,
expiry, a bound on size, and an immediate 404 for an unknown stream."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable

import pytest

from tokenrelay.errors import StreamNotFound, StreamTooLarge
from tokenrelay.sse import encode_event
from tokenrelay.streams import EventLog, new_stream_id

MakeLogs = Callable[..., Awaitable[tuple[EventLog, EventLog]]]  # the make_logs fixture
_DEADLINE = 10.0


async def _collect(log: EventLog, stream_id: str, after: int = 0) -> list[tuple[int, bytes]]:
    return [entry async for entry in await log.read(stream_id, after)]


def _chunk(rng: random.Random, n: int) -> bytes:
    # Arbitrary bytes, newlines and CRs included: the log must not care what an entry holds.
    return f"data: {n} ".encode() + rng.randbytes(rng.randint(0, 300)) + b"\r\n\n"


async def test_entries_are_numbered_from_one(make_logs: MakeLogs) -> None:
    write_log, read_log = await make_logs()
    stream_id = new_stream_id()
    writer = await write_log.open(stream_id)
    assert writer.seq == 0
    assert [writer.append(b"data: %d\n\n" % i) for i in range(5)] == [1, 2, 3, 4, 5]
    await writer.end()
    entries = await asyncio.wait_for(_collect(read_log, stream_id), _DEADLINE)
    assert entries == [(i + 1, b"data: %d\n\n" % i) for i in range(5)]


async def test_resume_at_200_random_positions_gives_the_exact_rest(make_logs: MakeLogs) -> None:
    """Readers join at random moments from random positions while the answer is written, as
    clients resuming after drops do; each joined read equals the uninterrupted one's suffix."""
    write_log, read_log = await make_logs()
    rng = random.Random(11)
    stream_id = new_stream_id()
    writer = await write_log.open(stream_id)
    chunks = [_chunk(rng, n) for n in range(3000)]
    steps = len(chunks) // 10
    joins: dict[int, list[int]] = {}
    for _ in range(190):  # a reader joining while it is written...
        joins.setdefault(rng.randrange(steps), []).append(-1)
    readers: list[tuple[int, asyncio.Task[list[tuple[int, bytes]]]]] = []

    def join(after: int) -> None:
        task = asyncio.create_task(_collect(read_log, stream_id, after))
        readers.append((after, task))

    for step in range(steps):
        for _ in joins.get(step, ()):
            join(rng.randint(0, writer.seq))  # any position a client could have seen
        for chunk in chunks[step * 10 : step * 10 + 10]:
            writer.append(chunk)
        await asyncio.sleep(0)  # an upstream's chunks arrive across loop turns
    await writer.end()
    for after in (0, 1, len(chunks) - 1, len(chunks), *rng.sample(range(len(chunks)), 6)):
        join(after)  # ...and after it ended, the edges included
    assert len(readers) == 200

    results = await asyncio.wait_for(asyncio.gather(*(task for _, task in readers)), 60)
    whole = b"".join(chunks)
    for (after, _), entries in zip(readers, results, strict=True):
        assert [seq for seq, _ in entries] == list(range(after + 1, len(chunks) + 1))
        assert b"".join(chunks[:after]) + b"".join(c for _, c in entries) == whole


async def test_a_reader_attached_first_sees_each_append_live(make_logs: MakeLogs) -> None:
    write_log, read_log = await make_logs()
    stream_id = new_stream_id()
    writer = await write_log.open(stream_id)
    received: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()

    async def read() -> None:
        async for entry in await read_log.read(stream_id):
            received.put_nowait(entry)

    reader = asyncio.create_task(read())
    for n in range(1, 21):
        chunk = b"data: live %d\n\n" % n
        writer.append(chunk)
        # Each entry arrives while the log is still open and before the next one exists.
        assert await asyncio.wait_for(received.get(), _DEADLINE) == (n, chunk)
    assert not reader.done()
    await writer.end()
    await asyncio.wait_for(reader, _DEADLINE)
    assert received.empty()


async def test_several_readers_each_get_everything(make_logs: MakeLogs) -> None:
    write_log, read_log = await make_logs()
    stream_id = new_stream_id()
    writer = await write_log.open(stream_id)
    first = asyncio.create_task(_collect(read_log, stream_id))
    second = asyncio.create_task(_collect(write_log, stream_id))
    for n in range(50):
        writer.append(b"data: %d\n\n" % n)
        await asyncio.sleep(0)
    late = asyncio.create_task(_collect(read_log, stream_id))  # a second tab, opened later
    for n in range(50, 100):
        writer.append(b"data: %d\n\n" % n)
        await asyncio.sleep(0)
    await writer.end()
    expected = [(n + 1, b"data: %d\n\n" % n) for n in range(100)]
    results = await asyncio.wait_for(asyncio.gather(first, second, late), _DEADLINE)
    assert results == [expected, expected, expected]


async def test_an_ended_log_stays_readable_then_expires(make_logs: MakeLogs) -> None:
    write_log, read_log = await make_logs(ttl=0.3)
    stream_id = new_stream_id()
    writer = await write_log.open(stream_id)
    writer.append(b"data: 1\n\n")
    await writer.end()
    assert await _collect(read_log, stream_id) == [(1, b"data: 1\n\n")]
    deadline = time.monotonic() + _DEADLINE
    while True:
        try:
            await read_log.read(stream_id)
        except StreamNotFound:
            break
        assert time.monotonic() < deadline, "the log never expired"
        await asyncio.sleep(0.05)  # polling for the expiry, with a deadline


async def test_an_unknown_stream_is_not_found_at_once(make_logs: MakeLogs) -> None:
    _, read_log = await make_logs()
    for stream_id in (new_stream_id(), "no such/stream\n"):
        with pytest.raises(StreamNotFound) as caught:
            await asyncio.wait_for(read_log.read(stream_id), 2.0)
        assert caught.value.status == 404
        error = caught.value.to_dict()["error"]
        assert error["code"] == "stream_not_found"
        assert error["type"] == "invalid_request_error"


async def test_a_log_is_bounded_and_its_tail_still_ends_it(make_logs: MakeLogs) -> None:
    write_log, read_log = await make_logs(max_bytes=1024)
    stream_id = new_stream_id()
    writer = await write_log.open(stream_id)
    chunk = b"data: " + b"x" * 194 + b"\n\n"  # 202 bytes
    for _ in range(5):
        writer.append(chunk)
    with pytest.raises(StreamTooLarge) as caught:
        writer.append(chunk)
    assert caught.value.to_dict()["error"]["code"] == "stream_too_large"
    assert writer.seq == 5
    tail = encode_event(caught.value.to_dict())
    await writer.end(tail)
    entries = await asyncio.wait_for(_collect(read_log, stream_id), _DEADLINE)
    assert entries == [(n, chunk) for n in range(1, 6)] + [(6, tail)]
    with pytest.raises(RuntimeError):
        writer.append(b"data: after the end\n\n")


async def test_a_stream_id_is_opened_once(make_logs: MakeLogs) -> None:
    write_log, _ = await make_logs()
    stream_id = new_stream_id()
    writer = await write_log.open(stream_id)
    with pytest.raises(ValueError):
        await write_log.open(stream_id)
    await writer.end()
    with pytest.raises(ValueError):
        await write_log.open("not a valid id")
