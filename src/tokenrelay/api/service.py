"""The service's own endpoints: liveness, readiness and Prometheus metrics.

``/healthz`` (and ``/health``, its older name) answers 200 as long as the process serves.
``/readyz`` answers 200 only when this process can answer a model request: the database answers
``SELECT 1``, Redis answers ``PING`` when it is configured, and at least one provider is usable
(an upstream is configured, or the local model is not reported unavailable). Otherwise 503, with
the checks that failed named in the body. ``/metrics`` is ``tokenrelay.metrics`` rendered.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any

from fastapi import APIRouter, Request
from redis.asyncio import Redis
from starlette.responses import JSONResponse, Response

from tokenrelay.config import Settings
from tokenrelay.metrics import CONTENT_TYPE, Exposition
from tokenrelay.providers.local import LocalProvider
from tokenrelay.providers.registry import ProviderRegistry
from tokenrelay.storage.database import Database

__all__ = ["Readiness", "local_provider", "router"]

logger = logging.getLogger(__name__)

router = APIRouter(tags=["Service"])

_CHECK_TIMEOUT = 2.0  # seconds each readiness check may take
_OK = "ok"


def local_provider(registry: ProviderRegistry) -> LocalProvider | None:
    """The embedded model among the providers, if it is enabled."""
    for provider in registry.providers:
        if isinstance(provider, LocalProvider):
            return provider
    return None


class Readiness:
    """The checks behind ``/readyz``, with a Redis connection of their own when configured."""

    def __init__(self, settings: Settings, database: Database, registry: ProviderRegistry) -> None:
        self.database = database
        self.registry = registry
        self.redis: Redis | None = None
        if settings.redis_url is not None:
            self.redis = Redis.from_url(
                settings.redis_url.get_secret_value(),
                socket_timeout=_CHECK_TIMEOUT,
                socket_connect_timeout=_CHECK_TIMEOUT,
            )

    async def aclose(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()

    async def check(self) -> dict[str, str]:
        """Each check's outcome: ``ok``, or what is wrong (never an exception's own text)."""
        checks: dict[str, Awaitable[str]] = {
            "database": self._check(self.database.ping(), "did not answer SELECT 1"),
        }
        if self.redis is not None:
            checks["redis"] = self._check(self.redis.ping(), "did not answer PING")
        outcomes = await asyncio.gather(*checks.values())
        results = dict(zip(checks, outcomes, strict=True))
        results["providers"] = self._providers()
        return results

    @staticmethod
    async def _check(probe: Awaitable[Any], failure: str) -> str:
        try:
            async with asyncio.timeout(_CHECK_TIMEOUT):
                await probe
        except Exception as exc:  # whatever failed, the service is not ready; say so, log why
            logger.warning("readiness: %s (%s)", failure, type(exc).__name__)
            return failure
        return _OK

    def _providers(self) -> str:
        """``ok`` when one provider can answer: any upstream, or a local model not given up on."""
        problems = []
        for provider in self.registry.providers:
            if not isinstance(provider, LocalProvider):
                return _OK
            unavailable = provider.stats().unavailable
            if unavailable is None:
                return _OK
            problems.append(f"the local model is unavailable: {unavailable}")
        return "; ".join(problems) or "no provider is configured"


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: answers 200 as long as the server accepts requests."""
    return {"status": "ok"}


@router.get("/health", include_in_schema=False)
async def health() -> dict[str, str]:
    """``/healthz`` under its older name."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    responses={503: {"description": "Not ready: the failed checks are named in `checks`."}},
)
async def readyz(request: Request) -> JSONResponse:
    """Readiness: the database, Redis (when configured) and at least one provider answer."""
    readiness: Readiness = request.app.state.readiness
    checks = await readiness.check()
    failed = [name for name, outcome in checks.items() if outcome != _OK]
    if failed:
        body = {"status": "not ready", "not_ready": failed, "checks": checks}
        return JSONResponse(body, status_code=503)
    return JSONResponse({"status": "ready", "checks": checks})


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus text format."}},
)
async def metrics(request: Request) -> Response:
    """Prometheus metrics, summed over every worker process."""
    exposition: Exposition = request.app.state.metrics
    return Response(await exposition.render(), media_type=CONTENT_TYPE)
