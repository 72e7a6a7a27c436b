"""One answer being written: owned by no connection, recorded as it grows.

A ``Generation`` opens a provider's stream in its own task, pulls it, and appends the text to the
stored assistant message at most ``flush_interval`` seconds behind. It exists, and can be stopped,
from before the provider is asked: a Stop (or a DELETE) that arrives while the upstream has not
answered its headers, or while the local model's queue holds the request, cancels the pending
open and closes that request. A connection only *reads* the answer: when the reader leaves, the
answer still completes and is saved, so a reload finds it whole. Only an explicit ``stop()`` (or
shutdown) cancels it; the message is then ``stopped`` (or ``interrupted``) with the text so far.

The final save is retried, and if the text still cannot be written the status alone is, so a
storage failure never leaves an answer ``streaming``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable

from tokenrelay.chunks import ChunkSummary, StreamError
from tokenrelay.errors import TokenrelayError
from tokenrelay.sse import DONE, encode_event
from tokenrelay.storage.conversations import ConversationStore, MessageNotFound
from tokenrelay.storage.models import MessageStatus

__all__ = ["Generation", "Generations", "StreamOpener"]

logger = logging.getLogger(__name__)

StreamOpener = Callable[[], Awaitable[AsyncGenerator[bytes, None]]]
"""Opens the provider's stream; returns once the provider accepted (``Provider.open_stream``)."""

_SAVE_ATTEMPTS = 3
_SAVE_RETRY_DELAY = 0.25  # seconds before the second attempt, doubled before each next one
_UNSAVED = "The answer could not be saved in full; the text is what was saved before that."


