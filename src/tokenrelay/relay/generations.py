"""The answers running in this process, and how the other processes reach them.

``Generations`` starts every streamed answer (a ``Generation`` writing to a log of its own) and
keeps what several processes must agree on in the shared state (memory, or Redis with several
workers or replicas):

- an owner lease per stored answer (``answer:<stream id>``), renewed while it runs, so that a
  process starting up marks ``interrupted`` only answers whose owner really stopped;
- keys held for the life of an answer (``busy:<conversation id>``), renewed the same way;
- a cancel broadcast: a cancel for a stream running elsewhere is published, and the process
  running it cancels it;
- readers elsewhere (``readers:<stream id>``): a connection reading a stream that another
  process runs keeps this key alive, so that process's grace period does not cancel an answer
  someone is reading.

One task per process renews every lease and key; nothing here runs per chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Iterable

from tokenrelay.errors import StreamNotFound
from tokenrelay.relay.generation import Generation, Reader, Recorder, Shape, StreamOpener
from tokenrelay.state import SharedState, Subscription
from tokenrelay.storage.models import MessageStatus
from tokenrelay.streams import EventLog, new_stream_id

__all__ = ["Generations", "answer_lease"]

logger = logging.getLogger(__name__)

_CANCEL_CHANNEL = "cancel"


def answer_lease(stream_id: str) -> str:
    """The shared-state key a running stored answer's owner holds."""
    return f"answer:{stream_id}"


class Generations:
    """Starts answers, finds them by stream id, cancels them wherever they run."""

    def __init__(self, log: EventLog, state: SharedState, *, lease_seconds: float) -> None:
        self.log = log
        self.state = state
        self.lease_seconds = lease_seconds
        self.owner = "proc_" + secrets.token_hex(8)  # this process, in leases
        self._running: dict[str, Generation] = {}
        self._held: dict[str, str] = {}  # shared-state key -> the token holding it
        self._renewer: asyncio.Task[None] | None = None
        self._subscription: Subscription | None = None
        self._watching: dict[str, int] = {}  # streams run elsewhere -> readers here

    async def start(self) -> None:
        self._subscription = await self.state.subscribe(_CANCEL_CHANNEL, self._on_cancel)
        self._renewer = asyncio.create_task(self._renew_forever(), name="lease renewer")

    async def aclose(self) -> None:
        """On shutdown: cut every answer short (saved as ``interrupted``), release the keys."""
        running = list(self._running.values())
        for generation in running:
            generation.cancel(MessageStatus.INTERRUPTED)
        await asyncio.gather(*(g.task for g in running), return_exceptions=True)
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
        if self._subscription is not None:
            await self._subscription.aclose()
        for key, token in list(self._held.items()):
            await self.release(key, token)

    async def begin(
        self,
        open_stream: StreamOpener,
        *,
        grace: float,
        shape: Shape | None = None,
        recorder: Recorder | None = None,
        leased: bool = False,
        stream_id: str | None = None,
        holding: Iterable[tuple[str, str]] = (),
    ) -> Generation:
        """Open a log and start the answer into it.

        ``leased`` takes the owner lease (for answers stored elsewhere, whose status another
        process may have to settle); ``holding`` are keys already held (``hold``) that are
        renewed while the answer runs and released when it ends.
        """
        stream_id = stream_id or new_stream_id()
        writer = await self.log.open(stream_id)
        keys = list(holding)
        if leased:
            key = answer_lease(stream_id)
            await self.state.claim(key, self.owner, self.lease_seconds)
            self._held[key] = self.owner
            keys.append((key, self.owner))
        generation = Generation(open_stream, writer, grace=grace, shape=shape, recorder=recorder)
        self._running[stream_id] = generation
        generation.task.add_done_callback(lambda _: self._ended(stream_id, keys))
        return generation

    def _ended(self, stream_id: str, keys: list[tuple[str, str]]) -> None:
        self._running.pop(stream_id, None)
        for key, token in keys:
            if self._held.get(key) == token:
                del self._held[key]
                task = asyncio.create_task(self.state.release(key, token))
                task.add_done_callback(_log_failure)

    def get(self, stream_id: str) -> Generation | None:
        return self._running.get(stream_id)

    def reader(self, stream_id: str) -> Reader:
        """What a connection reading ``stream_id`` attaches to: the answer if it runs here,
        else a presence the process running it can see."""
        generation = self._running.get(stream_id)
        return generation if generation is not None else _RemoteReader(self, stream_id)

    async def _read_elsewhere(self, stream_id: str) -> bool:
        try:
            return await self.state.holder(_readers_key(stream_id)) is not None
        except Exception:  # cannot tell: keep the answer rather than cancel it wrongly
            logger.exception("looking up the readers of %s failed", stream_id)
            return True

    async def hold(self, key: str) -> str | None:
        """Take ``key`` for an answer about to start; its token, or None if another has it."""
        token = secrets.token_hex(8)
        if not await self.state.claim(key, token, self.lease_seconds):
            return None
        self._held[key] = token
        return token

    async def release(self, key: str, token: str) -> None:
        if self._held.get(key) == token:
            del self._held[key]
        try:
            await self.state.release(key, token)
        except Exception:  # it expires on its own
            logger.exception("releasing %s failed", key)

    async def cancel(self, stream_id: str, status: MessageStatus = MessageStatus.STOPPED) -> bool:
        """Cancel the answer, here or (published) in the process running it.

        Returns whether it runs here; wait for its end by reading its log to the end.
        """
        generation = self._running.get(stream_id)
        if generation is not None:
            generation.cancel(status)
            return True
        await self.state.publish(_CANCEL_CHANNEL, stream_id)
        return False

    async def wait_ended(self, stream_id: str) -> None:
        """Return once the answer ``stream_id`` has ended: here its task, elsewhere its log.

        Bound it with ``asyncio.timeout``: the process running it may be gone.
        """
        generation = self._running.get(stream_id)
        if generation is not None:
            await asyncio.gather(generation.task, return_exceptions=True)
            return
        with contextlib.suppress(StreamNotFound):
            async for _ in await self.log.read(stream_id, 0):
                pass

    def _on_cancel(self, stream_id: str) -> None:
        generation = self._running.get(stream_id)
        if generation is not None:
            generation.cancel()

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            for key, token in list(self._held.items()):
                try:
                    if not await self.state.renew(key, token, self.lease_seconds):
                        del self._held[key]  # lost (expired meanwhile): taken again below
                except Exception:
                    logger.exception("renewing %s failed; retrying", key)
            for stream_id in list(self._watching):
                key = _readers_key(stream_id)
                if key not in self._held:
                    with contextlib.suppress(Exception):
                        await self.hold(key)


def _readers_key(stream_id: str) -> str:
    return f"readers:{stream_id}"


class _RemoteReader:
    """A connection here reading a stream another process runs (see ``Generations.reader``)."""

    def __init__(self, generations: Generations, stream_id: str) -> None:
        self._generations = generations
        self._stream_id = stream_id

    def attach(self) -> None:
        watching = self._generations._watching
        watching[self._stream_id] = watching.get(self._stream_id, 0) + 1

    def detach(self) -> None:
        generations, stream_id = self._generations, self._stream_id
        left = generations._watching.get(stream_id, 1) - 1
        if left > 0:
            generations._watching[stream_id] = left
            return
        generations._watching.pop(stream_id, None)
        key = _readers_key(stream_id)
        token = generations._held.get(key)
        if token is not None:
            task = asyncio.create_task(generations.release(key, token))
            task.add_done_callback(_log_failure)


def _log_failure(task: asyncio.Task[object]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        logger.error("releasing a shared key failed: %r", exc)
