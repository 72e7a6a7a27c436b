"""The path every completion takes: pick the provider, then answer whole or as a stream."""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from tokenrelay.api.errors import validation_message
from tokenrelay.api.sse import EventStreamResponse
from tokenrelay.config import Settings
from tokenrelay.errors import InvalidRequest
from tokenrelay.providers.base import Endpoint, ProviderRequest
from tokenrelay.providers.registry import ProviderRegistry

M = TypeVar("M", bound=BaseModel)

__all__ = ["body_doc", "read_body", "registry_of", "relay", "settings_of"]


def registry_of(request: Request) -> ProviderRegistry:
    registry: ProviderRegistry = request.app.state.registry
    return registry


def settings_of(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def relay(request: Request, endpoint: Endpoint, body: dict[str, Any], raw: bytes) -> Response:
    """Send one validated OpenAI request to its provider and return its answer unchanged."""
    model = body["model"]
    provider = registry_of(request).resolve(model)
    provider_request = ProviderRequest(endpoint=endpoint, model=model, body=body, raw=raw)
    if provider_request.stream:
        events = await provider.open_stream(provider_request)
        return EventStreamResponse(events, ping_interval=settings_of(request).ping_interval)
    return Response(await provider.complete(provider_request), media_type="application/json")


async def read_body(request: Request, model: type[M]) -> tuple[M, dict[str, Any], bytes]:
    """The body validated against ``model``, and as the dict and bytes the client sent.

    Validated here rather than by FastAPI so that the dict the providers read is the client's,
    untouched, and errors read as OpenAI's. That the body was sent as ``application/json`` the
    request guards made sure already (``api/guards.py``: curl's ``-d`` alone sends a form type,
    and a browser sends ``text/plain`` across sites without asking).
    """
    raw = await request.body()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise validation_message([{"type": "json_invalid", "loc": ()}]) from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    try:
        parsed = model.model_validate(body)
    except ValidationError as exc:
        raise validation_message(exc.errors()) from None
    return parsed, body, raw


def body_doc(model: type[BaseModel], *, required: bool = True) -> dict[str, Any]:
    """``openapi_extra`` documenting a body that the route validates itself (``read_body``).

    The schema itself is added to the spec's components by ``tokenrelay.app``.
    """
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    content = {"application/json": {"schema": ref}}
    return {"requestBody": {"required": required, "content": content}}
