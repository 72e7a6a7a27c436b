"""``/api/streams``: read any streamed answer again, from where a dropped connection left off.

Every streamed answer's response names its stream (``X-Tokenrelay-Stream``) and numbers its
events (``id: <stream id>:<n>``). ``GET /api/streams/{id}`` with ``Last-Event-ID`` (which a
browser's ``EventSource`` sends by itself when it reconnects) or ``?last_event_id=`` gives every
event after that one, then the live rest: no gap, no duplicate. Any number of readers may watch
one stream; ``POST .../cancel`` stops it for all of them, on whichever process runs it.
"""

from __future__ import annotations

import asyncio
from contextlib import aclosing, suppress
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from tokenrelay.api.relay import generations_of, settings_of
from tokenrelay.api.sse import EventStreamResponse
from tokenrelay.errors import StreamNotFound
from tokenrelay.sse import STREAM_ID_PATTERN, parse_event_id

__all__ = ["router"]

router = APIRouter(prefix="/api/streams", tags=["Streams"])

_CANCEL_WAIT = 10.0  # seconds a cancel waits for the answer to end (and be saved)

_STREAM_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The stream's events after `Last-Event-ID`, each with its `id:`, then "
        "the live rest until the answer ends.",
        "content": {"text/event-stream": {}},
    }
}


def _checked(stream_id: str) -> str:
    if STREAM_ID_PATTERN.fullmatch(stream_id) is None:
        raise StreamNotFound(stream_id[:100])
    return stream_id


@router.get("/{stream_id}", response_class=Response, responses=_STREAM_DOC)
async def read_stream(
    request: Request,
    stream_id: str,
    last_event_id: Annotated[
        str | None,
        Query(
            max_length=200,
            description="Resume after this event id (or send the `Last-Event-ID` header).",
        ),
    ] = None,
) -> Response:
    """Read a stream from its start, or resume it after an event id."""
    _checked(stream_id)
    after = 0
    header = request.headers.get("last-event-id")
    if header:
        after = parse_event_id(header, stream_id=stream_id)[1]
    elif last_event_id:
        after = parse_event_id(last_event_id, stream_id=stream_id, param="last_event_id")[1]
    generations = generations_of(request)
    entries = await generations.log.read(stream_id, after)
    return EventStreamResponse(
        stream_id,
        entries,
        reader_of=generations.reader(stream_id),
        ping_interval=settings_of(request).ping_interval,
    )


@router.post("/{stream_id}/cancel")
async def cancel_stream(request: Request, stream_id: str) -> dict[str, bool]:
    """Stop the answer for every reader; what was written is kept (a conversation's as
    `stopped`). Returns once it has ended, or after a few seconds if its process is gone."""
    _checked(stream_id)
    generations = generations_of(request)
    if generations.get(stream_id) is None:
        # 404 for an unknown or expired stream, before anything is published.
        async with aclosing(await generations.log.read(stream_id, 0)):  # type: ignore[type-var]
            pass
    await generations.cancel(stream_id)
    with suppress(TimeoutError):
        async with asyncio.timeout(_CANCEL_WAIT):
            await generations.wait_ended(stream_id)
    return {"cancelled": True}
