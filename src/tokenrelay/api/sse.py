"""Server-Sent Events: the one place that knows the wire format and how a stream ends.

``EventStreamResponse`` sends an async iterator of already-framed events (bytes ending in a blank
line) as they come, with three things a relay needs besides: a ``: ping`` comment when the stream
has been idle for a while (proxies close silent connections), a watcher that notices the client
leaving even while no bytes flow (so the upstream is closed at once, not at the next write), and
errors raised mid-stream turned into one ``data: {"error": ...}`` event before a clean end, which
is how OpenAI reports them and how the openai SDK expects them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Mapping

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from tokenrelay.errors import TokenrelayError
from tokenrelay.sse import PING, encode_event

__all__ = ["SSE_HEADERS", "EventStreamResponse"]

logger = logging.getLogger(__name__)

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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        self._last_write = time.monotonic()
        client_gone = False
        async with anyio.create_task_group() as tasks:

            async def watch_disconnect() -> None:
                nonlocal client_gone
                while (await receive())["type"] != "http.disconnect":
                    pass
                client_gone = True
                tasks.cancel_scope.cancel()

            tasks.start_soon(watch_disconnect)
            tasks.start_soon(self._heartbeat, send)
            try:
                await self._relay(send)
            except OSError:  # the socket went away while writing
                client_gone = True
            tasks.cancel_scope.cancel()
        if not client_gone:
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _relay(self, send: Send) -> None:
        events = self.events
        try:
            async for chunk in events:
                # Set before awaiting: the heartbeat must see the stream as busy while we write.
                self._last_write = time.monotonic()
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except TokenrelayError as exc:
            await self._send_error(send, exc)
        except anyio.get_cancelled_exc_class():
            raise
        except Exception:
            logger.exception("stream failed")
            await self._send_error(send, TokenrelayError("The stream failed unexpectedly."))
        finally:
            with anyio.CancelScope(shield=True):
                await events.aclose()

    async def _send_error(self, send: Send, exc: TokenrelayError) -> None:
        body = exc.to_dict()
        # OpenAI's streamed errors carry no HTTP status; keep ours for clients that want it.
        body["error"]["status"] = exc.status
        await send({"type": "http.response.body", "body": encode_event(body), "more_body": True})

    async def _heartbeat(self, send: Send) -> None:
        while True:
            idle = time.monotonic() - self._last_write
            if idle >= self.ping_interval:
                self._last_write = time.monotonic()
                await send({"type": "http.response.body", "body": PING, "more_body": True})
                idle = 0.0
            await anyio.sleep(self.ping_interval - idle)
