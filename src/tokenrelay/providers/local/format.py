"""OpenAI's response bodies and stream chunks for answers the local model writes.

Each streamed text delta is the same JSON with only the text changed, so the bytes around the
text are rendered once per answer (from a dict, so the shape stays readable) and each delta is
``prefix + orjson.dumps(text) + suffix``: no dict and no full serialisation per token.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import orjson

from tokenrelay.sse import DONE, encode_event

__all__ = ["AnswerFormat"]

_MARK = "\x00tokenrelay-text\x00"
_MARK_JSON = orjson.dumps(_MARK)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class AnswerFormat:
    """The bytes of one answer, chat (``chat.completion``) or legacy (``text_completion``)."""

    __slots__ = ("_chat", "_head", "_include_usage", "_prefix", "_suffix")

    def __init__(self, *, chat: bool, model: str, include_usage: bool = False) -> None:
        self._chat = chat
        self._include_usage = include_usage
        prefix = "chatcmpl-" if chat else "cmpl-"
        self._head: dict[str, Any] = {
            "id": prefix + secrets.token_urlsafe(18),
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
        }
        # orjson writes no newline, so the text's JSON always stays inside one `data:` line.
        self._prefix, self._suffix = encode_event(self._chunk(_MARK, None)).split(_MARK_JSON)

    def _chunk(self, text: str | None, finish_reason: str | None) -> dict[str, Any]:
        if self._chat:
            delta = {} if text is None else {"content": text}
            choice: dict[str, Any] = {
                "index": 0,
                "delta": delta,
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        else:
            choice = {
                "text": text or "",
                "index": 0,
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        chunk = {**self._head, "choices": [choice]}
        if self._include_usage:  # as OpenAI does: null on every chunk but the usage one
            chunk["usage"] = None
        return chunk

    # Streamed answers.

    def opening(self) -> bytes:
        """The chunk OpenAI sends before any text: the assistant role (chat only)."""
        if not self._chat:
            return b""
        chunk = self._chunk(None, None)
        chunk["choices"][0]["delta"] = {"role": "assistant", "content": "", "refusal": None}
        return encode_event(chunk)

    def delta(self, text: str) -> bytes:
        return self._prefix + orjson.dumps(text) + self._suffix

    def closing(self, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> bytes:
        """The finish chunk, the usage chunk if asked for, and ``[DONE]``."""
        out = encode_event(self._chunk(None, finish_reason))
        if self._include_usage:
            usage = {**self._head, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)}
            out += encode_event(usage)
        return out + DONE

    # Whole answers.

    def whole(
        self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int
    ) -> bytes:
        head = dict(self._head)
        if self._chat:
            head["object"] = "chat.completion"
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        else:
            choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}
        body = {
            **head,
            "choices": [choice],
            "usage": _usage(prompt_tokens, completion_tokens),
        }
        return orjson.dumps(body)
