"""The threads that own llama.cpp model instances: loading, admission, decoding.

One ``Llama`` object is not thread-safe, so each instance lives in its own worker thread and
decodes one job at a time. Jobs wait in a bounded queue shared by all workers; a job that does
not fit is refused at once (`RateLimited`). Results cross back to the requesting event loop with
``loop.call_soon_threadsafe`` into the job's ``asyncio.Queue``: text deltas as ``str``, then one
terminal item (`Finished` or a `TokenrelayError`). Nothing here knows OpenAI's response shapes.
"""

from __future__ import annotations

import asyncio
import codecs
import ctypes
import logging
import queue
import threading
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from tokenrelay.errors import InvalidRequest, ModelUnavailable, RateLimited, TokenrelayError

__all__ = [
    "Sampling",
    "Job",
    "Started",
    "Finished",
    "EngineStats",
    "LlamaEngine",
    "check_model_file",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Sampling:
    """How to pick tokens; field names follow OpenAI where OpenAI has the knob."""

    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repeat_penalty: float
    frequency_penalty: float
    presence_penalty: float
    seed: int | None
    stop: tuple[str, ...]


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


class _State(Enum):
    WAITING = 1
    RUNNING = 2
    CANCELLED = 3  # cancelled while still waiting; a worker will skip it
    DONE = 4


Item = str | Started | Finished | TokenrelayError
"""What a worker sends to the event loop for one job."""


class Job:
    """One generation: its input, where its output goes, and how to stop it.

    ``messages`` (chat, rendered with the model's template) or ``prompt`` (text or token ids)
    is set, never both.
    """

    __slots__ = ("_state", "cancelled", "loop", "messages", "prompt", "queue", "sampling")

    def __init__(
        self,
        *,
        sampling: Sampling,
        messages: list[dict[str, Any]] | None = None,
        prompt: str | list[int] | None = None,
    ) -> None:
        self.sampling = sampling
        self.messages = messages
        self.prompt = prompt
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Item] = asyncio.Queue()
        # Set from any thread; the worker reads it between tokens.
        self.cancelled = threading.Event()
        self._state = _State.WAITING

    def emit(self, item: Item) -> bool:
        """Hand ``item`` to the event loop; False once nobody can receive it."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the requesting event loop is closed: the client is gone
            self.cancelled.set()
            return False
        return True


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot for tests, benchmarks and metrics."""

    loaded: bool
    instances: int
    running: int
    waiting: int
    decoded_tokens: int


def check_model_file(path: Path) -> None:
    """Raise ``ModelUnavailable`` unless ``path`` is a readable GGUF file (cheap: 4 bytes read)."""
    if not path.exists():
        raise ModelUnavailable(f"The local model file {path} does not exist.")
    if not path.is_file():
        raise ModelUnavailable(f"The local model path {path} is not a file.")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError:
        raise ModelUnavailable(f"The local model file {path} cannot be read.") from None
    if magic != b"GGUF":
        raise ModelUnavailable(f"The local model file {path} is not a GGUF file.")


