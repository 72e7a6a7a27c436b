"""``/metrics`` over real servers: what an answer records, and the sums across ``--workers``."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from conftest import NO_LOCAL_MODEL, Relay, fake_provider_toml, scrape, start_tokenrelay
from fake_upstream import FakeUpstream
from redis_server import REDIS_URL, require_redis

MESSAGES: list[Any] = [{"role": "user", "content": "how many words are in this prompt"}]
OK_CHAT = 'tokenrelay_requests_total{model="fake-model",route="/v1/chat/completions",status="200"}'
PROMPT_TOKENS = 'tokenrelay_tokens_total{direction="prompt"}'
COMPLETION_TOKENS = 'tokenrelay_tokens_total{direction="completion"}'
ACTIVE = "tokenrelay_active_streams"
TTFT = "tokenrelay_time_to_first_token_seconds"
DURATION = "tokenrelay_request_duration_seconds"
FAKE_ERRORS = 'tokenrelay_upstream_errors_total{provider="fake"}'
DEADLINE = 10.0


class Delta:
    """How the metrics moved since it was made (``delta[key]``), read again on ``refresh()``."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.before = scrape(relay)
        self.after = self.before

    def refresh(self) -> Delta:
        self.after = scrape(self.relay)
        return self

    def __getitem__(self, key: str) -> float:
        return self.after.get(key, 0.0) - self.before.get(key, 0.0)

    def wait(self, condition: Callable[[Delta], bool], what: str) -> None:
        """Scrape until ``condition`` holds: an answer's end is recorded as its log ends, which
        its client may see a moment before."""
        deadline = time.monotonic() + DEADLINE
        while not condition(self.refresh()):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting until {what}: {self.after}")
            time.sleep(0.02)


def test_a_streamed_answer_counts_its_request_usage_and_times(
    relay: Relay, openai_client: openai.OpenAI
) -> None:
    delta = Delta(relay)
    stream = openai_client.chat.completions.create(
        model="fake-model",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
        # The first chunk comes 0.3 s after the headers: the time to first token is to it.
        extra_body={"fake": {"tokens": 4, "first_delay": 0.3}},
    )
    chunks = list(stream)
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 4

    delta.wait(lambda d: d[f"{DURATION}_count"] == 1, "the answer's end is recorded")
    assert delta[OK_CHAT] == 1
    assert delta[PROMPT_TOKENS] == usage.prompt_tokens == 7
    assert delta[COMPLETION_TOKENS] == 4
    assert delta[f"{TTFT}_count"] == 1
    assert delta[f'{TTFT}_bucket{{le="0.25"}}'] == 0
    assert 0.3 <= delta[f"{TTFT}_sum"] <= delta[f"{DURATION}_sum"]
    assert delta[ACTIVE] == 0


def test_a_stream_counts_the_usage_asked_for_its_client(
    relay: Relay, openai_client: openai.OpenAI
) -> None:
    """The client did not ask for usage; the gateway did, and the client never sees it."""
    delta = Delta(relay)
    chunks = list(
        openai_client.chat.completions.create(
            model="fake-model", messages=MESSAGES, stream=True, extra_body={"fake": {"tokens": 3}}
        )
    )
    assert all(chunk.usage is None for chunk in chunks)
    delta.wait(lambda d: d[f"{DURATION}_count"] == 1, "the answer's end is recorded")
    assert delta[OK_CHAT] == 1
    assert delta[PROMPT_TOKENS] == 7 and delta[COMPLETION_TOKENS] == 3


def test_a_whole_answer_counts_its_request_usage_and_time(
    relay: Relay, openai_client: openai.OpenAI
) -> None:
    delta = Delta(relay)
    completion = openai_client.chat.completions.create(
        model="fake-model", messages=MESSAGES, extra_body={"fake": {"tokens": 5}}
    )
    assert completion.usage is not None
    delta.refresh()
    assert delta[OK_CHAT] == 1
    assert delta[PROMPT_TOKENS] == completion.usage.prompt_tokens == 7
    assert delta[COMPLETION_TOKENS] == 5
    assert delta[f"{TTFT}_count"] == delta[f"{DURATION}_count"] == 1


def test_active_streams_counts_the_answers_running_now(relay: Relay) -> None:
    delta = Delta(relay)
    body = {
        "model": "fake-model",
        "messages": MESSAGES,
        "stream": True,
        "fake": {"tokens": 50, "delay": 0.1},
    }
    with ExitStack() as streams:
        # Each response's lines held: a line iterator dropped closes its response.
        readers = [
            streams.enter_context(
                httpx.stream("POST", f"{relay.v1}/chat/completions", json=body, timeout=30)
            ).iter_lines()
            for _ in range(2)
        ]
        for lines in readers:
            next(lines)
        assert delta.refresh()[ACTIVE] == 2
    # The clients left: their answers are cancelled, and no longer running.
    delta.wait(lambda d: d[ACTIVE] == 0, "both answers ended")
    assert delta[f"{DURATION}_count"] == 2


