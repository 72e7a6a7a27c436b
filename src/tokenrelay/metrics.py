"""Prometheus metrics: what tokenrelay counts, and how ``GET /metrics`` reads it.

Recorded at a few moments of a request, never per chunk: its response's start (``api/tracking``),
an answer's start and end (the gateway, ``relay/gateway.py``, which every call to a model passes
through), an upstream's failure (``providers/openai_compat``). Tokens come from the usage an
answer reports: a whole answer's body, or a stream's last chunks, read once when it ends.

With ``tokenrelay serve --workers N``, ``serve`` sets ``PROMETHEUS_MULTIPROC_DIR`` to a directory
of its own before the workers start: prometheus-client then keeps every value in a file per
process, and a scrape, whichever worker answers it, adds them up. The local model's figures,
read from its pool when scraped in one process, are copied into such files every second then.
"""

from __future__ import annotations

import asyncio
import glob
import logging
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from tokenrelay.chunks import Usage

if TYPE_CHECKING:
    from tokenrelay.providers.local.pool import PoolStats

__all__ = [
    "CONTENT_TYPE",
    "Exposition",
    "answer_ended",
    "request_answered",
    "stream_started",
    "upstream_error",
]

logger = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST
# As prometheus-client decides, once, when it is imported (``serve`` drops its old lowercase name).
_MULTIPROCESS_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
_MULTIPROCESS = _MULTIPROCESS_DIR is not None

# A `_created` series per counter would double a scrape, for nothing we use.
disable_created_metrics()  # type: ignore[no-untyped-call]  # unannotated upstream

_PUBLISH_INTERVAL = 1.0  # seconds between copies of the local model's figures (several workers)
_MAX_MODELS = 100
"""Model names given labels of their own, per process; more are ``other``: a client names the
model, and a provider serving ``*`` takes any name."""

_REQUESTS = Counter(
    "tokenrelay_requests",
    "HTTP requests answered, by route, model and status.",
    ["route", "model", "status"],
)
_TIME_TO_FIRST_TOKEN = Histogram(
    "tokenrelay_time_to_first_token_seconds",
    "Seconds from an answer's start to its first log entry (a whole answer: to the answer).",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60),
)
_DURATION = Histogram(
    "tokenrelay_request_duration_seconds",
    "Seconds from an answer's start to the end of its log (a whole answer: to the answer).",
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640),
)
_TOKENS = Counter(
    "tokenrelay_tokens", "Tokens the answers reported using, by direction.", ["direction"]
)
_PROMPT_TOKENS, _COMPLETION_TOKENS = _TOKENS.labels("prompt"), _TOKENS.labels("completion")
_ACTIVE_STREAMS = Gauge(
    "tokenrelay_active_streams",
    "Streamed answers running now.",
    multiprocess_mode="livesum",
)
_UPSTREAM_ERRORS = Counter(
    "tokenrelay_upstream_errors", "Failed exchanges with an upstream, by provider.", ["provider"]
)
_QUEUE_DEPTH_NAME = "tokenrelay_local_queue_depth"
_QUEUE_DEPTH_HELP = "Requests waiting for a local model instance."
_RESTARTS_NAME = "tokenrelay_local_worker_restarts"
_RESTARTS_HELP = "Local model worker processes restarted after a crash."

_models: set[str] = set()


# Recording: one call per event of a request, each a few dict lookups and additions.


def request_answered(route: str, model: str, status: int) -> None:
    """An HTTP response started with ``status``."""
    if model not in _models:
        if len(_models) >= _MAX_MODELS:
            model = "other"
        else:
            _models.add(model)
    _REQUESTS.labels(route, model, str(status)).inc()


def stream_started() -> None:
    _ACTIVE_STREAMS.inc()


def answer_ended(
    seconds: float, first_token: float | None, usage: Usage | None, *, streamed: bool
) -> None:
    """An answer ended ``seconds`` after it was asked (a stream: its log ended), its first
    token ``first_token`` seconds in (None: it never had one), having used ``usage``."""
    if streamed:
        _ACTIVE_STREAMS.dec()
    _DURATION.observe(seconds)
    if first_token is not None:
        _TIME_TO_FIRST_TOKEN.observe(first_token)
    if usage is not None:
        prompt, completion = usage
        if prompt:
            _PROMPT_TOKENS.inc(prompt)
        if completion:
            _COMPLETION_TOKENS.inc(completion)