class Generation:
    """Streams one provider answer into a stored message and to at most one live reader."""

    def __init__(
        self,
        store: ConversationStore,
        message_id: str,
        open_stream: StreamOpener,
        *,
        flush_interval: float,
    ) -> None:
        self.message_id = message_id
        self._store = store
        self._stream: AsyncGenerator[bytes, None] | None = None
        self._flush_interval = flush_interval
        self._summary = ChunkSummary()
        self._saved = 0  # pieces of the summary's text already in the database
        self._status = MessageStatus.STREAMING
        self._error: str | None = None
        self._refusal: TokenrelayError | None = None
        self._reader: asyncio.Queue[bytes | None] | None = asyncio.Queue()
        self._final_status = MessageStatus.STOPPED
        self._started = False
        self._cancelled = False
        self._settled = asyncio.Event()  # the provider accepted, or the answer ended before that
        self._finished = asyncio.Event()
        self.task = asyncio.create_task(self._run(open_stream), name=f"generation {message_id}")

    async def opened(self) -> bool:
        """Wait for the provider: True once it accepted, False if the answer was stopped first.

        Raises the provider's error if it refused (the message is then saved as ``error``), so a
        failure before the first byte is still an ordinary HTTP error for whoever asked.
        """
        await self._settled.wait()
        if self._refusal is not None:
            raise self._refusal
        return self._stream is not None

    async def _run(self, open_stream: StreamOpener) -> None:
        self._started = True
        flusher: asyncio.Task[None] | None = None
        try:
            if self._cancelled:  # stopped before this task first ran
                raise asyncio.CancelledError
            self._stream = await open_stream()
            self._settled.set()
            flusher = asyncio.create_task(self._flush_periodically())
            async for chunk in self._stream:
                self._publish(chunk)
                try:
                    self._summary.feed(chunk)
                except StreamError as exc:  # an upstream that reports errors in-band
                    self._status, self._error = MessageStatus.ERROR, str(exc)
                    return
            self._status = MessageStatus.COMPLETE
        except TokenrelayError as exc:
            self._fail(exc)
        except asyncio.CancelledError:
            self._status = self._final_status
            self._publish(DONE)
            raise
        except Exception:
            logger.exception("generation %s failed", self.message_id)
            self._fail(TokenrelayError("The answer failed unexpectedly."))
        finally:
            try:
                # Never cancel a write in flight: on SQLite that can leave the write lock held.
                self._finished.set()
                await asyncio.shield(self._finish(flusher))
            finally:
                self._publish(None)
                self._settled.set()

    def _fail(self, exc: TokenrelayError) -> None:
        self._status, self._error = MessageStatus.ERROR, exc.message
        if self._stream is None:
            self._refusal = exc  # raised by ``opened()``: the route answers it as an HTTP error
        else:
            self._publish(encode_event(exc.to_dict()))

    def _publish(self, chunk: bytes | None) -> None:
        if self._reader is not None:
            self._reader.put_nowait(chunk)

    async def _flush_periodically(self) -> None:
        """Append new text every ``flush_interval`` seconds until the answer is finished."""
        while not self._finished.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._finished.wait(), self._flush_interval)
            parts = len(self._summary.parts)
            if parts > self._saved and not self._finished.is_set():
                try:
                    await self._store.update_message(
                        self.message_id, append=self._summary.text_since(self._saved)
                    )
                except MessageNotFound:
                    return  # deleted with its conversation; the final save finds that too
                except Exception:  # the final save appends whatever is still unsaved
                    logger.exception("saving answer %s failed; retrying later", self.message_id)
                    continue
                self._saved = parts

    async def _finish(self, flusher: asyncio.Task[None] | None) -> None:
        """Let a periodic write in flight end, close the stream, then save the answer."""
        if flusher is not None:
            await flusher
        if self._stream is not None:
            try:
                await self._stream.aclose()
            except Exception:  # the answer is saved all the same
                logger.exception("closing the stream of answer %s failed", self.message_id)
        await self._save_final()

    async def _save_final(self) -> None:
        """Write the rest of the text and the status; retried, then at least the status."""
        usage = self._summary.usage or {}
        delay = _SAVE_RETRY_DELAY
        for attempt in range(1, _SAVE_ATTEMPTS + 1):
            parts = len(self._summary.parts)
            try:
                await self._store.update_message(
                    self.message_id,
                    append=self._summary.text_since(self._saved),
                    status=self._status,
                    error=self._error,
                    prompt_tokens=usage.get("prompt_tokens"),
                    completion_tokens=usage.get("completion_tokens"),
                )
            except MessageNotFound:
                return  # the conversation was deleted: there is nothing left to save into
            except Exception:
                logger.exception(
                    "saving answer %s failed (attempt %d of %d)",
                    self.message_id,
                    attempt,
                    _SAVE_ATTEMPTS,
                )
                if attempt < _SAVE_ATTEMPTS:
                    await asyncio.sleep(delay)
                    delay *= 2
                continue
            self._saved = parts
            return
        # The text cannot be written: record that, with the smallest update there is.
        status = MessageStatus.ERROR if self._status == MessageStatus.COMPLETE else self._status
        try:
            await self._store.update_message(self.message_id, status=status, error=_UNSAVED)
        except MessageNotFound:
            return
        except Exception:
            logger.exception(
                "answer %s stays 'streaming' until the next start marks it interrupted",
                self.message_id,
            )
        else:
            logger.error("answer %s saved as %s without its unsaved text", self.message_id, status)

    async def events(self) -> AsyncGenerator[bytes, None]:
        """The answer's SSE bytes from now on, for the one connection that started it."""
        reader = self._reader
        if reader is None:
            return
        try:
            while (chunk := await reader.get()) is not None:
                yield chunk
        finally:
            # The reader left (or the answer ended): stop queueing for it; generation goes on.
            self._reader = None

    async def stop(self, status: MessageStatus = MessageStatus.STOPPED) -> None:
        """Cancel the answer and wait until it is saved."""
        self.cancel(status)
        await asyncio.gather(self.task, return_exceptions=True)

    def cancel(self, status: MessageStatus = MessageStatus.STOPPED) -> None:
        """Cancel the answer, opening or streaming; the text so far is saved with ``status``.

        An answer already finishing (or already cancelled) is left alone, so a second cancel can
        never interrupt its final save.
        """
        if self._cancelled or self._finished.is_set():
            return
        self._cancelled = True
        self._final_status = status
        if self._started:
            self.task.cancel()
        # Not started yet: ``_run`` sees ``_cancelled`` first and saves the answer as stopped
        # (a task cancelled before its first step would run none of its code, saves included).


class Generations:
    """The answers running in this process, by conversation, so a Stop can find its answer."""

    def __init__(self) -> None:
        self._running: dict[str, Generation] = {}

    def start(self, conversation_id: str, generation: Generation) -> None:
        self._running[conversation_id] = generation
        generation.task.add_done_callback(lambda _: self._forget(conversation_id, generation))

    def _forget(self, conversation_id: str, generation: Generation) -> None:
        if self._running.get(conversation_id) is generation:
            del self._running[conversation_id]

    def get(self, conversation_id: str) -> Generation | None:
        return self._running.get(conversation_id)

    async def stop(self, conversation_id: str) -> bool:
        """Stop the conversation's running answer and wait until it is saved."""
        generation = self._running.get(conversation_id)
        if generation is None:
            return False
        await generation.stop()
        return True

    async def aclose(self) -> None:
        """On shutdown: cut every answer short, saved as ``interrupted``."""
        running = list(self._running.values())
        for generation in running:
            generation.cancel(MessageStatus.INTERRUPTED)
        await asyncio.gather(*(g.task for g in running), return_exceptions=True)
