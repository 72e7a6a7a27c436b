"""What an upstream says, made fit to relay, store and log: keys scrubbed, error shapes read.

An upstream is not trusted. Its errors may quote the key tokenrelay sent it (OpenAI quotes a
rejected key in the message; others put it anywhere), in an error answer or in an error event
in the middle of a stream. Every string tokenrelay passes on from an upstream's error, whichever
field it came in, goes through a ``Scrubber`` first. Model output is relayed as it came.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

__all__ = ["ERROR_MARKER", "Scrubber", "parse_error"]

ERROR_MARKER = b'"error"'
"""Bytes every JSON error event contains. In model text a quote is escaped (``\\"error\\"``), so
content never matches: a stream's chunks are parsed only when this test says they might hold an
error."""

_KEY_LIKE = re.compile(
    r"\b(?:sk|rk|pk)[-_][A-Za-z0-9_\-*.]{6,}"  # OpenAI (also masked: sk-proj-***abcd), Anthropic
    r"|\b(?:gsk|xai)[-_][A-Za-z0-9]{20,}"  # Groq, xAI
    r"|\bhf_[A-Za-z0-9]{16,}"  # Hugging Face
    r"|\bAIza[A-Za-z0-9_\-]{20,}"  # Google
    r"|\bBearer\s+[A-Za-z0-9_\-.~+/*]{8,}=*",
    re.IGNORECASE,
)
"""Strings shaped like an API key, scrubbed even when they are not the configured one (an
upstream that proxies to another may quote that one's key)."""

_MAX_MESSAGE = 2000
"""Characters of an upstream's error message kept: enough for any real one."""
_MAX_FIELD = 200
"""Characters kept of an error's ``type``, ``param`` and ``code``."""
_MAX_DEPTH = 32
"""Nesting scrubbed in an error event; deeper values are dropped (no real error nests so)."""


class Scrubber:
    """Replaces the configured secrets, and anything shaped like a key, with ``***``."""

    __slots__ = ("_secrets",)

    def __init__(self, *secrets: str | None) -> None:
        # Longest first, so that a key containing another is replaced whole.
        self._secrets = tuple(sorted({s for s in secrets if s}, key=len, reverse=True))

    def text(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return _KEY_LIKE.sub("***", text)

    def field(self, value: object, limit: int = _MAX_FIELD) -> str | None:
        """One error field as a scrubbed string of at most ``limit`` characters, or ``None``."""
        if value is None:
            return None
        text = value if isinstance(value, str) else orjson.dumps(value).decode()
        return self.text(text)[:limit]

    def json(self, value: Any, depth: int = 0) -> Any:
        """``value`` with every string in it, keys included, scrubbed."""
        if isinstance(value, str):
            return self.text(value)
        if depth >= _MAX_DEPTH:
            return None
        if isinstance(value, dict):
            return {self.text(str(k)): self.json(v, depth + 1) for k, v in value.items()}
        if isinstance(value, list):
            return [self.json(v, depth + 1) for v in value]
        return value

    def error_events(self, events: bytes) -> bytes:
        """``events`` with the ``data:`` lines of any error event scrubbed; the rest unchanged.

        Called only for chunks that contain ``ERROR_MARKER``. A data line that is not JSON (a
        piece of a multi-line event, or garbage) is scrubbed as text.
        """
        lines = events.splitlines(keepends=True)
        changed = False
        for i, line in enumerate(lines):
            if not line.startswith(b"data:"):
                continue
            body = line.rstrip(b"\r\n")
            try:
                data = orjson.loads(body[5:])
            except orjson.JSONDecodeError:
                scrubbed = self.text(line.decode("utf-8", "replace")).encode()
            else:
                if not (isinstance(data, dict) and "error" in data):
                    continue
                scrubbed = b"data: " + orjson.dumps(self.json(data)) + line[len(body) :]
            if scrubbed != line:
                lines[i] = scrubbed
                changed = True
        return b"".join(lines) if changed else events

    def error_fields(self, body: bytes) -> tuple[str, str | None, str | None, str | None]:
        """An error body's message, type, param and code, each scrubbed (see ``parse_error``)."""
        message, type_, param, code = parse_error(body)
        return (
            self.field(message, _MAX_MESSAGE) or "",
            self.field(type_),
            self.field(param),
            self.field(code),
        )


def parse_error(body: bytes) -> tuple[object, object, object, object]:
    """Read OpenAI's error shape (or a plain ``{"error": "text"}``, as some servers send).

    The values are whatever the upstream sent: scrub them (``Scrubber.error_fields``).
    """
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:500].decode("utf-8", "replace").strip(), None, None, None
    error = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(error, str):
        return error, None, None, None
    if not isinstance(error, dict):
        return "", None, None, None
    message = error.get("message") or error.get("detail") or ""
    return message, error.get("type"), error.get("param"), error.get("code")
