"""The identity guard: who a request comes from, by its gateway key.

The last of the request guards (``api/guards.py``): after the browser guards, so a page on an
allowed origin can read why it was refused. The key comes as ``Authorization: Bearer tr-...``
(OpenAI's SDKs) or ``api-key: tr-...`` (Azure's); the ``Caller`` found is left in the scope for
the routes and the gateway (``caller_of``). The chat page, the usage page, their files, the
health checks and the API's documentation are open: the pages ask for a key themselves.
Key management and usage (``/api/keys``, ``/api/usage``) need the admin key.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import Response

from tokenrelay.access.keys import Authenticator, Caller
from tokenrelay.api.guards import Incoming

__all__ = ["CALLER", "Authentication", "caller_of"]

CALLER = "tokenrelay.caller"
"""Scope key of the request's ``Caller``."""

_NOBODY = Caller(key=None, admin=False)

_OPEN_PATHS = frozenset(
    {
        "/",
        "/usage",
        "/health",
        "/healthz",
        "/readyz",
        "/docs",
        "/docs/oauth2-redirect",
        "/redoc",
        "/openapi.json",
        "/favicon.ico",
    }
)
_OPEN_PREFIXES = ("/static/",)
_ADMIN_PREFIXES = ("/api/keys", "/api/usage")


def caller_of(request: Request) -> Caller:
    """The request's caller; a request the guard did not see is nobody's (fail closed)."""
    caller: Caller = request.scope.get(CALLER, _NOBODY)
    return caller


class Authentication:
    """A guard: identifies the caller, refuses with 401 (no or bad key) or 403 (not admin)."""

    def __init__(self, authenticator: Callable[[], Authenticator]) -> None:
        self._authenticator = authenticator

    async def check(self, request: Incoming) -> Response | None:
        path = request.path
        if request.method == "OPTIONS" or path in _OPEN_PATHS or path.startswith(_OPEN_PREFIXES):
            return None
        caller = await self._authenticator().identify(_presented(request))
        if path.startswith(_ADMIN_PREFIXES):
            caller.require_admin()
        request.scope[CALLER] = caller
        return None


def _presented(request: Incoming) -> str | None:
    """The key a request presents, if any."""
    if request.authorization is not None:
        scheme, _, value = request.authorization.decode("latin-1").strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return None
    if request.api_key is not None:
        return request.api_key.decode("latin-1").strip() or None
    return None
