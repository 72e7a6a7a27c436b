"""The seam every call to a model passes through: the API's routes, the conversations, the
Responses API and the CLI alike.

``admit`` decides whether a call may go ahead and where to: the caller's key may use the model
(403), the model has a provider (404; several deployments fail over among themselves, see
``providers/deployments``), the key's limits have room (429, ``access/limits``); it returns the
rate-limit headers the answer carries. ``complete`` then gets a whole answer and ``stream`` starts
a ``Generation``; both account for it when it ends: metrics, the usage ledger (one row per call,
a client that left included) and the tokens the key's windows are charged.

A stream's usage is what the provider reports in its last chunk. A client that did not ask for
that chunk (``stream_options.include_usage``) gets it asked for anyway when usage is accounted
(or its key is limited), and stripped from what it reads (``WithoutUsage``: one more search per
chunk, a parse only of a chunk holding ``[]``), so every such stream is accounted for. Tokens
of a running stream are charged to its key's windows once a second, counted as log entries
(about one per token), and settled with the reported usage at the end: a long answer counts
against its key while it runs, and nothing is done per chunk.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta

import orjson

from tokenrelay import metrics
from tokenrelay.access.keys import Caller
from tokenrelay.access.limits import Limiter
from tokenrelay.access.usage import UsageLedger
from tokenrelay.chunks import (
    Usage,
    usage_in_answer,
    usage_in_stream,
)
from tokenrelay.errors import ModelNotAllowed, RateLimited
from tokenrelay.providers.base import Provider, ProviderRequest
from tokenrelay.providers.registry import ProviderRegistry
from tokenrelay.relay.generation import Generation, Recorder, Shape, WithoutUsage
from tokenrelay.relay.generations import Generations
from tokenrelay.storage.models import utcnow
from tokenrelay.storage.usage import UsageRow

__all__ = ["Admitted", "Gateway", "Opener"]

logger = logging.getLogger(__name__)

_BYTES_PER_TOKEN = 4
"""A request's prompt tokens, estimated from its size before the model has counted them."""
_METER_INTERVAL = 1.0

Opener = Callable[[Provider, ProviderRequest], Awaitable[AsyncGenerator[bytes, None]]]


