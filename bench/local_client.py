"""What ``local_bench.py`` sends and how it times what comes back.

One request shape (temperature 0, so every path decodes the same tokens), one clock (request sent,
first text, last text) and the SSE reading shared by the provider and the server paths.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

__all__ = [
    "CHAT_MESSAGES",
    "COMPLETION_PROMPT",
    "MODEL",
    "SAMPLING",
    "Arrivals",
    "Clock",
    "Run",
    "request_body",
    "through_server",
]

MODEL = "smollm2-135m-instruct"
# The model counts on without ending its answer, so every run decodes exactly max_tokens.
COMPLETION_PROMPT = "1, 2, 3, 4, 5,"
CHAT_MESSAGES: list[Any] = [
    {"role": "user", "content": "Tell me a long story about a lighthouse keeper."}
]
SAMPLING = {"temperature": 0.0, "top_p": 1.0, "top_k": 40, "min_p": 0.05, "repeat_penalty": 1.0}


@dataclass
class Run:
    """One answer: time to first token, decode speed, and what it cost."""

    ttft: float
    rate: float  # (tokens - 1) / (last text - first text): decoding only, no prompt
    tokens: int
    text: str
    end: float = 0.0  # perf_counter when the last text arrived
    gateway_cpu: float = float("nan")  # CPU s per token: the process serving HTTP / the provider
    model_cpu: float = float("nan")  # CPU s per token: the process running llama.cpp
    others: float = 0.0  # cores' worth of CPU other people's processes took meanwhile


class Clock:
    """First and last moment text arrived, and the text itself."""

    __slots__ = ("first", "last", "parts", "start")

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
        return Run(self.first - self.start, rate, tokens, "".join(self.parts), end=self.last)


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


class Arrivals:
    """The bytes of an SSE stream as they arrived, each piece with its time; read afterwards.

    Nothing is parsed while the answer streams: the client shares the CPUs with the gateway and
    the model, so it does as little as it can per token (parsing each event on arrival cost
    about 0.04 ms of CPU per token more, on top of the 0.2 ms that receiving it costs).
    """

    __slots__ = ("pieces", "start")

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.pieces: list[tuple[float, bytes]] = []

    def run(self) -> Run:
        """Time the text: an event counts from the arrival of the piece that completed it."""
        clock = Clock()
        clock.start = self.start
        tokens = None
        buffer = b""
        for at, piece in self.pieces:
            buffer += piece
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                text, usage = _read_event(event)
                if text:
                    clock.first = at if clock.first is None else clock.first
                    clock.last = at
                    clock.parts.append(text)
                tokens = usage or tokens
        if tokens is None:
            raise RuntimeError("the stream reported no usage")
        return clock.run(tokens)


def _read_event(event: bytes) -> tuple[str, int | None]:
    """The text of one SSE event, and its completion tokens if it reports usage."""
    text, tokens = "", None
    for line in event.split(b"\n"):
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        data = orjson.loads(line[6:])
        if "error" in data:
            raise RuntimeError(f"the stream failed: {data['error']}")
        for choice in data.get("choices") or ():
            delta = choice.get("delta")
            text += (delta.get("content") if delta is not None else choice.get("text")) or ""
        if data.get("usage"):
            tokens = int(data["usage"]["completion_tokens"])
    return text, tokens


async def through_server(
    session: aiohttp.ClientSession, url: str, chat: bool, max_tokens: int
) -> Run:
    """One streamed answer over HTTP, timed from just before the request is sent."""
    endpoint = "chat/completions" if chat else "completions"
    arrivals = Arrivals()
    async with session.post(f"{url}/v1/{endpoint}", json=request_body(chat, max_tokens)) as resp:
        if resp.status != 200:
            raise RuntimeError(f"the server answered {resp.status}: {await resp.text()}")
        pieces, now = arrivals.pieces, time.perf_counter
        async for piece in resp.content.iter_any():
            pieces.append((now(), piece))
    return arrivals.run()
