"""The gateway's side of the local model: worker processes, admission, supervision.

Each model instance is a child process (``worker.py``) that owns llama.cpp; this module never
imports it. Jobs wait in one bounded queue and go to whichever worker is idle; a job that does not
fit is refused at once (`RateLimited`). Output crosses back over a Unix socket as it is decoded and
lands in the job's ``asyncio.Queue``: text as ``str``, ``Started``, then one terminal item
(`Finished` or a `TokenrelayError`).

A worker that dies (segfault, abort, OOM kill, SIGKILL) ends its job with `ModelCrashed` and is
restarted with a growing backoff; after ``max_crashes`` crashes in a row without a finished answer
in between, the model is reported unavailable with the reason instead of being restarted in a loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tokenrelay.errors import (
    InvalidRequest,
    ModelCrashed,
    ModelUnavailable,
    RateLimited,
    TokenrelayError,
)
from tokenrelay.providers.local import wire
from tokenrelay.providers.local.extra_buffers import ExtraBuffersMemory
from tokenrelay.providers.local.wire import Sampling

__all__ = ["Finished", "Item", "Job", "PoolStats", "Started", "WorkerPool"]

logger = logging.getLogger(__name__)

_LOAD_TIMEOUT = 300.0  # seconds a worker may take to load its model and say it is ready
_STOP_TIMEOUT = 5.0  # seconds a worker gets to exit after its socket closes, before SIGKILL
_BACKOFF_FIRST, _BACKOFF_MAX = 0.25, 10.0


@dataclass(frozen=True, slots=True)
class Started:
    """The job left the queue and its prompt fits: decoding begins."""

    prompt_tokens: int


@dataclass(frozen=True, slots=True)
class Finished:
    """The last item of a job that ran to its end."""

    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int


Item = str | Started | Finished | TokenrelayError
"""What a job's queue receives."""


class Job:
    """One generation: its input, where its output goes, and which worker runs it."""

    __slots__ = ("id", "messages", "prompt", "queue", "sampling", "slot", "texts")

    def __init__(
        self,
        *,
        sampling: Sampling,
        messages: list[dict[str, Any]] | None = None,
        prompt: str | list[int] | None = None,
    ) -> None:
        self.id = 0  # set by the pool
        self.sampling = sampling
        self.messages = messages
        self.prompt = prompt
        self.queue: asyncio.Queue[Item] = asyncio.Queue()
        self.slot: _Slot | None = None  # the worker running it; None while waiting
        self.texts = 0  # text pieces received, to count decoded tokens as they come


@dataclass(frozen=True, slots=True)
class PoolStats:
    """A snapshot for tests, benchmarks and metrics."""

    loaded: bool
    instances: int
    running: int
    waiting: int
    decoded_tokens: int
    restarts: int
    unavailable: str | None


def _signal_name(returncode: int | None) -> str:
    if returncode is None:
        return "closed its connection"
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-returncode).name}"
        return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


