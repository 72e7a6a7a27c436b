"""Processes for ``local_bench.py``: ``tokenrelay serve`` started and stopped, and /proc read.

The local model decodes in worker processes that the gateway starts, so most of what the bench
wants to know (CPU per token, RSS, how busy the machine was meanwhile) is read from /proc, for the
gateway and for its workers apart.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from local_client import Run

__all__ = [
    "WORKER_MODULE",
    "NoiseMeter",
    "Quiet",
    "Server",
    "cpu_seconds",
    "descendants",
    "measure_quietly",
    "status_mib",
    "wait_quiet",
    "workers_of",
]

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
WORKER_MODULE = "tokenrelay.providers.local.worker"


def _stat_fields(pid: int) -> list[bytes] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state is [0], ppid [1])."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat_fields(int(entry))) is not None:
            parents.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(parents.get(current, ()))
    return tree


def workers_of(pid: int) -> list[int]:
    """The local model's worker processes that ``pid`` started itself (not its children's)."""
    found = []
    for child in descendants(pid)[1:]:
        fields = _stat_fields(child)
        if fields is None or int(fields[1]) != pid:
            continue
        with suppress(OSError), open(f"/proc/{child}/cmdline", "rb") as f:
            if WORKER_MODULE.encode() in f.read():
                found.append(child)
    return sorted(found)


def cpu_seconds(pids: list[int]) -> float:
    """CPU time these processes' live threads have used so far, in seconds.

    From each thread's ``schedstat`` (nanoseconds) rather than ``stat`` (10 ms ticks): a
    gateway spends a fraction of a millisecond per token, which ticks cannot resolve.
    """
    ns = 0
    for pid in pids:
        with suppress(OSError):
            for task in os.listdir(f"/proc/{pid}/task"):
                with suppress(OSError), open(f"/proc/{pid}/task/{task}/schedstat") as f:
                    ns += int(f.read().split()[0])
    return ns / 1e9


def status_mib(pid: int, key: str) -> float:
    """One ``/proc/<pid>/status`` field (``VmRSS``, ``VmHWM``) in MiB; NaN if it is gone."""
    with suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _busy_ticks() -> tuple[int, int]:
    """(ticks spent in processes, ticks elapsed) summed over all cores, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:8]]
    # user nice system idle iowait irq softirq: steal is no one's here.
    tasks = values[0] + values[1] + values[2]
    return tasks, sum(values)


def wait_quiet(limit: float, max_wait: float) -> bool:
    """Wait (at most ``max_wait`` s) until the machine is under ``limit`` busy over 0.5 s.

    Returns False when it never went quiet: the run goes ahead and the noise meter judges it.
    """
    end = time.monotonic() + max_wait
    while True:
        tasks, total = _busy_ticks()
        time.sleep(0.5)
        tasks2, total2 = _busy_ticks()
        if (tasks2 - tasks) / max(1, total2 - total) < limit:
            return True
        if time.monotonic() >= end:
            return False


def _tree_ticks(pid: int) -> int:
    """CPU ticks of ``pid``'s live tree, reaped children included (``cutime``, ``cstime``).

    A process that ends within the tree moves its time into its parent's ``cutime`` once reaped,
    so a server stopped during a measurement is not mistaken for someone else's work.
    """
    ticks = 0
    for member in descendants(pid):
        if (fields := _stat_fields(member)) is not None:
            ticks += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return ticks


class NoiseMeter:
    """How much CPU processes other than the bench's own took while a run lasted, in cores.

    The bench's own processes are this one and everything below it (the direct child, the
    servers, every worker); the rest of the machine's busy time is someone else's. Both come
    from clock ticks (10 ms), so a short run reads coarse.
    """

    def __init__(self) -> None:
        self._pid = os.getpid()
        self._start = (0, 0, 0.0)

    def start(self) -> None:
        tasks, _ = _busy_ticks()
        self._start = (tasks, _tree_ticks(self._pid), time.monotonic())

    def others(self) -> float:
        """Cores' worth of CPU the others used since ``start`` (0.1 = a tenth of one core)."""
        tasks, _ = _busy_ticks()
        ours = _tree_ticks(self._pid)
        start_tasks, start_ours, start_time = self._start
        elapsed = time.monotonic() - start_time
        foreign = (tasks - start_tasks - (ours - start_ours)) / CLK_TCK
        return max(0.0, foreign) / elapsed if elapsed > 0 else 0.0


