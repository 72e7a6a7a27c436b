"""A fast fake OpenAI-compatible upstream for the benchmark.

``POST /v1/chat/completions`` answers with ``tokens`` chunks, one every ``delay`` seconds, of the
deterministic text in :mod:`corpus`. The parameters come from an extra body field
``"bench": {"tokens": 64, "delay": 0.02, "seed": 7}``, or, for a gateway that drops unknown
fields, from a user message written by :func:`corpus.prompt`.

It is a raw asyncio protocol with httptools' parser on uvloop: measured on one core at 500 paced
streams it spends ~12.5 us of CPU per chunk where an ``aiohttp.web`` handler doing the same spends
~19 us (most of what is left is the loopback write itself), which leaves the shared load core more
room for the load generator (see bench/README.md). Chunks are scheduled at
absolute times (``start + i * delay``), so a late timer never stretches a stream further. With
``delay`` 0 each chunk is still its own write, and writing pauses while the peer is slow to read.

Bounded: at most ``MAX_TOKENS`` per stream and ``MAX_DELAY`` between chunks, and the process exits
by itself after ``--max-seconds``. Listens on 127.0.0.1 only.

Run: ``python bench/upstream.py --port 9100`` (prints ``READY <port>`` once listening).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httptools
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import VOCABULARY, parse_prompt, token

__all__ = ["main", "serve"]

MAX_TOKENS = 10_000
MAX_DELAY = 1.0
DEFAULT_TOKENS = 16
DEFAULT_DELAY = 0.02

_ESCAPED: dict[str, bytes] = {word: orjson.dumps(word) for word in VOCABULARY}
_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"content-type: text/event-stream; charset=utf-8\r\n"
    b"cache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n"
)
_CLOSE = b"connection: close\r\n"
_KEEP = b"connection: keep-alive\r\n"
_LAST_CHUNK = b"0\r\n\r\n"
_DONE = b"data: [DONE]\n\n"
_CREATED = 1_700_000_000


def _frame(payload: bytes) -> bytes:
    """One HTTP/1.1 chunk of the chunked transfer coding."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


@dataclass(slots=True)
class _Request:
    method: bytes
    path: bytes
    body: bytes
    keep_alive: bool


@dataclass(slots=True)
class _Params:
    tokens: int
    delay: float
    seed: int
    model: str
    stream: bool
    include_usage: bool


class _Stats:
    """Counts kept per process, printed to stderr at exit."""

    requests = 0
    completed = 0
    disconnected = 0


def _params(body: dict[str, Any]) -> _Params:
    bench = body.get("bench")
    found: dict[str, float] = {}
    if isinstance(bench, dict):
        found = {k: float(v) for k, v in bench.items() if isinstance(v, int | float)}
    else:
        messages = body.get("messages") or []
        for message in reversed(messages):
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list):  # content parts
                content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
            if isinstance(content, str):
                parsed = parse_prompt(content)
                if parsed is not None:
                    found = parsed
                    break
    tokens = int(found.get("tokens", DEFAULT_TOKENS))
    delay = float(found.get("delay", DEFAULT_DELAY))
    options = body.get("stream_options")
    return _Params(
        tokens=max(1, min(tokens, MAX_TOKENS)),
        delay=max(0.0, min(delay, MAX_DELAY)),
        seed=int(found.get("seed", 0)),
        model=str(body.get("model", "bench")),
        stream=bool(body.get("stream", False)),
        include_usage=isinstance(options, dict) and bool(options.get("include_usage")),
    )


