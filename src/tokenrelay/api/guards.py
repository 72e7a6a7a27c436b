"""The request guards: one declared list, checked once per request before any route runs.

``tokenrelay.app`` puts every HTTP request through ``Guarded``, the fast ``/v1`` path and
FastAPI's routes alike, so no route re-implements a check. A guard reads the request's head
(``Incoming``, its headers looked up once) and may refuse it (an OpenAI-shaped error), answer it
(a CORS preflight), bound how its body is read (``receive``) or add headers to the response's
start. None of them sees a response body: a streamed answer's chunks bypass them all
(``sse.RAW_SEND``).

The browser guards exist because a web page the user visits can send requests to a server on
loopback: after a DNS rebinding under a name of its own (``AllowedHosts``), or across origins
with a body a form or ``fetch(..., {mode: "no-cors"})`` may send (``CrossSiteRequests``,
``JsonBodies``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenrelay.api.errors import INTERNAL_ERROR, error_response
from tokenrelay.errors import (
    ClientGone,
    Forbidden,
    RequestTooLarge,
    TokenrelayError,
    UnsupportedMediaType,
)

__all__ = [
    "LOOPBACK_NAMES",
    "AllowedHosts",
    "BodySizeLimit",
    "CrossSiteRequests",
    "Guard",
    "Guarded",
    "Incoming",
    "JsonBodies",
]

logger = logging.getLogger(__name__)

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
"""Methods that change nothing on their own; the routes that spend tokens on GET are named."""

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})

# Request headers a page on an allowed origin may send (OpenAI's SDKs send `x-stainless-*`).
_CORS_HEADERS = frozenset(
    {
        "accept",
        "api-key",
        "authorization",
        "content-type",
        "last-event-id",
        "openai-beta",
        "openai-organization",
        "openai-project",
        "x-request-id",
    }
)
_CORS_HEADER_PREFIXES = ("x-tokenrelay-", "x-stainless-")
_CORS_METHODS = "GET, POST, PATCH, DELETE, OPTIONS"
_CORS_MAX_AGE = "600"
# Response headers a page on an allowed origin may read: the stream to resume, when to retry,
# the request's id.
_CORS_EXPOSED = b"X-Tokenrelay-Stream, Retry-After, X-Request-Id"
_SHOWN = 100
"""Characters of a client's header value an error message repeats, at most."""


@dataclass(slots=True)
class Incoming:
    """One request's head as the guards read it. A guard may replace ``receive`` and ``send``."""

    scope: Scope
    receive: Receive
    send: Send
    method: str
    path: str
    host: bytes | None = None
    origin: bytes | None = None
    fetch_site: bytes | None = None
    content_type: bytes | None = None
    content_length: bytes | None = None
    chunked: bool = False
    preflight_method: bytes | None = None
    preflight_headers: bytes | None = None
    request_id: bytes | None = None
    authorization: bytes | None = None
    api_key: bytes | None = None

    @classmethod
    def read(cls, scope: Scope, receive: Receive, send: Send) -> Incoming:
        request = cls(scope, receive, send, scope["method"], scope["path"])
        # One pass over the headers (the server gives their names in lowercase); the first of
        # a repeated header counts, as browsers never repeat these.
        for name, value in scope["headers"]:
            if name == b"host":
                request.host = request.host or value
            elif name == b"content-type":
                request.content_type = request.content_type or value
            elif name == b"content-length":
                request.content_length = request.content_length or value
            elif name == b"origin":
                request.origin = request.origin or value
            elif name == b"sec-fetch-site":
                request.fetch_site = request.fetch_site or value
            elif name == b"transfer-encoding":
                request.chunked = True
            elif name == b"access-control-request-method":
                request.preflight_method = value
            elif name == b"access-control-request-headers":
                request.preflight_headers = value
            elif name == b"x-request-id":
                request.request_id = value
            elif name == b"authorization":
                request.authorization = request.authorization or value
            elif name == b"api-key":
                request.api_key = request.api_key or value
        return request

    @property
    def has_body(self) -> bool:
        return self.chunked or (self.content_length is not None and self.content_length != b"0")


class Guard(Protocol):
    """One check on every request, before any route sees it."""

    async def check(self, request: Incoming) -> Response | None:
        """Raise a ``TokenrelayError`` to refuse, return a response to answer here, else None."""


