"""Any OpenAI-compatible HTTP API (OpenAI, Azure OpenAI, vLLM, llama.cpp server, Ollama ...).

One pooled ``aiohttp`` session per provider. Requests are forwarded as the client's exact bytes,
and streamed answers go back as the upstream's bytes: measured on one core at 500 streams, this
keeps 0.94-0.97x of direct throughput where the openai SDK's parsed streaming keeps 0.23-0.70x.
The only per-chunk work is keeping the output aligned to SSE event boundaries, so a heartbeat or
an error event can never land inside an upstream event.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import re
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

import aiohttp
import orjson

from tokenrelay.config import ProviderSettings
from tokenrelay.errors import (
    TokenrelayError,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from tokenrelay.providers.base import ClosingStream, ModelCard, ProviderRequest

__all__ = ["OpenAICompatibleProvider"]

logger = logging.getLogger(__name__)

_EVENT_END = (b"\n\n", b"\r\n\r\n")
_KEY_LIKE = re.compile(r"\b(sk|rk|pk)-[A-Za-z0-9_\-*.]{6,}")
_MODELS_TTL = 60.0


class OpenAICompatibleProvider:
    """Relays requests to one OpenAI-compatible upstream."""

    def __init__(self, settings: ProviderSettings) -> None:
        self.settings = settings
        self.name = settings.name
        self._base_url = settings.base_url.rstrip("/")
        self._api_key = settings.resolved_api_key()
        self._patterns = settings.models
        self._headers = self._auth_headers()
        self._params = (
            {"api-version": settings.azure_api_version} if settings.azure_api_version else None
        )
        self._session: aiohttp.ClientSession | None = None
        self._models_cache: tuple[float, list[ModelCard]] | None = None

    def _auth_headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        s = self.settings
        if self._api_key:
            if s.azure_api_version:
                headers["api-key"] = self._api_key
            else:
                headers["Authorization"] = f"Bearer {self._api_key}"
        if s.organization:
            headers["OpenAI-Organization"] = s.organization
        if s.project:
            headers["OpenAI-Project"] = s.project
        return headers

    @property
    def session(self) -> aiohttp.ClientSession:
        # Created on first use so it binds to the running event loop (uvicorn's, not import time's).
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self.settings.max_connections, ttl_dns_cache=300, enable_cleanup_closed=True
            )
            timeout = aiohttp.ClientTimeout(
                total=None,
                connect=self.settings.connect_timeout,
                sock_read=self.settings.read_timeout,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=timeout,
                headers=self._headers,
                auto_decompress=True,
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    def serves(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self._patterns)

    def context_window(self, model: str) -> int:
        return self.settings.context_window

    async def list_models(self) -> list[ModelCard]:
        """Configured names; a provider that serves any name (a pattern) asks the upstream."""
        exact = [p for p in self._patterns if not any(c in p for c in "*?[")]
        if len(exact) == len(self._patterns):
            return [_card(name, self.name) for name in exact]
        now = time.monotonic()
        if self._models_cache and now - self._models_cache[0] < _MODELS_TTL:
            return self._models_cache[1]
        try:
            listed = await self._fetch_models()
        except TokenrelayError as exc:
            logger.warning("provider %s: could not list models: %s", self.name, exc.message)
            listed = []
        names = {card.get("id") for card in listed}
        cards = [card for card in listed if self.serves(str(card.get("id")))]
        cards += [_card(name, self.name) for name in exact if name not in names]
        self._models_cache = (now, cards)
        return cards

    async def _fetch_models(self) -> list[ModelCard]:
        try:
            async with self.session.get(
                f"{self._base_url}/models",
                params=self._params,
                timeout=aiohttp.ClientTimeout(total=self.settings.connect_timeout),
            ) as resp:
                body = await resp.read()
                if resp.status != 200:
                    raise self._error_from(resp.status, body, resp.headers)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._transport_error(exc) from None
        data = orjson.loads(body).get("data")
        return [card for card in data if isinstance(card, dict)] if isinstance(data, list) else []

    async def complete(self, request: ProviderRequest) -> bytes:
        resp = await self._post(request)
        try:
            return await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._transport_error(exc) from None
        finally:
            resp.release()

    async def open_stream(self, request: ProviderRequest) -> AsyncGenerator[bytes, None]:
        resp = await self._post(request)
        return _UpstreamEvents(resp, self._transport_error)

    async def _post(self, request: ProviderRequest) -> aiohttp.ClientResponse:
        """Send the client's bytes; return the response once the upstream answered 2xx."""
        url = f"{self._base_url}/{request.endpoint}"
        try:
            resp = await self.session.post(url, data=request.raw, params=self._params)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._transport_error(exc) from None
        if resp.status >= 300:
            try:
                body = await resp.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise self._transport_error(exc) from None
            finally:
                resp.release()
            raise self._error_from(resp.status, body, resp.headers)
        return resp

    def _transport_error(self, exc: BaseException, *, mid_stream: bool = False) -> TokenrelayError:
        where = "stopped in the middle of the answer" if mid_stream else "could not be reached"
        if isinstance(exc, TimeoutError | asyncio.TimeoutError | aiohttp.ServerTimeoutError):
            logger.warning("provider %s timed out (%s)", self.name, type(exc).__name__)
            return UpstreamTimeout(f"The upstream provider '{self.name}' did not answer in time.")
        logger.warning("provider %s %s (%s)", self.name, where, type(exc).__name__)
        return UpstreamUnavailable(f"The upstream provider '{self.name}' {where}.")

    def _error_from(self, status: int, body: bytes, headers: Any) -> UpstreamError:
        """Map an upstream error answer to ours, keeping its message but never a key."""
        message, type_, param, code = _parse_error(body)
        message = self._scrub(message) or f"The upstream provider '{self.name}' answered {status}."
        extra: dict[str, str] = {}
        if status in (401, 403):
            # The key at fault is tokenrelay's, not the client's: a gateway problem.
            our_status, type_ = 502, "upstream_error"
            code = code or "upstream_authentication_failed"
            message = (
                f"The upstream provider '{self.name}' refused tokenrelay's credentials: {message}"
            )
        elif status == 429:
            our_status = 429
            if retry_after := headers.get("Retry-After"):
                extra["Retry-After"] = retry_after
        elif status in (400, 404, 409, 413, 422):
            our_status = status
        elif status == 504:
            our_status = 504
        elif status >= 500:
            our_status = 502 if status != 503 else 503
        else:
            our_status = 502
        logger.info("provider %s answered %s", self.name, status)
        return UpstreamError(
            message, status=our_status, type=type_, param=param, code=code, headers=extra
        )

    def _scrub(self, text: str) -> str:
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return _KEY_LIKE.sub("***", text)

    async def start(self) -> None:
        """Nothing to prepare: the connection pool is made on first use."""

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _parse_error(body: bytes) -> tuple[str, str | None, str | None, str | None]:
    """Read OpenAI's error shape (or a plain ``{"error": "text"}``, as some servers send)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:500].decode("utf-8", "replace").strip(), None, None, None
    error = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(error, str):
        return error, None, None, None
    if not isinstance(error, dict):
        return "", None, None, None

    def text(key: str) -> str | None:
        value = error.get(key)
        return str(value) if value is not None else None

    return text("message") or text("detail") or "", text("type"), text("param"), text("code")


def _card(model: str, owner: str) -> ModelCard:
    return {"id": model, "object": "model", "created": 0, "owned_by": owner}


class _UpstreamEvents(ClosingStream):
    """The upstream's streamed bytes, cut so that every piece ends on an SSE event boundary.

    Upstreams almost always send one event per read, so the common case returns the bytes as
    they came, with no copy. Closing it closes the upstream response, even before the first read
    (see ``ClosingStream``): that is what stops the upstream when a client leaves early.
    """

    __slots__ = ("_chunks", "_on_error", "_pending", "_resp")

    def __init__(
        self,
        resp: aiohttp.ClientResponse,
        on_error: Callable[..., TokenrelayError],
    ) -> None:
        self._resp = resp
        self._chunks = resp.content.iter_any()
        self._pending = b""
        self._on_error = on_error

    async def __anext__(self) -> bytes:
        try:
            while True:
                try:
                    data = await self._chunks.__anext__()
                except StopAsyncIteration:
                    self._resp.release()  # read to the end: the connection goes back to the pool
                    tail, self._pending = self._pending, b""
                    if tail.strip():  # an upstream that ended without a blank line
                        return tail + b"\n\n"
                    raise
                if self._pending:
                    data, self._pending = self._pending + data, b""
                if not data.endswith(_EVENT_END):
                    lf, crlf = data.rfind(b"\n\n"), data.rfind(b"\r\n\r\n")
                    cut = max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)
                    if cut == 0:  # no boundary yet: wait for more bytes
                        self._pending = data
                        continue
                    data, self._pending = data[:cut], data[cut:]
                return data
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._resp.close()
            raise self._on_error(exc, mid_stream=True) from None
        except StopAsyncIteration:
            raise
        except BaseException:  # cancellation (the client left), anything else: drop the connection
            self._resp.close()
            raise

    def _close(self) -> None:
        self._resp.close()
