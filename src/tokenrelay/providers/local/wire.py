"""What the gateway and a model worker process say to each other, one JSON object per line.

The two ends share a Unix socket pair (stdout and stderr stay free for llama.cpp's own output and
for crash messages). The gateway sends ``run`` and ``cancel``; the worker answers each job with
``started``, any number of ``text`` pieces, then exactly one terminal message (``done``, ``error``
or ``cancelled``), after which it is idle again. Before any job it sends one ``ready`` (or
``fatal`` when the model cannot be loaded, then exits).

This module is imported by both ends and imports nothing of llama.cpp.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import orjson

__all__ = [
    "MAX_LINE_BYTES",
    "Sampling",
    "decode",
    "encode",
    "run_message",
    "sampling_from",
]

MAX_LINE_BYTES = 64 * 1024 * 1024
"""The longest line either end accepts: a whole prompt (a long chat) fits with room to spare."""


@dataclass(frozen=True, slots=True)
class Sampling:
    """How to pick tokens; field names follow OpenAI where OpenAI has the knob."""

    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repeat_penalty: float
    frequency_penalty: float
    presence_penalty: float
    seed: int | None
    stop: tuple[str, ...]


def encode(message: dict[str, Any]) -> bytes:
    """One message as a line; orjson escapes newlines inside strings, so one line it stays."""
    return orjson.dumps(message) + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    message = orjson.loads(line)
    if not isinstance(message, dict):
        raise ValueError("a wire message must be a JSON object")
    return message


def run_message(
    job_id: int,
    sampling: Sampling,
    messages: list[dict[str, Any]] | None,
    prompt: str | list[int] | None,
) -> bytes:
    return encode(
        {
            "op": "run",
            "id": job_id,
            "sampling": asdict(sampling),
            "messages": messages,
            "prompt": prompt,
        }
    )


def sampling_from(data: dict[str, Any]) -> Sampling:
    return Sampling(**{**data, "stop": tuple(data.get("stop") or ())})