@dataclass
class Quiet:
    """How to keep other people's work out of the numbers on a shared machine."""

    wait: float  # seconds to wait for idle CPUs before each measurement (0: don't)
    noise: float  # cores' worth of others' CPU above which a measurement is done again
    retries: int


async def measure_quietly(
    measure: Callable[[], Awaitable[Run]], quiet: Quiet, within: float
) -> tuple[Run, int, bool]:
    """Run ``measure`` until others stay under the noise limit: (run, times redone, kept noisy).

    When every attempt (``quiet.retries`` + 1) was noisy, the least noisy one is kept, and said
    to be.
    """
    meter = NoiseMeter()
    attempts: list[Run] = []
    while True:
        if quiet.wait > 0:
            await asyncio.to_thread(wait_quiet, 0.15, quiet.wait)
        meter.start()
        run = await asyncio.wait_for(measure(), within)
        run.others = meter.others()
        if run.others <= quiet.noise:
            return run, len(attempts), False
        attempts.append(run)
        if len(attempts) > quiet.retries:
            return min(attempts, key=lambda r: r.others), len(attempts) - 1, True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Server:
    """A ``tokenrelay serve`` process with the local model and nothing else."""

    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    spawned: float  # perf_counter just before the process was started
    listening: float  # perf_counter when /v1/models first answered

    @classmethod
    def start(
        cls,
        workdir: Path,
        *,
        model: Path,
        threads: int,
        instances: int = 1,
        load: str = "eager",
        env: dict[str, str] | None = None,
        deadline: float = 120.0,
        poll: float = 0.1,
    ) -> Server:
        """Start it and wait until it answers; raise ``RuntimeError`` with its log if it can't.

        ``workdir`` is its data directory (SQLite database, the local model's CPU decision);
        ``env`` adds variables (the workers inherit them).
        """
        workdir.mkdir(parents=True, exist_ok=True)
        port = _free_port()
        environ = {
            k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "TOKENRELAY_"))
        }
        environ.update(env or {})
        environ.update(
            {
                "PYTHONPATH": os.pathsep.join(
                    filter(None, [str(REPO / "src"), environ.get("PYTHONPATH")])
                ),
                "TOKENRELAY_LOCAL__PATH": str(model),
                "TOKENRELAY_LOCAL__THREADS": str(threads),
                "TOKENRELAY_LOCAL__INSTANCES": str(instances),
                "TOKENRELAY_LOCAL__LOAD": load,
                "TOKENRELAY_DATA_DIR": str(workdir),
                "TOKENRELAY_DATABASE_URL": f"sqlite+aiosqlite:///{workdir / 'bench.db'}",
                "TOKENRELAY_LOG_LEVEL": "warning",
            }
        )
        log = workdir / f"server-{port}.log"
        command = [sys.executable, "-m", "tokenrelay", "serve", "--host", "127.0.0.1"]
        with log.open("wb") as out:
            spawned = time.perf_counter()
            proc = subprocess.Popen(
                [*command, "--port", str(port)],
                cwd=workdir,
                env=environ,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        url = f"http://127.0.0.1:{port}"
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            with suppress(OSError), urllib.request.urlopen(f"{url}/v1/models", timeout=2) as resp:
                if resp.status == 200:
                    return cls(proc, url, log, spawned, time.perf_counter())
            # Waiting on the process is the pause between polls, and notices an early exit.
            with suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=poll)
            if proc.poll() is not None:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
                raise RuntimeError(f"`tokenrelay serve` exited with {proc.returncode}:\n{tail}")
        cls(proc, url, log, spawned, 0.0).stop()
        raise RuntimeError(f"`tokenrelay serve` did not answer within {deadline:.0f} s ({log})")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def workers(self) -> list[int]:
        return workers_of(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
