"""Benchmark tokenrelay against nginx and against no gateway at all, interleaved in one run.

Starts the fake upstream (``bench/upstream.py``), nginx as a plain reverse proxy
(``proxy_buffering off``) and ``python -m tokenrelay serve`` (with the event log in memory, in
Redis with ``+redis``, behind a gateway key with ``+auth``, without usage accounting with
``+noaccount``, and as it was at older git revisions with ``@REV``), then runs the load
generator (``bench/loadgen.py``) through each of them and directly to the upstream, scenario by
scenario, in rotating order, for several rounds. The gateway under test is alone on core 0;
the upstream, the load generator and this script share core 1. It reads the gateway's CPU time
(``/proc/<pid>/stat``) right around each measured part, samples its RSS, and prints a markdown
table with a PASS/FAIL line for each target of the benchmark.

Run: ``.venv/bin/python bench/run.py`` (about 11 minutes on a quiet machine) or ``--quick``
(about 2 minutes).
Everything listens on and talks to 127.0.0.1 only; every wait has a deadline.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

__all__ = ["main"]

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Targets from the issue; checked for tokenrelay (and shown for nginx, for reference).
TARGET_C1_ADDED_TTFT_MS = 1.5
TARGET_C100_CPU_VS_NGINX = 4.0
TARGET_C500_CHUNKS_VS_DIRECT = 0.95

RESUMABLE_HEADER = "X-Tokenrelay-Resumable:true"
FLAGS = ("redis", "auth", "noaccount", "resumable")
BENCH_KEY_NAME = "bench"
DEFAULT_PATHS = "direct,nginx,tokenrelay,tokenrelay+resumable,tokenrelay+redis"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/12"


@dataclass(frozen=True)
class PathSpec:
    """One path as named on the command line: ``direct``, ``nginx``, or
    ``tokenrelay[@REV][+redis][+auth][+noaccount][+resumable]``.

    ``@REV`` runs tokenrelay's ``src/`` as it was at that git revision (a baseline in the same
    run); ``+redis`` a server with ``TOKENRELAY_REDIS_URL`` set (streams in Redis Streams);
    ``+auth`` a server with a gateway key (made with ``tokenrelay keys create`` before it starts,
    so every request must present it, and does); ``+noaccount`` a server with
    ``TOKENRELAY_USAGE_ACCOUNTING=false`` (no usage row per request): ``tokenrelay+noaccount``
    is the gateway with neither, the baseline ``+auth`` is compared with. ``+resumable`` sends
    ``X-Tokenrelay-Resumable: true`` with every request. Paths that differ only in
    ``+resumable`` share one server.
    """

    name: str
    kind: str
    rev: str | None = None
    redis: bool = False
    resumable: bool = False
    auth: bool = False
    account: bool = True

    @property
    def server(self) -> tuple[str, str | None, bool, bool, bool]:
        """Which gateway process serves this path."""
        return (self.kind, self.rev, self.redis, self.auth, self.account)


def parse_path(text: str) -> PathSpec:
    """``tokenrelay@d805269+redis+resumable`` -> its parts; ValueError for anything else."""
    base, *flags = text.split("+")
    kind, _, rev = base.partition("@")
    if kind not in ("direct", "nginx", "tokenrelay"):
        raise ValueError(f"unknown path {text!r}")
    if kind != "tokenrelay" and (flags or rev):
        raise ValueError(f"only tokenrelay paths take @REV or +flags: {text!r}")
    if not set(flags) <= set(FLAGS) or len(set(flags)) != len(flags):
        raise ValueError(f"flags are {', '.join('+' + f for f in FLAGS)}: {text!r}")
    if "@" in base and not rev:
        raise ValueError(f"empty revision in {text!r}")
    return PathSpec(
        text, kind, rev or None, "redis" in flags, "resumable" in flags,
        auth="auth" in flags, account="noaccount" not in flags,
    )  # fmt: skip


@dataclass(frozen=True)
class Scenario:
    """One load shape: ``concurrency`` workers each streaming ``requests`` answers, ``runs``
    times per round (short runs interleave finely and are cheap to redo when noisy)."""

    name: str
    concurrency: int
    requests: int
    tokens: int
    delay: float
    runs: int = 1

    @property
    def streams_per_round(self) -> int:
        return self.concurrency * self.requests * self.runs

    def describe(self) -> str:
        pace = f"{self.delay * 1000:g} ms" if self.delay else "no delay"
        return f"C={self.concurrency}, {self.tokens} tokens, {pace}"


def _scenarios(quick: bool) -> list[Scenario]:
    # 64 tokens at 20 ms is the reference shape (a 1.28 s answer). The no-delay run measures
    # how many chunks per second each path can carry at all.
    if quick:
        return [
            Scenario("C=1", 1, 6, 64, 0.02, runs=2),
            Scenario("C=100", 100, 1, 64, 0.02),
            Scenario("C=500", 500, 1, 64, 0.02),
            Scenario("no-delay", 100, 4, 64, 0.0),
        ]
    return [
        Scenario("C=1", 1, 8, 64, 0.02, runs=5),
        Scenario("C=100", 100, 3, 64, 0.02),
        Scenario("C=500", 500, 2, 64, 0.02),
        Scenario("no-delay", 100, 10, 64, 0.0),
    ]


# --------------------------------------------------------------------------- /proc readings


def _children(pid: int) -> list[int]:
    """``pid`` and all its descendants (nginx's worker, uvicorn's workers)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    tree: list[int] = []
    todo = [pid]
    while todo and len(tree) < 1000:
        current = todo.pop()
        tree.append(current)
        todo.extend(parents.get(current, ()))
    return tree


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes (all their threads), in seconds."""
    ticks = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / CLK_TCK


def _status_kib(pids: list[int], key: str) -> int:
    """Sum of one ``/proc/<pid>/status`` field (VmRSS, VmHWM) over these processes, in KiB."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total


