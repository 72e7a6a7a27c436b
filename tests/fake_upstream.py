"""A fake OpenAI-compatible upstream: a real aiohttp server on a real socket, in its own thread.

tokenrelay is tested against this instead of a mock so that pooling, timeouts, aborted connections
and client disconnects all happen over TCP exactly as they would against api.openai.com. Each
request chooses the fake's behaviour with an extra body field, ``"fake": {...}``, which the tests
send through the openai SDK's ``extra_body`` and which tokenrelay forwards like any other field:

``tokens``       content chunks to stream (default 5); token ``i`` is ``"word{i} "``
``text``         stream this text instead, a word with its trailing whitespace per content chunk,
                 so the chunks join back into ``text``; the number of words replaces ``tokens``
``delay``        seconds between chunks (default 0)
``first_delay``  seconds between the response headers and the first chunk (or, unstreamed, the body)
``headers_delay`` seconds before the response headers are sent at all
``fail_after``   abort the TCP connection after that many content chunks (no last chunk, no [DONE])
``gate``         a name: after ``gate_after`` content chunks (default 0), hold the stream until the
                 test calls ``FakeUpstream.open_gate(name)`` (a gate opened earlier stays open), so
                 a test can act while an answer is known to be mid-stream, with no sleeps
``status``       answer this HTTP status in OpenAI's error shape; the message quotes ``LEAKED_KEY``
``retry_after``  sent as ``Retry-After`` with ``status``
``message``      replaces the error message of ``status``
``tool_calls``   answer with a function tool call instead of text
``tool_call_then_text`` answer with a function tool call while the request holds no tool
                 result yet (no ``role: "tool"`` message), then with text: one round of an
                 agent's loop (call the tool, read its result, answer)
``tool_arguments`` the arguments (a JSON text) of those tool calls instead of ``TOOL_ARGUMENTS``
``finish_reason`` replaces the natural finish reason

Misbehaviours, for testing that tokenrelay trusts nothing an upstream sends:

``leak_everywhere`` with ``status`` or ``error_after``: the error quotes ``LEAKED_KEY`` in every
                 field (message, type, param, code), not only in its message
``error_after``  after that many content chunks, an in-band ``data: {"error": ...}`` event, then
                 the body ends (no [DONE])
``end_after``    end the body cleanly after that many content chunks: no last chunk, no [DONE]
``no_done``      end the body after the last chunk (and usage) without ``data: [DONE]``, as some
                 OpenAI-compatible servers do: a finished answer all the same
``pings``        send that many ``: ping`` comments, ``delay`` apart, before the first chunk
``event_bytes``  the first content chunk carries that many bytes of text, written in pieces of
                 ``write_size`` bytes (default 16 KiB)
``no_newline``   instead of an answer, that many bytes of one ``data:`` line that never ends,
                 written ``write_size`` bytes at a time, ``delay`` apart, then the end of the body
``gzip_bomb``    the 2xx answer is ~50 KB of gzip (``Content-Encoding: gzip``) inflating to 50 MB
``redirect``     answer ``redirect_status`` (default 307) with this ``Location``
``body``         answer 2xx with exactly this body (may be empty) and ``content_type``
``raw``          write these exact bytes as the whole HTTP response, then hold the connection
                 open until the client leaves (e.g. a ``101 Switching Protocols``)

``GET .../models`` answers ``defaults["models_answer"]`` when set: ``"html"`` (a web page),
``"garbage"`` (not JSON), ``"not_a_list"`` (``data`` is an object), ``"error"`` (a 500 quoting
``LEAKED_KEY``) or ``"silent"`` (no answer for a minute); ``defaults["models_redirect"]`` makes
it a 302 to that URL. ``GET .../secret`` answers
``INTERNAL_SECRET``: a stand-in for an internal URL that a redirect may point at.

A test that cannot put ``fake`` into the body, because tokenrelay builds the upstream request itself
(the conversation API, the chat page, ``tokenrelay chat``), sets ``FakeUpstream.defaults`` instead:
those options apply to every request, under whatever the request's own ``fake`` object says.
``reset()`` empties them, so they never outlive the test that set them.

Every request is recorded (``FakeUpstream.requests``) with what the fake saw and, once the fake is
done with it, its outcome: ``"completed"``, ``"abandoned"`` (the client went away first, with the
``time.monotonic()`` at which the fake noticed) or ``"failed"`` (``fail_after`` cut it on purpose).
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import itertools
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Self

from aiohttp import web

__all__ = [
    "DEFAULT_MODELS",
    "INTERNAL_SECRET",
    "LEAKED_KEY",
    "TOOL_ARGUMENTS",
    "TOOL_NAME",
    "FakeUpstream",
    "Outcome",
    "RecordedRequest",
    "expected_text",
]

LEAKED_KEY = "sk-fake-upstream-secret-1234"
"""Quoted in every error message, the way OpenAI quotes a rejected key, to test scrubbing."""

INTERNAL_SECRET = "internal-only-3f9a"
"""What ``GET .../secret`` answers: text that must never reach a client through a redirect."""

DEFAULT_MODELS = ("fake-model", "fake-other")
TOOL_NAME = "get_weather"
"""The function called when the request names no tool."""
TOOL_ARGUMENTS = '{"location": "Paris, France", "unit": "celsius"}'
_TOOL_ARGUMENT_PIECE = 8
"""Characters of arguments per chunk; small, so a tool call takes several chunks as OpenAI's do."""
_WORDS = re.compile(r"\S+\s*|\s+")
"""The pieces ``text`` is streamed in: each word with the whitespace after it (and any leading
whitespace on its own), so that they join back into the text exactly."""

