"""A conversation's answer kept in the database as it grows, whatever happens to its readers.

The text is appended to the stored assistant message at most ``flush_interval`` seconds behind
the stream. The final save (text, status, usage) is retried, and if the text still cannot be
written the status alone is, so a storage failure never leaves an answer ``streaming``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from tokenrelay.chunks import ChunkSummary
from tokenrelay.storage.conversations import ConversationStore, MessageNotFound
from tokenrelay.storage.models import MessageStatus

__all__ = ["MessageRecorder"]

logger = logging.getLogger(__name__)

_SAVE_ATTEMPTS = 3
_SAVE_RETRY_DELAY = 0.25  # seconds before the second attempt, doubled before each next one
_UNSAVED = "The answer could not be saved in full; the text is what was saved before that."


class MessageRecorder:
    """The ``Recorder`` of one stored assistant message (see ``relay.generation``)."""

    def __init__(self, store: ConversationStore, message_id: str, *, flush_interval: float) -> None:
        self.message_id = message_id
        self._store = store
        self._flush_interval = flush_interval
        self._summary = ChunkSummary()
        self._saved = 0  # pieces of the summary's text already in the database
        self._finished = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None

    def opened(self) -> None:
        self._flusher = asyncio.create_task(self._flush_periodically())

    def feed(self, chunk: bytes) -> None:
        self._summary.feed(chunk)

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

    async def finish(self, status: MessageStatus, error: str | None) -> None:
        """Let a periodic write in flight end (never cancel one: on SQLite that can leave the
        write lock held), then write the rest of the text and the status."""
        self._finished.set()
        if self._flusher is not None:
            await self._flusher
        usage = self._summary.usage or {}
        delay = _SAVE_RETRY_DELAY
        for attempt in range(1, _SAVE_ATTEMPTS + 1):
            parts = len(self._summary.parts)
            try:
                await self._store.update_message(
                    self.message_id,
                    append=self._summary.text_since(self._saved),
                    status=status,
                    error=error,
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
        status = MessageStatus.ERROR if status == MessageStatus.COMPLETE else status
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
