"""The path every completion takes through the gateway: admitted, then answered whole or as a
stream; and what the routes share for reading a request."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive

from tokenrelay.api.auth import caller_of
from tokenrelay.api.errors import validation_message
from tokenrelay.api.sse import EventStreamResponse
from tokenrelay.api.tracking import MODEL_KEY
from tokenrelay.config import Settings
from tokenrelay.errors import ClientDisconnected, InvalidRequest
from tokenrelay.providers.base import Endpoint, ProviderRequest
from tokenrelay.providers.registry import ProviderRegistry
from tokenrelay.relay.gateway import Gateway
from tokenrelay.relay.generations import Generations

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

__all__ = [
    "RESUMABLE_HEADER",
    "body_doc",
    "gateway_of",
    "generations_of",
    "read_body",
    "registry_of",
    "relay",
    "settings_of",
    "unless_client_leaves",
]

logger = logging.getLogger(__name__)


def registry_of(request: Request) -> ProviderRegistry:
    registry: ProviderRegistry = request.app.state.registry
    return registry


def settings_of(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def generations_of(request: Request) -> Generations:
    generations: Generations = request.app.state.generations
    return generations


def gateway_of(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


RESUMABLE_HEADER = "x-tokenrelay-resumable"
"""``true``: the answer outlives its connection for ``stream_grace`` s, so a client can resume."""


async def relay(request: Request, endpoint: Endpoint, body: dict[str, Any], raw: bytes) -> Response:
    """Send one validated OpenAI request through the gateway and return its answer unchanged.

    A streamed answer is a generation writing to a log, which this connection reads. Unless
    the client asks for a resumable stream, the grace is 0: the upstream is closed the moment
    the client leaves, as an SDK client expects.
    """
    model = body["model"]
    request.scope[MODEL_KEY] = model  # the label of this request's count
    gateway = gateway_of(request)
    admitted = await gateway.admit(
        caller_of(request),
        request.scope["path"],
        ProviderRequest(endpoint=endpoint, model=model, body=body, raw=raw),
    )
    if not admitted.request.stream:
        answer = await unless_client_leaves(request, gateway.complete(admitted))
        return Response(answer, media_type="application/json", headers=admitted.headers)
    settings = settings_of(request)
    resumable = request.headers.get(RESUMABLE_HEADER, "").lower() == "true"
    generation = await gateway.stream(admitted, grace=settings.stream_grace if resumable else 0.0)
    try:
        await unless_client_leaves(request, generation.opened())
    except BaseException:
        generation.cancel()  # the client left first (an error ended the answer already)
        raise
    entries = await gateway.generations.log.read(generation.stream_id, 0)
    return EventStreamResponse(
        generation.stream_id,
        entries,
        reader_of=generation,
        ping_interval=settings.ping_interval,
        headers=admitted.headers,
    )


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it the moment the client disconnects.

    Until a response starts there is no write to fail, so nothing else would notice a client
    that left: a whole non-streamed answer (or a stream the upstream has not accepted yet, or a
    request queued for the local model) would run to its end for nobody. Cancelling ``work``
    closes its upstream request or frees the local model; ``ClientDisconnected`` is raised.

    ``work`` runs in this task, so its result is used the moment it is ready (an upstream that
    sends its answer and drops the connection at once loses nothing to an extra hop); only the
    watcher is a task, and it cancels this one while ``work`` is still pending, never after.
    """
    relay = asyncio.current_task()
    assert relay is not None
    pending = True
    client_left = False

    def on_disconnect(watcher: asyncio.Task[None]) -> None:
        nonlocal client_left
        if pending and not watcher.cancelled() and watcher.exception() is None:
            client_left = True
            relay.cancel()

    watcher = asyncio.create_task(_disconnect(request.receive))
    watcher.add_done_callback(on_disconnect)
    try:
        return await work
    except asyncio.CancelledError:
        if not client_left:
            raise  # not ours: the server is shutting down
        logger.info("client left before its answer; cancelled %s", request.url.path)
        raise ClientDisconnected() from None
    finally:
        pending = False
        watcher.cancel()
        if client_left:
            relay.uncancel()  # the cancellation was ours, and it is handled


async def _disconnect(receive: Receive) -> None:
    """Return when the client disconnects (the body, if any, has been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


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