Outcome = Literal["completed", "abandoned", "failed"]

_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request (key {key})."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided: {key}."),
    403: ("permission_error", "unsupported_country_region_territory", "Forbidden (key {key})."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist (key {key})."),
    429: (
        "rate_limit_error",
        "rate_limit_exceeded",
        "Rate limit reached for requests made with key {key}. Please try again in 1s.",
    ),
    500: ("server_error", None, "The server had an error processing your request (key {key})."),
    503: ("server_error", None, "The engine is currently overloaded (key {key})."),
}


def expected_text(tokens: int) -> str:
    """The whole text the fake streams for ``tokens`` tokens: ``"word0 word1 ... "``."""
    return "".join(f"word{i} " for i in range(tokens))


@dataclass
class RecordedRequest:
    """What the fake received, and how the exchange ended.

    ``headers`` has lower-cased names (HTTP header names are case-insensitive). ``json`` is ``None``
    when the body was not valid JSON. ``sent`` is the response body the fake wrote, so a test can
    check that tokenrelay passed it on byte for byte.
    """

    method: str
    path: str
    query_string: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    json: Any
    received_at: float
    sent: bytearray = field(default_factory=bytearray)
    outcome: Outcome | None = None
    outcome_at: float | None = None
    _finished: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def stream(self) -> bool:
        return isinstance(self.json, dict) and self.json.get("stream") is True

    def wait_for_outcome(self, timeout: float) -> Outcome:
        """Block until the fake is done with this request; ``TimeoutError`` if it takes longer."""
        if not self._finished.wait(timeout):
            raise TimeoutError(f"{self.method} {self.path}: no outcome within {timeout} s")
        assert self.outcome is not None
        return self.outcome

    def _finish(self, outcome: Outcome) -> None:
        # The first outcome wins: a cancelled handler may also see its write fail afterwards.
        if self._finished.is_set():
            return
        self.outcome = outcome
        self.outcome_at = time.monotonic()
        self._finished.set()


class _BadRequest(Exception):
    """The request cannot be answered; becomes a 400 in OpenAI's error shape."""


