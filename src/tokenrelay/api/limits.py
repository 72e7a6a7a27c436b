"""The request body's guard: refused with 413 over the configured size, before anything reads it
whole, and a client that leaves before sending all of it is no error (``ClientGone``)."""

from __future__ import annotations

from starlette.responses import Response
from starlette.types import Message, Receive

from tokenrelay.api.guards import Incoming
from tokenrelay.errors import ClientGone, RequestTooLarge

__all__ = ["BodySizeLimit"]


class BodySizeLimit:
    """A guard (``tokenrelay.api.guards``): checks ``Content-Length`` and counts chunked bodies
    as they arrive."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes

    def _error(self) -> RequestTooLarge:
        return RequestTooLarge(f"The request body is larger than {self.max_bytes} bytes.")

    def check(self, request: Incoming) -> Response | None:
        length = request.content_length
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            raise self._error()
        if request.has_body:
            request.receive = self._bounded(request.receive)
        return None

    def _bounded(self, receive: Receive) -> Receive:
        received = 0
        whole = False

        async def bounded_receive() -> Message:
            nonlocal received, whole
            message = await receive()
            if whole:  # after the body: the disconnect watch of a streamed answer
                return message
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Raised to whoever reads the body (``read_body``), mapped like any error.
                    raise self._error()
                whole = not message.get("more_body", False)
            elif message["type"] == "http.disconnect":
                # The client left (or was cut off by ``body_timeout``) mid-body: its reader
                # gets an error that is answered to nobody and logged as nothing.
                raise ClientGone("The client left before sending the whole request body.")
            return message

        return bounded_receive
