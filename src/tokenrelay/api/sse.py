"""Server-Sent Events: the one place that knows the wire format and how a stream ends.

``EventStreamResponse`` sends an async iterator of already-framed events (bytes ending in a blank
line) as they come, with three things a relay needs besides: a ``: ping`` comment when the stream
has been idle for a while (proxies close silent connections), a watcher that notices the client
leaving even while no bytes flow (so the upstream is closed at once, not at the next write), and
errors raised mid-stream turned into one ``data: {"error": ...}`` event before a clean end, which
is how OpenAI reports them and how the openai SDK expects them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Mapping
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from tokenrelay.errors import TokenrelayError
from tokenrelay.sse import PING, encode_event

__all__ = ["RAW_SEND", "SSE_HEADERS", "EventStreamResponse"]

logger = logging.getLogger(__name__)

RAW_SEND = "tokenrelay.raw_send"
"""Scope key under which the app keeps the server's own ``send`` (see ``EventStreamResponse``)."""

SSE_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
    "Connection": "keep-alive",
}


class EventStreamResponse(StreamingResponse):
    """Streams SSE bytes with heartbeat, disconnect detection and in-band errors."""

    media_type = "text/event-stream"

    def __init__(
        self,
        events: AsyncGenerator[bytes, None],
        *,
        ping_interval: float = 15.0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        # StreamingResponse's constructor sets no Content-Length, as a stream must not have one.
        super().__init__(events, headers={**SSE_HEADERS, **(headers or {})})
        self.events = events
        self.ping_interval = ping_interval
        self._last_write = 0.0
        self._client_gone = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The start goes through the middleware chain, so it knows a response has begun; the
        # body skips the chain's per-message wrappers (measured: a quarter of the relay's CPU
        # per chunk went to them) when the app left the server's own ``send`` in the scope.
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        send = scope.get(RAW_SEND, send)
        self._last_write = time.monotonic()
        relay = asyncio.current_task()
        assert relay is not None
        watcher = asyncio.create_task(self._watch(receive, send, relay))
        try:
            await self._relay(send)
        except asyncio.CancelledError:
            if not self._client_gone:
                raise  # not ours: the server is shutting down
            relay.uncancel()
        except OSError:  # the socket went away while writing
            self._client_gone = True
        finally:
            watcher.cancel()
        if not self._client_gone:
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _relay(self, send: Send) -> None:
        events = self.events
        try:
            async for chunk in events:
                # Set before awaiting: the watcher must see the stream as busy while we write.
                self._last_write = time.monotonic()
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except TokenrelayError as exc:
            await self._send_error(send, exc)
        except Exception:
            logger.exception("stream failed")
            await self._send_error(send, TokenrelayError("The stream failed unexpectedly."))
        finally:
            # Closing the events closes the upstream request; let nothing interrupt it.
            await asyncio.shield(events.aclose())

    async def _send_error(self, send: Send, exc: TokenrelayError) -> None:
        body = exc.to_dict()
        # OpenAI's streamed errors carry no HTTP status; keep ours for clients that want it.
        body["error"]["status"] = exc.status
        await send({"type": "http.response.body", "body": encode_event(body), "more_body": True})

    async def _watch(self, receive: Receive, send: Send, relay: asyncio.Task[Any]) -> None:
        """Cancel the relay the moment the client leaves; ping while the stream is idle.

        One task per stream does both, waking once per ``ping_interval`` at most: the relay
        itself pays nothing per chunk but a clock read.
        """
        while True:
            idle = time.monotonic() - self._last_write
            if idle >= self.ping_interval:
                self._last_write = time.monotonic()
                await send({"type": "http.response.body", "body": PING, "more_body": True})
                idle = 0.0
            try:
                message = await asyncio.wait_for(receive(), self.ping_interval - idle)
            except TimeoutError:
                continue
            if message["type"] == "http.disconnect":
                self._client_gone = True
                relay.cancel()
                return