def test_upstream_errors_are_counted_by_provider(
    relay: Relay, openai_client: openai.OpenAI
) -> None:
    delta = Delta(relay)
    with pytest.raises(openai.InternalServerError):
        openai_client.chat.completions.create(
            model="fake-model", messages=MESSAGES, extra_body={"fake": {"status": 500}}
        )
    for failure in ({"fail_after": 2}, {"error_after": 1}):  # cut, and an in-band error event
        with pytest.raises(openai.APIError):
            list(
                openai_client.chat.completions.create(
                    model="fake-model",
                    messages=MESSAGES,
                    stream=True,
                    extra_body={"fake": failure},
                )
            )
    delta.wait(lambda d: d[f"{DURATION}_count"] >= 3, "the answers' ends are recorded")
    assert delta[FAKE_ERRORS] == 3
    assert delta[OK_CHAT.replace('"200"', '"502"')] == 1


def test_model_names_a_client_invents_share_one_label(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    toml = fake_provider_toml(fake_upstream.base_url)
    with (
        start_tokenrelay(tmp_path, config_toml=toml, env=NO_LOCAL_MODEL) as relay,
        openai.OpenAI(base_url=relay.v1, api_key="unused", max_retries=0) as client,
    ):
        # The fake serves `tool-*`: any name a client makes up there is served, and labelled.
        for number in range(105):
            client.completions.create(model=f"tool-made-up-{number}", prompt="hi")
        samples = scrape(relay)
    models = {key.split('model="')[1].split('"')[0] for key in samples if "model=" in key}
    assert "other" in models
    assert len(models) <= 101  # and "" for the requests that name no model


@pytest.fixture
def two_workers(fake_upstream: FakeUpstream, tmp_path: Path) -> Iterator[tuple[Relay, Path]]:
    """``tokenrelay serve --workers 2`` with JSON logs (each line names its process), and the
    temporary directory it makes its metrics directory in. The local model is on, not loaded."""
    require_redis()  # several workers share their streams and state through it
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {"TOKENRELAY_LOG_FORMAT": "json", "TMPDIR": str(temp), "TOKENRELAY_REDIS_URL": REDIS_URL}
    toml = fake_provider_toml(fake_upstream.base_url)
    with start_tokenrelay(tmp_path, config_toml=toml, env=env, args=["--workers", "2"]) as relay:
        yield relay, temp


def _access(relay: Relay, path: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in relay.log_text().splitlines() if line.startswith("{")]
    return [line for line in lines if line["logger"] == "uvicorn.access" and line["path"] == path]


def test_metrics_add_up_across_workers(two_workers: tuple[Relay, Path]) -> None:
    relay, temp = two_workers
    assert len(list(temp.glob("tokenrelay-metrics-*"))) == 1

    def ask(_: int) -> None:
        with httpx.Client(timeout=30) as client:  # a connection of its own
            answer = client.post(
                f"{relay.v1}/chat/completions",
                json={"model": "fake-model", "messages": MESSAGES, "fake": {"first_delay": 0.2}},
            )
            assert answer.status_code == 200

    with ThreadPoolExecutor(12) as pool:
        list(pool.map(ask, range(24)))
    served_by = {line["pid"] for line in _access(relay, "/v1/chat/completions")}
    assert len(served_by) == 2, "both workers answered some"

    # Every scrape sees all 24, whichever worker answers it; go on until both have answered.
    deadline = time.monotonic() + DEADLINE
    while len({line["pid"] for line in _access(relay, "/metrics")}) < 2:
        assert scrape(relay)[OK_CHAT] == 24
        assert time.monotonic() < deadline, "one worker answered every scrape"

    # The local model's figures, copied by each worker, appear once.
    samples = scrape(relay)
    assert samples["tokenrelay_local_queue_depth"] == 0
    assert samples["tokenrelay_local_worker_restarts_total"] == 0

    # A stream held open is counted once, by whichever worker; and a worker killed while it
    # runs one leaves the count when it is gone.
    body = {"model": "fake-model", "messages": MESSAGES, "stream": True}
    body["fake"] = {"tokens": 200, "delay": 0.1}
    with httpx.stream(
        "POST",
        f"{relay.v1}/chat/completions",
        json=body,
        headers={"X-Request-Id": "held-stream"},
        timeout=30,
    ) as response:
        lines = response.iter_lines()
        next(lines)
        for _ in range(6):
            assert scrape(relay)[ACTIVE] == 1
        (holder,) = {
            line["pid"]
            for line in _access(relay, "/v1/chat/completions")
            if line["request_id"] == "held-stream"
        }
        os.kill(holder, signal.SIGKILL)
        with pytest.raises(httpx.HTTPError):
            for _ in lines:
                pass
    deadline = time.monotonic() + DEADLINE
    while scrape(relay)[ACTIVE] != 0:
        assert time.monotonic() < deadline, "the killed worker's stream still counts"
        time.sleep(0.05)


def test_serve_removes_its_metrics_directory_when_it_stops(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    require_redis()
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**NO_LOCAL_MODEL, "TMPDIR": str(temp), "TOKENRELAY_REDIS_URL": REDIS_URL}
    toml = fake_provider_toml(fake_upstream.base_url)
    with start_tokenrelay(tmp_path, config_toml=toml, env=env, args=["--workers", "2"]):
        (directory,) = temp.glob("tokenrelay-metrics-*")
        assert any(directory.iterdir())  # the workers' files
    assert not directory.exists()
    # One process keeps its metrics in memory: no directory at all.
    with start_tokenrelay(tmp_path / "one", config_toml=toml, env=env) as relay:
        assert ACTIVE in scrape(relay)
        assert not list(temp.glob("tokenrelay-metrics-*"))
