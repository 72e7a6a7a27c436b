"""The small protocol every model provider implements, upstream or local.

A provider turns one OpenAI-shaped request into either a whole JSON answer or a stream of
Server-Sent-Event bytes in OpenAI's chunk format. Streams are opened in two steps on purpose:
``open_stream`` waits until the provider has accepted the request (upstream answered 200, or a
local model slot was granted), so failures before the first byte still become a proper HTTP status;
after that, iteration yields bytes that each end on an event boundary (``\\n\\n``), ending with
``data: [DONE]``. A failure mid-stream is raised from iteration as a ``TokenrelayError``.
Closing the iterator (``aclose``) must stop the work at once: that is how a client leaving frees the
upstream connection or the local model.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Protocol, runtime_checkable

__all__ = ["ClosingStream", "Endpoint", "ModelCard", "Provider", "ProviderRequest"]

Endpoint = Literal["chat/completions", "completions"]
"""The OpenAI path (under ``/v1``) a request was made to."""

ModelCard = dict[str, Any]
"""One entry of ``GET /v1/models``: ``{"id", "object": "model", "created", "owned_by"}``."""


@dataclass(frozen=True, slots=True)
class ProviderRequest:
    """One request as the client sent it.

    ``body`` is the parsed JSON object (read it, never mutate it); ``raw`` is the exact bytes the
    client sent, which upstream providers forward unchanged so every field passes through.
    """

    endpoint: Endpoint
    model: str
    body: dict[str, Any]
    raw: bytes

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))


@runtime_checkable
class Provider(Protocol):
    """A source of completions. Built-in providers and any future plug-in share this interface."""

    name: str

    def serves(self, model: str) -> bool:
        """Whether requests naming ``model`` should be sent here."""
        ...

    def context_window(self, model: str) -> int:
        """How many tokens ``model`` reads at most, prompt and answer together."""
        ...

    async def list_models(self) -> list[ModelCard]:
        """The models this provider offers, for ``GET /v1/models``."""
        ...

    async def complete(self, request: ProviderRequest) -> bytes:
        """The whole answer as OpenAI's JSON response body (``stream`` false)."""
        ...

    async def open_stream(self, request: ProviderRequest) -> AsyncGenerator[bytes, None]:
        """Start a streamed answer; return once accepted. See the module docstring."""
        ...

    async def start(self) -> None:
        """Called once when the server starts: load what is configured to load eagerly."""
        ...

    async def aclose(self) -> None:
        """Release connections, threads and models."""
        ...


class ClosingStream(AsyncGenerator[bytes, None]):
    """A provider stream written as a class, whose ``_close`` stops the work behind it.

    An ``async def`` generator that never started runs no ``finally`` when closed, and a client
    may leave before the first chunk; a class can always stop its upstream request or its model.
    Subclasses implement ``__anext__`` (or ``asend``) and ``_close``.
    """

    __slots__ = ()

    def _close(self) -> None:
        raise NotImplementedError

    async def asend(self, value: None) -> bytes:
        return await self.__anext__()

    async def athrow(
        self,
        typ: type[BaseException] | BaseException,
        val: object = None,
        tb: TracebackType | None = None,
    ) -> bytes:
        self._close()
        if isinstance(typ, BaseException):
            raise typ
        raise typ() if val is None else typ(val)

    async def aclose(self) -> None:
        self._close()
