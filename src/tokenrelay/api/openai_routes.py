"""``/v1``: OpenAI's API, so any OpenAI client works by changing its base URL."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel
from starlette.responses import Response

from tokenrelay.api.relay import read_body, registry_of, relay
from tokenrelay.api.schemas import ChatCompletionRequest, CompletionRequest

__all__ = ["BODY_MODELS", "router"]

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])

_STREAM_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "A JSON completion, or with `stream: true` Server-Sent Events of chunks "
        "ending with `data: [DONE]`.",
        "content": {"application/json": {}, "text/event-stream": {}},
    }
}


def _body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """Document a body that the route validates itself (see ``read_body``)."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


@router.post(
    "/chat/completions",
    response_class=Response,
    responses=_STREAM_DOC,
    openapi_extra=_body_doc(ChatCompletionRequest),
)
async def create_chat_completion(request: Request) -> Response:
    """Create a chat completion, streamed or not (OpenAI's `chat.completions.create`)."""
    _, body, raw = await read_body(request, ChatCompletionRequest)
    return await relay(request, "chat/completions", body, raw)


@router.post(
    "/completions",
    response_class=Response,
    responses=_STREAM_DOC,
    openapi_extra=_body_doc(CompletionRequest),
)
async def create_completion(request: Request) -> Response:
    """Create a legacy text completion, streamed or not (OpenAI's `completions.create`)."""
    _, body, raw = await read_body(request, CompletionRequest)
    return await relay(request, "completions", body, raw)


@router.get("/models")
async def list_models(request: Request) -> dict[str, object]:
    """Every model any provider offers."""
    return {"object": "list", "data": await registry_of(request).list_models()}


BODY_MODELS: list[type[BaseModel]] = [ChatCompletionRequest, CompletionRequest]
"""Bodies documented by reference: ``tokenrelay.app`` adds their schemas to the OpenAPI spec."""