def _core_busy() -> list[tuple[int, int, int]]:
    """(busy in processes, busy in all, total) clock ticks per core from /proc/stat."""
    cores = []
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                # user nice system idle iowait irq softirq steal ...: steal and guest time
                # are not ours to use, so they count neither as busy nor as available.
                # Interrupt time is kept apart: processes' utime/stime never include it.
                v = [int(x) for x in line.split()[1:8]]
                tasks = v[0] + v[1] + v[2]
                busy = tasks + v[5] + v[6]
                cores.append((tasks, busy, busy + v[3] + v[4]))
    return cores


def _wait_quiet(cores: tuple[int, int], limit: float, max_wait: float) -> bool:
    """Wait (at most ``max_wait`` s) until both cores are under ``limit`` busy over 0.5 s.

    The gateway is meant to have its core alone; a test suite or a build running beside the bench
    would otherwise land in its numbers. Returns False when the machine never went quiet.
    """
    end = time.monotonic() + max_wait
    while True:
        before = _core_busy()
        time.sleep(0.5)
        after = _core_busy()
        loads = [(after[c][1] - before[c][1]) / max(1, after[c][2] - before[c][2]) for c in cores]
        if max(loads) < limit:
            return True
        if time.monotonic() >= end:
            return False


class _RssSampler:
    """Samples the summed VmRSS of a process tree every 20 ms in a thread; keeps the peak."""

    def __init__(self, pids: list[int]) -> None:
        self._pids = pids
        self._stop = threading.Event()
        self.peak_kib = _status_kib(pids, "VmRSS")
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        self.peak_kib = max(self.peak_kib, _status_kib(self._pids, "VmRSS"))

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_kib = max(self.peak_kib, _status_kib(self._pids, "VmRSS"))


# --------------------------------------------------------------------------- processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _pinned(core: int) -> Any:
    def pin() -> None:
        os.sched_setaffinity(0, {core})

    return pin


def _wait_port(port: int, proc: subprocess.Popen[Any], deadline: float, what: str) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port} within {deadline:.0f} s")


def _stop(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class Target:
    """One path from the load generator to the upstream."""

    name: str
    port: int
    pid: int | None  # the gateway's process, None for direct
    log: Path | None = None
    headers: tuple[str, ...] = ()  # NAME:VALUE sent with every request
    redis: bool = False  # streams go to Redis: its server's CPU is counted apart

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/v1/chat/completions"


def _start_upstream(work: Path, core: int, lifetime: float) -> tuple[subprocess.Popen[str], int]:
    log = open(work / "upstream.log", "w")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(
        [sys.executable, str(BENCH / "upstream.py"), "--port", "0", "--max-seconds", str(lifetime)],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        preexec_fn=_pinned(core),
    )
    assert proc.stdout is not None
    line = _readline(proc.stdout, 20.0)
    if not line.startswith("READY "):
        _stop(proc)
        raise RuntimeError(f"upstream did not start: {line!r}\n{_tail(work / 'upstream.log')}")
    return proc, int(line.split()[1])


_NGINX_CONF = """\
# Generated by bench/run.py: nginx as a plain streaming reverse proxy.
daemon off;
master_process on;
worker_processes 1;
worker_cpu_affinity {affinity};
worker_rlimit_nofile 16384;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
{user}
events {{
    worker_connections 8192;
}}

http {{
    access_log off;
    client_body_temp_path {work}/client_body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    keepalive_requests 100000;

    upstream bench_upstream {{
        server {host}:{upstream_port};
        keepalive 1024;
        keepalive_requests 100000;
    }}

    server {{
        listen {host}:{port} backlog=4096;
        location / {{
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 120s;
        }}
    }}
}}
"""


def _nginx_binary() -> str:
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else ""
    )
    if not found:
        print("nginx not found: running bench/setup.sh", file=sys.stderr)
        subprocess.run(["bash", str(BENCH / "setup.sh")], check=True, timeout=900)
        found = shutil.which("nginx") or "/usr/sbin/nginx"
    return found


def _start_nginx(work: Path, core: int, upstream_port: int) -> tuple[subprocess.Popen[str], Target]:
    port = _free_port()
    conf = work / "nginx.conf"
    conf.write_text(
        _NGINX_CONF.format(
            work=work,
            host=HOST,
            port=port,
            upstream_port=upstream_port,
            affinity=format(1 << core, "b"),
            # As root, nginx would switch its worker to `nobody`, which cannot enter the temp dir.
            user="user root;" if os.geteuid() == 0 else "",
        )
    )
    log = work / "nginx-error.log"
    proc = subprocess.Popen(
        [_nginx_binary(), "-p", str(work), "-c", str(conf), "-e", str(log)],
        stdout=subprocess.DEVNULL,
        stderr=open(work / "nginx-stderr.log", "w"),  # noqa: SIM115
        text=True,
        preexec_fn=_pinned(core),
    )
    try:
        _wait_port(port, proc, 20.0, "nginx")
    except RuntimeError as exc:
        _stop(proc)
        raise RuntimeError(f"{exc}\n{_tail(work / 'nginx-stderr.log')}\n{_tail(log)}") from None
    return proc, Target("nginx", port, proc.pid, log)


