"""``/v1``: OpenAI's API, so any OpenAI client works by changing its base URL."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from tokenrelay.api.errors import INTERNAL_ERROR, error_response
from tokenrelay.api.relay import body_doc, read_body, registry_of, relay
from tokenrelay.api.schemas import ChatCompletionRequest, CompletionRequest
from tokenrelay.errors import TokenrelayError
from tokenrelay.providers.base import Endpoint

__all__ = ["BODY_MODELS", "FAST_ROUTES", "router", "serve_fast"]

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])

_STREAM_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "A JSON completion, or with `stream: true` Server-Sent Events of chunks "
        "ending with `data: [DONE]`.",
        "content": {"application/json": {}, "text/event-stream": {}},
    }
}


FAST_ROUTES: dict[str, tuple[Endpoint, type[BaseModel]]] = {
    "/v1/chat/completions": ("chat/completions", ChatCompletionRequest),
    "/v1/completions": ("completions", CompletionRequest),
}
"""The hot paths, served by ``serve_fast`` without FastAPI's routing (see ``tokenrelay.app``)."""


async def _answer(request: Request, endpoint: Endpoint, schema: type[BaseModel]) -> Response:
    _, body, raw = await read_body(request, schema)
    return await relay(request, endpoint, body, raw)


async def serve_fast(scope: Scope, receive: Receive, send: Send) -> None:
    """Serve a ``FAST_ROUTES`` request as plain ASGI: the same code as the routes below, minus
    FastAPI's routing and middleware, which cost about a third of a streamed request's CPU in
    ``bench/`` at 500 concurrent streams. Errors are mapped by the same ``error_response``.
    """
    request = Request(scope, receive)
    try:
        response = await _answer(request, *FAST_ROUTES[scope["path"]])
    except TokenrelayError as exc:
        response = error_response(exc)
    except Exception:
        logger.exception("unhandled error on POST %s", scope["path"])
        response = error_response(TokenrelayError(INTERNAL_ERROR))
    await response(scope, receive, send)


@router.post(
    "/chat/completions",
    response_class=Response,
    responses=_STREAM_DOC,
    openapi_extra=body_doc(ChatCompletionRequest),
)
async def create_chat_completion(request: Request) -> Response:
    """Create a chat completion, streamed or not (OpenAI's `chat.completions.create`)."""
    return await _answer(request, *FAST_ROUTES["/v1/chat/completions"])


@router.post(
    "/completions",
    response_class=Response,
    responses=_STREAM_DOC,
    openapi_extra=body_doc(CompletionRequest),
)
async def create_completion(request: Request) -> Response:
    """Create a legacy text completion, streamed or not (OpenAI's `completions.create`)."""
    return await _answer(request, *FAST_ROUTES["/v1/completions"])


@router.get("/models")
async def list_models(request: Request) -> dict[str, object]:
    """Every model any provider offers."""
    return {"object": "list", "data": await registry_of(request).list_models()}


BODY_MODELS: list[type[BaseModel]] = [ChatCompletionRequest, CompletionRequest]
"""Bodies documented by reference: ``tokenrelay.app`` adds their schemas to the OpenAPI spec."""
