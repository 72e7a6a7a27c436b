"""One streamed answer, owned by no connection: a provider's stream pulled into an event log.

Every streamed answer (``/v1`` chat and completions, ``/api/ask/stream``, conversations, the
CLI) is a ``Generation``: a task that opens the provider's stream, appends its events to a
numbered log (``tokenrelay.streams``) and ends the log when the answer ends. Connections only
*read* the log, from the start or from a ``Last-Event-ID``; a second tab reads it too.

The generation exists, and can be cancelled, from before the provider is asked: a cancel that
arrives while the upstream has not answered its headers (or while the local model's queue holds
the request) closes that request. Readers are counted: when the last one leaves, the answer goes
on for ``grace`` seconds and is then cancelled, so nobody pays for tokens no one will read. A
plain ``/v1`` request has a grace of 0 (the upstream is closed the moment its client leaves, as
before), a conversation or a resumable request a longer one.

A ``Recorder`` (a conversation's stored message) sees every chunk and the outcome; ``settle``
runs once it is saved, before the log ends (releasing what the answer held); a ``Shape``
decides which log entries a chunk becomes (the chat chunks as they came, or the Responses
API's events translated from them).

What the answer cost is the gateway's business (``relay/gateway.py``): a generation only
notes when its first chunk came, keeps its last two chunks (where OpenAI-compatible streams
report usage) and awaits ``on_end`` once, before its log ends: a reader who sees the end finds
the answer accounted for. Per chunk, that costs keeping a reference to the one before, no
search.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from typing import Protocol

from tokenrelay.chunks import StreamError, ends_with_error, is_usage_only
from tokenrelay.errors import TokenrelayError
from tokenrelay.sse import DONE, encode_event
from tokenrelay.storage.models import MessageStatus
from tokenrelay.streams import LogWriter

__all__ = [
    "ChatChunks",
    "Generation",
    "Reader",
    "Recorder",
    "Shape",
    "StreamOpener",
    "WithoutUsage",
    "error_event",
]

logger = logging.getLogger(__name__)

_UNRESUMABLE_KEEP = 5.0  # seconds a grace-0 answer's log stays readable after its end

StreamOpener = Callable[[], Awaitable[AsyncGenerator[bytes, None]]]
"""Opens the provider's stream; returns once the provider accepted (``Provider.open_stream``)."""


def error_event(exc: TokenrelayError) -> bytes:
    """The SSE error event that ends a stream which failed after its first byte.

    OpenAI's streamed errors carry no HTTP status; ours keeps it for clients that want it.
    """
    body = exc.to_dict()
    body["error"]["status"] = exc.status
    return encode_event(body)


class Shape(Protocol):
    """Which log entries an answer's chunks become (each entry: whole SSE events)."""

    def opening(self) -> Iterable[bytes]:
        """Entries before the provider is even asked (a response's ``response.created``)."""
        ...

    def feed(self, chunk: bytes) -> Iterable[bytes]:
        """Entries for one provider chunk (whole chat-completion events)."""
        ...

    def finish(self) -> Iterable[bytes]:
        """Entries after the provider's stream ended normally."""
        ...

    def fail(self, exc: TokenrelayError) -> Iterable[bytes]:
        """Entries that end an answer failed after its first byte."""
        ...

    def cancel(self) -> Iterable[bytes]:
        """Entries that end an answer cancelled (Stop, or no reader left)."""
        ...


class ChatChunks:
    """The provider's chat-completion events, one log entry per event, as they came.

    An entry per *event*, not per network chunk: an ``id`` names one entry, so a client that
    dropped in the middle of a chunk holding two events resumes exactly after the one it got.
    """

    def opening(self) -> Iterable[bytes]:
        return ()

    def feed(self, chunk: bytes) -> Iterable[bytes]:
        # The common case, one event per chunk, costs one search and no copy.
        if chunk.find(b"\n\n") == len(chunk) - 2:
            return (chunk,)
        return _split_events(chunk)

    def finish(self) -> Iterable[bytes]:
        return ()

    def fail(self, exc: TokenrelayError) -> Iterable[bytes]:
        return (error_event(exc),)

    def cancel(self) -> Iterable[bytes]:
        return (DONE,)


class WithoutUsage(ChatChunks):
    """Chat chunks as they came, minus the usage chunk the gateway asked for on a client's
    behalf (``relay/gateway.py``). In the hot loop only a chunk holding ``[]`` is looked at."""

    def feed(self, chunk: bytes) -> Iterable[bytes]:
        return [event for event in super().feed(chunk) if not is_usage_only(event)]