def _checkout(rev: str, work: Path) -> Path:
    """``src/`` as it was at git revision ``rev``, unpacked under ``work``; returns that ``src``.

    A baseline runs from there with ``PYTHONPATH`` (the venv's own packages are shared, so a
    revision needing other dependencies than today's will not start; the error says so).
    """
    full = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--verify", f"{rev}^{{commit}}"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    dest = work / f"rev-{full[:12]}"
    if not (dest / "src").is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", "--format=tar", full, "src"],
            check=True, capture_output=True,
        )  # fmt: skip
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest / "src"


def _start_tokenrelay(
    work: Path,
    core: int,
    upstream_port: int,
    *,
    label: str,
    src: Path,
    redis_url: str | None,
    auth: bool = False,
    account: bool = True,
) -> tuple[subprocess.Popen[str], int, str | None]:
    """Start ``tokenrelay serve`` on its own database; returns it, its port, and the gateway
    key its requests must present (``auth``), else None."""
    port = _free_port()
    config = work / f"{label}.toml"
    config.write_text(
        "[[providers]]\n"
        'name = "bench"\n'
        f'base_url = "http://{HOST}:{upstream_port}/v1"\n'
        'api_key = "bench"\n'
        'models = ["*"]\n'
    )
    # Only our settings: no OpenAI key or other TOKENRELAY_* from the caller's shell.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "TOKENRELAY_"))}
    env.update(
        TOKENRELAY_CONFIG=str(config),
        TOKENRELAY_LOCAL__ENABLED="false",
        TOKENRELAY_LOG_LEVEL="warning",
        # Keep the bench's conversations out of the user's own database.
        TOKENRELAY_DATABASE_URL=f"sqlite+aiosqlite:///{work}/{label}.db",
        XDG_DATA_HOME=str(work / "xdg-data"),
        # This checkout's (or the baseline's) sources, not whatever the venv has installed.
        PYTHONPATH=str(src),
    )
    if redis_url is not None:
        env["TOKENRELAY_REDIS_URL"] = redis_url
    if not account:
        env["TOKENRELAY_USAGE_ACCOUNTING"] = "false"
    log = work / f"{label}.log"
    # Made on the server's database before it starts, as an admin would: from then on every
    # request needs a key, and the server looks each one up (cached) and accounts it to it.
    key = _create_key(env, work / f"{label}-keys.log") if auth else None
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenrelay", "serve", "--host", HOST, "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=open(log, "w"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_pinned(core),
    )
    try:
        _wait_port(port, proc, 60.0, label)
        if key is not None:
            _check_auth(port, key, label)
    except RuntimeError as exc:
        _stop(proc)
        raise RuntimeError(f"{exc}\n{_tail(log)}") from None
    return proc, port, key


