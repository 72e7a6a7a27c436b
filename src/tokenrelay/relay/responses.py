"""The Responses API answered by any chat model: translate, generate, store, resume.

A request is validated and translated to chat completions (``tokenrelay.responses``); the chat
answer comes back as Responses events. A streamed or background response is a ``Generation``
like every streamed answer, whose log holds the translated events, one per entry, so the log's
entry ``n`` is the event with ``sequence_number`` ``n - 1`` and ``starting_after`` maps straight
onto a resume. With ``store`` (the default) the response, its input items and, at the end, its
output and usage are kept in the database, so ``GET``, ``input_items``, ``DELETE`` and
``previous_response_id`` work on any replica and after a restart, until they expire.

A background response runs to its end whoever reads it (as OpenAI's do); a streamed foreground
response is cancelled when its client leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import orjson

from tokenrelay.access.keys import OPERATOR, Caller
from tokenrelay.errors import InvalidRequest, TokenrelayError
from tokenrelay.providers.base import Provider, ProviderRequest
from tokenrelay.providers.deployments import Deployments
from tokenrelay.providers.openai_compat import OpenAICompatibleProvider
from tokenrelay.relay.gateway import Admitted, Gateway
from tokenrelay.relay.generation import Generation
from tokenrelay.relay.generations import answer_lease
from tokenrelay.responses import (
    ChatTranslation,
    ResponseStream,
    chain_items,
    parse_request,
    response_from_completion,
    response_from_record,
    translate,
)
from tokenrelay.storage.models import MessageStatus, ResponseStatus, new_id
from tokenrelay.storage.responses import ResponseNotFound, ResponseStore, ResponseTurn

__all__ = ["ResponseService", "StartedResponse"]

logger = logging.getLogger(__name__)

_EXPIRY_SWEEP_SECONDS = 3600.0
_CANCEL_WAIT = 10.0
_ORPHANED = {
    "code": "server_error",
    "message": "The server answering this response stopped before the answer ended.",
}


class _ResponseEvents:
    """The ``Shape`` of a response's log: its Responses events, one entry per event."""

    def __init__(self, stream: ResponseStream, *, queued: bool) -> None:
        self.stream = stream
        self._queued = queued

    def opening(self) -> Iterable[bytes]:
        return self.stream.start(queued=self._queued)

    def feed(self, chunk: bytes) -> Iterable[bytes]:
        return self.stream.feed(chunk)

    def finish(self) -> Iterable[bytes]:
        return self.stream.finish()

    def fail(self, exc: TokenrelayError) -> Iterable[bytes]:
        return self.stream.fail(exc)

    def cancel(self) -> Iterable[bytes]:
        return self.stream.cancel()


class _StoredResponse:
    """The ``Recorder`` of a stored response: its start (if queued) and its outcome, written once
    it ends."""

    def __init__(
        self, store: ResponseStore, stream: ResponseStream, *, queued: bool = False
    ) -> None:
        self._store = store
        self._stream = stream
        self._queued = queued
        self._started: asyncio.Task[None] | None = None

    def opened(self) -> None:
        # Other replicas read a running response from the database: a queued one now runs.
        if self._queued:
            self._started = asyncio.create_task(self._mark_in_progress())

    async def _mark_in_progress(self) -> None:
        try:
            # Conditional: it never overwrites an end written first.
            await self._store.update(
                self._stream.id,
                status=ResponseStatus.IN_PROGRESS,
                if_status=(ResponseStatus.QUEUED,),
            )
        except Exception:
            logger.exception("saving response %s as in progress failed", self._stream.id)

    def feed(self, chunk: bytes) -> None:
        pass  # the response's state is the stream's own (``_ResponseEvents``)

    async def finish(self, status: MessageStatus, error: str | None) -> None:
        if self._started is not None:  # written before the outcome, never after it
            await asyncio.gather(self._started, return_exceptions=True)
        stream = self._stream
        if not stream.done:  # the provider's stream stopped without a word: a failure
            stream.fail({"message": error or "The answer ended unexpectedly."})
        final = stream.response()
        try:
            await self._store.update(
                stream.id,
                status=stream.status,
                output=final["output"],
                usage=stream.usage,
                error=stream.error,
                incomplete_reason=stream.incomplete_reason,
                completed_at=_utc(stream.completed_at),
            )
        except ResponseNotFound:
            pass  # deleted while it ran
        except Exception:
            logger.exception("saving response %s failed", stream.id)