class Guarded:
    """An ASGI app behind a list of guards, checked in order; the first refusal answers."""

    def __init__(self, app: ASGIApp, guards: Sequence[Guard]) -> None:
        self.app = app
        self.guards = tuple(guards)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Incoming.read(scope, receive, send)
        try:
            for guard in self.guards:
                answer = await guard.check(request)
                if answer is not None:
                    await answer(scope, receive, request.send)
                    return
        except TokenrelayError as exc:
            # Through ``request.send``: a page on an allowed origin can read why it was refused.
            await error_response(exc)(scope, receive, request.send)
            return
        except Exception:  # a guard's bug: answered like a route's, in OpenAI's shape
            logger.exception("a request guard failed on %s %s", request.method, request.path)
            await error_response(TokenrelayError(INTERNAL_ERROR))(scope, receive, request.send)
            return
        await self.app(scope, request.receive, request.send)


def host_name(host: bytes) -> str:
    """``Host`` without its port or IPv6 brackets, lowercase: ``b"[::1]:8000"`` -> ``"::1"``."""
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        end = text.find("]")
        return text[1:end] if end > 0 else text
    if text.count(":") == 1:
        text = text.partition(":")[0]
    return text.rstrip(".")


def _shown(value: bytes | str) -> str:
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "..."


class AllowedHosts:
    """Refuse requests addressed to a host name the server does not answer to (DNS rebinding).

    A page at ``http://evil.example:8000/`` whose name the attacker re-points at 127.0.0.1
    reaches the server with ``Host: evil.example:8000``; refusing names nobody configured stops
    it. Allowed, with any port: the loopback names, the address the connection arrived at (an IP
    address cannot be rebound, and on a wildcard bind it is whichever address of this machine
    the client used), the name the server was told to bind, and ``allowed_hosts`` (``*``: any).
    A request without ``Host`` (HTTP/1.0) did not come from a browser and passes.
    """

    _REMEMBERED = 64
    """``Host`` values remembered as allowed: a set lookup instead of parsing, per request."""

    def __init__(self, allowed: Iterable[str], bound_host: str) -> None:
        names = set(allowed)
        self.any = "*" in names
        names |= LOOPBACK_NAMES
        if bound_host not in ("0.0.0.0", "::", ""):
            names.add(host_name(bound_host.encode()))
        self.names = frozenset(names)
        self._allowed: set[bytes] = set()

    async def check(self, request: Incoming) -> Response | None:
        host = request.host
        if self.any or host is None or host in self._allowed:
            return None
        name = host_name(host)
        if name in self.names:
            if len(self._allowed) < self._REMEMBERED:
                self._allowed.add(host)
            return None
        server = request.scope.get("server")
        if server and name == server[0].removeprefix("::ffff:"):
            return None
        raise Forbidden(
            f"This server does not answer to the host '{_shown(name)}'. "
            "If that name is yours, add it to the `allowed_hosts` setting.",
            code="host_not_allowed",
        )