def _create_key(env: dict[str, str], log: Path) -> str:
    """A new gateway key from ``tokenrelay keys create`` on the database ``env`` names.

    The CLI prints the secret on stdout, and its notice or error on stderr (into ``log``). A
    revision from before gateway keys has no such command: the error says so.
    """
    with open(log, "w") as err:
        try:
            done = subprocess.run(
                [sys.executable, "-m", "tokenrelay", "keys", "create", "--name", BENCH_KEY_NAME],
                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True, timeout=60.0,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            raise RuntimeError("`tokenrelay keys create` took over 60 s") from None
    secret = done.stdout.strip()
    if done.returncode != 0 or not secret.startswith("tr-") or len(secret.split()) != 1:
        raise RuntimeError(
            f"`tokenrelay keys create` failed (code {done.returncode})\n{_tail(log)}"
        )
    return secret


def _check_auth(port: int, key: str, label: str) -> None:
    """Make sure the server really requires the key: a +auth path that let anyone in (or
    refused its own key) would measure something else than it claims."""

    def status(secret: str) -> int:
        request = urllib.request.Request(
            f"http://{HOST}:{port}/v1/models", headers={"Authorization": f"Bearer {secret}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=10.0) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError as exc:
            raise RuntimeError(f"{label}: checking its key failed: {exc}") from None

    without, with_key = status("bench"), status(key)
    if without != 401 or with_key != 200:
        raise RuntimeError(
            f"{label}: expected 401 without the key and 200 with it, got {without} and {with_key}"
        )


def _redis_pid(url: str) -> int | None:
    """The pid of the Redis server behind ``url`` when it runs on this machine, else None.

    Its CPU time is read like the gateway's, so a run's Redis work is reported beside the
    gateway's and not counted as other processes' noise.
    """
    from redis import Redis
    from redis.exceptions import RedisError

    try:
        with Redis.from_url(url, socket_timeout=5.0) as client:
            client.ping()
            pid = int(client.info("server")["process_id"])
    except RedisError as exc:
        raise RuntimeError(f"Redis at {url} cannot be reached: {exc}") from None
    return pid if os.path.exists(f"/proc/{pid}/stat") else None


def _readline(stream: IO[str], timeout: float) -> str:
    """One line from a child's stdout, or "" after ``timeout`` seconds."""
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return result[0].strip() if result else ""


# --------------------------------------------------------------------------- measuring


@dataclass
class Measurement:
    """Everything seen for one (scenario, target) pair, summed over rounds."""

    ok: int = 0
    errors: int = 0
    wrong: int = 0
    chunks: int = 0
    elapsed: float = 0.0
    cpu: float = 0.0
    peak_rss_kib: int = 0
    busy: list[float] = field(default_factory=lambda: [0.0, 0.0])  # busy jiffies per core
    total: list[float] = field(default_factory=lambda: [0.0, 0.0])
    ttft_ms: list[float] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)
    foreign: list[float] = field(default_factory=lambda: [0.0, 0.0])  # others' ticks per core
    noisy: int = 0  # runs kept although other work shared a core
    retried: int = 0  # runs thrown away and done again because other work shared a core
    loadgen_cpu: float = 0.0  # the load generator's own CPU seconds in its last run
    redis_cpu: float = 0.0  # the Redis server's CPU seconds (paths with +redis only)

    def merge(self, run: Measurement) -> None:
        """Add one run's numbers."""
        for name in (
            "ok", "errors", "wrong", "chunks", "elapsed", "cpu", "noisy", "retried", "redis_cpu",
        ):  # fmt: skip
            setattr(self, name, getattr(self, name) + getattr(run, name))
        self.peak_rss_kib = max(self.peak_rss_kib, run.peak_rss_kib)
        for i in range(2):
            self.busy[i] += run.busy[i]
            self.total[i] += run.total[i]
            self.foreign[i] += run.foreign[i]
        self.ttft_ms.extend(run.ttft_ms)
        self.samples.extend(run.samples[: max(0, 5 - len(self.samples))])

    def foreign_share(self) -> float:
        """The larger share of a core that processes other than the bench's own used."""
        return max(f / t if t else 0.0 for f, t in zip(self.foreign, self.total, strict=True))

    def chunks_per_s(self) -> float:
        return self.chunks / self.elapsed if self.elapsed else 0.0

    def cpu_per_1k(self) -> float:
        return self.cpu / self.chunks * 1000.0 if self.chunks else float("nan")

    def redis_cpu_per_1k(self) -> float:
        return self.redis_cpu / self.chunks * 1000.0 if self.chunks else float("nan")


def _percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100.0 * len(ordered) + 0.5) - 1))
    return ordered[index]


def _measure(
    target: Target,
    scenario: Scenario,
    seed: int,
    cores: tuple[int, int],
    upstream_pid: int,
    deadline: float,
    gateways: list[int],
    redis_pid: int | None,
) -> Measurement:
    """One run of the load generator against ``target``.

    Besides the gateway's CPU time, it works out how much of each core went to processes that
    are not the bench's (a test suite, a build): the caller runs again when that is too much.
    ``gateways`` are all the gateway processes on the gateway core (the idle ones are the
    bench's too); ``redis_pid`` the Redis server, whose CPU is counted for ``+redis`` paths.
    """
    into = Measurement()
    deadline = min(deadline, scenario.requests * (scenario.tokens * scenario.delay + 5.0) + 60.0)
    cmd = [
        sys.executable, str(BENCH / "loadgen.py"), "--url", target.url,
        "--concurrency", str(scenario.concurrency), "--requests", str(scenario.requests),
        "--tokens", str(scenario.tokens), "--delay", str(scenario.delay),
        "--deadline", str(deadline), "--seed", str(seed), "--wait-go",
    ]  # fmt: skip
    for header in target.headers:
        cmd += ["--header", header]
    gen = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=_pinned(cores[1]),
    )
    assert gen.stdin is not None and gen.stdout is not None
    try:
        line = _readline(gen.stdout, 90.0)
        if line != "READY":
            # Warm-up failed: the loadgen prints its RESULT with the reason instead.
            if not line.startswith("RESULT "):
                line = _readline(gen.stdout, 10.0)
            _add(into, line, target.name)
            return into
        pids = _children(target.pid) if target.pid else []
        idle = [p for g in gateways if g != target.pid for p in _children(g)]
        ours = [*_children(upstream_pid), os.getpid()]  # on the load core with the loadgen
        redis = [redis_pid] if redis_pid is not None and target.redis else []
        cpu_before, ours_before = _cpu_seconds(pids), _cpu_seconds(ours)
        idle_before, redis_before = _cpu_seconds(idle), _cpu_seconds(redis)
        cores_before = _core_busy()
        with _RssSampler(pids) as rss:
            gen.stdin.write("GO\n")
            gen.stdin.flush()
            line = _readline(gen.stdout, deadline + 30.0)
        cores_after = _core_busy()
        into.cpu = _cpu_seconds(pids) - cpu_before
        ours_cpu = _cpu_seconds(ours) - ours_before
        idle_cpu = _cpu_seconds(idle) - idle_before
        into.redis_cpu = _cpu_seconds(redis) - redis_before
        _add(into, line, target.name)
        known = (into.cpu + idle_cpu, ours_cpu + into.loadgen_cpu)
        for i, core in enumerate(cores):  # gateway core, then load core
            tasks = cores_after[core][0] - cores_before[core][0]
            into.busy[i] = cores_after[core][1] - cores_before[core][1]
            into.total[i] = cores_after[core][2] - cores_before[core][2]
            into.foreign[i] = max(0.0, tasks - known[i] * CLK_TCK)
        # Redis is not pinned (it is shared): its ticks came off whichever core was busier.
        redis_ticks = into.redis_cpu * CLK_TCK
        for i in sorted(range(2), key=lambda i: -into.foreign[i]):
            taken = min(redis_ticks, into.foreign[i])
            into.foreign[i] -= taken
            redis_ticks -= taken
        into.peak_rss_kib = rss.peak_kib
    finally:
        _stop(gen, signal.SIGKILL)
    return into


