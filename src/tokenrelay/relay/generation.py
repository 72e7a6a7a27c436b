"""One answer being written: owned by no connection, recorded as it grows.

A ``Generation`` pulls a provider's stream in its own task and appends the text to the stored
assistant message at most ``flush_interval`` seconds behind. A connection only *reads* it: when
the reader leaves, the answer still completes and is saved, so a reload finds it whole. Only an
explicit ``stop()`` (or shutdown) cancels the upstream request; the message is then ``stopped``
(or ``interrupted``) with the text generated so far.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator

from tokenrelay.chunks import ChunkSummary, StreamError
from tokenrelay.errors import TokenrelayError
from tokenrelay.sse import DONE, encode_event
from tokenrelay.storage.conversations import ConversationStore
from tokenrelay.storage.models import MessageStatus

__all__ = ["Generation", "Generations"]

logger = logging.getLogger(__name__)


class Generation:
    """Streams one provider answer into a stored message and to at most one live reader."""

    def __init__(
        self,
        store: ConversationStore,
        message_id: str,
        stream: AsyncGenerator[bytes, None],
        *,
        flush_interval: float,
    ) -> None:
        self.message_id = message_id
        self._store = store
        self._stream = stream
        self._flush_interval = flush_interval
        self._summary = ChunkSummary()
        self._saved = 0  # characters of the text already in the database
        self._status = MessageStatus.STREAMING
        self._error: str | None = None
        self._reader: asyncio.Queue[bytes | None] | None = asyncio.Queue()
        self._final_status = MessageStatus.STOPPED
        self._finished = asyncio.Event()
        self.task = asyncio.create_task(self._run(), name=f"generation {message_id}")

    async def _run(self) -> None:
        flusher = asyncio.create_task(self._flush_periodically())
        try:
            async for chunk in self._stream:
                self._publish(chunk)
                try:
                    self._summary.feed(chunk)
                except StreamError as exc:  # an upstream that reports errors in-band
                    self._status, self._error = MessageStatus.ERROR, str(exc)
                    return
            self._status = MessageStatus.COMPLETE
        except TokenrelayError as exc:
            self._status, self._error = MessageStatus.ERROR, exc.message
            self._publish(encode_event(exc.to_dict()))
        except asyncio.CancelledError:
            self._status = self._final_status
            self._publish(DONE)
            raise
        except Exception:
            logger.exception("generation %s failed", self.message_id)
            self._status, self._error = MessageStatus.ERROR, "The answer failed unexpectedly."
            self._publish(encode_event({"error": {"message": self._error, "type": "server_error"}}))
        finally:
            try:
                # Never cancel a write in flight: on SQLite that can leave the write lock held.
                self._finished.set()
                await flusher
                await asyncio.shield(self._save_final())
            finally:
                self._publish(None)

    def _publish(self, chunk: bytes | None) -> None:
        if self._reader is not None:
            self._reader.put_nowait(chunk)

    async def _flush_periodically(self) -> None:
        """Append new text every ``flush_interval`` seconds until the answer is finished."""
        while not self._finished.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._finished.wait(), self._flush_interval)
            text = self._summary.text
            if len(text) > self._saved and not self._finished.is_set():
                try:
                    await self._store.update_message(self.message_id, append=text[self._saved :])
                except Exception:  # the final save appends whatever is still unsaved
                    logger.exception("saving answer %s failed; retrying later", self.message_id)
                    continue
                self._saved = len(text)

    async def _save_final(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            text = self._summary.text
            usage = self._summary.usage or {}
            await self._store.update_message(
                self.message_id,
                append=text[self._saved :],
                status=self._status,
                error=self._error,
                prompt_tokens=usage.get("prompt_tokens"),
                completion_tokens=usage.get("completion_tokens"),
            )
            self._saved = len(text)

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

    def cancel(self, status: MessageStatus = MessageStatus.STOPPED) -> None:
        """Cancel the upstream request; the text so far is saved with ``status``."""
        self._final_status = status
        self.task.cancel()


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
        generation.cancel()
        await asyncio.gather(generation.task, return_exceptions=True)
        return True

    async def aclose(self) -> None:
        """On shutdown: cut every answer short, saved as ``interrupted``."""
        running = list(self._running.values())
        for generation in running:
            generation.cancel(MessageStatus.INTERRUPTED)
        await asyncio.gather(*(g.task for g in running), return_exceptions=True)
