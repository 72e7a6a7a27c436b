"""The ASGI application: routes, error handlers, and the providers' lifetime."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic.json_schema import models_json_schema
from starlette.types import ASGIApp, Receive, Scope, Send

from tokenrelay import __version__
from tokenrelay.access.keys import Authenticator, is_loopback
from tokenrelay.access.limits import Limiter
from tokenrelay.access.usage import UsageLedger
from tokenrelay.api import admin, ask, conversations, openai_routes, responses, service, streams
from tokenrelay.api.auth import Authentication
from tokenrelay.api.errors import install_error_handlers
from tokenrelay.api.guards import (
    AllowedHosts,
    BodySizeLimit,
    CrossSiteRequests,
    Guard,
    Guarded,
    JsonBodies,
)
from tokenrelay.api.sse import RAW_SEND
from tokenrelay.api.tracking import RequestTracking
from tokenrelay.config import Settings
from tokenrelay.metrics import Exposition
from tokenrelay.providers.registry import ProviderRegistry
from tokenrelay.relay.chat import ChatService
from tokenrelay.relay.gateway import Gateway
from tokenrelay.relay.generations import Generations, answer_lease
from tokenrelay.relay.responses import ResponseService
from tokenrelay.state import SharedState, create_shared_state
from tokenrelay.storage.conversations import ConversationStore
from tokenrelay.storage.database import Database
from tokenrelay.storage.keys import KeyStore
from tokenrelay.storage.responses import ResponseStore
from tokenrelay.storage.usage import UsageStore
from tokenrelay.streams import create_event_log

__all__ = ["create_app"]

logger = logging.getLogger(__name__)

_INDEX = Path(__file__).parent / "web" / "static" / "index.html"
_USAGE_PAGE = Path(__file__).parent / "web" / "static" / "usage.html"
# Model output is untrusted: besides sanitising, the page may run only its own scripts.
_PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}


def request_guards(settings: Settings, authenticator: Callable[[], Authenticator]) -> list[Guard]:
    """Every check a request passes before any route sees it, in order (``api/guards.py``)."""
    return [
        RequestTracking(fast_routes=openai_routes.FAST_ROUTES),  # first: every answer has an id
        AllowedHosts(settings.allowed_hosts, bound_host=settings.host),
        CrossSiteRequests(settings.cors_origins, spending_paths=ask.SPENDING_PATHS),
        JsonBodies(),
        BodySizeLimit(settings.max_body_bytes),
        Authentication(authenticator),  # last: a refusal is readable by an allowed page
    ]


async def _owned(state: SharedState, stream_id: str) -> bool:
    return await state.holder(answer_lease(stream_id)) is not None


async def _sweep_orphans(database: Database, state: SharedState, lease_seconds: float) -> None:
    """Every few leases, mark ``interrupted`` the answers whose process died (another replica,
    killed): nobody else would, until some process starts again."""
    while True:
        await asyncio.sleep(lease_seconds * 3)
        try:
            interrupted = await database.interrupt_orphans(
                lambda stream_id: _owned(state, stream_id)
            )
        except Exception:
            logger.exception("looking for interrupted answers failed")
            continue
        if interrupted:
            logger.warning("marked %d answer(s) of a stopped process interrupted", interrupted)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; ``tokenrelay serve`` calls this once per worker process."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registry = ProviderRegistry.from_settings(settings)
        database = Database(settings.database_url)
        log, state = create_event_log(settings), create_shared_state(settings)
        generations = Generations(log, state, lease_seconds=settings.lease_seconds)
        redis_url = settings.redis_url.get_secret_value() if settings.redis_url else None
        ledger = UsageLedger(UsageStore(database)) if settings.usage_accounting else None
        gateway = Gateway(registry, generations, limiter=Limiter(redis_url), ledger=ledger)
        chat = ChatService(ConversationStore(database), gateway, grace=settings.stream_grace)
        responses_service = ResponseService(
            ResponseStore(database), gateway, ttl_days=settings.responses_ttl_days
        )
        keys = KeyStore(database)
        admin_key = settings.admin_key.get_secret_value() if settings.admin_key else None
        app.state.authenticator = Authenticator(
            keys,
            admin_key=admin_key,
            always=not is_loopback(settings.host) and not settings.insecure_no_auth,
        )
        app.state.keys, app.state.usage = keys, UsageStore(database)
        app.state.ledger, app.state.gateway = ledger, gateway
        app.state.registry, app.state.chat, app.state.generations = registry, chat, generations
        app.state.responses = responses_service
        local = service.local_provider(registry)
        app.state.metrics = exposition = Exposition(local.stats if local is not None else None)
        app.state.readiness = readiness = service.Readiness(settings, database, registry)
        sweeper: asyncio.Task[None] | None = None
        try:
            await exposition.start()
            await log.start()
            await state.start()
            await generations.start()
            # Answers left `streaming` whose owner's lease lapsed died with their process.
            await database.start(owned=lambda stream_id: _owned(state, stream_id))
            await registry.start()
            await gateway.start()
            if ledger is not None:
                await ledger.start()
            await responses_service.start()
            sweeper = asyncio.create_task(_sweep_orphans(database, state, settings.lease_seconds))
            yield
        finally:
            if sweeper is not None:
                sweeper.cancel()
            await responses_service.aclose()
            await generations.aclose()  # answers still running are saved as interrupted
            await gateway.aclose()
            if ledger is not None:
                await ledger.aclose()  # after the answers: their rows are written too
            if gateway.limiter is not None:
                await gateway.limiter.aclose()
            await registry.aclose()
            await state.aclose()
            await log.aclose()
            await database.close()
            await readiness.aclose()
            await exposition.aclose()

    app = _App(
        title="tokenrelay",
        version=__version__,
        summary="An OpenAI-compatible streaming gateway with an embedded local model.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    install_error_handlers(app)
    app.guarded = Guarded(app.dispatch, request_guards(settings, lambda: app.state.authenticator))
    app.include_router(openai_routes.router)
    app.include_router(ask.router)
    app.include_router(conversations.router)
    app.include_router(responses.router)
    app.include_router(streams.router)
    app.include_router(service.router)
    app.include_router(admin.router)
    app.mount("/static", StaticFiles(packages=[("tokenrelay.web", "static")]), name="static")

    @app.get("/", include_in_schema=False)
    async def chat_page() -> FileResponse:
        return FileResponse(_INDEX, headers=_PAGE_HEADERS)

    @app.get("/usage", include_in_schema=False)
    async def usage_page() -> FileResponse:
        return FileResponse(_USAGE_PAGE, headers=_PAGE_HEADERS)

    _document_body_models(app)
    return app


class _App(FastAPI):
    """FastAPI behind the request guards, with the completion endpoints served on a short path
    (``serve_fast``), and the server's own ``send`` in each HTTP scope for streamed bodies
    (``EventStreamResponse``)."""

    guarded: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.guarded is not None:
            scope[RAW_SEND] = send
            await self.guarded(scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    async def dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A guarded request: to ``serve_fast`` or through FastAPI's routing."""
        if scope["method"] == "POST" and scope["path"] in openai_routes.FAST_ROUTES:
            scope["app"] = self
            await openai_routes.serve_fast(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def _document_body_models(app: FastAPI) -> None:
    """Add the request models our routes validate themselves to the OpenAPI components."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = build()
            _, defs = models_json_schema(
                [
                    (model, "validation")
                    for model in openai_routes.BODY_MODELS
                    + conversations.BODY_MODELS
                    + admin.BODY_MODELS
                ],
                ref_template="#/components/schemas/{model}",
            )
            spec.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented override hook