def _split_events(chunk: bytes) -> list[bytes]:
    """Whole SSE events (``\\n\\n`` or ``\\r\\n\\r\\n`` ended), each with its terminator."""
    events: list[bytes] = []
    start = 0
    end = len(chunk)
    while start < end:
        lf = chunk.find(b"\n\n", start)
        crlf = chunk.find(b"\r\n\r\n", start)
        if lf < 0 and crlf < 0:
            events.append(chunk[start:])
            break
        stop = crlf + 4 if crlf >= 0 and (lf < 0 or crlf + 2 <= lf) else lf + 2
        events.append(chunk[start:stop])
        start = stop
    return events


class Recorder(Protocol):
    """Keeps what an answer said (a conversation's stored message)."""

    def opened(self) -> None:
        """The provider accepted: start saving periodically."""
        ...

    def feed(self, chunk: bytes) -> None:
        """One provider chunk; raises ``StreamError`` on an in-band error event."""
        ...

    async def finish(self, status: MessageStatus, error: str | None) -> None:
        """Save the outcome; never raises for storage trouble (it is logged)."""
        ...


class Reader(Protocol):
    """What a connection reading an answer's log tells the answer (``Generation`` itself, or
    the process running it, for a reader on another process)."""

    def attach(self) -> None:
        """A connection started reading."""
        ...

    def detach(self) -> None:
        """That connection stopped reading."""
        ...