def _utc(timestamp: int | None) -> datetime | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC)


@dataclass(frozen=True, slots=True)
class StartedResponse:
    """What ``create`` started: a whole Response object, or a generation to read."""

    response: dict[str, Any]
    generation: Generation | None = None
    stream: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    """The caller's rate-limit headers."""


class ResponseService:
    """Creates, finds, cancels and deletes responses; the routes only speak HTTP."""

    def __init__(self, store: ResponseStore, gateway: Gateway, *, ttl_days: float) -> None:
        self.store = store
        self.gateway = gateway
        self.generations = gateway.generations
        self._ttl = timedelta(days=ttl_days)
        self._streams: dict[str, ResponseStream] = {}  # running here, by response id
        self._owners: dict[str, str | None] = {}  # theirs, for the unstored ones among them
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # Responses whose process died (no live owner lease) would stay running forever.
        failed = await self.store.fail_orphans(self._owned, _ORPHANED)
        if failed:
            logger.warning("marked %d unfinished response(s) as failed", failed)
        self._sweeper = asyncio.create_task(self._expire_forever(), name="responses expiry")

    async def _owned(self, response_id: str) -> bool:
        state = self.generations.state
        return await state.holder(answer_lease(response_id)) is not None

    async def aclose(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)

    async def _expire_forever(self) -> None:
        """Stored responses are kept ``ttl_days``, never forever by accident."""
        while True:
            try:
                expired = await self.store.expire(self._ttl)
                if expired:
                    logger.info("expired %d stored response(s)", expired)
            except Exception:
                logger.exception("expiring stored responses failed")
            await asyncio.sleep(_EXPIRY_SWEEP_SECONDS)

    async def create(self, body: object, caller: Caller = OPERATOR) -> StartedResponse:
        """Validate, translate and start a response (see the module docstring)."""
        request = parse_request(body)
        provider = self.gateway.provider_for(caller, request.model)
        history: list[Any] = []
        if request.previous_response_id is not None:
            await self.store.require_owner(
                request.previous_response_id, caller.key_id, param="previous_response_id"
            )
            turns = await self.store.chain(request.previous_response_id)
            _refuse_running(turns)
            history = chain_items((turn.input_items, turn.response.output) for turn in turns)
        translation = translate(
            request, history=history, drop_unsupported_tools=_drops_unsupported_tools(provider)
        )
        response_id = new_id("resp")
        store = request.store is not False
        background = bool(request.background)
        streamed = bool(request.stream) or background
        body_out = dict(translation.body)
        if streamed:
            body_out["stream"] = True
            body_out["stream_options"] = {"include_usage": True}
        chat = ProviderRequest("chat/completions", request.model, body_out, orjson.dumps(body_out))
        admitted = await self.gateway.admit(caller, "responses", chat)
        stored = partial(
            self.store.create,
            response_id=response_id,
            model=request.model,
            fields=translation.fields,
            input_items=translation.input_items,
            status=ResponseStatus.QUEUED if background else ResponseStatus.IN_PROGRESS,
            background=background,
            previous_response_id=request.previous_response_id,
            owner=caller.key_id,
        )
        if not streamed:
            if store:
                await stored()
            whole = await self._whole(admitted, translation, response_id, store=store)
            return StartedResponse(whole, headers=admitted.headers)
        stream = ResponseStream(
            response_id, fields=translation.fields, tool_names=translation.tool_names
        )
        # Owned before it is stored as running: no replica's sweep may take it for a dead one's.
        lease = self.generations.lease(response_id) if store else contextlib.nullcontext()
        async with lease:
            if store:
                await stored()
            generation = await self.gateway.stream(
                admitted,
                opener=partial(_open_renamed, translation),
                grace=math.inf if background else 0.0,
                shape=_ResponseEvents(stream, queued=background),
                recorder=_StoredResponse(self.store, stream, queued=background) if store else None,
                leased=store,
                stream_id=response_id,
            )
        self._streams[response_id] = stream
        self._owners[response_id] = caller.key_id

        def ended(_: object) -> None:
            self._streams.pop(response_id, None)
            self._owners.pop(response_id, None)

        generation.task.add_done_callback(ended)
        return StartedResponse(
            stream.response(), generation, stream=bool(request.stream), headers=admitted.headers
        )

    async def _whole(
        self,
        admitted: Admitted,
        translation: ChatTranslation,
        response_id: str,
        *,
        store: bool,
    ) -> dict[str, Any]:
        try:
            completion = orjson.loads(await self.gateway.complete(admitted))
        except TokenrelayError as exc:
            exc.param = translation.param_for(exc.param)
            if store:
                stream = ResponseStream(response_id, fields=translation.fields)
                stream.fail(exc)
                await _StoredResponse(self.store, stream).finish(MessageStatus.ERROR, exc.message)
            raise
        response = response_from_completion(
            completion,
            response_id=response_id,
            fields=translation.fields,
            tool_names=translation.tool_names,
        )
        if store:
            await self.store.update(
                response_id,
                status=response["status"],
                output=response["output"],
                usage=response.get("usage"),
                incomplete_reason=(response.get("incomplete_details") or {}).get("reason"),
                completed_at=_utc(response.get("completed_at")),
            )
        return response

    async def require_owner(self, response_id: str, caller: Caller) -> None:
        """404 unless ``caller`` made the response (one running here unstored included)."""
        if response_id in self._owners:
            if self._owners[response_id] != caller.key_id:
                raise ResponseNotFound(response_id)
            return
        await self.store.require_owner(response_id, caller.key_id)

    async def get(self, response_id: str) -> dict[str, Any]:
        """The Response now: live from its stream if it runs here, else as stored."""
        stream = self._streams.get(response_id)
        if stream is not None:
            return stream.response()
        return response_from_record(await self.store.get(response_id))

    async def cancel(self, response_id: str) -> dict[str, Any]:
        """Stop a (background) response; it ends ``cancelled`` with its partial output."""
        record = await self.store.get(response_id)
        if record.status in (ResponseStatus.QUEUED, ResponseStatus.IN_PROGRESS):
            await self.generations.cancel(response_id)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_CANCEL_WAIT):
                    await self.generations.wait_ended(response_id)
        return response_from_record(await self.store.get(response_id))

    async def delete(self, response_id: str) -> dict[str, Any]:
        await self.store.delete(response_id)
        self._streams.pop(response_id, None)  # gone for a GET here at once, not when it ends
        await self.generations.cancel(response_id)  # here, or in the process running it
        return {"id": response_id, "object": "response.deleted", "deleted": True}


async def _open_renamed(
    translation: ChatTranslation, provider: Provider, chat: ProviderRequest
) -> AsyncGenerator[bytes, None]:
    """Open the chat stream; an error naming a chat parameter names the Responses one."""
    try:
        return await provider.open_stream(chat)
    except TokenrelayError as exc:
        exc.param = translation.param_for(exc.param)
        raise


def _refuse_running(turns: Iterable[ResponseTurn]) -> None:
    """A chain through a response still running would leave its answer out of the history."""
    for turn in turns:
        if turn.response.status in (ResponseStatus.QUEUED, ResponseStatus.IN_PROGRESS):
            raise InvalidRequest(
                f"Previous response with id '{turn.response.id}' is still {turn.response.status}; "
                "wait until it has ended (or cancel it).",
                param="previous_response_id",
            )


def _drops_unsupported_tools(provider: Provider) -> bool:
    """Only when every deployment that may answer would: the request is translated once."""
    members = provider.providers if isinstance(provider, Deployments) else (provider,)
    return all(
        isinstance(member, OpenAICompatibleProvider) and member.settings.drop_unsupported_tools
        for member in members
    )
