"""Any OpenAI-compatible HTTP API (OpenAI, Azure OpenAI, vLLM, llama.cpp server, Ollama ...).

One pooled ``aiohttp`` session per provider. Requests are forwarded as the client's exact bytes,
and streamed answers go back as the upstream's bytes: measured on one core at 500 streams, this
keeps 0.94-0.97x of direct throughput where the openai SDK's parsed streaming keeps 0.23-0.70x.

The upstream is not trusted (see ``_upstream_stream`` and ``_upstream_text``): redirects are never
followed (a 307 would re-send the prompt and the key to another host), an answer must have the
status and content type asked for, bodies are read with a bound and never decompressed (tokenrelay
asks for ``identity``; a compressed body could inflate a thousandfold), and every string passed on
from an error is scrubbed of keys.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import time
from collections.abc import AsyncGenerator
from typing import Any

import aiohttp
import orjson

from tokenrelay import metrics
from tokenrelay.config import ProviderSettings
from tokenrelay.errors import (
    TokenrelayError,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from tokenrelay.providers._upstream_stream import StreamRules, UpstreamEvents
from tokenrelay.providers._upstream_text import Scrubber
from tokenrelay.providers.base import ModelCard, ProviderRequest

__all__ = ["OpenAICompatibleProvider"]

logger = logging.getLogger(__name__)

_MODELS_TTL = 60.0
_MAX_ERROR_BODY = 64 * 1024
"""Bytes of an upstream's error answer read at most: its message is all we keep."""
_JSON = "application/json"
_EVENT_STREAM = "text/event-stream"


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
        self._scrubber = Scrubber(self._api_key)
        self._stream_rules = StreamRules(
            provider=self.name,
            scrubber=self._scrubber,
            on_transport_error=lambda exc: self._transport_error(exc, mid_stream=True),
            read_timeout=settings.read_timeout,
            max_event_bytes=settings.max_event_bytes,
            max_response_bytes=settings.max_response_bytes,
        )
        self._session: aiohttp.ClientSession | None = None
        self._models_cache: tuple[float, list[ModelCard]] | None = None

    def _auth_headers(self) -> dict[str, str]:
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            # Never a compressed body: see the module docstring.
            "Accept-Encoding": "identity",
        }
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
            # `total` bounds a whole answer, body included, at no cost per chunk.
            timeout = aiohttp.ClientTimeout(
                total=self.settings.max_request_seconds,
                connect=self.settings.connect_timeout,
                sock_read=self.settings.read_timeout,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=timeout,
                headers=self._headers,
                auto_decompress=False,
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    def serves(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self._patterns)

    def context_window(self, model: str) -> int:
        return self.settings.context_window

    # -- models ------------------------------------------------------------------------------

    async def list_models(self) -> list[ModelCard]:
        """Configured names; a provider that serves any name (a pattern) asks the upstream.

        An upstream that cannot list its models is logged and skipped (its exact names are still
        listed): one broken provider never breaks ``/v1/models`` for the others.
        """
        exact = [p for p in self._patterns if not any(c in p for c in "*?[")]
        if len(exact) == len(self._patterns):
            return [_card(name, self.name) for name in exact]
        now = time.monotonic()
        if self._models_cache and now - self._models_cache[0] < _MODELS_TTL:
            return self._models_cache[1]
        try:
            listed = await self._fetch_models()
        except TokenrelayError as exc:
            metrics.upstream_error(self.name)
            logger.warning("provider %s: could not list models: %s", self.name, exc.message)
            listed = []
        names = {card["id"] for card in listed}
        cards = [card for card in listed if self.serves(card["id"])]
        cards += [_card(name, self.name) for name in exact if name not in names]
        self._models_cache = (now, cards)
        return cards

    async def _fetch_models(self) -> list[ModelCard]:
        try:
            async with self.session.get(
                f"{self._base_url}/models",
                params=self._params,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=self.settings.connect_timeout),
            ) as resp:
                await self._check_status(resp)
                body = await self._read_answer(resp)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._transport_error(exc) from None
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise self._invalid("answered /models with a body that is not JSON") from None
        listed = data.get("data") if isinstance(data, dict) else None
        if not isinstance(listed, list):
            raise self._invalid("answered /models without a list of models")
        return [card for item in listed if (card := self._model_card(item)) is not None]

    def _model_card(self, item: object) -> ModelCard | None:
        """The fields of a listed model that clients read, rebuilt; ``None`` if unusable."""
        if not isinstance(item, dict):
            return None
        model = item.get("id")
        if not isinstance(model, str) or not model or self._scrubber.text(model) != model:
            return None
        created = item.get("created")
        owner = self._scrubber.field(item.get("owned_by")) or self.name
        return {
            "id": model,
            "object": "model",
            "created": created if isinstance(created, int) and not isinstance(created, bool) else 0,
            "owned_by": owner,
        }

    # -- answers -----------------------------------------------------------------------------

    async def complete(self, request: ProviderRequest) -> bytes:
        try:
            return await self._complete(request)
        except TokenrelayError:
            metrics.upstream_error(self.name)
            raise

    async def open_stream(self, request: ProviderRequest) -> AsyncGenerator[bytes, None]:
        """Errors after this returns are counted by the stream (``_upstream_stream``)."""
        try:
            return await self._open_stream(request)
        except TokenrelayError:
            metrics.upstream_error(self.name)
            raise

    async def _complete(self, request: ProviderRequest) -> bytes:
        resp = await self._post(request)
        try:
            self._check_content_type(resp, _JSON)
            body = await self._read_answer(resp)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._transport_error(exc) from None
        finally:
            resp.release()
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise self._invalid("answered with a body that is not JSON") from None
        if not isinstance(answer, dict):
            raise self._invalid("answered with JSON that is not an object")
        if "error" in answer and "choices" not in answer:  # an error dressed as a success
            raise self._error_from(502, body, resp.headers)
        return body

    async def _open_stream(self, request: ProviderRequest) -> AsyncGenerator[bytes, None]:
        resp = await self._post(request)
        try:
            await self._check_stream(resp)
        except (aiohttp.ClientError, TimeoutError) as exc:
            resp.close()
            raise self._transport_error(exc) from None
        except BaseException:
            resp.close()
            raise
        return UpstreamEvents(resp, self._stream_rules)

    async def _post(self, request: ProviderRequest) -> aiohttp.ClientResponse:
        """Send the client's bytes; return the response once the upstream answered 2xx."""
        url = f"{self._base_url}/{request.endpoint}"
        try:
            resp = await self.session.post(
                url, data=request.raw, params=self._params, allow_redirects=False
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._transport_error(exc) from None
        try:
            await self._check_status(resp)
        except (aiohttp.ClientError, TimeoutError) as exc:
            resp.close()
            raise self._transport_error(exc) from None
        except BaseException:
            resp.close()
            raise
        return resp

    # -- checks on what came back -----------------------------------------------------------

    async def _check_status(self, resp: aiohttp.ClientResponse) -> None:
        """Raise unless ``resp`` is a 2xx that may carry an answer; the caller closes ``resp``.

        An error's body is read (bounded) for its message; a redirect's never is.
        """
        status = resp.status
        if 300 <= status < 400:
            # Never followed, and its body never read: it may point anywhere, internal included.
            logger.warning("provider %s answered a redirect (%s); not followed", self.name, status)
            raise UpstreamError(
                f"The upstream provider '{self.name}' answered with a redirect ({status}), "
                "which tokenrelay does not follow.",
                status=502,
                type="upstream_error",
                code="upstream_redirect",
            )
        if status < 200 or status in (204, 205):  # 101 Switching Protocols, No Content ...
            raise self._invalid(f"answered {status}, which is not an answer")
        if status >= 400:
            body = b""
            if _identity(resp):  # a compressed message is left unread; the status still counts
                body, _ = await self._read_capped(resp, _MAX_ERROR_BODY)
            raise self._error_from(status, body, resp.headers)
        if not _identity(resp):
            encoding = self._scrubber.field(resp.headers.get("Content-Encoding"), 40)
            raise self._invalid(
                f"answered with a compressed body ({encoding}) although tokenrelay asks for none"
            )

    async def _check_stream(self, resp: aiohttp.ClientResponse) -> None:
        """Raise unless ``resp`` (a 2xx) is an event stream with a body."""
        if resp.content_type == _JSON:
            # An error sent as a 2xx JSON body (some servers do): keep what it says.
            body, _ = await self._read_capped(resp, _MAX_ERROR_BODY)
            if b'"error"' in body:
                raise self._error_from(502, body, resp.headers)
        self._check_content_type(resp, _EVENT_STREAM)
        if resp.content_length == 0:
            raise self._invalid("answered with an empty body")

    def _check_content_type(self, resp: aiohttp.ClientResponse, expected: str) -> None:
        content_type = resp.content_type  # lower-cased, parameters dropped
        if content_type == expected:
            return
        if expected == _JSON and (
            content_type.endswith("+json") or "Content-Type" not in resp.headers
        ):
            return  # JSON is checked by parsing it
        shown = self._scrubber.field(content_type, 80)
        raise self._invalid(f"answered with content type {shown} instead of {expected}")

    async def _read_answer(self, resp: aiohttp.ClientResponse) -> bytes:
        """A whole (unstreamed) body, refused when empty or over ``max_response_bytes``."""
        limit = self.settings.max_response_bytes
        whole = resp.content_length is None or resp.content_length <= limit
        if whole:
            body, whole = await self._read_capped(resp, limit)
        if not whole:
            logger.warning("provider %s sent an answer over max_response_bytes", self.name)
            raise UpstreamError(
                f"The upstream provider '{self.name}' sent an answer larger than tokenrelay "
                "accepts (`max_response_bytes`).",
                status=502,
                type="upstream_error",
                code="upstream_response_too_large",
            )
        if not body.strip():
            raise self._invalid("answered with an empty body")
        return body

    @staticmethod
    async def _read_capped(resp: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
        """The body's first ``limit`` bytes at most, and whether that was all of it."""
        parts: list[bytes] = []
        size = 0
        async for part in resp.content.iter_any():
            if size + len(part) > limit:
                parts.append(part[: limit - size])
                return b"".join(parts), False
            parts.append(part)
            size += len(part)
        return b"".join(parts), True

    def _invalid(self, what: str) -> UpstreamError:
        """The upstream answered something that is not an answer: a 502 naming it."""
        logger.warning("provider %s %s", self.name, what)
        return UpstreamError(
            f"The upstream provider '{self.name}' {what}.",
            status=502,
            type="upstream_error",
            code="upstream_invalid_response",
        )

    def _transport_error(self, exc: BaseException, *, mid_stream: bool = False) -> TokenrelayError:
        where = "stopped in the middle of the answer" if mid_stream else "could not be reached"
        if isinstance(exc, TimeoutError | asyncio.TimeoutError | aiohttp.ServerTimeoutError):
            logger.warning("provider %s timed out (%s)", self.name, type(exc).__name__)
            return UpstreamTimeout(f"The upstream provider '{self.name}' did not answer in time.")
        logger.warning("provider %s %s (%s)", self.name, where, type(exc).__name__)
        return UpstreamUnavailable(f"The upstream provider '{self.name}' {where}.")

    def _error_from(self, status: int, body: bytes, headers: Any) -> UpstreamError:
        """Map an upstream error answer to ours, keeping its fields but never a key."""
        message, type_, param, code = self._scrubber.error_fields(body)
        message = message or f"The upstream provider '{self.name}' answered {status}."
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
            if retry_after := self._scrubber.field(headers.get("Retry-After"), 40):
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

    async def start(self) -> None:
        """Nothing to prepare: the connection pool is made on first use."""

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _identity(resp: aiohttp.ClientResponse) -> bool:
    """Whether the body is sent as it is (tokenrelay never decompresses: see the docstring)."""
    return resp.headers.get("Content-Encoding", "identity").strip().lower() in ("", "identity")


def _card(model: str, owner: str) -> ModelCard:
    return {"id": model, "object": "model", "created": 0, "owned_by": owner}