class Generation:
    """Pulls one provider answer into ``writer``'s log; see the module docstring."""

    def __init__(
        self,
        open_stream: StreamOpener,
        writer: LogWriter,
        *,
        grace: float,
        shape: Shape | None = None,
        recorder: Recorder | None = None,
        settle: Callable[[], Awaitable[None]] | None = None,
        on_end: Callable[[Generation], Awaitable[None]] | None = None,
    ) -> None:
        self.stream_id = writer.stream_id
        self.grace = grace
        self.status = MessageStatus.STREAMING
        self.error: str | None = None
        self._writer = writer
        self._shape: Shape = shape or ChatChunks()
        self._passthrough = shape is None or type(shape) is WithoutUsage
        self._strip_usage = type(shape) is WithoutUsage
        self._recorder = recorder
        self._settle = settle
        self._on_end = on_end
        self.client_left = False
        """The last reader had left when the answer ended (or it was cut short for that)."""
        self.time_to_first_chunk: float | None = None
        self.duration = 0.0
        self.last_chunks: tuple[bytes, bytes] = (b"", b"")
        """The provider's last two chunks: where its usage is, if it reported any."""
        self._stream: AsyncGenerator[bytes, None] | None = None
        self._refusal: TokenrelayError | None = None
        self._final_status = MessageStatus.STOPPED
        self._started = False
        self._cancelled = False
        self._readers = 0
        self._grace_timer: asyncio.TimerHandle | None = None
        self._settled = asyncio.Event()  # the provider accepted, or the answer ended before that
        self._finished = asyncio.Event()
        self._begun = time.perf_counter()
        self.task = asyncio.create_task(self._run(open_stream), name=f"generation {self.stream_id}")

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    @property
    def entries(self) -> int:
        """Log entries written so far: about one per token (the gateway's running token count)."""
        return self._writer.seq

    async def opened(self) -> bool:
        """Wait for the provider: True once it accepted, False if the answer was cancelled first.

        Raises the provider's error if it refused, so a failure before the first byte is still
        an ordinary HTTP error for whoever asked.
        """
        await self._settled.wait()
        if self._refusal is not None:
            raise self._refusal
        return self._stream is not None

    async def _run(self, open_stream: StreamOpener) -> None:
        self._started = True
        writer, shape, recorder = self._writer, self._shape, self._recorder
        tail: list[bytes] = []
        before = last = b""  # the answer's last two chunks, where its usage is
        try:
            if self._cancelled:  # cancelled before this task first ran
                raise asyncio.CancelledError
            for entry in shape.opening():  # readers see the answer begin before the provider
                writer.append(entry)
            self._stream = await open_stream()
            self._settled.set()
            if recorder is not None:
                recorder.opened()
            append = writer.append
            stream = self._stream
            async for chunk in stream:  # the first chunk alone: the time to the first token
                for entry in shape.feed(chunk):
                    append(entry)
                self.time_to_first_chunk = time.perf_counter() - self._begun
                if recorder is not None:
                    recorder.feed(chunk)
                last = chunk
                break
            if self._passthrough and recorder is None:  # the /v1 hot path: nothing per chunk
                strip = self._strip_usage
                async for chunk in stream:  # but a search or two, an append and no new object
                    if strip and b"[]" in chunk:  # maybe the usage its client did not ask for
                        for entry in shape.feed(chunk):
                            append(entry)
                    elif chunk.find(b"\n\n") == len(chunk) - 2:
                        append(chunk)
                    else:
                        for entry in _split_events(chunk):
                            append(entry)
                    before, last = last, chunk
            else:
                async for chunk in stream:
                    for entry in shape.feed(chunk):
                        append(entry)
                    if recorder is not None:
                        recorder.feed(chunk)
                    before, last = last, chunk
            tail.extend(shape.finish())
            # An in-band error event, relayed unparsed by the hot loop, ended it all the same.
            failed = ends_with_error(last)
            self.status = MessageStatus.ERROR if failed else MessageStatus.COMPLETE
        except StreamError as exc:  # an upstream that reports errors in-band: already relayed
            self.status, self.error = MessageStatus.ERROR, str(exc)
        except TokenrelayError as exc:  # StreamTooLarge among them
            self.status, self.error = MessageStatus.ERROR, exc.message
            if self._stream is None:
                self._refusal = exc  # raised by ``opened()``: the route answers it as HTTP
            tail.extend(shape.fail(exc))  # for readers of the log (a resume, a background answer)
        except asyncio.CancelledError:
            self.status = self._final_status
            tail.extend(shape.cancel())
            raise
        except Exception:
            logger.exception("generation %s failed", self.stream_id)
            failure = TokenrelayError("The answer failed unexpectedly.")
            self.status, self.error = MessageStatus.ERROR, failure.message
            if self._stream is None:
                self._refusal = failure
            tail.extend(shape.fail(failure))
        finally:
            self._finished.set()
            self._settled.set()
            if self._grace_timer is not None:
                self._grace_timer.cancel()
            # Never cancelled midway: the stream is closed, the log ended, the answer saved.
            self.last_chunks = (before, last)
            await asyncio.shield(self._finish(b"".join(tail)))

    async def _finish(self, tail: bytes) -> None:
        if self._stream is not None:
            try:
                await self._stream.aclose()
            except Exception:  # the answer is saved all the same
                logger.exception("closing the stream of %s failed", self.stream_id)
        # Saved, and settled (its conversation free again), before the log ends: a reader who
        # sees the end and reloads finds it saved, and may ask the next question at once.
        if self._recorder is not None:
            await self._recorder.finish(self.status, self.error)
        if self._settle is not None:
            try:
                await self._settle()
            except Exception:
                logger.exception("settling %s failed", self.stream_id)
        self.duration = time.perf_counter() - self._begun
        if self._on_end is not None:
            try:
                await self._on_end(self)
            except Exception:
                logger.exception("accounting for %s failed", self.stream_id)
        try:
            # An answer cancelled when its client leaves cannot be resumed: its log is kept
            # only for readers already behind it, not for ``stream_ttl`` (memory per answer).
            await self._writer.end(tail, keep=_UNRESUMABLE_KEEP if self.grace <= 0 else None)
        except Exception:
            logger.exception("ending the log of %s failed", self.stream_id)

    # Readers.

    def attach(self) -> None:
        """A connection started reading the log."""
        self._readers += 1
        self.client_left = False
        if self._grace_timer is not None:
            self._grace_timer.cancel()
            self._grace_timer = None

    def detach(self) -> None:
        """A connection stopped reading; the last one leaving starts the grace period."""
        self._readers -= 1
        if self._readers > 0 or self.finished:
            return
        self.client_left = True
        if self.grace <= 0:
            self.cancel()
        elif self.grace != math.inf:  # an answer that runs to its end whoever reads it
            self._grace_timer = asyncio.get_running_loop().call_later(self.grace, self._grace_over)

    def _grace_over(self) -> None:
        self._grace_timer = None
        if self._readers == 0:
            logger.info("nobody read %s for %g s: cancelled", self.stream_id, self.grace)
            self.cancel()

    # Ending early.

    async def stop(self, status: MessageStatus = MessageStatus.STOPPED) -> None:
        """Cancel the answer and wait until it is saved."""
        self.cancel(status)
        await asyncio.gather(self.task, return_exceptions=True)

    def cancel(self, status: MessageStatus = MessageStatus.STOPPED) -> None:
        """Cancel the answer, opening or streaming; the text so far is saved with ``status``.

        An answer already finishing (or already cancelled) is left alone, so a second cancel can
        never interrupt its final save.
        """
        if self._cancelled or self.finished:
            return
        self._cancelled = True
        self._final_status = status
        if self._started:
            self.task.cancel()
        # Not started yet: ``_run`` sees ``_cancelled`` first and ends the answer as stopped
        # (a task cancelled before its first step would run none of its code, saves included).