class _Stream:
    """One streamed answer on one connection."""

    __slots__ = (
        "_cid",
        "_index",
        "_p",
        "_prefix",
        "_proto",
        "_start",
        "_suffix",
        "_timer",
        "keep_alive",
        "waiting",
    )  # fmt: skip

    def __init__(self, proto: UpstreamProtocol, params: _Params, keep_alive: bool) -> None:
        self._proto = proto
        self._p = params
        self._index = 0
        self._start = 0.0
        self._timer: asyncio.TimerHandle | asyncio.Handle | None = None
        self._cid = f"chatcmpl-bench-{params.seed}".encode()
        self._prefix = (
            b'data: {"id":"%s","object":"chat.completion.chunk","created":%d,"model":%s,'
            b'"system_fingerprint":null,"choices":[{"index":0,"delta":{'
            % (self._cid, _CREATED, orjson.dumps(params.model))
        )
        self._suffix = b'},"logprobs":null,"finish_reason":null}]}\n\n'
        self.keep_alive = keep_alive
        self.waiting = False

    def start(self) -> None:
        self._start = self._proto.loop.time()
        head = _SSE_HEAD + (_KEEP if self.keep_alive else _CLOSE) + b"\r\n"
        first = self._prefix + b'"role":"assistant","content":' + self._content(0) + self._suffix
        self._proto.write(head + _frame(first))
        self._index = 1
        self._schedule()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _content(self, index: int) -> bytes:
        return _ESCAPED[token(self._p.seed, index)]

    def _schedule(self) -> None:
        loop = self._proto.loop
        if self._index >= self._p.tokens:
            self._timer = loop.call_soon(self._finish)
        elif self._p.delay > 0:
            self._timer = loop.call_at(self._start + self._index * self._p.delay, self.step)
        else:
            self._timer = loop.call_soon(self.step)

    def step(self) -> None:
        self._timer = None
        if self._proto.closed:
            return
        if self._proto.write_paused:
            self.waiting = True  # resumed by UpstreamProtocol.resume_writing
            return
        self.waiting = False
        chunk = self._prefix + b'"content":' + self._content(self._index) + self._suffix
        self._proto.write(_frame(chunk))
        self._index += 1
        self._schedule()

    def _finish(self) -> None:
        self._timer = None
        if self._proto.closed:
            return
        tail = (
            b'data: {"id":"%s","object":"chat.completion.chunk","created":%d,"model":%s,'
            b'"system_fingerprint":null,"choices":[{"index":0,"delta":{},"logprobs":null,'
            b'"finish_reason":"stop"}]}\n\n' % (self._cid, _CREATED, orjson.dumps(self._p.model))
        )
        if self._p.include_usage:
            n = self._p.tokens
            tail += (
                b'data: {"id":"%s","object":"chat.completion.chunk","created":%d,"model":%s,'
                b'"choices":[],"usage":{"prompt_tokens":8,"completion_tokens":%d,'
                b'"total_tokens":%d}}\n\n'
                % (self._cid, _CREATED, orjson.dumps(self._p.model), n, n + 8)
            )
        self._proto.write(_frame(tail + _DONE) + _LAST_CHUNK)
        _Stats.completed += 1
        self._proto.stream_done(self)