def _prompt_estimate(request: ProviderRequest) -> int:
    return max(1, len(request.raw) // _BYTES_PER_TOKEN)


def _open(provider: Provider, request: ProviderRequest) -> Awaitable[AsyncGenerator[bytes, None]]:
    return provider.open_stream(request)


@dataclass(slots=True)
class Admitted:
    """A call the gateway let through: where it goes and what its answer carries."""

    caller: Caller
    route: str
    provider: Provider
    request: ProviderRequest
    headers: dict[str, str]
    """``x-ratelimit-*`` for a limited key; empty otherwise."""
    strip_usage: bool = False
    charged: int = 0
    """Tokens charged to the key's windows so far (at first, the prompt's estimate)."""
    charged_entries: int = field(default=0)
    began: float = field(default_factory=time.perf_counter)


class Gateway:
    """Admits calls to models, runs them, and accounts for them; see the module docstring."""

    def __init__(
        self,
        registry: ProviderRegistry,
        generations: Generations,
        *,
        limiter: Limiter | None = None,
        ledger: UsageLedger | None = None,
    ) -> None:
        self.registry = registry
        self.generations = generations
        self.limiter = limiter
        self.ledger = ledger
        self._metered: dict[Generation, Admitted] = {}
        self._meter: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.limiter is not None:
            self._meter = asyncio.create_task(self._meter_forever(), name="token meter")

    async def aclose(self) -> None:
        if self._meter is not None:
            self._meter.cancel()
            await asyncio.gather(self._meter, return_exceptions=True)

    def provider_for(self, caller: Caller, model: str) -> Provider:
        """The provider answering ``model`` for ``caller``: 403 if the key may not use it,
        404 if no provider serves it."""
        if caller.key is not None and not caller.key.may_use(model):
            raise ModelNotAllowed(model)
        return self.registry.resolve(model)

    async def admit(self, caller: Caller, route: str, request: ProviderRequest) -> Admitted:
        """Let a call through, or refuse it (403, 404, 429); see the module docstring."""
        provider = self.provider_for(caller, request.model)
        headers: dict[str, str] = {}
        charged = 0
        key = caller.key
        if key is not None and key.limited and self.limiter is not None:
            charged = _prompt_estimate(request)
            try:
                headers = await self.limiter.admit(key, charged)
            except RateLimited:
                self._record(
                    caller, route, request.model, provider, None, None, 0.0, "rate_limited"
                )
                raise
        strip = False
        accounted = self.ledger is not None or (key is not None and key.limited)
        if accounted and request.stream and request.endpoint in ("chat/completions", "completions"):
            request, strip = self._asking_usage(request)
        return Admitted(caller, route, provider, request, headers, strip, charged)

    def _asking_usage(self, request: ProviderRequest) -> tuple[ProviderRequest, bool]:
        """``request`` asking for usage in its stream, and whether its client did not.

        The client's bytes are kept as they are, with the option put first: an upstream gets
        every field as the client wrote it, and nothing is serialised again.
        """
        options = request.body.get("stream_options")
        if options is None and "stream_options" not in request.body:
            body = {**request.body, "stream_options": {"include_usage": True}}
            start = request.raw.index(b"{") + 1  # a JSON object, as the route checked
            raw = b'{"stream_options":{"include_usage":true},' + request.raw[start:]
            return ProviderRequest(request.endpoint, request.model, body, raw), True
        if not isinstance(options, dict) or options.get("include_usage") is True:
            return request, False  # asked already (or not ours to fix: the upstream says why)
        body = {**request.body, "stream_options": {**options, "include_usage": True}}
        return ProviderRequest(request.endpoint, request.model, body, orjson.dumps(body)), True

    async def complete(self, admitted: Admitted) -> bytes:
        """The whole answer, accounted for (a client that left while waiting included)."""
        status = "error"
        body: bytes | None = None
        try:
            body = await admitted.provider.complete(admitted.request)
            status = "complete"
            return body
        except asyncio.CancelledError:
            status = "stopped"
            raise
        finally:
            seconds = time.perf_counter() - admitted.began
            usage = usage_in_answer(body) if body is not None else None
            metrics.answer_ended(
                seconds, seconds if body is not None else None, usage, streamed=False
            )
            await self._settle(
                admitted,
                usage,
                seconds if body is not None else None,
                seconds,
                status,
                client_left=status == "stopped",
            )

    async def stream(
        self,
        admitted: Admitted,
        *,
        grace: float,
        shape: Shape | None = None,
        recorder: Recorder | None = None,
        leased: bool = False,
        stream_id: str | None = None,
        holding: Iterable[tuple[str, str]] = (),
        opener: Opener = _open,
    ) -> Generation:
        """Start the streamed answer as a ``Generation`` (see ``Generations.begin``)."""
        if shape is None and admitted.strip_usage:
            shape = WithoutUsage()

        async def ended(generation: Generation) -> None:
            self._metered.pop(generation, None)
            usage = usage_in_stream(*generation.last_chunks)
            first = generation.time_to_first_chunk
            metrics.answer_ended(generation.duration, first, usage, streamed=True)
            await self._settle(
                admitted,
                usage,
                first,
                generation.duration,
                str(generation.status),
                client_left=generation.client_left,
                entries=generation.entries,
            )

        admitted.began = time.perf_counter()
        generation = await self.generations.begin(
            lambda: opener(admitted.provider, admitted.request),
            grace=grace,
            shape=shape,
            recorder=recorder,
            leased=leased,
            stream_id=stream_id,
            holding=holding,
            on_end=ended,
        )
        metrics.stream_started()  # before ``ended`` can run: the answer's task has not yet
        key = admitted.caller.key
        if key is not None and key.limits_tokens and self.limiter is not None:
            self._metered[generation] = admitted
        return generation

    # Accounting.

    async def _settle(
        self,
        admitted: Admitted,
        usage: Usage | None,
        first_token: float | None,
        seconds: float,
        status: str,
        *,
        client_left: bool,
        entries: int = 0,
    ) -> None:
        """Write the call's usage row, and charge its key what its windows have not seen.

        Without reported usage (the answer was cut short), the prompt is estimated from the
        request's size and the answer from its log entries (the first holds no token), and the
        row says so.
        """
        estimated = usage is None and entries > 0
        if usage is None:  # nothing generated, nothing used (an error before the first byte)
            usage = (_prompt_estimate(admitted.request), entries - 1) if estimated else (0, 0)
        self._record(
            admitted.caller,
            admitted.route,
            admitted.request.model,
            admitted.provider,
            usage,
            first_token,
            seconds,
            status,
            client_left=client_left,
            estimated=estimated,
        )
        key = admitted.caller.key
        if key is None or self.limiter is None or not key.limits_tokens:
            return
        spent = sum(usage)
        owed = spent - admitted.charged
        admitted.charged = spent
        if owed > 0:
            try:
                await self.limiter.charge(key, owed)
            except Exception:  # Redis gone: the answer is not failed for it
                logger.exception("charging tokens to a key failed")

    def _record(
        self,
        caller: Caller,
        route: str,
        model: str,
        provider: Provider,
        usage: Usage | None,
        first_token: float | None,
        seconds: float,
        status: str,
        *,
        client_left: bool = False,
        estimated: bool = False,
    ) -> None:
        if self.ledger is None:
            return
        prompt, completion = usage if usage is not None else (0, 0)
        self.ledger.record(
            UsageRow(
                created_at=utcnow() - timedelta(seconds=seconds),
                key_id=caller.key_id,
                route=route,
                model=model,
                provider=provider.name,
                prompt_tokens=prompt,
                completion_tokens=completion,
                ttft_ms=round(first_token * 1000) if first_token is not None else None,
                duration_ms=round(seconds * 1000),
                status=status,
                client_left=client_left,
                estimated=estimated,
            )
        )

    async def _meter_forever(self) -> None:
        """Charge running streams' tokens to their keys, once a second (see the docstring)."""
        assert self.limiter is not None
        while True:
            await asyncio.sleep(_METER_INTERVAL)
            for generation, admitted in list(self._metered.items()):
                key = admitted.caller.key
                assert key is not None
                entries = generation.entries
                flowed = entries - admitted.charged_entries
                if flowed <= 0:
                    continue
                admitted.charged_entries = entries
                admitted.charged += flowed
                try:
                    await self.limiter.charge(key, flowed)
                except Exception:
                    logger.exception("charging tokens to a key failed")