class CrossSiteRequests:
    """Refuse requests from another site's pages wherever they would change state or spend tokens.

    Such a request is any but GET, HEAD and OPTIONS, and a GET of ``spending_paths``. It is
    refused when its ``Origin`` is neither the server's own nor one of ``cors_origins``, and when
    it has no ``Origin`` but the browser marks it ``Sec-Fetch-Site: cross-site`` or
    ``same-site`` (an ``<img>`` sends no ``Origin``; another port of the same host is the same
    site but not the same origin). Clients that are not browsers send neither header.

    The origins in ``cors_origins`` get CORS: preflights answered here, and their responses
    carry ``Access-Control-Allow-Origin`` naming them. No other origin ever does.
    """

    def __init__(self, cors_origins: Iterable[str], spending_paths: Iterable[str]) -> None:
        self.origins = frozenset(origin.encode() for origin in cors_origins)
        self.spending_paths = frozenset(spending_paths)

    async def check(self, request: Incoming) -> Response | None:
        origin = request.origin
        allowed = origin is not None and origin.lower() in self.origins
        if request.method == "OPTIONS" and origin is not None and request.preflight_method:
            if not allowed:
                raise self._foreign(origin)
            return self._preflight(request, origin)
        if request.method not in SAFE_METHODS or request.path in self.spending_paths:
            if origin is not None:
                if not allowed and not _same_origin(request, origin):
                    raise self._foreign(origin)
            elif request.fetch_site in (b"cross-site", b"same-site"):
                raise Forbidden(
                    "Requests from other sites' pages may not use this endpoint.",
                    code="cross_site_request",
                )
        if allowed:
            assert origin is not None
            request.send = _with_cors_headers(request.send, origin)
        return None

    @staticmethod
    def _foreign(origin: bytes) -> Forbidden:
        return Forbidden(
            f"Requests from pages at '{_shown(origin)}' are not allowed. "
            "If that site is yours, add it to the `cors_origins` setting.",
            code="origin_not_allowed",
        )

    @staticmethod
    def _preflight(request: Incoming, origin: bytes) -> Response:
        headers = {
            "Access-Control-Allow-Origin": origin.decode("latin-1"),
            "Access-Control-Allow-Methods": _CORS_METHODS,
            "Access-Control-Max-Age": _CORS_MAX_AGE,
            "Vary": "Origin",
        }
        # The requested headers we accept, named back; a header left out fails the preflight.
        asked = (request.preflight_headers or b"").decode("latin-1").lower().split(",")
        accepted = [
            name
            for name in (part.strip() for part in asked)
            if name in _CORS_HEADERS or name.startswith(_CORS_HEADER_PREFIXES)
        ]
        if accepted:
            headers["Access-Control-Allow-Headers"] = ", ".join(accepted)
        return Response(status_code=204, headers=headers)


def _same_origin(request: Incoming, origin: bytes) -> bool:
    """``Origin`` names this server as the client addressed it: ``scheme://Host``."""
    if request.host is None:
        return False
    scheme: str = request.scope.get("scheme", "http")
    host = request.host.lower()
    default = b":443" if scheme == "https" else b":80"
    return origin.lower() == scheme.encode() + b"://" + host.removesuffix(default)


def _with_cors_headers(send: Send, origin: bytes) -> Send:
    """``send`` adding CORS headers to the response's start (streamed bodies bypass it)."""
    extra = [
        (b"access-control-allow-origin", origin),
        (b"vary", b"Origin"),
        (b"access-control-expose-headers", _CORS_EXPOSED),
    ]

    async def cors_send(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", ()), *extra]
        await send(message)

    return cors_send


class JsonBodies:
    """Refuse request bodies that are not declared JSON, with 415.

    A browser sends ``text/plain`` or a form type across origins without asking first (no CORS
    preflight), so reading those as JSON let any page post to the API. Requests without a body
    (``POST .../stop``) need no type.
    """

    async def check(self, request: Incoming) -> Response | None:
        if request.method in SAFE_METHODS or not request.has_body:
            return None
        declared = request.content_type
        if declared is not None and _media_type(declared) == b"application/json":
            return None
        named = f"`{_shown(declared)}`" if declared is not None else "no Content-Type"
        raise UnsupportedMediaType(
            f"The request body was sent with {named}; "
            "send JSON with `Content-Type: application/json`."
        )


def _media_type(content_type: bytes) -> bytes:
    """``b"application/json; charset=utf-8"`` -> ``b"application/json"``."""
    return content_type.partition(b";")[0].strip().lower()


class BodySizeLimit:
    """Refuses a body over the configured size with 413, before anything reads it whole: checks
    ``Content-Length`` and counts chunked bodies as they arrive. A client that leaves before
    sending all of it is no error (``ClientGone``)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes

    def _error(self) -> RequestTooLarge:
        return RequestTooLarge(f"The request body is larger than {self.max_bytes} bytes.")

    async def check(self, request: Incoming) -> Response | None:
        length = request.content_length
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            raise self._error()
        if request.has_body:
            request.receive = self._bounded(request.receive)
        return None

    def _bounded(self, receive: Receive) -> Receive:
        received = 0
        whole = False

        async def bounded_receive() -> Message:
            nonlocal received, whole
            message = await receive()
            if whole:  # after the body: the disconnect watch of a streamed answer
                return message
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Raised to whoever reads the body (``read_body``), mapped like any error.
                    raise self._error()
                whole = not message.get("more_body", False)
            elif message["type"] == "http.disconnect":
                # The client left (or was cut off by ``body_timeout``) mid-body: its reader
                # gets an error that is answered to nobody and logged as nothing.
                raise ClientGone("The client left before sending the whole request body.")
            return message

        return bounded_receive
