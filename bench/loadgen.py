"""The benchmark's load generator: C concurrent streams through one aiohttp client.

Each of ``--concurrency`` workers sends ``--requests`` streamed chat completions one after the
other, records the time to the first content chunk (TTFT), keeps the raw body, and afterwards
decodes it as SSE and checks the text against :mod:`corpus` exactly. Work per chunk is kept small
(the body is parsed once, at the end of the stream) because the load generator shares a core with
the fake upstream and must not be what is measured.

With ``--wait-go`` it first opens its connections with one tiny request per worker, prints
``READY``, and waits for a line on stdin, so the orchestrator can read the gateway's CPU counters
right around the measured part. It prints one ``RESULT {json}`` line at the end.

Bounded: ``--requests`` per worker, and ``--deadline`` seconds for the whole measured part, after
which unfinished streams are cancelled and counted as errors. Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import prompt, text

__all__ = ["Tally", "run", "main"]

# The first event whose delta carries some text; tolerant of re-encoded JSON (spaces after ':').
_FIRST_CONTENT = re.compile(rb'"content"\s*:\s*"(?!")')
_MAX_ERROR_SAMPLES = 5
_JSON = {"Content-Type": "application/json"}
"""tokenrelay refuses bodies not declared JSON (aiohttp would declare bytes octet-stream)."""


@dataclass
class Tally:
    """What one run of the load generator saw."""

    ok: int = 0
    errors: int = 0
    wrong: int = 0
    chunks: int = 0
    bytes: int = 0
    elapsed: float = 0.0
    cpu: float = 0.0
    ttft_ms: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)

    def error(self, message: str) -> None:
        self.errors += 1
        if len(self.error_samples) < _MAX_ERROR_SAMPLES and message not in self.error_samples:
            self.error_samples.append(message)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "errors": self.errors,
            "wrong": self.wrong,
            "chunks": self.chunks,
            "bytes": self.bytes,
            "elapsed": self.elapsed,
            "cpu": self.cpu,
            "ttft_ms": [round(t, 4) for t in self.ttft_ms],
            "error_samples": self.error_samples,
        }


def decode(body: bytes) -> tuple[str, int, bool, str | None]:
    """Text, content chunks, whether ``[DONE]`` came, and an error message if one was streamed.

    SSE as the HTML standard has it: events end at a blank line, ``data`` lines of one event are
    joined with newlines, lines starting with ``:`` are comments (pings).
    """
    parts: list[str] = []
    chunks = 0
    done = False
    for event in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        data = [line[5:].removeprefix(b" ") for line in event.split(b"\n") if line[:5] == b"data:"]
        if not data:
            continue
        payload = b"\n".join(data)
        if payload == b"[DONE]":
            done = True
            continue
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return "".join(parts), chunks, done, f"bad JSON in event: {payload[:80]!r}"
        if not isinstance(obj, dict):
            return "".join(parts), chunks, done, f"event is not an object: {payload[:80]!r}"
        if "error" in obj:
            return "".join(parts), chunks, done, f"streamed error: {str(obj['error'])[:120]}"
        for choice in obj.get("choices") or ():
            content = (choice.get("delta") or {}).get("content")
            if content:
                parts.append(content)
                chunks += 1
    return "".join(parts), chunks, done, None


async def _one(
    session: aiohttp.ClientSession,
    url: str,
    seed: int,
    tokens: int,
    delay: float,
    tally: Tally | None,
) -> None:
    body = orjson.dumps(
        {
            "model": "bench",
            "stream": True,
            "messages": [{"role": "user", "content": prompt(tokens, delay, seed)}],
            "bench": {"tokens": tokens, "delay": delay, "seed": seed},
        }
    )
    received: list[bytes] = []
    ttft: float | None = None
    start = time.perf_counter()
    try:
        async with session.post(url, data=body, headers=_JSON) as response:
            if response.status != 200:
                detail = (await response.read())[:120]
                if tally is not None:
                    tally.error(f"HTTP {response.status}: {detail!r}")
                return
            async for data in response.content.iter_any():
                received.append(data)
                if ttft is None and _FIRST_CONTENT.search(
                    data if len(received) == 1 else b"".join(received)
                ):
                    ttft = time.perf_counter() - start
    except (aiohttp.ClientError, TimeoutError) as exc:
        if tally is not None:
            tally.error(f"{type(exc).__name__}: {exc}"[:160])
        return
    if tally is None:
        return
    raw = b"".join(received)
    got, chunks, done, problem = decode(raw)
    tally.bytes += len(raw)
    tally.chunks += chunks
    if problem is not None:
        tally.error(problem)
    elif not done:
        tally.error("stream ended without [DONE]")
    elif got != text(seed, tokens):
        tally.wrong += 1
        if len(tally.error_samples) < _MAX_ERROR_SAMPLES:
            tally.error_samples.append(f"wrong text for seed {seed}: {got[:60]!r}...")
    elif ttft is None:
        tally.error("no content chunk")
    else:
        tally.ok += 1
        tally.ttft_ms.append(ttft * 1000.0)


async def _worker(
    session: aiohttp.ClientSession,
    url: str,
    first_seed: int,
    requests: int,
    tokens: int,
    delay: float,
    tally: Tally,
) -> None:
    for i in range(requests):
        await _one(session, url, first_seed + i, tokens, delay, tally)


async def run(
    url: str,
    concurrency: int,
    requests: int,
    tokens: int,
    delay: float,
    deadline: float,
    seed: int = 1,
    wait_go: bool = False,
    extra_headers: dict[str, str] | None = None,
) -> Tally:
    """Warm up one connection per worker, then measure ``concurrency * requests`` streams.

    ``extra_headers`` go on every request (e.g. ``X-Tokenrelay-Resumable: true``, or
    ``Authorization: Bearer tr-...`` instead of the default ``Bearer bench``).
    """
    if urlsplit(url).hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("the load generator only sends to this machine (127.0.0.1)")
    per_request = tokens * delay + 30.0
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=per_request, sock_connect=10.0)
    headers = {"content-type": "application/json", "authorization": "Bearer bench"}
    # Header names match whatever their case: ``Authorization:Bearer tr-...`` must replace the
    # default key, not go out as a second Authorization header beside it.
    headers.update({k.lower(): v for k, v in (extra_headers or {}).items()})
    tally = Tally()
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, headers=headers, auto_decompress=False
    ) as session:
        warm = Tally()
        await asyncio.wait_for(
            asyncio.gather(
                *(_one(session, url, 10**9 + i, 2, 0.0, warm) for i in range(concurrency))
            ),
            timeout=60.0,
        )
        if warm.errors:
            tally.errors += warm.errors
            tally.error_samples = ["warm-up: " + s for s in warm.error_samples]
            return tally
        if wait_go:
            print("READY", flush=True)
            # Blocking is fine here: nothing else runs until the measured part starts.
            if not sys.stdin.readline():
                raise SystemExit("stdin closed before GO")
        started, cpu_started = time.perf_counter(), time.process_time()
        workers = [
            asyncio.create_task(
                _worker(session, url, seed + w * requests, requests, tokens, delay, tally)
            )
            for w in range(concurrency)
        ]
        _, unfinished = await asyncio.wait(workers, timeout=deadline)
        for task in unfinished:
            task.cancel()
        if unfinished:
            await asyncio.wait(unfinished, timeout=5.0)
            missing = concurrency * requests - tally.ok - tally.errors - tally.wrong
            tally.errors += missing
            tally.error_samples.append(f"deadline of {deadline:.0f} s: {missing} streams cut")
        tally.elapsed = time.perf_counter() - started
        tally.cpu = time.process_time() - cpu_started
    return tally


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="…/v1/chat/completions on 127.0.0.1")
    parser.add_argument("--concurrency", "-c", type=int, default=1, help="streams at once")
    parser.add_argument("--requests", "-n", type=int, default=10, help="streams per worker")
    parser.add_argument("--tokens", type=int, default=64, help="chunks per stream")
    parser.add_argument("--delay", type=float, default=0.02, help="seconds between chunks")
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds at most")
    parser.add_argument("--seed", type=int, default=1, help="first stream's seed")
    parser.add_argument("--wait-go", action="store_true", help="print READY, wait for a line")
    parser.add_argument(
        "--header", action="append", default=[], help="NAME:VALUE sent with every request"
    )
    args = parser.parse_args(argv)
    extra: dict[str, str] = {}
    for item in args.header:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            parser.error(f"--header takes NAME:VALUE, not {item!r}")
        extra[name.strip()] = value.strip()

    coro = run(
        args.url, args.concurrency, args.requests, args.tokens, args.delay, args.deadline,
        args.seed, args.wait_go, extra,
    )  # fmt: skip
    try:
        import uvloop
    except ImportError:
        tally = asyncio.run(coro)
    else:
        tally = uvloop.run(coro)
    print("RESULT " + orjson.dumps(tally.as_dict()).decode(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