class LlamaEngine:
    """A pool of ``instances`` model copies behind one bounded queue of ``queue_size`` jobs.

    ``load`` and ``close`` block (call them from a thread); ``submit`` and ``cancel`` are cheap
    and safe from any thread.
    """

    def __init__(
        self,
        path: Path,
        *,
        threads: int,
        context_size: int,
        instances: int,
        queue_size: int,
    ) -> None:
        self.path = path
        self._threads = threads
        self._context_size = context_size
        self._instances = instances
        self._queue_size = queue_size
        self._load_lock = threading.Lock()
        self._lock = threading.Lock()  # guards the counters and job states below
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._workers: list[_Worker] = []
        self._admitted: set[Job] = set()  # waiting or running
        self._running = 0
        self._closed = False
        self.chat_template: str | None = None

    @property
    def loaded(self) -> bool:
        return bool(self._workers)

    def load(self) -> None:
        """Open every instance and start its thread; raise `ModelUnavailable` if we cannot."""
        with self._load_lock:
            if self._workers:
                return
            if self._closed:
                raise ModelUnavailable("The local model has been shut down.")
            llamas: list[Any] = []
            try:
                for _ in range(self._instances):
                    llamas.append(self._open())
            except BaseException:
                for llama in llamas:
                    llama.close()
                raise
            self.chat_template = llamas[0].metadata.get("tokenizer.chat_template") or None
            workers = [_Worker(self, llama, n) for n, llama in enumerate(llamas)]
            for worker in workers:
                worker.start()
            self._workers = workers

    def _open(self) -> Any:
        path = self.path
        check_model_file(path)
        try:
            return llama_cpp.Llama(
                model_path=str(path),
                n_ctx=self._context_size,
                n_threads=self._threads,
                n_threads_batch=self._threads,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelUnavailable(
                f"The local model file {path} could not be loaded by llama.cpp "
                "(corrupt, truncated, or an unsupported architecture)."
            ) from exc

    def submit(self, job: Job) -> None:
        """Queue ``job``, or refuse it (`RateLimited`) when all instances and places are taken."""
        with self._lock:
            if self._closed:
                raise ModelUnavailable("The local model has been shut down.")
            if len(self._admitted) >= self._instances + self._queue_size:
                waiting = len(self._admitted) - self._running
                raise RateLimited(
                    f"The local model is busy ({self._running} answering, {waiting} waiting); "
                    "retry shortly.",
                    retry_after=1,
                )
            self._admitted.add(job)
        self._jobs.put(job)

    def cancel(self, job: Job) -> None:
        """Stop ``job``: a waiting job leaves the queue now, a running one within a token."""
        job.cancelled.set()
        with self._lock:
            if job._state is _State.WAITING:
                job._state = _State.CANCELLED
                self._admitted.discard(job)

    def stats(self) -> EngineStats:
        with self._lock:
            running = self._running
            waiting = len(self._admitted) - running
        return EngineStats(
            loaded=self.loaded,
            instances=self._instances,
            running=running,
            waiting=waiting,
            decoded_tokens=sum(w.decoded_tokens for w in self._workers),
        )

    def close(self) -> None:
        """Stop every job, end the threads and free the models. Blocks until done."""
        with self._load_lock:
            with self._lock:
                self._closed = True
                jobs = list(self._admitted)
            for job in jobs:
                self.cancel(job)
                # A waiting job's requester is still listening; a running job's gets the
                # same error from its worker when decoding stops.
                if job._state is _State.CANCELLED:
                    job.emit(ModelUnavailable("The local model was shut down."))
            for _ in self._workers:
                self._jobs.put(None)
            for worker in self._workers:
                worker.join()
            self._workers = []

    # Called by workers.

    def _next_job(self) -> Job | None:
        while True:
            job = self._jobs.get()
            if job is None:
                return None
            with self._lock:
                if job._state is _State.CANCELLED:
                    continue
                if job.cancelled.is_set():  # `cancel` is under way, or the stream was dropped
                    job._state = _State.DONE
                    self._admitted.discard(job)
                    continue
                job._state = _State.RUNNING
                self._running += 1
            return job

    def _job_done(self, job: Job) -> None:
        with self._lock:
            job._state = _State.DONE
            self._running -= 1
            self._admitted.discard(job)


class _Worker(threading.Thread):
    """Owns one ``Llama``; runs jobs one after another until it gets ``None``."""

    def __init__(self, engine: LlamaEngine, llama: Any, number: int) -> None:
        super().__init__(name=f"tokenrelay-llama-{number}", daemon=True)
        self._engine = engine
        self._llama = llama
        self._n_ctx: int = llama.n_ctx()
        self._n_vocab: int = llama.n_vocab()
        self._vocab = llama_cpp.llama_model_get_vocab(llama.model)
        self._piece_buf = ctypes.create_string_buffer(64)
        self._pieces: dict[int, bytes] = {}
        self._formatter: Jinja2ChatFormatter | None = None
        self.decoded_tokens = 0  # written by this thread only
        template = engine.chat_template
        if template:
            self._formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=self._special_text(llama.token_eos()),
                bos_token=self._special_text(llama.token_bos()),
            )

    def _special_text(self, token: int) -> str:
        if token < 0:
            return ""
        return bytes(self._llama.detokenize([token], special=True)).decode("utf-8", "replace")

    def run(self) -> None:
        try:
            while (job := self._engine._next_job()) is not None:
                last: Item | None
                try:
                    last = self._run(job)
                except Exception:
                    logger.exception("local model failed while generating")
                    last = TokenrelayError("The local model failed while generating; see the log.")
                # Free the instance before the requester hears the end, so that a request it
                # sends next never sees this one still running.
                self._engine._job_done(job)
                if last is not None:
                    job.emit(last)
        finally:
            self._llama.close()

    def _prompt_tokens(self, job: Job) -> list[int]:
        llama = self._llama
        if job.messages is not None:
            if self._formatter is None:  # checked before submitting; kept as a guard
                raise InvalidRequest("The model has no chat template.", param="messages")
            try:
                messages: list[Any] = (
                    job.messages
                )  # plain dicts; llama_cpp types them as TypedDicts
                rendered = self._formatter(messages=messages).prompt
            except Exception as exc:
                # Templates reject bad conversations with `raise_exception("...")`, whose
                # text is written for the caller (e.g. "roles must alternate").
                raise InvalidRequest(
                    f"The model's chat template rejected these messages: {exc}",
                    param="messages",
                ) from None
            # The template writes the special tokens (BOS included) itself.
            tokens: list[int] = llama.tokenize(rendered.encode("utf-8"), False, True)
        elif isinstance(job.prompt, str):
            tokens = llama.tokenize(job.prompt.encode("utf-8"), True, True)
            if not tokens and llama.token_bos() >= 0:
                tokens = [llama.token_bos()]
        else:
            tokens = list(job.prompt or ())
            if any(not 0 <= t < self._n_vocab for t in tokens):
                raise InvalidRequest(
                    f"Token ids in `prompt` must lie in [0, {self._n_vocab}).", param="prompt"
                )
        if not tokens:
            raise InvalidRequest("The prompt is empty.", param="prompt")
        if len(tokens) >= self._n_ctx:
            raise InvalidRequest(
                f"This model's maximum context length is {self._n_ctx} tokens, "
                f"but the prompt has {len(tokens)} tokens.",
                param="messages" if job.messages is not None else "prompt",
                code="context_length_exceeded",
            )
        return tokens

    def _piece(self, token: int) -> bytes:
        buf = self._piece_buf
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        if n < 0:  # the piece is longer than the buffer: -n is the size needed
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        piece = buf.raw[:n]
        self._pieces[token] = piece
        return piece

    def _run(self, job: Job) -> Item | None:
        """Decode ``job``, emitting its text; return its last item (None: nobody listens)."""
        try:
            prompt = self._prompt_tokens(job)
        except TokenrelayError as exc:
            return exc
        n_prompt = len(prompt)
        s = job.sampling
        room = self._n_ctx - n_prompt
        limit = room if s.max_tokens is None else min(s.max_tokens, room)
        cancelled = job.cancelled
        if not job.emit(Started(n_prompt)) or cancelled.is_set():
            return None

        llama = self._llama
        llama.set_seed(llama_cpp.LLAMA_DEFAULT_SEED if s.seed is None else s.seed)
        tokens = llama.generate(
            prompt,
            top_k=s.top_k,
            top_p=s.top_p,
            min_p=s.min_p,
            temp=s.temperature,
            repeat_penalty=s.repeat_penalty,
            frequency_penalty=s.frequency_penalty,
            presence_penalty=s.presence_penalty,
        )
        # The hot loop: one forward pass per iteration, inside `next(tokens)`; the rest is
        # kept to a dict lookup, an incremental UTF-8 decode and one hand-off per token.
        decode = codecs.getincrementaldecoder("utf-8")("replace").decode
        stops = _StopScanner(s.stop) if s.stop else None
        pieces = self._pieces
        vocab = self._vocab
        is_eog = llama_cpp.llama_vocab_is_eog
        emit = job.emit
        finish_reason = "length"
        stop_sequence_found = False
        produced = 0
        try:
            for token in tokens:
                if is_eog(vocab, token):
                    finish_reason = "stop"
                    break
                produced += 1
                self.decoded_tokens += 1
                piece = pieces.get(token)
                text = decode(self._piece(token) if piece is None else piece)
                if stops is not None:
                    text, hit = stops.feed(text)
                    if hit:
                        if text:
                            emit(text)
                        finish_reason, stop_sequence_found = "stop", True
                        break
                if text and not emit(text):
                    return None
                if produced >= limit or cancelled.is_set():
                    break
        finally:
            tokens.close()
        if cancelled.is_set():
            # Heard only when `close` stopped the job; a requester that cancelled has gone.
            return ModelUnavailable("The local model stopped before the answer was finished.")
        if not stop_sequence_found:  # send what was held back: a partial character or stop
            tail = decode(b"", True)
            if stops is not None:
                tail = stops.flush(tail)
            if tail:
                emit(tail)
        return Finished(finish_reason, n_prompt, produced)


class _StopScanner:
    """Finds stop sequences in streamed text, holding back only what could begin one."""

    __slots__ = ("_held", "_longest", "_stops")

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._longest = max(len(s) for s in stops)
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Return the text safe to send now, and whether a stop sequence was reached."""
        held = self._held + text
        cut = min((i for i in (held.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            return held[:cut], True
        # Keep the longest tail that is the start of some stop sequence.
        keep = 0
        for k in range(min(len(held), self._longest - 1), 0, -1):
            tail = held[-k:]
            if any(s.startswith(tail) for s in self._stops):
                keep = k
                break
        self._held = held[len(held) - keep :]
        return held[: len(held) - keep], False

    def flush(self, text: str) -> str:
        """At the end: whatever was held back (plus ``text``), minus any stop inside it."""
        out, _ = self.feed(text)
        out += self._held
        self._held = ""
        return out