def _measure_quietly(
    target: Target,
    scenario: Scenario,
    seed: int,
    cores: tuple[int, int],
    upstream_pid: int,
    args: argparse.Namespace,
    deadline: float,
    gateways: list[int],
    redis_pid: int | None,
) -> Measurement:
    """:func:`_measure` after the cores went idle; again (``--retries`` times at most) when
    other processes took more than ``--noise`` of a core during the run."""
    retried = 0
    while True:
        quiet = args.quiet_wait <= 0 or _wait_quiet(cores, 0.15, args.quiet_wait)
        run = _measure(target, scenario, seed, cores, upstream_pid, deadline, gateways, redis_pid)
        clean = quiet and run.foreign_share() <= args.noise
        if clean or retried >= args.retries or not run.ok:
            run.retried = retried
            run.noisy = 0 if clean else 1
            return run
        retried += 1
        seed += scenario.concurrency * scenario.requests


def _add(into: Measurement, line: str, name: str) -> None:
    if not line.startswith("RESULT "):
        into.errors += 1
        into.samples.append(f"{name}: load generator gave no result")
        return
    result = json.loads(line[len("RESULT ") :])
    into.ok += result["ok"]
    into.errors += result["errors"]
    into.wrong += result["wrong"]
    into.chunks += result["chunks"]
    into.elapsed += result["elapsed"]
    into.loadgen_cpu = result.get("cpu", 0.0)
    into.ttft_ms.extend(result["ttft_ms"])
    for sample in result["error_samples"]:
        if len(into.samples) < 5:
            into.samples.append(sample)


# --------------------------------------------------------------------------- report


def _fmt(value: float, digits: int = 2) -> str:
    return "—" if value != value else f"{value:.{digits}f}"  # NaN check


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _per_round(
    per_round: dict[tuple[str, str, int], Measurement], scenario: str, name: str
) -> dict[str, list[float]]:
    """This path's ratios round by round, each against direct and nginx of the same round."""
    out: dict[str, list[float]] = {"x_direct": [], "x_nginx": [], "cpu_per_1k": []}
    rounds = sorted({r for (s, _, r) in per_round if s == scenario})
    for r in rounds:
        m = per_round.get((scenario, name, r))
        if m is None or not m.chunks:
            continue
        direct = per_round.get((scenario, "direct", r))
        nginx = per_round.get((scenario, "nginx", r))
        if direct is not None and direct.chunks_per_s():
            out["x_direct"].append(m.chunks_per_s() / direct.chunks_per_s())
        if name != "direct":
            out["cpu_per_1k"].append(m.cpu_per_1k())
            if nginx is not None and nginx.cpu > 0 and nginx.chunks:
                out["x_nginx"].append(m.cpu_per_1k() / nginx.cpu_per_1k())
    return out


def _cell(values: list[float], digits: int = 2) -> str:
    """``median (round 1, round 2, ...)``."""
    if not values:
        return "—"
    each = ", ".join(_fmt(v, digits) for v in values)
    return f"**{_fmt(_median(values), digits)}** ({each})"


