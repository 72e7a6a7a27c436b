"""The tutorial's two endpoints: ask once and get JSON, or ask and get an EventStream.

``/api/ask/stream`` is made for the browser's ``EventSource``: a plain GET whose events are
OpenAI's chat chunks, ending with ``data: [DONE]`` (close the EventSource then, or it reconnects).
"""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel
from starlette.responses import Response

from tokenrelay.api.relay import registry_of, relay
from tokenrelay.errors import UpstreamError

__all__ = ["SPENDING_PATHS", "router"]

router = APIRouter(prefix="/api", tags=["Ask"])

SPENDING_PATHS = ("/api/ask", "/api/ask/stream")
"""GET routes that spend tokens: the request guards refuse them to other sites' pages."""

Prompt = Annotated[str, Query(min_length=1, max_length=100_000, description="What to ask.")]
Model = Annotated[
    str | None, Query(min_length=1, description="Model name; default: the first listed.")
]


class Answer(BaseModel):
    model: str
    answer: str
    finish_reason: str | None
    usage: dict[str, Any] | None


async def _chat_body(
    request: Request, prompt: str, model: str | None, stream: bool
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model or await registry_of(request).default_model(),
        "messages": [{"role": "user", "content": prompt}],
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


@router.get("/ask", response_model=Answer)
async def ask(request: Request, prompt: Prompt, model: Model = None) -> Answer:
    """Ask once; the whole answer comes back as JSON."""
    body = await _chat_body(request, prompt, model, stream=False)
    response = await relay(request, "chat/completions", body, orjson.dumps(body))
    try:
        completion = orjson.loads(response.body)
        choice = completion["choices"][0]
        return Answer(
            model=completion.get("model") or body["model"],
            answer=choice["message"].get("content") or "",
            finish_reason=choice.get("finish_reason"),
            usage=completion.get("usage"),
        )
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
        raise UpstreamError("The model's answer was not a chat completion.", status=502) from None


@router.get(
    "/ask/stream",
    response_class=Response,
    responses={200: {"content": {"text/event-stream": {}}, "description": "OpenAI chat chunks."}},
)
async def ask_stream(request: Request, prompt: Prompt, model: Model = None) -> Response:
    """Ask and read the answer as it is written, as Server-Sent Events."""
    body = await _chat_body(request, prompt, model, stream=True)
    return await relay(request, "chat/completions", body, orjson.dumps(body))
