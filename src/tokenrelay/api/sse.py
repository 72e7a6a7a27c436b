"""Server-Sent Events: how a connection reads an answer's event log.

``EventStreamResponse`` sends the entries of one stream's log (``tokenrelay.streams``) as they
come, each led by its ``id: <stream id>:<seq>`` line so that a client that drops can resume with
``Last-Event-ID``, and names the stream in ``X-Tokenrelay-Stream``. Besides, it does what a relay
needs: a ``: ping`` comment when the stream has been idle a while (proxies close silent
connections), and a watcher that notices the client leaving even while no bytes flow, so the
reader detaches at once (for a plain ``/v1`` request that cancels the answer and closes the
upstream). An error while reading (the log's store failing) becomes one ``data: {"error": ...}``
event before a clean end, which is how OpenAI reports errors mid-stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from tokenrelay.errors import TokenrelayError
from tokenrelay.relay.generation import Reader, error_event
from tokenrelay.sse import PING, event_id_prefix

__all__ = ["RAW_SEND", "SSE_HEADERS", "STREAM_HEADER", "EventStreamResponse"]

logger = logging.getLogger(__name__)

RAW_SEND = "tokenrelay.raw_send"
"""Scope key under which the app keeps the server's own ``send`` (see ``EventStreamResponse``)."""

STREAM_HEADER = "X-Tokenrelay-Stream"
"""Names the stream a response reads, for ``GET /api/streams/{id}`` after a drop."""

SSE_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
    "Connection": "keep-alive",
}


class EventStreamResponse(StreamingResponse):
    """Streams one log's entries with ids, heartbeat, disconnect detection and in-band errors."""

    media_type = "text/event-stream"

    def __init__(
        self,
        stream_id: str,
        entries: AsyncIterator[tuple[int, bytes]],
        *,
        reader_of: Reader | None = None,
        preamble: bytes = b"",
        ping_interval: float = 15.0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        # StreamingResponse's constructor sets no Content-Length, as a stream must not have one.
        # The body is sent by ``__call__`` below, from ``entries``.
        super().__init__((), headers={**SSE_HEADERS, STREAM_HEADER: stream_id, **(headers or {})})
        self.stream_id = stream_id
        self.entries = entries
        self.reader_of = reader_of
        self.preamble = preamble
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
        if self.reader_of is not None:
            self.reader_of.attach()
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
            if self.reader_of is not None:
                self.reader_of.detach()
        if not self._client_gone:
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _relay(self, send: Send) -> None:
        entries = self.entries
        prefix = event_id_prefix(self.stream_id)
        try:
            if self.preamble:
                await send({"type": "http.response.body", "body": self.preamble, "more_body": True})
            async for seq, chunk in entries:
                # Set before awaiting: the watcher must see the stream as busy while we write.
                self._last_write = time.monotonic()
                body = b"%s%d\n%s" % (prefix, seq, chunk)  # sse.with_event_id, inlined
                await send({"type": "http.response.body", "body": body, "more_body": True})
        except TokenrelayError as exc:
            await self._send_error(send, exc)
        except Exception:
            logger.exception("reading stream %s failed", self.stream_id)
            await self._send_error(send, TokenrelayError("The stream failed unexpectedly."))
        finally:
            close = getattr(entries, "aclose", None)
            if close is not None:
                await asyncio.shield(close())

    async def _send_error(self, send: Send, exc: TokenrelayError) -> None:
        await send({"type": "http.response.body", "body": error_event(exc), "more_body": True})

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
