"""The local model's start-up and its throughput under concurrent requests, for ``local_bench.py``.

Cold start: a fresh ``tokenrelay serve`` with ``load = "lazy"``, so its first request pays for
starting the worker process (Python, llama.cpp's import, the GGUF's load) before its first token.
Each trial starts two servers on one new data directory: the first ever (the worker also probes
llama.cpp's extra buffer types with a short decode and remembers the outcome), then a later one
(the decision is remembered). Times: process start -> listening, request sent -> first text token,
process start -> first text token; then the memory of the gateway and of its worker.

Concurrency: one server per ``instances x threads`` layout, all loaded eagerly, then rounds in
which each layout in turn answers 1, 2 and 4 simultaneous ``/v1/completions`` requests. Aggregate
tokens/s = completion tokens of all requests / (last text - first request sent), prompt and
queueing included: what a user with that many clients sees.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from local_client import Run, through_server
from local_procs import Quiet, Server, cpu_seconds, descendants, measure_quietly, status_mib

__all__ = ["run"]

COLD_TARGET = 2.0
COLD_TOKENS = 16
TIMEOUT = aiohttp.ClientTimeout(total=300)
STARTUP_TIMEOUT = 300.0


@dataclass
class ColdStart:
    listening: float  # process start -> /v1/models answers
    first_token: float  # request sent -> first text token (worker start and load included)
    from_spawn: float  # process start -> first text token
    gateway_rss: float
    gateway_hwm: float
    worker_rss: float


async def _cold_start(work: Path, model: Path, threads: int) -> ColdStart:
    # Polled every 10 ms, so "listening" is late by 5 ms on average.
    server = await asyncio.to_thread(
        Server.start, work, model=model, threads=threads, load="lazy", poll=0.01
    )
    try:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            sent = time.perf_counter()
            answer = await through_server(session, server.url, True, COLD_TOKENS)
        workers = server.workers()
        return ColdStart(
            listening=server.listening - server.spawned,
            first_token=answer.ttft,
            from_spawn=sent + answer.ttft - server.spawned,
            gateway_rss=status_mib(server.pid, "VmRSS"),
            gateway_hwm=status_mib(server.pid, "VmHWM"),
            worker_rss=status_mib(workers[0], "VmRSS") if workers else float("nan"),
        )
    finally:
        await asyncio.to_thread(server.stop)


def _spread(values: list[float], unit: float = 1.0, digits: int = 2) -> str:
    scaled = [v * unit for v in values]
    return (
        f"{statistics.median(scaled):.{digits}f} "
        f"({min(scaled):.{digits}f}-{max(scaled):.{digits}f})"
    )


async def cold_starts(
    args: argparse.Namespace, model: Path, work: Path, quiet: Quiet
) -> list[tuple[str, bool]]:
    print(f"\nCold start: {args.cold_starts} trials, lazy load, one chat request of "
          f"{COLD_TOKENS} tokens, threads {args.threads}")  # fmt: skip
    kinds: dict[str, list[ColdStart]] = {"first start (probe)": [], "later start": []}
    noisy = 0
    for trial in range(args.cold_starts):
        data_dir = work / f"cold-{trial}"
        for kind, trials in kinds.items():
            first_ever = kind.startswith("first")
            results: dict[int, ColdStart] = {}  # id of the Run handed back -> what it timed

            async def one(
                data_dir: Path = data_dir,
                first_ever: bool = first_ever,
                results: dict[int, ColdStart] = results,
            ) -> Run:
                if first_ever:  # a redone first start must probe again
                    (data_dir / "local-model.json").unlink(missing_ok=True)
                timed = await _cold_start(data_dir, model, args.threads)
                run = Run(timed.first_token, 0.0, 1, "")
                results[id(run)] = timed
                return run

            run, _, was_noisy = await measure_quietly(one, quiet, STARTUP_TIMEOUT)
            noisy += was_noisy
            result = results[id(run)]
            trials.append(result)
            print(
                f"  trial {trial + 1} {kind:<20} listening {result.listening:5.2f} s, "
                f"request -> first token {result.first_token:5.2f} s, "
                f"process start -> first token {result.from_spawn:5.2f} s"
                + (f"  (others used {run.others:.2f} cores)" if was_noisy else "")
            )
            if first_ever and not (data_dir / "local-model.json").exists():
                print("  WARNING: the first start remembered no CPU decision")
    verdicts = []
    print(f"\n{'':<21} {'listening s':>17} {'request -> 1st s':>17} {'start -> 1st s':>17} "
          f"{'gateway RSS MiB':>17} {'peak':>17} {'worker RSS MiB':>17}")  # fmt: skip
    for kind, trials in kinds.items():
        print(
            f"{kind:<21} {_spread([t.listening for t in trials]):>17} "
            f"{_spread([t.first_token for t in trials]):>17} "
            f"{_spread([t.from_spawn for t in trials]):>17} "
            f"{_spread([t.gateway_rss for t in trials], digits=1):>17} "
            f"{_spread([t.gateway_hwm for t in trials], digits=1):>17} "
            f"{_spread([t.worker_rss for t in trials], digits=1):>17}"
        )
        first = statistics.median(t.first_token for t in trials)
        verdicts.append(
            (
                f"{kind}: worker start to first token {first:.2f} s (<= {COLD_TARGET:.0f} s)",
                first <= COLD_TARGET,
            )
        )
    if noisy:
        print(f"({noisy} trials kept although others used more than {quiet.noise} cores)")
    return verdicts


@dataclass
class Layout:
    instances: int
    threads: int
    passive: bool = False  # OMP_WAIT_POLICY=PASSIVE: OpenMP threads sleep instead of spinning
    server: Server | None = None
    aggregate: dict[int, list[float]] = field(default_factory=dict)  # concurrency -> tok/s
    ttft: dict[int, list[float]] = field(default_factory=dict)  # concurrency -> median TTFT s
    noisy: int = 0

    @property
    def name(self) -> str:
        return f"{self.instances}x{self.threads}{'p' if self.passive else ''}"


async def _burst(session: aiohttp.ClientSession, url: str, n: int, max_tokens: int) -> Run:
    """``n`` requests at once; a Run whose rate is the aggregate tokens/s, ttft the median."""
    sent = time.perf_counter()
    answers = await asyncio.gather(
        *(through_server(session, url, False, max_tokens) for _ in range(n))
    )
    tokens = sum(a.tokens for a in answers)
    end = max(a.end for a in answers)
    ttft = statistics.median(a.ttft for a in answers)
    return Run(ttft, tokens / (end - sent), tokens, answers[0].text, end=end)


async def concurrency(
    args: argparse.Namespace, model: Path, work: Path, quiet: Quiet
) -> list[tuple[str, bool]]:
    layouts = []
    for spec in args.layouts.lower().split(","):
        instances, threads = (int(x) for x in spec.rstrip("p").split("x"))
        layouts.append(Layout(instances, threads, passive=spec.endswith("p")))
    levels = [int(x) for x in args.concurrency.split(",")]
    print(
        f"\nConcurrent requests: layouts (instances x threads) {args.layouts}, "
        f"{args.concurrency} requests at once, /v1/completions, {args.max_tokens} tokens each, "
        f"{args.scale_rounds} rounds"
    )
    try:
        for layout in layouts:
            layout.server = await asyncio.to_thread(
                Server.start,
                work / f"layout-{layout.name}",
                model=model,
                threads=layout.threads,
                instances=layout.instances,
                env={"OMP_WAIT_POLICY": "PASSIVE"} if layout.passive else None,
            )
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            for layout in layouts:  # warm-up: every worker answers once
                assert layout.server is not None
                await _burst(session, layout.server.url, layout.instances, args.max_tokens)
            for round_ in range(args.scale_rounds):
                shift = round_ % len(layouts)
                for layout in layouts[shift:] + layouts[:shift]:
                    await _measure_layout(session, layout, layouts, levels, args, quiet)
                print(
                    f"round {round_ + 1}: "
                    + "; ".join(
                        f"{la.name} " + " ".join(f"{la.aggregate[c][-1]:.0f}" for c in levels)
                        for la in layouts
                    )
                    + " tok/s"
                )
    finally:
        for layout in layouts:
            if layout.server is not None:
                await asyncio.to_thread(layout.server.stop)
    _report_concurrency(layouts, levels)
    return []


async def _measure_layout(
    session: aiohttp.ClientSession,
    layout: Layout,
    layouts: list[Layout],
    levels: list[int],
    args: argparse.Namespace,
    quiet: Quiet,
) -> None:
    server = layout.server
    assert server is not None
    idle = [
        p for la in layouts if la is not layout and la.server for p in descendants(la.server.pid)
    ]
    for level in levels:
        idle_cpu = cpu_seconds(idle)

        async def burst(level: int = level) -> Run:
            assert server is not None
            return await _burst(session, server.url, level, args.max_tokens)

        run, _, noisy = await measure_quietly(burst, quiet, STARTUP_TIMEOUT)
        idle_cpu = cpu_seconds(idle) - idle_cpu
        if idle_cpu > 0.05:
            print(
                f"  note: the idle servers used {idle_cpu:.2f} CPU s during {layout.name} x{level}"
            )
        layout.noisy += noisy
        layout.aggregate.setdefault(level, []).append(run.rate)
        layout.ttft.setdefault(level, []).append(run.ttft)


def _report_concurrency(layouts: list[Layout], levels: list[int]) -> None:
    print("\nAggregate tokens/s, median (range); then median TTFT in ms")
    head = "".join(f"{f'{c} at once':>22}" for c in levels)
    print(f"{'instances x threads':<20}{head}   noisy")
    for layout in layouts:
        cells = "".join(f"{_spread(layout.aggregate[c], digits=1):>22}" for c in levels)
        print(f"{layout.name:<20}{cells}   {layout.noisy}")
    for layout in layouts:
        cells = "".join(f"{statistics.median(layout.ttft[c]) * 1000:>22.0f}" for c in levels)
        print(f"{layout.name + ' TTFT':<20}{cells}")
    for level in levels:
        # Ranked, with the figures: two layouts that decode alike (1x2 and 2x2 with one request)
        # are a tie within the noise, not a win.
        ranked = sorted(layouts, key=lambda la: -statistics.median(la.aggregate[level]))
        print(
            f"{level} at once, best first: "
            + ", ".join(f"{la.name} {statistics.median(la.aggregate[level]):.0f}" for la in ranked)
        )


async def run(
    args: argparse.Namespace, model: Path, work: Path, quiet: Quiet
) -> list[tuple[str, bool]]:
    verdicts = await cold_starts(args, model, work, quiet)
    verdicts += await concurrency(args, model, work, quiet)
    return verdicts