@dataclass(frozen=True)
class _Behaviour:
    tokens: int = 5
    text: str | None = None
    delay: float = 0.0
    first_delay: float = 0.0
    headers_delay: float = 0.0
    fail_after: int | None = None
    gate: str | None = None
    gate_after: int = 0
    status: int | None = None
    retry_after: str | None = None
    message: str | None = None
    tool_calls: bool = False
    tool_arguments: str = TOOL_ARGUMENTS
    finish_reason: str | None = None
    leak_everywhere: bool = False
    error_after: int | None = None
    end_after: int | None = None
    no_done: bool = False
    pings: int = 0
    event_bytes: int | None = None
    no_newline: int | None = None
    write_size: int = 16 * 1024
    gzip_bomb: bool = False
    redirect: str | None = None
    redirect_status: int = 307
    body: str | None = None
    content_type: str = "application/json"
    raw: str | None = None

    @classmethod
    def from_body(cls, body: dict[str, Any], defaults: dict[str, Any] | None = None) -> _Behaviour:
        # tokenrelay forwards whatever clients send, fuzz included, so the fake validates
        # its own field rather than crash into a 500 that would look like tokenrelay's fault.
        options = body.get("fake", {})
        if options is None:
            options = {}
        if not isinstance(options, dict):
            raise _BadRequest("`fake` must be an object")
        options = {**(defaults or {}), **options}
        tokens = _number(options, "tokens", int, 5, minimum=0)
        text = _optional_str(options, "text")
        return cls(
            tokens=tokens if text is None else len(_WORDS.findall(text)),
            text=text,
            delay=_number(options, "delay", float, 0.0, minimum=0),
            first_delay=_number(options, "first_delay", float, 0.0, minimum=0),
            headers_delay=_number(options, "headers_delay", float, 0.0, minimum=0),
            fail_after=_number(options, "fail_after", int, None, minimum=0),
            gate=_optional_str(options, "gate"),
            gate_after=_number(options, "gate_after", int, 0, minimum=0),
            status=_number(options, "status", int, None, minimum=100),
            retry_after=_optional_str(options, "retry_after"),
            message=_optional_str(options, "message"),
            tool_calls=_flag(options, "tool_calls")
            or (_flag(options, "tool_call_then_text") and not _has_tool_result(body)),
            tool_arguments=_optional_str(options, "tool_arguments") or TOOL_ARGUMENTS,
            finish_reason=_optional_str(options, "finish_reason"),
            leak_everywhere=_flag(options, "leak_everywhere"),
            error_after=_number(options, "error_after", int, None, minimum=0),
            end_after=_number(options, "end_after", int, None, minimum=0),
            no_done=_flag(options, "no_done"),
            pings=_number(options, "pings", int, 0, minimum=0),
            event_bytes=_number(options, "event_bytes", int, None, minimum=0, maximum=_MANY),
            no_newline=_number(options, "no_newline", int, None, minimum=0, maximum=_MANY),
            write_size=_number(options, "write_size", int, 16 * 1024, minimum=1, maximum=_MANY),
            gzip_bomb=_flag(options, "gzip_bomb"),
            redirect=_optional_str(options, "redirect"),
            redirect_status=_number(options, "redirect_status", int, 307, minimum=300),
            body=_optional_str(options, "body"),
            content_type=_optional_str(options, "content_type") or "application/json",
            raw=_optional_str(options, "raw"),
        )

    @property
    def pieces(self) -> list[str]:
        """What the content chunks carry: ``text`` a word at a time, else ``"word{i} "``."""
        if self.text is not None:
            return _WORDS.findall(self.text)
        return [f"word{i} " for i in range(self.tokens)]


def _number(
    options: dict[str, Any],
    name: str,
    kind: type[int] | type[float],
    default: float | None,
    *,
    minimum: float,
    maximum: float = 10_000,
) -> Any:
    value = options.get(name, default)
    if value is None:
        return default
    # bool is an int in Python but never a sensible count.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _BadRequest(f"`fake.{name}` must be a number")
    if kind is int and not isinstance(value, int):
        raise _BadRequest(f"`fake.{name}` must be an integer")
    if not minimum <= value <= maximum:
        raise _BadRequest(f"`fake.{name}` is out of range")
    return kind(value)


def _optional_str(options: dict[str, Any], name: str) -> str | None:
    value = options.get(name)
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise _BadRequest(f"`fake.{name}` must be a string")
    return value


def _flag(options: dict[str, Any], name: str) -> bool:
    value = options.get(name, False)
    if not isinstance(value, bool):
        raise _BadRequest(f"`fake.{name}` must be a boolean")
    return value


_MANY = 256 * 1024 * 1024
"""The largest byte count a misbehaviour option accepts."""


@functools.cache
def _gzip_bomb() -> bytes:
    """~50 KB of gzip that inflates to 50 MB of zeros."""
    return gzip.compress(bytes(50 * 1024 * 1024), compresslevel=9)


def _has_tool_result(body: dict[str, Any]) -> bool:
    """Whether a chat request's messages hold a tool's result (``role: "tool"``)."""
    messages = body.get("messages")
    return isinstance(messages, list) and any(
        isinstance(message, dict) and message.get("role") == "tool" for message in messages
    )


