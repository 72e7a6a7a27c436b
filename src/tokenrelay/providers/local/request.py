"""Reading an OpenAI request body into what the local model needs, with OpenAI's limits.

Fields the local model cannot honour (several choices, logprobs, tools, JSON mode) are refused
with a 400 naming the field, rather than silently ignored. Besides OpenAI's knobs, llama.cpp
server's ``top_k``, ``min_p`` and ``repeat_penalty`` are accepted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenrelay.errors import InvalidRequest
from tokenrelay.providers.base import ProviderRequest
from tokenrelay.providers.local.wire import Sampling

__all__ = ["LocalRequest", "parse_request"]

# The legacy completions endpoint stops after 16 tokens unless told otherwise, like OpenAI's.
_COMPLETIONS_DEFAULT_MAX_TOKENS = 16
_MAX_STOP_SEQUENCES = 4
# llama.cpp's defaults; they keep a small model coherent at OpenAI's default temperature of 1.
_DEFAULT_TOP_K = 40
_DEFAULT_MIN_P = 0.05


@dataclass(frozen=True, slots=True)
class LocalRequest:
    """A validated request: chat ``messages`` or a completion ``prompt``, and how to sample."""

    chat: bool
    messages: list[dict[str, Any]] | None
    prompt: str | list[int] | None
    sampling: Sampling
    stream: bool
    include_usage: bool


def parse_request(request: ProviderRequest) -> LocalRequest:
    body = request.body
    chat = request.endpoint == "chat/completions"
    _refuse_unsupported(body, chat)
    messages = _messages(body.get("messages")) if chat else None
    prompt = None if chat else _prompt(body.get("prompt"))
    if chat:
        max_tokens = _int(body, "max_completion_tokens", minimum=1)
        if max_tokens is None:
            max_tokens = _int(body, "max_tokens", minimum=1)
    else:
        max_tokens = _int(body, "max_tokens", minimum=1)
        if "max_tokens" not in body:
            max_tokens = _COMPLETIONS_DEFAULT_MAX_TOKENS
    top_k = _int(body, "top_k", minimum=0)
    sampling = Sampling(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        top_k=_DEFAULT_TOP_K if top_k is None else top_k,
        min_p=_number(body, "min_p", _DEFAULT_MIN_P, 0.0, 1.0),
        repeat_penalty=_number(body, "repeat_penalty", 1.0, 0.0, 10.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        seed=_seed(body.get("seed")),
        stop=_stop(body.get("stop")),
    )
    stream = bool(body.get("stream"))
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequest("`stream_options` must be an object.", param="stream_options")
    include_usage = bool(options and options.get("include_usage"))
    return LocalRequest(chat, messages, prompt, sampling, stream, include_usage)


def _refuse_unsupported(body: dict[str, Any], chat: bool) -> None:
    def refuse(field: str, what: str) -> None:
        raise InvalidRequest(f"The local model does not support {what}.", param=field)

    if body.get("n") not in (None, 1):
        refuse("n", "more than one choice (`n` must be 1)")
    if body.get("best_of") not in (None, 1):
        refuse("best_of", "`best_of`")
    if body.get("logprobs") or body.get("top_logprobs"):
        refuse("logprobs", "logprobs")
    if body.get("logit_bias"):
        refuse("logit_bias", "`logit_bias`")
    if body.get("tools") or body.get("functions"):
        refuse("tools", "tools or function calling")
    response_format = body.get("response_format")
    if response_format is not None and (
        not isinstance(response_format, dict) or response_format.get("type") != "text"
    ):
        refuse("response_format", "`response_format` other than text")
    if not chat and body.get("echo"):
        refuse("echo", "`echo`")
    if not chat and body.get("suffix") is not None:
        refuse("suffix", "`suffix` (insertion)")


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise InvalidRequest("`messages` must be a non-empty array.", param="messages")
    messages: list[dict[str, Any]] = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest(
                f"`messages[{i}]` must be an object with a `role`.", param=f"messages[{i}]"
            )
        role = message["role"]
        # Chat templates predate OpenAI's `developer` role; it means what `system` meant.
        out: dict[str, Any] = {
            "role": "system" if role == "developer" else role,
            "content": _content(message.get("content"), i),
        }
        if isinstance(message.get("name"), str):
            out["name"] = message["name"]
        messages.append(out)
    return messages


def _content(value: Any, i: int) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts: list[str] = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise InvalidRequest(
                    "The local model reads text only; "
                    f"`messages[{i}].content` has a part that is not text.",
                    param=f"messages[{i}].content",
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise InvalidRequest(
                    "A text part needs a string `text`.", param=f"messages[{i}].content"
                )
            texts.append(text)
        return "".join(texts)
    raise InvalidRequest(
        f"`messages[{i}].content` must be a string or an array of parts.",
        param=f"messages[{i}].content",
    )


def _prompt(value: Any) -> str | list[int]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str | list):
        value = value[0]  # one prompt in a batch of one
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    ):
        return list(value)
    if isinstance(value, list):
        raise InvalidRequest("The local model answers one prompt per request.", param="prompt")
    raise InvalidRequest("`prompt` must be a string or an array of token ids.", param="prompt")


def _int(body: dict[str, Any], field: str, *, minimum: int) -> int | None:
    value = body.get(field)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InvalidRequest(f"`{field}` must be an integer >= {minimum}.", param=field)
    return value


def _number(body: dict[str, Any], field: str, default: float, low: float, high: float) -> float:
    value = body.get(field)
    if value is None:
        return default
    if not isinstance(value, int | float) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidRequest(f"`{field}` must be a number from {low:g} to {high:g}.", param=field)
    return float(value)


def _seed(value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequest("`seed` must be an integer.", param="seed")
    # llama.cpp seeds are 32-bit, and 0xFFFFFFFF there means "pick a random seed".
    return value % 0xFFFFFFFF


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if (
        not isinstance(value, list)
        or len(value) > _MAX_STOP_SEQUENCES
        or not all(isinstance(s, str) for s in value)
    ):
        raise InvalidRequest(
            f"`stop` must be a string or an array of at most {_MAX_STOP_SEQUENCES} strings.",
            param="stop",
        )
    return tuple(s for s in value if s)
