"""Which provider answers which model name.

Upstreams are asked in configuration order, the first that serves a name wins. The local model
answers its own name, and, when no upstream is configured at all, any name no one else serves:
a fresh install with no key answers whatever model an OpenAI client asks for.
"""

from __future__ import annotations

import asyncio
import logging

from tokenrelay.config import Settings
from tokenrelay.errors import ModelNotFound
from tokenrelay.providers.base import ModelCard, Provider
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
    ) -> None:
        self.providers = providers
        self.fallback = fallback
        self._default_model = default_model

    @classmethod
    def from_settings(cls, settings: Settings) -> ProviderRegistry:
        providers: list[Provider] = [
            OpenAICompatibleProvider(p) for p in settings.upstream_providers()
        ]
        fallback: Provider | None = None
        if settings.local.enabled:
            # Imported here: llama-cpp-python is only loaded when the local model is wanted.
            from tokenrelay.providers.local import LocalProvider

            local = LocalProvider(settings.local, data_dir=settings.resolved_data_dir())
            providers.insert(0, local)
            if len(providers) == 1:
                fallback = local
        return cls(providers, fallback=fallback, default_model=settings.default_model)

    def resolve(self, model: str) -> Provider:
        for provider in self.providers:
            if provider.serves(model):
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