def upstream_error(provider: str) -> None:
    _UPSTREAM_ERRORS.labels(provider).inc()


# Reading.


class _LocalModel:
    """The local model's queue depth and worker restarts, from its pool's stats.

    A collector read at scrape time in one process; with several, each copies its pool's
    figures into per-process files every second (a scrape reads them all).
    """

    def __init__(self, stats: Callable[[], PoolStats]) -> None:
        self._stats = stats
        self._restarts_copied = 0
        self._queue_depth: Gauge | None = None
        self._restarts: Counter | None = None
        if _MULTIPROCESS:  # not registered: the files are what a scrape reads
            self._queue_depth = Gauge(
                _QUEUE_DEPTH_NAME, _QUEUE_DEPTH_HELP, registry=None, multiprocess_mode="livesum"
            )
            self._restarts = Counter(_RESTARTS_NAME, _RESTARTS_HELP, registry=None)

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        yield GaugeMetricFamily(_QUEUE_DEPTH_NAME, _QUEUE_DEPTH_HELP, value=stats.waiting)
        yield CounterMetricFamily(_RESTARTS_NAME, _RESTARTS_HELP, value=stats.restarts)

    def copy(self) -> None:
        assert self._queue_depth is not None and self._restarts is not None
        stats = self._stats()
        self._queue_depth.set(stats.waiting)
        if stats.restarts > self._restarts_copied:
            self._restarts.inc(stats.restarts - self._restarts_copied)
            self._restarts_copied = stats.restarts


class Exposition:
    """What ``GET /metrics`` answers, for one app; ``start`` and ``aclose`` in its lifespan."""

    def __init__(self, local_stats: Callable[[], PoolStats] | None = None) -> None:
        self._local = _LocalModel(local_stats) if local_stats is not None else None
        self._local_registry: CollectorRegistry | None = None
        if self._local is not None and not _MULTIPROCESS:
            self._local_registry = CollectorRegistry()
            self._local_registry.register(self._local)
        self._copier: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if _MULTIPROCESS and self._local is not None:
            self._copier = asyncio.create_task(self._copy_forever(self._local))

    async def aclose(self) -> None:
        if self._copier is not None:
            self._copier.cancel()
            await asyncio.gather(self._copier, return_exceptions=True)
        if _MULTIPROCESS:  # this process's gauges leave the sums
            multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]  # unannotated upstream

    async def render(self) -> bytes:
        """The Prometheus text exposition of every metric, across processes when there are
        several (their files are read in a thread)."""
        if not _MULTIPROCESS:
            text = generate_latest(REGISTRY)
            if self._local_registry is not None:
                text += generate_latest(self._local_registry)
            return text
        if self._local is not None:
            self._local.copy()  # this process's figures as of now, read on the pool's loop
        return await asyncio.to_thread(_render_files)

    @staticmethod
    async def _copy_forever(local: _LocalModel) -> None:
        while True:
            try:
                local.copy()
            except Exception:  # never stop copying for one failure
                logger.exception("copying the local model's metrics failed")
            await asyncio.sleep(_PUBLISH_INTERVAL)


def _render_files() -> bytes:
    _forget_dead_processes()
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # unannotated upstream
    return generate_latest(registry)


def _forget_dead_processes() -> None:
    """Drop the live gauges of worker processes that died without saying so (a crash, a kill):
    uvicorn restarts a worker under a new pid, and the old one's figures must not count."""
    directory = _MULTIPROCESS_DIR
    assert directory is not None
    for path in glob.glob(os.path.join(directory, "gauge_live*_*.db")):
        pid_text = path.rsplit("_", 1)[-1].removesuffix(".db")
        if not pid_text.isdigit():
            continue
        pid = int(pid_text)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]  # unannotated upstream
        except PermissionError:  # alive, under another user
            pass
