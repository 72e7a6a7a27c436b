"""How ``tokenrelay serve`` runs uvicorn: its options, and read timeouts uvicorn does not have.

uvicorn bounds idle keep-alive connections (``timeout_keep_alive``) and open connections
(``limit_concurrency``), but not how long a client may take to send a request: a client that
sends a header line every few seconds, or connects and sends nothing, holds its connection
forever, and enough of them starve the server (Slowloris). ``TimedHttpProtocol`` is uvicorn's
own HTTP protocol plus one timer per connection while a request is arriving: ``header_timeout``
from the connection (or from the first byte of a next request) to the end of the headers, then
``body_timeout`` to the end of the body. It costs nothing per response chunk: the timer is off
while an answer streams, and bytes the server writes never pass through it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from tokenrelay.config import Settings

__all__ = ["TimedHttpProtocol", "uvicorn_options"]

logger = logging.getLogger("uvicorn.error")


class TimedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol (the one its ``auto`` picks), closing connections whose
    request's headers or body do not arrive in time.

    A deadline is a float; at most one timer per connection is pending, and it is not cancelled
    when a request arrives in time: when it fires it looks at the deadline then in force, if
    any, and waits again. So a request pays a clock read, not a timer, in the common case.
    """

    def __init__(
        self, *args: Any, header_timeout: float = 10.0, body_timeout: float = 30.0, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self._deadline: float | None = None
        self._in_body = False
        self._timer: asyncio.TimerHandle | None = None
        self._timed: RequestResponseCycle | None = None  # the request whose body is timed
        self._received: RequestResponseCycle | None = None  # the last request received whole

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._expect(self.header_timeout, None)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow(data_arrived=True)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow(data_arrived=False)

    def connection_lost(self, exc: Exception | None) -> None:
        self._deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def _follow(self, *, data_arrived: bool) -> None:
        """Time whatever part of a request is arriving, after the parser has seen new bytes."""
        cycle: RequestResponseCycle | None = self.cycle
        if cycle is None:
            return  # the first request's headers are still coming: connection_made's deadline
        if cycle is self._received:
            # The newest request is in whole. Bytes after its answer begin the next request,
            # whose headers are not complete yet (or it would be a new cycle).
            if data_arrived and self._deadline is None and cycle.response_complete:
                self._expect(self.header_timeout, None)
            return
        if cycle.more_body:
            # Also when the answer went out before the body came in: uvicorn ignores the rest
            # of that body, so the deadline is what closes the connection if it never ends.
            if self._timed is not cycle:
                self._expect(self.body_timeout, cycle)
            return
        self._received = cycle
        self._timed = None
        self._deadline = None

    def _expect(self, seconds: float, body_of: RequestResponseCycle | None) -> None:
        """Set the deadline for the headers (``body_of`` None) or the body of a request."""
        deadline = self.loop.time() + seconds
        self._deadline, self._in_body, self._timed = deadline, body_of is not None, body_of
        timer = self._timer
        # Due later than this deadline (the body's of the request before): wake earlier.
        if timer is not None and timer.when() > deadline:
            timer.cancel()
            timer = None
        if timer is None:
            self._timer = self.loop.call_at(deadline, self._wake)

    def _wake(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None or self.transport.is_closing():
            return
        if self.loop.time() < deadline:
            self._timer = self.loop.call_at(deadline, self._wake)
            return
        # A route reading the body sees the client leave (``ClientGone``): nothing to answer.
        in_body = self._in_body
        logger.info(
            "%s:%s - closed: no complete request %s within %g s",
            *(self.client or ("?", "?")),
            "body" if in_body else "headers",
            self.body_timeout if in_body else self.header_timeout,
        )
        self.transport.close()


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """``uvicorn.run`` keywords for the connection limits in ``settings``."""
    protocol = functools.partial(
        TimedHttpProtocol,
        header_timeout=settings.header_timeout,
        body_timeout=settings.body_timeout,
    )
    return {
        # A partial, not a subclass made on the fly: it pickles by reference into the worker
        # processes uvicorn spawns for --workers, which build their protocols from it.
        "http": protocol,
        "timeout_keep_alive": settings.keep_alive_timeout,
        # uvicorn answers 503 once the open connections, its own included, reach the limit.
        "limit_concurrency": settings.max_connections + 1,
    }