class UpstreamProtocol(asyncio.Protocol):
    """HTTP/1.1 with keep-alive; requests on one connection are answered in order."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.write_paused = False
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._body: list[bytes] = []
        self._pending: collections.deque[_Request] = collections.deque()
        self._stream: _Stream | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._reply(400, b'{"error":{"message":"bad request","type":"invalid_request_error"}}')
            self._close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._stream is not None:
            self._stream.cancel()
            self._stream = None
            _Stats.disconnected += 1

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._stream is not None and self._stream.waiting:
            self._stream.step()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._body = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        _Stats.requests += 1
        request = _Request(
            method=self._parser.get_method(),
            path=self._url.split(b"?", 1)[0],
            body=b"".join(self._body),
            keep_alive=self._parser.should_keep_alive(),
        )
        self._pending.append(request)
        if self._stream is None:
            self._next()

    # helpers
    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def stream_done(self, stream: _Stream) -> None:
        self._stream = None
        if not stream.keep_alive:
            self._close()
            return
        self._next()

    def _close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True

    def _reply(self, status: int, body: bytes, keep_alive: bool = False) -> None:
        reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found"}.get(status, b"Error")
        self.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s"
            % (status, reason, len(body), _KEEP if keep_alive else _CLOSE, body)
        )

    def _next(self) -> None:
        while self._pending and self._stream is None and not self.closed:
            request = self._pending.popleft()
            self._handle(request)

    def _handle(self, request: _Request) -> None:
        if request.method == b"GET" and request.path == b"/v1/models":
            body = orjson.dumps(
                {
                    "object": "list",
                    "data": [{"id": "bench", "object": "model", "owned_by": "bench"}],
                }
            )
            self._reply(200, body, request.keep_alive)
        elif request.method == b"POST" and request.path == b"/v1/chat/completions":
            try:
                payload = orjson.loads(request.body)
                if not isinstance(payload, dict):
                    raise ValueError("body is not an object")
                params = _params(payload)
            except (ValueError, TypeError) as exc:
                message = orjson.dumps(str(exc))
                self._reply(
                    400,
                    b'{"error":{"message":%s,"type":"invalid_request_error"}}' % message,
                    request.keep_alive,
                )
            else:
                if params.stream:
                    self._stream = _Stream(self, params, request.keep_alive)
                    self._stream.start()
                    return
                self._reply(200, _completion(params), request.keep_alive)
        else:
            self._reply(
                404,
                b'{"error":{"message":"not found","type":"invalid_request_error"}}',
                request.keep_alive,
            )
        if not request.keep_alive:
            self._close()


def _completion(params: _Params) -> bytes:
    """The non-streamed answer, for completeness (the benchmark only streams)."""
    content = "".join(token(params.seed, i) for i in range(params.tokens))
    return orjson.dumps(
        {
            "id": f"chatcmpl-bench-{params.seed}",
            "object": "chat.completion",
            "created": _CREATED,
            "model": params.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": 8,
                "completion_tokens": params.tokens,
                "total_tokens": params.tokens + 8,
            },
        }
    )


async def serve(host: str, port: int, max_seconds: float, reuse_port: bool) -> None:
    """Serve until SIGTERM/SIGINT or ``max_seconds``, whichever comes first."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await loop.create_server(
        UpstreamProtocol, host, port, backlog=4096, reuse_port=reuse_port
    )
    bound = server.sockets[0].getsockname()[1]
    print(f"READY {bound}", flush=True)
    started = time.monotonic()
    try:
        await asyncio.wait_for(stop.wait(), timeout=max_seconds)
    except TimeoutError:
        print(f"upstream: stopping after {max_seconds:.0f} s", file=sys.stderr)
    server.close()
    print(
        f"upstream pid {os.getpid()}: {_Stats.requests} requests, {_Stats.completed} streams "
        f"completed, {_Stats.disconnected} cut short, {time.monotonic() - started:.0f} s",
        file=sys.stderr,
    )


def _run_workers(args: argparse.Namespace) -> int:
    """Several processes on one port through SO_REUSEPORT; the kernel spreads connections."""
    if args.port == 0:
        raise SystemExit("--workers > 1 needs an explicit --port")
    base = [sys.executable, __file__, "--host", args.host, "--port", str(args.port)]
    base += ["--max-seconds", str(args.max_seconds), "--reuse-port", "--workers", "1"]
    children = [
        subprocess.Popen(base, stdout=subprocess.PIPE, text=True) for _ in range(args.workers)
    ]
    try:
        for child in children:
            assert child.stdout is not None
            child.stdout.readline()  # each prints READY once listening
        print(f"READY {args.port}", flush=True)
        signal.sigwait({signal.SIGTERM, signal.SIGINT})
    finally:
        for child in children:
            child.terminate()
        for child in children:
            try:
                child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                child.kill()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", choices=["127.0.0.1", "localhost"])
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the port")
    parser.add_argument("--reuse-port", action="store_true", help="bind with SO_REUSEPORT")
    parser.add_argument(
        "--max-seconds", type=float, default=3600.0, help="exit by itself after this long"
    )
    args = parser.parse_args(argv)
    if args.workers > 1:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        return _run_workers(args)
    try:
        import uvloop
    except ImportError:  # works without it, only slower
        asyncio.run(serve(args.host, args.port, args.max_seconds, args.reuse_port))
    else:
        uvloop.run(serve(args.host, args.port, args.max_seconds, args.reuse_port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
