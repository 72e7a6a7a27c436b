"""The answers running in this process, and how the other processes reach them.

``Generations`` starts every streamed answer (a ``Generation`` writing to a log of its own) and
keeps what several processes must agree on in the shared state (memory, or Redis with several
workers or replicas):

- an owner lease per stored answer (``answer:<stream id>``), renewed while it runs, so that a
  process starting up marks ``interrupted`` only answers whose owner really stopped;
- keys held for the life of an answer (``busy:<conversation id>``), renewed the same way;
- a cancel broadcast: a cancel for a stream running elsewhere is published, and the process
  running it cancels it;
- readers on other processes: a connection reading a stream that runs elsewhere (a client that
  resumed on another replica) is announced to the process running it, where it counts like a
  local reader, so the answer's grace period never cuts it off.

Keys an answer holds are released once it is saved and before its log ends, so a reader who
sees the end may ask the next question at once, on any replica. One task per process renews
every lease and key; nothing here runs per chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from typing import Any

from tokenrelay.errors import StreamNotFound
from tokenrelay.relay.generation import Generation, Reader, Recorder, Shape, StreamOpener
from tokenrelay.state import SharedState, Subscription
from tokenrelay.storage.models import MessageStatus
from tokenrelay.streams import INTERRUPTED_EVENT, EventLog, new_stream_id

__all__ = ["Generations", "answer_lease"]

logger = logging.getLogger(__name__)

_CANCEL_CHANNEL = "cancel"
_READERS_CHANNEL = "readers"  # "+<stream id>" when a reader starts elsewhere, "-<stream id>" ends


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
        self._remote_readers: dict[str, int] = {}  # stream id -> readers elsewhere, counted here
        self._renewer: asyncio.Task[None] | None = None
        self._subscriptions: list[Subscription] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._subscriptions = [
            await self.state.subscribe(_CANCEL_CHANNEL, self._on_cancel),
            await self.state.subscribe(_READERS_CHANNEL, self._on_reader),
        ]
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
        for subscription in self._subscriptions:
            await subscription.aclose()
        await asyncio.gather(*self._tasks, return_exceptions=True)
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
        on_end: Callable[[Generation], Awaitable[None]] | None = None,
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
            if key not in self._held:  # taken already by ``lease``, before the answer was stored
                await self.state.claim(key, self.owner, self.lease_seconds)
                self._held[key] = self.owner
            keys.append((key, self.owner))
        generation = Generation(
            open_stream,
            writer,
            grace=grace,
            shape=shape,
            recorder=recorder,
            settle=(lambda: self._release_all(keys)) if keys else None,
            on_end=on_end,
        )
        self._running[stream_id] = generation
        generation.task.add_done_callback(lambda _: self._ended(stream_id, keys))
        return generation

    async def _release_all(self, keys: list[tuple[str, str]]) -> None:
        """Release an ended answer's keys; bounded, as they expire on their own anyway."""
        try:
            async with asyncio.timeout(self.lease_seconds):
                for key, token in keys:
                    if self._held.get(key) == token:
                        await self.release(key, token)
        except TimeoutError:
            logger.error("releasing the keys of an answer took too long; they will expire")

    def _ended(self, stream_id: str, keys: list[tuple[str, str]]) -> None:
        self._running.pop(stream_id, None)
        self._remote_readers.pop(stream_id, None)
        for key, token in keys:  # any ``_release_all`` did not get to
            if self._held.get(key) == token:
                del self._held[key]
                task = asyncio.create_task(self.state.release(key, token))
                task.add_done_callback(_log_failure)

    def get(self, stream_id: str) -> Generation | None:
        return self._running.get(stream_id)

    def reader(self, stream_id: str) -> Reader:
        """What a connection reading ``stream_id`` reports to: the answer, if it runs here;
        otherwise whichever process runs it (if any), through the shared state."""
        generation = self._running.get(stream_id)
        if generation is not None:
            return generation
        return _RemoteReader(self, stream_id)

    async def hold(self, key: str) -> str | None:
        """Take ``key`` for an answer about to start; its token, or None if another has it."""
        token = secrets.token_hex(8)
        if not await self.state.claim(key, token, self.lease_seconds):
            return None
        self._held[key] = token
        return token

    @contextlib.asynccontextmanager
    async def lease(self, stream_id: str) -> AsyncIterator[None]:
        """Hold the owner lease of an answer *before* it is stored as running, so no process
        sweeping for dead answers ever sees it running and unowned; released again if the
        block fails (the answer was never started), else ``begin(leased=True)`` takes it on."""
        key = answer_lease(stream_id)
        await self.state.claim(key, self.owner, self.lease_seconds)
        self._held[key] = self.owner
        try:
            yield
        except BaseException:
            await self.release(key, self.owner)
            raise

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

    async def wait_ended(self, stream_id: str) -> bool:
        """Return once the answer ``stream_id`` has ended: here its task, elsewhere its log;
        True if its log ended ``interrupted`` (the process writing it died).

        Bound it with ``asyncio.timeout``: the process running it may be gone.
        """
        generation = self._running.get(stream_id)
        if generation is not None:
            await asyncio.gather(generation.task, return_exceptions=True)
            return False
        last = b""
        with contextlib.suppress(StreamNotFound):
            async for _, chunk in await self.log.read(stream_id, 0):
                last = chunk
        return last == INTERRUPTED_EVENT

    def _on_cancel(self, stream_id: str) -> None:
        generation = self._running.get(stream_id)
        if generation is not None:
            generation.cancel()

    def _on_reader(self, message: str) -> None:
        sign, stream_id = message[:1], message[1:]
        generation = self._running.get(stream_id)
        if generation is None:
            return  # it runs elsewhere, or nowhere any more
        count = self._remote_readers.get(stream_id, 0)
        if sign == "+":
            self._remote_readers[stream_id] = count + 1
            generation.attach()
        elif count > 0:  # never more detaches than attaches seen here
            self._remote_readers[stream_id] = count - 1
            generation.detach()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``work`` in a task this object keeps until it is done."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            for key, token in list(self._held.items()):
                try:
                    await self.state.renew(key, token, self.lease_seconds)
                except Exception:
                    logger.exception("renewing %s failed; retrying", key)


class _RemoteReader:
    """A reader here of an answer that runs on another process: announced there, where it
    counts like a local reader (``Generations._on_reader``)."""

    def __init__(self, generations: Generations, stream_id: str) -> None:
        self._generations = generations
        self._stream_id = stream_id
        self._attached: asyncio.Task[None] | None = None

    def attach(self) -> None:
        self._attached = self._generations._spawn(self._publish("+"))

    def detach(self) -> None:
        self._generations._spawn(self._publish("-", after=self._attached))

    async def _publish(self, sign: str, *, after: asyncio.Task[None] | None = None) -> None:
        if after is not None:  # in order: a detach never overtakes its attach
            await asyncio.gather(after, return_exceptions=True)
        try:
            await self._generations.state.publish(_READERS_CHANNEL, sign + self._stream_id)
        except Exception:
            logger.exception("announcing a reader of %s failed", self._stream_id)


def _log_failure(task: asyncio.Task[object]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        logger.error("releasing a shared key failed: %r", exc)