def _round_table(
    scenarios: list[Scenario],
    targets: list[str],
    per_round: dict[tuple[str, str, int], Measurement],
) -> list[str]:
    """Medians over rounds of each gateway's ratios: the figures the targets are checked on."""
    shown = [s for s in scenarios if s.name != "C=1"]
    head = "| path | " + " | ".join(
        f"{s.name} chunks/s x direct | {s.name} CPU s / 1k chunks | {s.name} CPU x nginx"
        for s in shown
    )
    lines = [head + " |", "|---|" + "---:|---:|---:|" * len(shown)]
    for name in targets:
        if name == "direct":
            continue
        cells = []
        for scenario in shown:
            ratios = _per_round(per_round, scenario.name, name)
            cells += [
                _cell(ratios["x_direct"]),
                _cell(ratios["cpu_per_1k"], 3),
                _cell(ratios["x_nginx"]),
            ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _report(
    scenarios: list[Scenario],
    targets: list[str],
    results: dict[tuple[str, str], Measurement],
    per_round: dict[tuple[str, str, int], Measurement],
) -> tuple[str, bool, list[dict[str, Any]]]:
    lines = [
        "| scenario | path | streams ok | TTFT p50 / p99 ms | added TTFT p50 / p99 ms "
        "| chunks/s | x direct | CPU s / 1k chunks | x nginx | peak RSS MiB "
        "| gateway / load core busy | others | errors | wrong |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows: list[dict[str, Any]] = []
    for scenario in scenarios:
        direct = results.get((scenario.name, "direct"))
        nginx = results.get((scenario.name, "nginx"))
        for name in targets:
            m = results[(scenario.name, name)]
            p50, p99 = _percentile(m.ttft_ms, 50), _percentile(m.ttft_ms, 99)
            row: dict[str, Any] = {
                "scenario": scenario.name, "path": name, "ok": m.ok, "errors": m.errors,
                "wrong": m.wrong, "chunks": m.chunks, "ttft_p50_ms": p50, "ttft_p99_ms": p99,
                "chunks_per_s": m.chunks_per_s(), "cpu_s": m.cpu,
                "cpu_s_per_1k_chunks": m.cpu_per_1k() if name != "direct" else None,
                "peak_rss_mib": m.peak_rss_kib / 1024 if name != "direct" else None,
                "core_busy": [b / t if t else 0.0 for b, t in zip(m.busy, m.total, strict=True)],
                "others_share": m.foreign_share(), "retried": m.retried, "noisy": m.noisy,
                "error_samples": m.samples,
                "redis_cpu_s_per_1k_chunks": m.redis_cpu_per_1k() if m.redis_cpu else None,
                "rounds": _per_round(per_round, scenario.name, name),
            }  # fmt: skip
            added = "—"
            ratio_direct = "—"
            ratio_nginx = "—"
            if direct is not None and name != "direct":
                d50, d99 = _percentile(direct.ttft_ms, 50), _percentile(direct.ttft_ms, 99)
                row["added_ttft_p50_ms"], row["added_ttft_p99_ms"] = p50 - d50, p99 - d99
                added = f"{_fmt(p50 - d50)} / {_fmt(p99 - d99)}"
            if direct is not None and direct.chunks_per_s():
                row["chunks_vs_direct"] = m.chunks_per_s() / direct.chunks_per_s()
                ratio_direct = _fmt(row["chunks_vs_direct"])
            if nginx is not None and name != "direct" and nginx.cpu > 0 and m.chunks:
                row["cpu_vs_nginx"] = m.cpu_per_1k() / nginx.cpu_per_1k()
                ratio_nginx = _fmt(row["cpu_vs_nginx"])
            busy = "/".join(
                f"{100 * b / t:.0f}%" if t else "—" for b, t in zip(m.busy, m.total, strict=True)
            )
            cpu = _fmt(m.cpu_per_1k(), 3) if name != "direct" else "—"
            rss = _fmt(m.peak_rss_kib / 1024, 1) if name != "direct" else "—"
            lines.append(
                f"| {scenario.name} | {name} | {m.ok} | {_fmt(p50)} / {_fmt(p99)} | {added} "
                f"| {m.chunks_per_s():.0f} | {ratio_direct} | {cpu} | {ratio_nginx} | {rss} "
                f"| {busy} | {100 * m.foreign_share():.0f}% | {m.errors} | {m.wrong} |"
            )
            rows.append(row)

    checks: list[tuple[str, bool]] = []
    by = {(r["scenario"], r["path"]): r for r in rows}
    for name in (t for t in targets if t != "direct"):
        c1, c100, c500 = by.get(("C=1", name)), by.get(("C=100", name)), by.get(("C=500", name))
        if c1 and "added_ttft_p50_ms" in c1:
            value = c1["added_ttft_p50_ms"]
            checks.append(
                (f"{name}: C=1 added TTFT p50 {value:.2f} ms <= {TARGET_C1_ADDED_TTFT_MS} ms",
                 value <= TARGET_C1_ADDED_TTFT_MS)
            )  # fmt: skip
        # Medians of the per-round ratios: one round disturbed by other work moves them less.
        if c100 and c100["rounds"]["x_nginx"]:
            value = _median(c100["rounds"]["x_nginx"])
            checks.append(
                (f"{name}: C=100 CPU per 1,000 chunks {value:.2f}x nginx (median of rounds) <= "
                 f"{TARGET_C100_CPU_VS_NGINX}x", value <= TARGET_C100_CPU_VS_NGINX)
            )  # fmt: skip
        if c500 and c500["rounds"]["x_direct"]:
            value = _median(c500["rounds"]["x_direct"])
            checks.append(
                (f"{name}: C=500 chunks/s {value:.3f}x direct (median of rounds) >= "
                 f"{TARGET_C500_CHUNKS_VS_DIRECT}x", value >= TARGET_C500_CHUNKS_VS_DIRECT)
            )  # fmt: skip
    errors = sum(r["errors"] for r in rows)
    wrong = sum(r["wrong"] for r in rows)
    checks.append(
        (f"all paths: {errors} errors, {wrong} wrong texts (0 and 0)", not errors and not wrong)
    )

    notes = []
    noisy = sum(m.noisy for m in results.values())
    retried = sum(m.retried for m in results.values())
    if retried:
        notes.append(
            f"- note: {retried} run(s) were thrown away and done again because other processes "
            "shared a core"
        )
    if noisy:
        notes.append(
            f"- note: {noisy} run(s) kept although other processes shared a core (all retries "
            "were noisy too); their numbers are less trustworthy"
        )
    for scenario in scenarios:
        direct = results.get((scenario.name, "direct"))
        if direct is not None and scenario.delay and direct.chunks:
            # Each stream lasts (tokens - 1) * delay; no path can beat that pace.
            limit = (
                scenario.concurrency * scenario.tokens / ((scenario.tokens - 1) * scenario.delay)
            )
            notes.append(
                f"- note: {scenario.name} direct reached {direct.chunks_per_s() / limit:.0%} of "
                f"the pacing limit ({limit:.0f} chunks/s); the load core was "
                f"{100 * direct.busy[1] / max(1.0, direct.total[1]):.0f}% busy"
            )
    for row in rows:
        if row["redis_cpu_s_per_1k_chunks"] is not None:
            notes.append(
                f"- note: {row['scenario']} {row['path']}: the Redis server used "
                f"{row['redis_cpu_s_per_1k_chunks']:.3f} CPU s per 1,000 chunks besides the "
                "gateway (it is shared: other clients' work counts too)"
            )
    lines.append("")
    lines.append("Per round (median in bold, then each round; each ratio against direct and "
                 "nginx of the same round):")  # fmt: skip
    lines.append("")
    lines.extend(_round_table(scenarios, targets, per_round))
    lines.append("")
    for text, passed in checks:
        lines.append(f"- {'PASS' if passed else 'FAIL'}: {text}")
    lines.extend(notes)
    samples = [f"  - {r['scenario']} {r['path']}: {s}" for r in rows for s in r["error_samples"]]
    if samples:
        lines.append("")
        lines.append("Error samples:")
        lines.extend(samples[:20])
    return "\n".join(lines), all(passed for _, passed in checks), rows


# --------------------------------------------------------------------------- main


def _raise_open_files() -> None:
    """C=500 needs 1,000+ sockets in the gateway and the load generator; children inherit this."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < 2 * 500 + 100:
        print(f"warning: open-files limit {want} is low for C=500", file=sys.stderr)


@contextlib.contextmanager
def _processes() -> Iterator[list[subprocess.Popen[str]]]:
    """Every long-lived child; all stopped on the way out, whatever happens."""
    procs: list[subprocess.Popen[str]] = []
    try:
        yield procs
    finally:
        for proc in reversed(procs):
            _stop(proc, signal.SIGQUIT if "nginx" in str(proc.args) else signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Benchmark tokenrelay against nginx and direct, interleaved.",
        epilog="Prints a markdown table and PASS/FAIL per target; exits 1 when a target fails.",
    )
    parser.add_argument("--quick", action="store_true", help="one short round (~2 minutes)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds [default: 3, quick 1]")
    parser.add_argument(
        "--paths",
        default=DEFAULT_PATHS,
        help="comma-separated: direct, nginx, "
        "tokenrelay[@REV][+redis][+auth][+noaccount][+resumable] "
        f"[default: {DEFAULT_PATHS}]",
    )
    parser.add_argument(
        "--redis-url",
        default=DEFAULT_REDIS_URL,
        help=f"Redis for the +redis paths [default: {DEFAULT_REDIS_URL}]",
    )
    parser.add_argument(
        "--scenarios", default=None, help="comma-separated subset of C=1,C=100,C=500,no-delay"
    )
    parser.add_argument(
        "--max-minutes", type=float, default=45.0, help="stop starting scenarios after this"
    )
    parser.add_argument(
        "--gateway-core", type=int, default=0, help="the core the gateway has alone"
    )
    parser.add_argument("--load-core", type=int, default=1, help="upstream + load generator core")
    parser.add_argument(
        "--json", type=Path, default=None, help="write raw results here [default: bench/results/]"
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=30.0,
        help="seconds to wait for idle cores before each run (0: don't wait)",
    )
    parser.add_argument(
        "--noise",
        type=float,
        default=0.10,
        help="share of a core other processes may take during a run before it is redone",
    )
    parser.add_argument("--retries", type=int, default=2, help="redos of a noisy run at most")
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="niceness of the bench and all it starts (negative needs root): on a machine "
        "shared with other work, -10 gives the bench's processes most of their cores",
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp dir with logs")
    args = parser.parse_args(argv)

    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    try:
        specs = {p: parse_path(p) for p in paths}
    except ValueError as exc:
        parser.error(str(exc))
    if not paths or len(specs) != len(paths):
        parser.error("--paths takes each path once")
    scenarios = _scenarios(args.quick)
    if args.scenarios:
        wanted = {s.strip() for s in args.scenarios.split(",")}
        scenarios = [s for s in scenarios if s.name in wanted]
    rounds = args.rounds or (1 if args.quick else 3)
    allowed = os.sched_getaffinity(0)
    if not {args.gateway_core, args.load_core} <= allowed or args.gateway_core == args.load_core:
        parser.error(f"need two distinct cores out of {sorted(allowed)}")

    _raise_open_files()
    if args.nice:
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)  # inherited by every child
    os.sched_setaffinity(0, {args.load_core})
    cores = (args.gateway_core, args.load_core)
    started = time.monotonic()
    stop_at = started + args.max_minutes * 60.0
    work = Path(tempfile.mkdtemp(prefix="tokenrelay-bench-"))
    results: dict[tuple[str, str], Measurement] = {
        (s.name, p): Measurement() for s in scenarios for p in paths
    }
    per_round: dict[tuple[str, str, int], Measurement] = {}
    hwm: dict[str, int] = {}
    try:
        with _processes() as procs:
            upstream, upstream_port = _start_upstream(
                work, args.load_core, args.max_minutes * 60.0 + 300.0
            )
            procs.append(upstream)
            targets: dict[str, Target] = {}
            # server -> port, pid, the gateway key its requests present (+auth)
            servers: dict[tuple[str, str | None, bool, bool, bool], tuple[int, int, str | None]]
            servers = {}
            redis_pid = None
            if any(spec.redis for spec in specs.values()):
                redis_pid = _redis_pid(args.redis_url)
            for name, spec in specs.items():
                if spec.kind == "direct":
                    targets[name] = Target(name, upstream_port, None)
                    continue
                if spec.server not in servers:
                    if spec.kind == "nginx":
                        proc, nginx = _start_nginx(work, args.gateway_core, upstream_port)
                        assert nginx.pid is not None
                        servers[spec.server] = (nginx.port, nginx.pid, None)
                    else:
                        label = "tokenrelay" + (f"-{spec.rev}" if spec.rev else "")
                        label += "-redis" if spec.redis else ""
                        label += "-auth" if spec.auth else ""
                        label += "" if spec.account else "-noaccount"
                        src = _checkout(spec.rev, work) if spec.rev else REPO / "src"
                        redis_url = args.redis_url if spec.redis else None
                        proc, port, key = _start_tokenrelay(
                            work, args.gateway_core, upstream_port,
                            label=label, src=src, redis_url=redis_url,
                            auth=spec.auth, account=spec.account,
                        )  # fmt: skip
                        servers[spec.server] = (port, proc.pid, key)
                    procs.append(proc)
                port, pid, key = servers[spec.server]
                headers: tuple[str, ...] = (RESUMABLE_HEADER,) if spec.resumable else ()
                if key is not None:
                    headers += (f"Authorization:Bearer {key}",)
                targets[name] = Target(name, port, pid, None, headers, spec.redis)
            gateways = [pid for _, pid, _ in servers.values()]
            print(
                f"upstream :{upstream_port}, "
                + ", ".join(f"{t.name} :{t.port}" for t in targets.values())
                + f"; gateway on core {args.gateway_core}, load on core {args.load_core}; "
                f"{rounds} round(s); logs in {work}",
                file=sys.stderr,
            )
            seed = 1
            for r in range(rounds):
                for scenario, part in ((s, k) for s in scenarios for k in range(s.runs)):
                    # Rotate the order each time so no path always runs first or last.
                    turn = (r + part) % len(paths)
                    for name in paths[turn:] + paths[:turn]:
                        if time.monotonic() > stop_at:
                            raise TimeoutError(f"--max-minutes {args.max_minutes} reached")
                        run = _measure_quietly(
                            targets[name], scenario, seed, cores, upstream.pid, args,
                            stop_at - time.monotonic(), gateways, redis_pid,
                        )  # fmt: skip
                        results[(scenario.name, name)].merge(run)
                        per_round.setdefault((scenario.name, name, r), Measurement()).merge(run)
                        seed += scenario.concurrency * scenario.requests * (1 + run.retried)
                        print(
                            f"round {r + 1}/{rounds} {scenario.name:8} "
                            + (f"{part + 1}/{scenario.runs} " if scenario.runs > 1 else "")
                            + f"{name:10} "
                            f"ok {run.ok:5} errors {run.errors} wrong {run.wrong} "
                            f"{run.chunks_per_s():8.0f} chunks/s, others used "
                            f"{100 * run.foreign_share():.0f}% of a core"
                            + (f" (after {run.retried} noisy run(s))" if run.retried else "")
                            + (" NOISY" if run.noisy else ""),
                            file=sys.stderr,
                        )
                        time.sleep(0.2)  # let closed connections drain before the next run
            for name, target in targets.items():
                if target.pid:
                    hwm[name] = _status_kib(_children(target.pid), "VmHWM")
    except (RuntimeError, TimeoutError) as exc:
        print(f"bench stopped: {exc}", file=sys.stderr)
        args.keep_logs = True
        if not any(m.ok for m in results.values()):
            return 2

    table, passed, rows = _report(scenarios, paths, results, per_round)
    header = (
        f"tokenrelay bench, {datetime.datetime.now().isoformat(timespec='seconds')}, "
        f"{rounds} round(s), {time.monotonic() - started:.0f} s"
    )
    print(f"\n{header}\n")
    print(
        "\n".join(
            f"- {s.name}: {s.describe()}, {s.streams_per_round} streams per path per round"
            for s in scenarios
        )
    )
    print()
    print(table)
    if hwm:
        print(
            "\nVmHWM over the whole run: "
            + ", ".join(f"{k} {v / 1024:.1f} MiB" for k, v in hwm.items())
        )
    out = args.json or (BENCH / "results" / f"run-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"header": header, "rounds": rounds, "rows": rows, "vm_hwm_kib": hwm,
             "scenarios": [s.__dict__ for s in scenarios]},
            indent=1, default=float,
        )
    )  # fmt: skip
    print(f"\nraw results: {out}")
    if args.keep_logs:
        print(f"logs kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if passed else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
    raise SystemExit(130)
