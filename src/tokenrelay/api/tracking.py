"""The first request guard: an id for every request, and a count of every response.

The id is the client's ``X-Request-Id`` when it is a sane token (a proxy in front may have
given one), else a new one. It is set in ``logs.REQUEST_ID`` for every log record made while
serving the request, and returned as ``X-Request-Id`` on every response, refusals by the guards
after this one included. The response's start is counted in ``tokenrelay_requests_total`` by
route (the route's path template, so that ids in paths make no new series), model (what the
relay put in the scope under ``MODEL_KEY``) and status. Both happen at the response's start, the
one message of a streamed response that passes the guards (``sse.RAW_SEND``).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable

from starlette.responses import Response
from starlette.types import Message, Scope, Send

from tokenrelay import metrics
from tokenrelay.api.guards import Incoming
from tokenrelay.logs import REQUEST_ID

__all__ = ["MODEL_KEY", "REQUEST_ID_HEADER", "RequestTracking"]

MODEL_KEY = "tokenrelay.model"
"""Scope key under which the relay names the model a request asked for."""

REQUEST_ID_HEADER = "X-Request-Id"

_SANE_ID = re.compile(rb"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
"""A client's id we repeat in logs and headers: a short token, nothing a log line could mistake."""

_OTHER_ROUTE = "other"


class RequestTracking:
    """The request's id and its response's count; see the module docstring."""

    def __init__(self, fast_routes: Iterable[str]) -> None:
        self.fast_routes = frozenset(fast_routes)  # served without FastAPI's routing

    async def check(self, request: Incoming) -> Response | None:
        given = request.request_id
        if given is not None and _SANE_ID.fullmatch(given):
            request_id = given.decode("ascii")
        else:
            request_id = "req_" + secrets.token_hex(12)
        REQUEST_ID.set(request_id)
        request.send = self._tracked(request.send, request.scope, request_id.encode())
        return None

    def _tracked(self, send: Send, scope: Scope, request_id: bytes) -> Send:
        header = (b"x-request-id", request_id)

        async def tracked_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
                metrics.request_answered(
                    self._route(scope), scope.get(MODEL_KEY, ""), message["status"]
                )
            await send(message)

        return tracked_send

    def _route(self, scope: Scope) -> str:
        route = scope.get("route")  # set by Starlette's routing when a route matched
        if route is not None:
            path: str | None = getattr(route, "path", None)
            return path or _OTHER_ROUTE
        path = scope["path"]
        return path if path in self.fast_routes else _OTHER_ROUTE
