"""Which provider answers which model name.

The local model answers its own name. Otherwise every ``[[providers]]`` table whose ``models``
match a name is one of its deployments, asked in file order with fail-over before the first byte
(``deployments``); the ``openai`` provider implied by ``OPENAI_API_KEY`` answers only names no
table serves, and is never a fail-over target (a key in the environment must not send prompts
meant for your own server to OpenAI). When no upstream is configured at all, the local model
answers any name: a fresh install with no key answers whatever model an OpenAI client asks for.
"""

from __future__ import annotations

import asyncio
import logging

from tokenrelay.config import Settings
from tokenrelay.errors import ModelNotFound
from tokenrelay.providers.base import ModelCard, Provider
from tokenrelay.providers.deployments import Deployment, DeploymentPool
from tokenrelay.providers.openai_compat import OpenAICompatibleProvider

__all__ = ["ProviderRegistry"]

logger = logging.getLogger(__name__)


class ProviderRegistry:
    """Owns every provider for the life of the app."""

    def __init__(
        self,
        providers: list[Provider],
        *,
        fallback: Provider | None = None,
        default_model: str | None = None,
        deployments: DeploymentPool | None = None,
    ) -> None:
        self.providers = providers
        self.fallback = fallback
        self._default_model = default_model
        self._deployments = deployments or DeploymentPool((), backoff=0.0)

    @classmethod
    def from_settings(cls, settings: Settings) -> ProviderRegistry:
        upstreams = [OpenAICompatibleProvider(p) for p in settings.upstream_providers()]
        # The tables come first; the implied `openai` provider, if any, after them.
        tables = upstreams[: len(settings.providers)]
        deployments = DeploymentPool(
            [
                Deployment(
                    p,
                    max_failures=p.settings.failover_max_failures,
                    cooldown=p.settings.failover_cooldown,
                )
                for p in tables
            ],
            backoff=settings.failover_backoff,
        )
        providers: list[Provider] = list(upstreams)
        fallback: Provider | None = None
        if settings.local.enabled:
            # Imported here: llama-cpp-python is only loaded when the local model is wanted.
            from tokenrelay.providers.local import LocalProvider

            local = LocalProvider(settings.local, data_dir=settings.resolved_data_dir())
            providers.insert(0, local)
            if len(providers) == 1:
                fallback = local
        return cls(
            providers,
            fallback=fallback,
            default_model=settings.default_model,
            deployments=deployments,
        )

    def resolve(self, model: str) -> Provider:
        """The provider for ``model``: with several deployments, one that fails over among them."""
        for provider in self.providers:
            if provider.serves(model):
                if provider in self._deployments:
                    return self._deployments.resolve(model) or provider
                return provider
        if self.fallback is not None:
            return self.fallback
        raise ModelNotFound(model)

    async def default_model(self) -> str:
        """The model used when a request names none: the configured one, else the first listed."""
        if self._default_model is not None:
            return self._default_model
        models = await self.list_models()
        if not models:
            raise ModelNotFound("(none)")
        return str(models[0]["id"])

    async def list_models(self) -> list[ModelCard]:
        """Every provider's models, first listing first; a provider that fails is skipped."""
        listed = await asyncio.gather(
            *(p.list_models() for p in self.providers), return_exceptions=True
        )
        seen: set[str] = set()
        union: list[ModelCard] = []
        for provider, cards in zip(self.providers, listed, strict=True):
            if isinstance(cards, BaseException):
                if not isinstance(cards, Exception):  # cancellation: not a provider's fault
                    raise cards
                # Only the type: the text of an unexpected error may quote what the upstream sent.
                logger.warning(
                    "provider %s: could not list models (%s)", provider.name, type(cards).__name__
                )
                continue
            for card in cards:
                if card["id"] not in seen:
                    seen.add(card["id"])
                    union.append(card)
        return union

    async def start(self) -> None:
        """Load what is configured to load eagerly (the local model with ``load = "eager"``)."""
        for provider in self.providers:
            await provider.start()

    async def aclose(self) -> None:
        for provider in self.providers:
            await provider.aclose()