def _words(value: Any) -> int:
    """Whitespace-separated words in any text found in a prompt or a message list."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(_words(item) for item in value)
    if isinstance(value, dict):
        # Message objects carry text in `content`; content parts carry it in `text`.
        return _words(value.get("content")) + _words(value.get("text"))
    return 0


def _dumps(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def _event(payload: Any) -> bytes:
    return b"data: " + _dumps(payload) + b"\n\n"


def _padded(payload: dict[str, Any], size: int) -> dict[str, Any]:
    """``payload`` (a content chunk) with its text padded to about ``size`` bytes."""
    choice = payload["choices"][0]
    if "delta" in choice:
        choice["delta"] = {**choice["delta"], "content": "x" * size}
    else:
        choice["text"] = "x" * size
    return payload


def _leaky_error(message: str) -> dict[str, Any]:
    """An error whose every field quotes ``LEAKED_KEY``."""
    return {
        "message": message if LEAKED_KEY in message else f"{message} ({LEAKED_KEY})",
        "type": f"invalid_key_{LEAKED_KEY}",
        "param": f"key={LEAKED_KEY}",
        "code": f"bad_{LEAKED_KEY}",
    }


def _error_response(
    status: int,
    message: str,
    *,
    type: str = "invalid_request_error",
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = {"error": {"message": message, "type": type, "param": None, "code": code}}
    return web.json_response(body, status=status, headers=headers, dumps=json.dumps)


class FakeUpstream:
    """The fake server. Use as a context manager, or call ``start()`` and ``stop()``."""

    def __init__(self, models: list[str] | None = None) -> None:
        self.models: list[str] = list(models or DEFAULT_MODELS)
        self.defaults: dict[str, Any] = {}
        """``fake`` options for requests that do not set them; see the module's docstring."""
        self.requests: list[RecordedRequest] = []
        self._seen = 0
        self._ids = itertools.count(1)
        self._changed = threading.Condition()
        self._gates: dict[str, asyncio.Event] = {}  # used on the server's loop only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def root_url(self) -> str:
        if self._port is None:
            raise RuntimeError("FakeUpstream is not started")
        return f"http://127.0.0.1:{self._port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    def start(self, timeout: float = 10.0) -> None:
        """Start serving in a background thread; return once the socket accepts connections."""
        # Binding here, before the thread starts, means the port is known and listening by the
        # time anyone reads base_url: no startup race.
        sock = socket.create_server(("127.0.0.1", 0))
        self._port = sock.getsockname()[1]
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._serve(sock))
            except BaseException as exc:  # reported to start()'s caller, not swallowed
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._shutdown())
            loop.close()

        self._thread = threading.Thread(target=run, name="fake-upstream", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError("FakeUpstream did not start")
        if failure:
            raise RuntimeError("FakeUpstream failed to start") from failure[0]

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is None or self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        self._loop = None
        self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def _serve(self, sock: socket.socket) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        # handler_cancellation makes aiohttp cancel a handler the moment its client disconnects,
        # so an abandoned stream is noticed even while the fake is waiting between chunks.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()

    async def _shutdown(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # -- what tests read ---------------------------------------------------------------------

    def reset(self) -> None:
        """Forget recorded requests and ``defaults``; tests sharing one fake call this between."""
        with self._changed:
            self.requests.clear()
            self._seen = 0
        # A new dict rather than clear(): the server thread may be reading the old one right now.
        self.defaults = {}
        if self._loop is not None:
            # Streams held at a gate are released, so no handler outlives the test that set it.
            self._loop.call_soon_threadsafe(self._reset_gates)

    def open_gate(self, name: str) -> None:
        """Let every stream held at gate ``name`` go on, and any that reaches it later."""
        if self._loop is None:
            raise RuntimeError("FakeUpstream is not started")
        self._loop.call_soon_threadsafe(lambda: self._gate(name).set())

    def _gate(self, name: str) -> asyncio.Event:
        gate = self._gates.get(name)
        if gate is None:
            gate = self._gates[name] = asyncio.Event()
        return gate

    def _reset_gates(self) -> None:
        for gate in self._gates.values():
            gate.set()
        self._gates = {}

    def last_request(self, timeout: float = 5.0) -> RecordedRequest:
        """Wait until a request arrives that no earlier call returned, and return the newest.

        A request that tokenrelay already forwarded before the call counts, so the usual
        ``client.create(...)`` then ``fake.last_request()`` never races.
        """
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.requests) > self._seen, timeout):
                raise TimeoutError(f"no new request reached the fake upstream within {timeout} s")
            self._seen = len(self.requests)
            return self.requests[-1]

    def wait_for_outcome(self, record: RecordedRequest, timeout: float = 5.0) -> Outcome:
        """Block until the fake has finished with ``record``; see ``RecordedRequest``."""
        return record.wait_for_outcome(timeout)

    def chat_requests(self) -> list[RecordedRequest]:
        """The chat completions received since the last ``reset()`` (model lists aside)."""
        return [r for r in list(self.requests) if r.path.endswith("/chat/completions")]

    def _record(self, record: RecordedRequest) -> None:
        with self._changed:
            self.requests.append(record)
            self._changed.notify_all()

    # -- serving -----------------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        try:
            parsed: Any = json.loads(body) if body else None
        except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
            parsed = None
        record = RecordedRequest(
            method=request.method,
            path=request.path,
            query_string=request.query_string,
            query=dict(request.query),
            headers={name.lower(): value for name, value in request.headers.items()},
            body=body,
            json=parsed,
            received_at=time.monotonic(),
        )
        self._record(record)
        try:
            response = await self._answer(request, record)
        except (asyncio.CancelledError, ConnectionError):
            record._finish("abandoned")
            raise
        if isinstance(response, web.Response) and isinstance(response.body, bytes):
            record.sent += response.body
        record._finish("completed")
        return response

    async def _answer(self, request: web.Request, record: RecordedRequest) -> web.StreamResponse:
        path = request.path.rstrip("/")
        if request.method == "GET" and path.endswith("/models"):
            return await self._models()
        if request.method == "GET" and path.endswith("/secret"):
            return web.Response(text=INTERNAL_SECRET)
        if request.method != "POST" or not path.endswith("/completions"):
            return _error_response(
                404, f"Unknown request URL: {request.method} {request.path}.", code="unknown_url"
            )
        if not isinstance(record.json, dict):
            return _error_response(
                400,
                "We could not parse the JSON body of your request. (HINT: This likely means you "
                "aren't using your HTTP library correctly.)",
            )
        try:
            behaviour = _Behaviour.from_body(record.json, self.defaults)
        except _BadRequest as exc:
            return _error_response(400, str(exc))
        if behaviour.headers_delay:
            await asyncio.sleep(behaviour.headers_delay)
        if behaviour.raw is not None:
            return await self._raw(request, record, behaviour.raw.encode())
        if behaviour.redirect is not None:
            return web.Response(
                status=behaviour.redirect_status,
                headers={"Location": behaviour.redirect},
                text=f"Redirecting to {behaviour.redirect}",
            )
        if behaviour.status is not None:
            return self._failure(behaviour)
        if behaviour.body is not None:
            return web.Response(
                body=behaviour.body.encode(), headers={"Content-Type": behaviour.content_type}
            )
        if behaviour.gzip_bomb:
            content_type = "text/event-stream" if record.stream else "application/json"
            return web.Response(
                body=_gzip_bomb(),
                headers={"Content-Type": content_type, "Content-Encoding": "gzip"},
            )
        chat = path.endswith("/chat/completions")
        if record.stream:
            return await self._stream(request, record, behaviour, chat=chat)
        if behaviour.first_delay:
            await asyncio.sleep(behaviour.first_delay)
        return web.Response(
            body=_dumps(self._whole(record.json, behaviour, chat=chat)),
            content_type="application/json",
        )

    async def _models(self) -> web.Response:
        broken = self.defaults.get("models_answer")
        if redirect := self.defaults.get("models_redirect"):
            return web.Response(status=302, headers={"Location": redirect})
        if broken == "html":
            return web.Response(text="<html><body>Sign in</body></html>", content_type="text/html")
        if broken == "garbage":
            return web.Response(text='{"data": [{"id": ', content_type="application/json")
        if broken == "not_a_list":
            return web.json_response({"object": "list", "data": {"id": "fake-model"}})
        if broken == "error":
            return _error_response(500, f"Models unavailable for key {LEAKED_KEY}.")
        if broken == "silent":
            await asyncio.sleep(60)
        created = int(time.time())
        data = [
            {"id": model, "object": "model", "created": created, "owned_by": "fake"}
            for model in self.models
        ]
        return web.json_response({"object": "list", "data": data})

    def _failure(self, behaviour: _Behaviour) -> web.Response:
        assert behaviour.status is not None
        type, code, template = _ERRORS.get(behaviour.status, _ERRORS[500])
        message = behaviour.message or template.format(key=LEAKED_KEY)
        headers = {"Retry-After": behaviour.retry_after} if behaviour.retry_after else None
        if behaviour.leak_everywhere:
            return web.json_response(
                {"error": _leaky_error(message)}, status=behaviour.status, headers=headers
            )
        return _error_response(behaviour.status, message, type=type, code=code, headers=headers)

    async def _raw(self, request: web.Request, record: RecordedRequest, raw: bytes) -> web.Response:
        """Write ``raw`` as the whole response, then hold the connection until the client leaves."""
        transport = request.transport
        assert transport is not None
        transport.write(raw)
        record.sent += raw
        await asyncio.sleep(60)  # cancelled (recorded "abandoned") when the client closes
        transport.abort()
        raise asyncio.CancelledError

    # -- answer shapes -----------------------------------------------------------------------

    def _usage(self, body: dict[str, Any], behaviour: _Behaviour, *, chat: bool) -> dict[str, int]:
        prompt = _words(body.get("messages") if chat else body.get("prompt"))
        return {
            "prompt_tokens": prompt,
            "completion_tokens": behaviour.tokens,
            "total_tokens": prompt + behaviour.tokens,
        }

    def _tool_name(self, body: dict[str, Any]) -> str:
        tools = body.get("tools")
        if isinstance(tools, list) and tools and isinstance(tools[0], dict):
            function = tools[0].get("function")
            name = function.get("name") if isinstance(function, dict) else None
            if isinstance(name, str):
                return name
        return TOOL_NAME

    def _whole(self, body: dict[str, Any], behaviour: _Behaviour, *, chat: bool) -> dict[str, Any]:
        number = next(self._ids)
        model = body.get("model")
        usage = self._usage(body, behaviour, chat=chat)
        created = int(time.time())
        if not chat:
            return {
                "id": f"cmpl-fake{number}",
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "text": "".join(behaviour.pieces),
                        "index": 0,
                        "logprobs": None,
                        "finish_reason": behaviour.finish_reason or "stop",
                    }
                ],
                "usage": usage,
            }
        message: dict[str, Any] = {"role": "assistant", "content": "".join(behaviour.pieces)}
        finish = "stop"
        if behaviour.tool_calls:
            finish = "tool_calls"
            message = {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": f"call_fake{number}",
                        "type": "function",
                        "function": {
                            "name": self._tool_name(body),
                            "arguments": behaviour.tool_arguments,
                        },
                    }
                ],
            }
        return {
            "id": f"chatcmpl-fake{number}",
            "object": "chat.completion",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_fake",
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": behaviour.finish_reason or finish,
                }
            ],
            "usage": usage,
        }

    def _chat_deltas(
        self, body: dict[str, Any], behaviour: _Behaviour, number: int
    ) -> Iterator[tuple[dict[str, Any], bool]]:
        """Each chunk's delta, flagged when it carries content (what ``fail_after`` counts)."""
        if not behaviour.tool_calls:
            yield {"role": "assistant", "content": "", "refusal": None}, False
            for piece in behaviour.pieces:
                yield {"content": piece}, True
            return
        # OpenAI's shape: the call's id, type and name first with empty arguments, then the
        # arguments' JSON in pieces that only parse once joined.
        first_call = {
            "index": 0,
            "id": f"call_fake{number}",
            "type": "function",
            "function": {"name": self._tool_name(body), "arguments": ""},
        }
        yield {"role": "assistant", "content": None, "tool_calls": [first_call]}, False
        arguments = behaviour.tool_arguments
        for start in range(0, len(arguments), _TOOL_ARGUMENT_PIECE):
            piece = arguments[start : start + _TOOL_ARGUMENT_PIECE]
            yield {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}, True

    async def _stream(
        self, request: web.Request, record: RecordedRequest, behaviour: _Behaviour, *, chat: bool
    ) -> web.StreamResponse:
        body = record.json
        number = next(self._ids)
        model = body.get("model")
        created = int(time.time())
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
            }
        )
        await response.prepare(request)

        async def write(data: bytes) -> None:
            await response.write(data)
            record.sent += data

        if behaviour.first_delay:
            await asyncio.sleep(behaviour.first_delay)
        for ping in range(behaviour.pings):
            if ping and behaviour.delay:
                await asyncio.sleep(behaviour.delay)
            await write(b": ping\n\n")
        if behaviour.no_newline is not None:
            await write(b"data: ")
            await self._write_in_pieces(
                write, b"x" * behaviour.no_newline, behaviour.write_size, behaviour.delay
            )
            await response.write_eof()
            return response

        def chunk(choice: dict[str, Any]) -> dict[str, Any]:
            payload: dict[str, Any] = {
                "id": f"{'chatcmpl' if chat else 'cmpl'}-fake{number}",
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created,
                "model": model,
            }
            if chat:
                payload["system_fingerprint"] = "fp_fake"
            payload["choices"] = [choice]
            if include_usage:
                # OpenAI sends `"usage": null` on every chunk but the last when usage is asked for.
                payload["usage"] = None
            return payload

        if chat:
            events = (
                (
                    chunk({"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}),
                    content,
                )
                for delta, content in self._chat_deltas(body, behaviour, number)
            )
        else:
            events = (
                (
                    chunk({"text": piece, "index": 0, "logprobs": None, "finish_reason": None}),
                    True,
                )
                for piece in behaviour.pieces
            )
        sent = 0
        first = True
        for payload, content in events:
            if behaviour.fail_after is not None and content and sent >= behaviour.fail_after:
                return self._abort(request, record)
            if content and sent in (behaviour.end_after, behaviour.error_after):
                return await self._end_early(response, write, behaviour)
            if content and behaviour.gate is not None and sent == behaviour.gate_after:
                await self._gate(behaviour.gate).wait()
            if behaviour.delay and not first:
                await asyncio.sleep(behaviour.delay)
            first = False
            if content and sent == 0 and behaviour.event_bytes is not None:
                padded = _event(_padded(payload, behaviour.event_bytes))
                await self._write_in_pieces(write, padded, behaviour.write_size)
            else:
                await write(_event(payload))
            sent += content
        if behaviour.fail_after is not None and sent >= behaviour.fail_after:
            return self._abort(request, record)
        if sent in (behaviour.end_after, behaviour.error_after):
            return await self._end_early(response, write, behaviour)
        if behaviour.gate is not None and sent == behaviour.gate_after:  # held before the end
            await self._gate(behaviour.gate).wait()

        if behaviour.delay and not first:
            await asyncio.sleep(behaviour.delay)
        finish = behaviour.finish_reason or ("tool_calls" if behaviour.tool_calls else "stop")
        if chat:
            last = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}
        else:
            last = {"text": "", "index": 0, "logprobs": None, "finish_reason": finish}
        await write(_event(chunk(last)))
        if include_usage:
            usage_chunk = chunk(last)
            usage_chunk["choices"] = []
            usage_chunk["usage"] = self._usage(body, behaviour, chat=chat)
            await write(_event(usage_chunk))
        if not behaviour.no_done:
            await write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    @staticmethod
    async def _write_in_pieces(write: Any, data: bytes, size: int, delay: float = 0.0) -> None:
        for start in range(0, len(data), size):
            await write(data[start : start + size])
            # Let the event loop send it: the peer gets many small reads, not one big one.
            await asyncio.sleep(delay)

    @staticmethod
    async def _end_early(
        response: web.StreamResponse, write: Any, behaviour: _Behaviour
    ) -> web.StreamResponse:
        """End a stream cleanly but unfinished: ``end_after``, or ``error_after``'s error event."""
        if behaviour.error_after is not None:
            message = behaviour.message or f"The server had an error (key {LEAKED_KEY})."
            if behaviour.leak_everywhere:
                error: dict[str, Any] = _leaky_error(message)
            else:
                error = {"message": message, "type": "server_error", "param": None, "code": None}
            await write(_event({"error": error}))
        await response.write_eof()
        return response

    def _abort(self, request: web.Request, record: RecordedRequest) -> web.StreamResponse:
        """Drop the connection mid-body, as a crashed upstream or a cut network would."""
        record._finish("failed")
        transport = request.transport
        if transport is not None:
            transport.abort()
        # aiohttp cannot finish a response whose transport is gone; raising tells it to drop
        # the request quietly instead of logging a failed write.
        raise asyncio.CancelledError
