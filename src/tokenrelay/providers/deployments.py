"""Fail-over: a model name that several ``[[providers]]`` tables serve, tried in file order.

Each table serving a name is one of its *deployments*. The registry hands out a ``Deployments`` in
their place, itself a ``Provider``, so the API, the conversations, the Responses API and the CLI
fail over without knowing it.

Only a failure *before the first byte* moves on to the next deployment: ``open_stream`` and
``complete`` return only once an upstream answered 2xx, so whatever they raise has reached no
client. A stream, once returned, is the deployment's own, untouched (nothing is added per chunk);
a failure in it ends the client's answer with an error event and is never retried, because the
client already holds text that a second answer would contradict.

What fails over: no connection, a timeout, ``429`` and any 5xx as tokenrelay maps it (an upstream
refusing our key is a 502: another deployment's key may work). Any other 4xx is the request's
fault, the same everywhere, and is returned at once.

A deployment that fails ``failover_max_failures`` times in a row is skipped for
``failover_cooldown`` seconds. After that it is tried again: one success clears its count, one
more failure skips it again. When every deployment of a name is cooling down they are all tried
anyway, the soonest back first: a doubtful deployment may still answer, a skipped one never does.
The counts live in each process (a hint, not a contract): with several workers each learns alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from tokenrelay.errors import TokenrelayError
from tokenrelay.providers.base import ModelCard, Provider, ProviderRequest

__all__ = ["Deployment", "DeploymentPool", "Deployments"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_MAX_PAUSE = 2.0
"""Seconds between two deployments at most, however many failed before."""


@dataclass(slots=True, eq=False)
class Deployment:
    """One provider as a deployment, with its health: shared by every name it serves."""

    provider: Provider
    max_failures: int
    cooldown: float
    failures: int = 0
    """Failures before the first byte since its last answer."""
    cooling_until: float = 0.0
    """``time.monotonic()`` until which it is skipped."""

    def failed(self, now: float) -> bool:
        """Count one failure; whether it starts a cool-down that was not running already."""
        self.failures += 1
        if self.failures < self.max_failures:
            return False
        was_cooling = now < self.cooling_until
        self.cooling_until = now + self.cooldown
        return not was_cooling

    def answered(self) -> None:
        self.failures = 0
        self.cooling_until = 0.0


class Deployments:
    """Several deployments of one model name behind the ``Provider`` protocol.

    The member providers belong to the registry, which starts and closes them; this only
    chooses among them.
    """

    def __init__(self, deployments: Sequence[Deployment], *, backoff: float) -> None:
        self.deployments = tuple(deployments)
        self.name = "|".join(d.provider.name for d in self.deployments)
        self._backoff = backoff

    @property
    def providers(self) -> tuple[Provider, ...]:
        return tuple(d.provider for d in self.deployments)

    def serves(self, model: str) -> bool:
        return any(d.provider.serves(model) for d in self.deployments)

    def context_window(self, model: str) -> int:
        """The smallest: a conversation trimmed for it fits whichever deployment answers."""
        return min(d.provider.context_window(model) for d in self.deployments)

    async def list_models(self) -> list[ModelCard]:
        seen: set[str] = set()
        union: list[ModelCard] = []
        for deployment in self.deployments:
            for card in await deployment.provider.list_models():
                if card["id"] not in seen:
                    seen.add(card["id"])
                    union.append(card)
        return union

    async def complete(self, request: ProviderRequest) -> bytes:
        return await self._first_answer(lambda provider: provider.complete(request))

    async def open_stream(self, request: ProviderRequest) -> AsyncGenerator[bytes, None]:
        return await self._first_answer(lambda provider: provider.open_stream(request))

    async def start(self) -> None:
        """Nothing: the registry starts the member providers."""

    async def aclose(self) -> None:
        """Nothing: the registry closes the member providers."""

    def _order(self, now: float) -> list[Deployment]:
        """Those not cooling down, in file order; if none, all of them, the soonest back first."""
        ready = [d for d in self.deployments if d.cooling_until <= now]
        return ready or sorted(self.deployments, key=lambda d: d.cooling_until)

    async def _first_answer(self, ask: Callable[[Provider], Awaitable[T]]) -> T:
        """The first deployment's answer that came; a request error, or the last failure."""
        order = self._order(time.monotonic())
        for attempt, deployment in enumerate(order):
            try:
                answer = await ask(deployment.provider)
            except TokenrelayError as exc:
                if not _fails_over(exc):
                    raise  # the request's fault: it says nothing about the deployment
                if attempt == len(order) - 1:
                    self._note_failure(deployment, exc)
                    raise
                pause = min(self._backoff * 2**attempt, _MAX_PAUSE)
                self._note_failure(deployment, exc, next_one=order[attempt + 1], pause=pause)
                await asyncio.sleep(pause)
                continue
            deployment.answered()
            return answer
        raise AssertionError("a model's deployments are never empty")

    def _note_failure(
        self,
        deployment: Deployment,
        exc: TokenrelayError,
        *,
        next_one: Deployment | None = None,
        pause: float = 0.0,
    ) -> None:
        """Count a failure against ``deployment`` and log it: names and statuses, never a key
        (nor the upstream's message, which the error itself carries to the client)."""
        name = deployment.provider.name
        reason = f"{type(exc).__name__} {exc.status}"
        if deployment.failed(time.monotonic()):
            logger.warning(
                "deployment %s failed %d times in a row; skipped for %g s",
                name,
                deployment.failures,
                deployment.cooldown,
            )
        if next_one is not None:
            logger.warning(
                "deployment %s failed before the first byte (%s); failing over to %s in %g s",
                name,
                reason,
                next_one.provider.name,
                pause,
            )
        else:
            logger.warning(
                "deployment %s failed before the first byte (%s); no deployment left", name, reason
            )


class DeploymentPool:
    """The ``[[providers]]`` tables as deployments: which serve a name, and their health.

    One ``Deployments`` is kept per set of tables that serve some name, so health is shared and
    nothing is built per request; client-chosen names cannot grow this beyond the sets the
    configured patterns can form.
    """

    def __init__(self, deployments: Sequence[Deployment], *, backoff: float) -> None:
        self._deployments = tuple(deployments)
        self._ids = {id(d.provider) for d in self._deployments}
        self._backoff = backoff
        self._groups: dict[tuple[int, ...], Deployments] = {}

    def __contains__(self, provider: Provider) -> bool:
        return id(provider) in self._ids

    def resolve(self, model: str) -> Provider | None:
        """The one table serving ``model``, a ``Deployments`` of several, or ``None``."""
        serving = tuple(i for i, d in enumerate(self._deployments) if d.provider.serves(model))
        if len(serving) <= 1:
            return self._deployments[serving[0]].provider if serving else None
        group = self._groups.get(serving)
        if group is None:
            members = [self._deployments[i] for i in serving]
            group = self._groups[serving] = Deployments(members, backoff=self._backoff)
        return group


def _fails_over(exc: TokenrelayError) -> bool:
    """Whether another deployment might answer: the upstream's trouble, not the request's."""
    return exc.status == 429 or exc.status >= 500
