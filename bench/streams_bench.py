"""How much an event log costs the relay's hot path: append and reader lag, memory and Redis.

Streams ``--chunks`` chunks of ``--size`` bytes (default 1,000,000 of 200) through logs of
``--per-log`` chunks each (a stream ends and expires, the next begins, as answers do), one
append per event-loop turn as a relay appends one upstream chunk per turn, with a reader
attached from the start. Reported per scenario:

- append: the ``writer.append`` call alone, median and mean (a timer around each call, its own
  cost measured and subtracted);
- CPU per chunk: this process's CPU time over the run divided by chunks, which includes the
  reader, the event loop's turn and, for Redis, the background flusher (and the remote
  reader's Redis reads);
- reader lag: from ``append`` returning to the reader holding that entry, sampled every 100th
  entry, p50 / p99 / max;
- Redis pipelines: round trips the flusher made.

With ``--rate`` the appends are paced (a relay appends as fast as its upstreams send), which
gives the reader lag a client would see; without it they run flat out and the lag shows how
far a reader falls behind a saturated writer.

Scenarios: ``baseline`` (the same loop with no log: subtract it to get the log's own cost);
``memory``; ``redis-local`` (Redis backend, reader in the writer's process: it
reads the local copy); ``redis-remote`` (a second log object with its own connections reads
through Redis, as a reader on another replica would).

Run: ``.venv/bin/python bench/streams_bench.py [--chunks N] [--redis-url URL]``.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from redis.asyncio import Redis

from tokenrelay.streams import EventLog, MemoryEventLog, RedisEventLog, new_stream_id

_SAMPLE = 100  # every 100th entry's lag is measured


class _NoLog:
    """The baseline: the same loop, timers and reader task, with no log behind them."""

    def __init__(self) -> None:
        self._ended: dict[str, asyncio.Event] = {}

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    async def open(self, stream_id: str) -> _NoWriter:
        self._ended[stream_id] = asyncio.Event()
        return _NoWriter(self._ended[stream_id])

    async def read(self, stream_id: str, after: int = 0) -> AsyncIterator[tuple[int, bytes]]:
        return self._wait(self._ended[stream_id])

    async def _wait(self, ended: asyncio.Event) -> AsyncIterator[tuple[int, bytes]]:
        await ended.wait()
        for entry in ():
            yield entry


class _NoWriter:
    def __init__(self, ended: asyncio.Event) -> None:
        self._ended = ended
        self.seq = 0
        self.stream_id = ""

    def append(self, chunk: bytes) -> int:
        self.seq += 1
        return self.seq

    async def end(self, tail: bytes = b"") -> None:
        self._ended.set()


def _timer_cost() -> float:
    clock = time.perf_counter
    samples = []
    for _ in range(5):
        start = clock()
        for _ in range(100_000):
            t0 = clock()
            t1 = clock()
        samples.append((clock() - start) / 100_000)
        del t0, t1
    return min(samples)


async def _scenario(
    name: str,
    write_log: EventLog,
    read_log: EventLog,
    *,
    chunks: int,
    size: int,
    per_log: int,
    timer_cost: float,
    rate: float,
) -> dict[str, Any]:
    chunk = (b"data: " + b"x" * size)[: size - 2] + b"\n\n"
    clock = time.perf_counter
    append_times: list[float] = []
    lags: list[float] = []
    stamps: dict[int, float] = {}
    cpu0, wall0 = time.process_time(), clock()
    written = 0
    while written < chunks:
        n = min(per_log, chunks - written)
        stream_id = new_stream_id()
        writer = await write_log.open(stream_id)
        entries = await read_log.read(stream_id)

        async def read(entries: Any = entries) -> int:
            count = 0
            async for seq, _ in entries:
                count += 1
                if seq % _SAMPLE == 0:
                    lags.append(clock() - stamps.pop(seq))
            return count

        reader = asyncio.create_task(read())
        append = writer.append
        paced_from = clock()
        for i in range(1, n + 1):
            t0 = clock()
            append(chunk)
            t1 = clock()
            append_times.append(t1 - t0)
            if i % _SAMPLE == 0:
                stamps[i] = t1
            await asyncio.sleep(max(0.0, paced_from + i / rate - t1) if rate else 0)
        await writer.end()
        assert await asyncio.wait_for(reader, 120) == (0 if name == "baseline" else n)
        written += n
    cpu, wall = time.process_time() - cpu0, clock() - wall0
    lags.sort()
    lags = lags or [0.0]
    return {
        "scenario": name,
        "chunks": chunks,
        "append median us": max(0.0, statistics.median(append_times) - timer_cost) * 1e6,
        "append mean us": max(0.0, statistics.fmean(append_times) - timer_cost) * 1e6,
        "CPU per chunk us": cpu / chunks * 1e6,
        "wall per chunk us": wall / chunks * 1e6,
        "lag p50 us": lags[len(lags) // 2] * 1e6,
        "lag p99 us": lags[int(len(lags) * 0.99)] * 1e6,
        "lag max us": lags[-1] * 1e6,
        "pipelines": getattr(write_log, "flushes", 0),
        "rate": rate or "max",
    }


async def _main(args: argparse.Namespace) -> None:
    timer_cost = _timer_cost()
    common = {
        "chunks": args.chunks,
        "size": args.size,
        "per_log": args.per_log,
        "rate": args.rate,
    }
    results = []
    bounds = {"ttl": 5.0, "max_bytes": args.per_log * args.size + 1}

    async def run(
        name: str, make: Callable[[], Coroutine[Any, Any, tuple[EventLog, EventLog]]]
    ) -> None:
        write_log, read_log = await make()
        try:
            results.append(
                await _scenario(name, write_log, read_log, timer_cost=timer_cost, **common)
            )
        finally:
            await write_log.aclose()
            if read_log is not write_log:
                await read_log.aclose()
        print(_row(results[-1]), flush=True)

    async def memory() -> tuple[EventLog, EventLog]:
        log = MemoryEventLog(**bounds)
        await log.start()
        return log, log

    prefix = f"tokenrelay:bench-{secrets.token_hex(4)}:"

    async def redis_local() -> tuple[EventLog, EventLog]:
        log = RedisEventLog(args.redis_url, prefix=prefix, **bounds)
        await log.start()
        return log, log

    async def redis_remote() -> tuple[EventLog, EventLog]:
        log, _ = await redis_local()
        other = RedisEventLog(args.redis_url, prefix=prefix, **bounds)
        await other.start()
        return log, other

    print(_HEADER, flush=True)

    async def baseline() -> tuple[EventLog, EventLog]:
        log = _NoLog()
        return log, log

    scenarios = {
        "baseline": baseline,
        "memory": memory,
        "redis-local": redis_local,
        "redis-remote": redis_remote,
    }
    for name in args.scenarios:
        await run(name, scenarios[name])
    client = Redis.from_url(args.redis_url)
    keys = [key async for key in client.scan_iter(match=prefix + "*", count=1000)]
    if keys:
        await client.unlink(*keys)
    await client.aclose()


_COLUMNS = [
    "scenario",
    "rate",
    "chunks",
    "append median us",
    "append mean us",
    "CPU per chunk us",
    "wall per chunk us",
    "lag p50 us",
    "lag p99 us",
    "lag max us",
    "pipelines",
]
_HEADER = "| " + " | ".join(_COLUMNS) + " |\n|" + " --- |" * len(_COLUMNS)


def _row(result: dict[str, Any]) -> str:
    cells = [
        f"{result[c]:.2f}" if isinstance(result[c], float) else str(result[c]) for c in _COLUMNS
    ]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=1_000_000)
    parser.add_argument("--size", type=int, default=200, help="bytes per chunk")
    parser.add_argument("--per-log", type=int, default=10_000, help="chunks per stream")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/9")
    parser.add_argument(
        "--rate", type=float, default=0, help="chunks per second (default: as fast as possible)"
    )
    parser.add_argument(
        "--scenarios", nargs="+", default=["baseline", "memory", "redis-local", "redis-remote"]
    )
    args = parser.parse_args()
    try:
        import uvloop  # the loop uvicorn runs tokenrelay on
    except ImportError:
        asyncio.run(_main(args))
    else:
        uvloop.run(_main(args))


if __name__ == "__main__":
    main()
