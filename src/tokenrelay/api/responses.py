"""``/v1/responses``: OpenAI's Responses API, for every model tokenrelay serves.

Streamed responses are read from their event log like every stream, so
``GET /v1/responses/{id}?stream=true&starting_after=N`` resumes a background response on any
replica; ``POST .../cancel`` stops it, keeping what was written.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Query, Request
from starlette.responses import JSONResponse, Response

from tokenrelay.api.auth import caller_of
from tokenrelay.api.errors import validation_message
from tokenrelay.api.relay import generations_of, settings_of, unless_client_leaves
from tokenrelay.api.sse import EventStreamResponse
from tokenrelay.api.tracking import MODEL_KEY
from tokenrelay.errors import InvalidRequest, StreamNotFound
from tokenrelay.relay.responses import ResponseService
from tokenrelay.storage.responses import ResponseNotFound

__all__ = ["router"]

router = APIRouter(prefix="/v1/responses", tags=["OpenAI-compatible"])

_RESPONSE_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "A Response object, or with `stream: true` its events (`event:` named, "
        "each with `sequence_number`).",
        "content": {"application/json": {}, "text/event-stream": {}},
    }
}


def _service(request: Request) -> ResponseService:
    service: ResponseService = request.app.state.responses
    return service


async def _owned(request: Request, response_id: str) -> str:
    """``response_id``, once known to be ours (``resp_`` and 16 letters or digits) and the
    caller's: anything else, another key's response included, is simply not found."""
    if not (
        response_id.startswith("resp_") and response_id[5:].isalnum() and len(response_id) < 64
    ):
        raise ResponseNotFound(response_id[:64])
    await _service(request).require_owner(response_id, caller_of(request))
    return response_id


@router.post(
    "",
    response_class=Response,
    responses=_RESPONSE_DOC,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    },
)
async def create_response(request: Request) -> Response:
    """Create a response (OpenAI's `responses.create`), streamed, in the background, or whole."""
    raw = await request.body()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise validation_message([{"type": "json_invalid", "loc": ()}]) from None
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        request.scope[MODEL_KEY] = body["model"]  # the label of this request's count
    service = _service(request)
    started = await unless_client_leaves(request, service.create(body, caller_of(request)))
    generation = started.generation
    if generation is None or not started.stream:  # whole; or background: the Response as now
        return JSONResponse(started.response, headers=started.headers)
    try:
        await unless_client_leaves(request, generation.opened())
    except BaseException:
        generation.cancel()
        raise
    entries = await generations_of(request).log.read(generation.stream_id, 0)
    return EventStreamResponse(
        generation.stream_id,
        entries,
        reader_of=generation,
        ping_interval=settings_of(request).ping_interval,
        headers=started.headers,
    )


@router.get("/{response_id}", response_class=Response, responses=_RESPONSE_DOC)
async def get_response(
    request: Request,
    response_id: str,
    stream: bool = False,
    starting_after: Annotated[int | None, Query(ge=-1, le=10**9)] = None,
) -> Response:
    """Retrieve a response; with `stream=true`, its events after `starting_after`, then live."""
    await _owned(request, response_id)
    service = _service(request)
    if not stream:
        return JSONResponse(await service.get(response_id))
    after = 0 if starting_after is None else starting_after + 1  # log entry n = sequence n-1
    generations = generations_of(request)
    try:
        entries = await generations.log.read(response_id, after)
    except StreamNotFound:
        await service.get(response_id)  # a 404 if there is no such response at all
        raise InvalidRequest(
            f"Response with id '{response_id}' has no events to stream: it was created without "
            "`stream` or `background`, or it ended too long ago. Retrieve it without `stream`.",
            param="stream",
        ) from None
    return EventStreamResponse(
        response_id,
        entries,
        reader_of=generations.reader(response_id),
        ping_interval=settings_of(request).ping_interval,
    )


@router.post("/{response_id}/cancel")
async def cancel_response(request: Request, response_id: str) -> dict[str, Any]:
    """Cancel a background response; it ends `cancelled`, with the output written so far."""
    return await _service(request).cancel(await _owned(request, response_id))


@router.delete("/{response_id}")
async def delete_response(request: Request, response_id: str) -> dict[str, Any]:
    """Delete a stored response and its input items."""
    return await _service(request).delete(await _owned(request, response_id))


@router.get("/{response_id}/input_items")
async def list_input_items(
    request: Request,
    response_id: str,
    after: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Literal["asc", "desc"] = "desc",
) -> dict[str, Any]:
    """The items a response was given as input (`input_items.list`)."""
    page = await _service(request).store.list_input_items(
        await _owned(request, response_id), after=after, limit=limit, order=order
    )
    return {
        "object": "list",
        "data": list(page.data),
        "first_id": page.first_id,
        "last_id": page.last_id,
        "has_more": page.has_more,
    }