class _WorkerDied(Exception):
    """A worker ended before saying it was ready; ``reason`` says how."""

    def __init__(self, reason: str, *, fatal: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.fatal = fatal  # the worker's own message when it refused the model cleanly


class _Slot:
    """One worker process and the job it is running."""

    def __init__(self, pool: WorkerPool, number: int) -> None:
        self.pool = pool
        self.number = number
        self.proc: asyncio.subprocess.Process | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.job: Job | None = None
        self.ready = False
        self.reader_task: asyncio.Task[None] | None = None

    async def start(self, *, extra_buffers: bool, probe: bool) -> bool:
        """Start the worker and wait until it is ready; returns whether it has a chat template.

        Raises `_WorkerDied` when the process ends (or refuses the model) first.
        """
        pool = self.pool
        parent, child = socket.socketpair()
        try:
            command = [
                sys.executable, "-m", "tokenrelay.providers.local.worker",
                "--fd", str(child.fileno()),
                "--model", str(pool.path),
                "--threads", str(pool.threads),
                "--context-size", str(pool.context_size),
                "--extra-buffers", "on" if extra_buffers else "off",
            ]  # fmt: skip
            if probe:
                command.append("--probe")
            self.proc = await asyncio.create_subprocess_exec(
                *command, pass_fds=(child.fileno(),), stdin=asyncio.subprocess.DEVNULL
            )
        finally:
            child.close()
        reader, self.writer = await asyncio.open_unix_connection(
            sock=parent, limit=wire.MAX_LINE_BYTES
        )
        try:
            line = await asyncio.wait_for(reader.readline(), _LOAD_TIMEOUT)
        except TimeoutError:
            await self.stop()
            raise _WorkerDied(f"did not load the model within {_LOAD_TIMEOUT:.0f} s") from None
        message = wire.decode(line) if line else {}
        if "ready" not in message:
            await self.stop()
            fatal = message.get("fatal")
            raise _WorkerDied(
                _signal_name(self.proc.returncode), fatal=fatal if isinstance(fatal, str) else None
            )
        self.ready = True
        self.reader_task = asyncio.create_task(
            self._read(reader), name=f"local worker {self.number}"
        )
        return bool(message["ready"].get("chat_template"))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        """Hand each line to the running job; on EOF, the worker is gone."""
        try:
            while line := await reader.readline():
                job = self.job
                message = wire.decode(line)
                if job is None or message.get("id") != job.id:
                    continue  # the end of a job already given up on (a crash race): drop it
                if (text := message.get("text")) is not None:
                    job.texts += 1
                    job.queue.put_nowait(text)
                elif (started := message.get("started")) is not None:
                    job.queue.put_nowait(Started(started))
                else:
                    self.pool._job_ended(self, job, _terminal(message))
        except (ValueError, OSError, asyncio.LimitOverrunError):
            logger.exception("local model worker %d sent something unreadable", self.number)
        finally:
            self.ready = False
        await self.pool._worker_died(self)

    def send(self, data: bytes) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(data)

    async def stop(self) -> None:
        """Close the socket (the worker stops decoding and exits), then reap it, by force if
        need be."""
        self.ready = False
        if self.writer is not None:
            self.writer.close()
        await self.wait_exit()

    async def wait_exit(self) -> int | None:
        """Reap the process: its exit status, after ``_STOP_TIMEOUT`` s by SIGKILL."""
        if self.proc is None:
            return None
        try:
            return await asyncio.wait_for(self.proc.wait(), _STOP_TIMEOUT)
        except TimeoutError:
            self.proc.kill()
            return await self.proc.wait()


def _terminal(message: dict[str, Any]) -> TokenrelayError | Finished:
    if (done := message.get("done")) is not None:
        finish_reason, prompt_tokens, completion_tokens = done
        return Finished(finish_reason, prompt_tokens, completion_tokens)
    if message.get("cancelled"):
        return ModelUnavailable("The local model stopped before the answer was finished.")
    error = message.get("error") or {}
    if error.get("internal"):
        return TokenrelayError(str(error.get("message")))
    return InvalidRequest(
        str(error.get("message")), param=error.get("param"), code=error.get("code")
    )


class WorkerPool:
    """``instances`` worker processes behind one bounded queue of ``queue_size`` jobs.

    Lives on one event loop (the first that calls ``load``); every method but ``load`` and
    ``aclose`` is synchronous and cheap.
    """

    def __init__(
        self,
        path: Path,
        *,
        threads: int,
        context_size: int,
        instances: int,
        queue_size: int,
        extra_buffers: Literal["auto", "on", "off"],
        memory: ExtraBuffersMemory,
        max_crashes: int = 5,
    ) -> None:
        self.path = path
        self.threads = threads
        self.context_size = context_size
        self._instances = instances
        self._queue_size = queue_size
        self._extra_buffers_setting = extra_buffers
        self._memory = memory
        self._max_crashes = max_crashes
        self._slots = [_Slot(self, n) for n in range(instances)]
        self._waiting: collections.deque[Job] = collections.deque()
        self._running = 0
        self._next_id = 0
        self._decoded = 0
        self._crashes = 0  # in a row, without a finished answer in between
        self._restarts = 0
        self._restarting: set[asyncio.Task[None]] = set()
        self._load_lock = asyncio.Lock()
        self._loaded = False
        self._closed = False
        self._extra_buffers: bool | None = None  # decided at the first start
        self.unavailable: str | None = None
        self.chat_template = False

    @property
    def loaded(self) -> bool:
        return self._loaded

    async def load(self) -> None:
        """Start every worker, retrying crashes with backoff; raise `ModelUnavailable` if the
        model cannot be served (the file is refused, or the workers crash ``max_crashes`` times).
        """
        async with self._load_lock:
            while not self._loaded:
                self._check_available()
                try:
                    await self._start_all()
                except _WorkerDied as died:
                    if died.fatal:
                        self._give_up(died.fatal)
                        raise ModelUnavailable(died.fatal) from None
                    self._crashes += 1
                    logger.error(
                        "local model: worker %s while loading %s (crash %d in a row)",
                        died.reason,
                        self.path,
                        self._crashes,
                    )
                    if self._crashes >= self._max_crashes:
                        self._give_up(
                            f"The local model's worker process {died.reason} while loading "
                            f"the model, {self._crashes} times in a row."
                        )
                        raise ModelUnavailable(self.unavailable or "") from None
                    await asyncio.sleep(self._backoff())

    async def _start_all(self) -> None:
        first, others = self._slots[0], self._slots[1:]
        try:
            self.chat_template = await self._start_first(first)
            results = await asyncio.gather(
                *(self._start(slot) for slot in others), return_exceptions=True
            )
            for result in results:
                if isinstance(result, BaseException):
                    raise result
        except BaseException:
            await asyncio.gather(*(slot.stop() for slot in self._slots))
            raise
        self._loaded = True

    def _backoff(self) -> float:
        return float(min(_BACKOFF_FIRST * 2 ** (self._crashes - 1), _BACKOFF_MAX))

    async def _start_first(self, slot: _Slot) -> bool:
        """Start the first worker, deciding whether llama.cpp's extra buffer types may be used.

        ``auto`` with no remembered decision: probe with them on; if the worker dies in that
        first decode, start it again with them off and remember that for this machine.
        """
        if self._extra_buffers is None:
            setting = self._extra_buffers_setting
            self._extra_buffers = self._memory.recall() if setting == "auto" else setting == "on"
        if self._extra_buffers is not None:
            return await slot.start(extra_buffers=self._extra_buffers, probe=False)
        try:
            chat = await slot.start(extra_buffers=True, probe=True)
        except _WorkerDied as died:
            if died.fatal:
                raise
            logger.warning(
                "local model: the worker %s with llama.cpp's extra buffer types (AMX, weight "
                "repacking) on this CPU; it runs without them from now on (remembered in %s)",
                died.reason,
                self._memory.path,
            )
            self._extra_buffers = False
            chat = await slot.start(extra_buffers=False, probe=True)
        else:
            self._extra_buffers = True
        self._memory.remember(self._extra_buffers)
        return chat

    async def _start(self, slot: _Slot) -> None:
        assert self._extra_buffers is not None
        await slot.start(extra_buffers=self._extra_buffers, probe=False)

    def _check_available(self) -> None:
        if self._closed:
            raise ModelUnavailable("The local model has been shut down.")
        if self.unavailable is not None:
            raise ModelUnavailable(self.unavailable)

    def submit(self, job: Job) -> None:
        """Queue ``job``, or refuse it (`RateLimited`) when all instances and places are taken."""
        self._check_available()
        waiting = len(self._waiting)
        if self._running + waiting >= self._instances + self._queue_size:
            raise RateLimited(
                f"The local model is busy ({self._running} answering, {waiting} waiting); "
                "retry shortly.",
                retry_after=1,
            )
        self._next_id += 1
        job.id = self._next_id
        self._waiting.append(job)
        self._dispatch()

    def cancel(self, job: Job) -> None:
        """Stop ``job``: a waiting job leaves the queue now, a running one within a token."""
        if job.slot is not None:
            job.slot.send(wire.encode({"op": "cancel", "id": job.id}))
            return
        with contextlib.suppress(ValueError):
            self._waiting.remove(job)

    def stats(self) -> PoolStats:
        return PoolStats(
            loaded=self._loaded,
            instances=self._instances,
            running=self._running,
            waiting=len(self._waiting),
            decoded_tokens=self._decoded
            + sum(s.job.texts for s in self._slots if s.job is not None),
            restarts=self._restarts,
            unavailable=self.unavailable,
        )

    def _dispatch(self) -> None:
        for slot in self._slots:
            if not self._waiting:
                return
            if slot.ready and slot.job is None:
                job = self._waiting.popleft()
                slot.job, job.slot = job, slot
                self._running += 1
                slot.send(wire.run_message(job.id, job.sampling, job.messages, job.prompt))

    def _job_ended(self, slot: _Slot, job: Job, last: TokenrelayError | Finished) -> None:
        """Free the instance first, so a request the requester sends next never sees this one."""
        slot.job, job.slot = None, None
        self._running -= 1
        if isinstance(last, Finished):
            self._decoded += last.completion_tokens
            self._crashes = 0
        else:
            self._decoded += job.texts
        job.queue.put_nowait(last)
        self._dispatch()

    async def _worker_died(self, slot: _Slot) -> None:
        returncode = await slot.wait_exit()
        job = slot.job
        if self._closed:
            if job is not None:
                self._job_ended(slot, job, ModelUnavailable("The local model was shut down."))
            return
        how = _signal_name(returncode)
        self._crashes += 1
        logger.error(
            "local model: worker %d %s (crash %d in a row)", slot.number, how, self._crashes
        )
        if job is not None:
            self._job_ended(
                slot,
                job,
                ModelCrashed(f"The local model's worker process {how}; it is being restarted."),
            )
        if self._crashes >= self._max_crashes:
            self._give_up(
                f"The local model's worker process {how}, {self._crashes} times in a row."
            )
            return
        task = asyncio.create_task(self._restart(slot))
        self._restarting.add(task)
        task.add_done_callback(self._restarting.discard)

    async def _restart(self, slot: _Slot) -> None:
        await asyncio.sleep(self._backoff())
        while not self._closed and self.unavailable is None:
            self._restarts += 1
            try:
                await self._start(slot)
            except _WorkerDied as died:
                self._crashes += 1
                logger.error("local model: restarted worker %d %s", slot.number, died.reason)
                if died.fatal or self._crashes >= self._max_crashes:
                    self._give_up(
                        died.fatal
                        or f"The local model's worker process {died.reason}, "
                        f"{self._crashes} times in a row."
                    )
                    return
                await asyncio.sleep(self._backoff())
                continue
            if self._closed:
                await slot.stop()
                return
            logger.info("local model: worker %d restarted", slot.number)
            self._dispatch()
            return

    def _give_up(self, reason: str) -> None:
        """Repeated crashes: report the model unavailable rather than restarting in a loop."""
        self.unavailable = reason
        logger.error("local model: unavailable, not restarting: %s", reason)
        while self._waiting:
            self._waiting.popleft().queue.put_nowait(ModelUnavailable(reason))

    async def aclose(self) -> None:
        """End every job with an error, stop the workers and wait for them to exit."""
        self._closed = True
        for task in list(self._restarting):
            task.cancel()
        while self._waiting:
            self._waiting.popleft().queue.put_nowait(
                ModelUnavailable("The local model was shut down.")
            )
        await asyncio.gather(*(slot.stop() for slot in self._slots))
        readers = [s.reader_task for s in self._slots if s.reader_task is not None]
        await asyncio.gather(*readers, return_exceptions=True)
