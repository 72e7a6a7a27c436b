"""A streamed upstream answer, read as untrusted bytes: cut on event boundaries, bounded, checked.

Upstreams almost always send whole events per read, so the common case returns the bytes as they
came, with no copy, after an ``endswith``, a substring test for an error event and a look at the
first byte for a comment. Everything else is the rare path:

- bytes that do not end on an event boundary wait in one ``bytearray`` (linear, however small the
  pieces) and are searched only where new bytes arrived; one event longer than
  ``max_event_bytes``, or a whole stream longer than ``max_response_bytes``, ends the stream;
- a chunk that may hold an error event has that event's strings scrubbed of keys;
- an upstream that sends only comments (``: ping``) for ``read_timeout`` seconds times out: the
  clock is read only when a comment-only chunk arrives;
- a stream that ends with none of ``data: [DONE]``, a ``finish_reason`` or an error event is an
  error, not a success: only the last two data chunks are looked at, at the end.

Every failure is raised from iteration as a ``TokenrelayError`` (see ``providers.base``).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp

from tokenrelay import metrics
from tokenrelay.errors import TokenrelayError, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from tokenrelay.providers._upstream_text import ERROR_MARKER, Scrubber
from tokenrelay.providers.base import ClosingStream

__all__ = ["StreamRules", "UpstreamEvents"]

logger = logging.getLogger(__name__)

_EVENT_END = (b"\n\n", b"\r\n\r\n")
_COLON = 0x3A  # an SSE line starting with ':' is a comment
_DONE = re.compile(rb"(?m)^data: ?\[DONE\][ \t]*\r?$")
_FINISHED = re.compile(rb'(?m)"finish_reason"\s*:\s*"|^data: ?\{\s*"error"')
"""A non-null finish reason, or an error event: the answer's end, told in-band. Quotes inside
model text are escaped, so text never matches."""
_ERROR_EVENT = re.compile(rb'(?m)^data: ?\{\s*"error"')


@dataclass(frozen=True, slots=True)
class StreamRules:
    """What every stream of one provider shares: its name, scrubber, error mapping and bounds."""

    provider: str
    scrubber: Scrubber
    on_transport_error: Callable[[BaseException], TokenrelayError]
    read_timeout: float
    max_event_bytes: int
    max_response_bytes: int


class UpstreamEvents(ClosingStream):
    """The upstream's streamed bytes, cut so that every piece ends on an SSE event boundary.

    Closing it closes the upstream response, even before the first read (see ``ClosingStream``):
    that is what stops the upstream when a client leaves early.
    """

    __slots__ = ("_buffer", "_chunks", "_last", "_left", "_prev", "_quiet_since", "_resp", "_rules")

    def __init__(self, resp: aiohttp.ClientResponse, rules: StreamRules) -> None:
        self._resp = resp
        self._rules = rules
        self._chunks: AsyncIterator[bytes] = resp.content.iter_any()
        self._buffer = bytearray()  # bytes after the last event boundary, while an event arrives
        self._left = rules.max_response_bytes
        self._last = self._prev = b""  # the last two data chunks returned
        self._quiet_since: float | None = None  # first comment-only chunk since the last data

    async def __anext__(self) -> bytes:
        try:
            while True:
                try:
                    data = await self._chunks.__anext__()
                except StopAsyncIteration:
                    data = self._end()
                else:
                    self._left -= len(data)
                    if self._left < 0:
                        raise self._too_large("an answer", "max_response_bytes")
                    if self._buffer or not data.endswith(_EVENT_END):
                        data = self._cut(data)
                        if not data:  # no boundary yet: wait for more bytes
                            continue
                if ERROR_MARKER in data:
                    data = self._rules.scrubber.error_events(data)
                    if _ERROR_EVENT.search(data):  # relayed as it is, but an error all the same
                        metrics.upstream_error(self._rules.provider)
                if data[0] == _COLON and _comments_only(data):
                    self._note_quiet()
                else:
                    self._quiet_since = None
                    self._prev, self._last = self._last, data
                return data
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._resp.close()
            metrics.upstream_error(self._rules.provider)
            raise self._rules.on_transport_error(exc) from None
        except StopAsyncIteration:
            raise
        except BaseException as exc:  # our errors, cancellation (the client left): drop it
            self._resp.close()
            if isinstance(exc, TokenrelayError):
                metrics.upstream_error(self._rules.provider)
            raise

    def _cut(self, data: bytes) -> bytes:
        """Add ``data`` to the buffer; return the buffered whole events (``b""`` if none yet)."""
        buffer = self._buffer
        # A boundary may straddle the old bytes and the new: search from 3 bytes back.
        start = max(len(buffer) - 3, 0)
        buffer += data
        lf, crlf = buffer.rfind(b"\n\n", start), buffer.rfind(b"\r\n\r\n", start)
        cut = max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)
        events = b""
        if cut:
            events = bytes(buffer[:cut])
            del buffer[:cut]
        if len(buffer) > self._rules.max_event_bytes:
            raise self._too_large("one event", "max_event_bytes")
        return events

    def _end(self) -> bytes:
        """At the upstream's end of body: its unterminated last event, or the end (or an error)."""
        self._resp.release()  # read to the end: the connection goes back to the pool
        self._chunks = _ENDED  # a released response must not be read again
        buffer = self._buffer
        if buffer.strip():  # an upstream that ended without a blank line
            tail = bytes(buffer) + b"\n\n"
            buffer.clear()
            return tail
        buffer.clear()
        last, prev = self._last, self._prev
        if _DONE.search(last) or _FINISHED.search(last) or _FINISHED.search(prev):
            raise StopAsyncIteration
        name = self._rules.provider
        logger.warning("provider %s ended a stream before the answer was finished", name)
        raise UpstreamUnavailable(
            f"The upstream provider '{name}' stopped in the middle of the answer."
        )

    def _note_quiet(self) -> None:
        """A comment-only chunk: time out if nothing but comments came for ``read_timeout``."""
        now = time.monotonic()
        if self._quiet_since is None:
            self._quiet_since = now
        elif now - self._quiet_since >= self._rules.read_timeout:
            name = self._rules.provider
            logger.warning("provider %s sent only comments for too long", name)
            raise UpstreamTimeout(f"The upstream provider '{name}' did not answer in time.")

    def _too_large(self, what: str, setting: str) -> UpstreamError:
        name = self._rules.provider
        logger.warning("provider %s sent %s over %s", name, what, setting)
        return UpstreamError(
            f"The upstream provider '{name}' sent {what} larger than tokenrelay accepts "
            f"(`{setting}`).",
            status=502,
            type="upstream_error",
            code="upstream_response_too_large",
        )

    def _close(self) -> None:
        self._resp.close()


class _Ended(AsyncIterator[bytes]):
    """The chunks of a body already read to its end."""

    async def __anext__(self) -> bytes:
        raise StopAsyncIteration


_ENDED = _Ended()


def _comments_only(events: bytes) -> bool:
    return all(not line or line[0] == _COLON for line in events.splitlines())
