"""The embedded model's worker process dying, over real processes: the gateway lives on.

The server relays to the fake upstream and runs the local model in a worker process; tests kill
that worker with SIGKILL (as the OOM killer does) in the middle of an answer, or make it crash by
fault injection (``TOKENRELAY_TEST_WORKER_FAULT``, read only by the worker), and check what every
client sees. Nothing here depends on the CPU: the crashes are real signals, not AMX.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from conftest import (
    Relay,
    assert_openai_error,
    data_events,
    fake_provider_toml,
    scrape,
    start_tokenrelay,
)
from fake_upstream import FakeUpstream, expected_text

MODEL = "smollm2-135m-instruct"
COUNTING = "1, 2, 3, 4, 5,"
DEADLINE = 20.0
FAULT_ENV = "TOKENRELAY_TEST_WORKER_FAULT"


def worker_pids(relay: Relay) -> list[int]:
    """The server's model worker processes (its children running the worker module)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == relay.proc.pid and b"tokenrelay.providers.local.worker" in cmdline:
            pids.append(int(entry.name))
    return pids


def wait_for(condition: Any, what: str, deadline: float = DEADLINE) -> Any:
    end = time.monotonic() + deadline
    while not (result := condition()):
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.02)
    return result


@pytest.fixture
def mixed_relay(fake_upstream: FakeUpstream, tmp_path: Path) -> Iterator[Relay]:
    """The fake upstream for `fake-*` models and the embedded model, in one server."""
    toml = fake_provider_toml(fake_upstream.base_url, models=("fake-model",))
    env = {"TOKENRELAY_DATA_DIR": str(tmp_path / "data"), "TOKENRELAY_LOCAL__LOAD": "eager"}
    with start_tokenrelay(tmp_path, config_toml=toml, env=env) as relay:
        yield relay


def local_stream_body(max_tokens: int = 1500) -> dict[str, Any]:
    return {
        "model": MODEL,
        "prompt": COUNTING,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }


def test_the_gateway_process_never_loads_llama_cpp(mixed_relay: Relay) -> None:
    with httpx.Client(timeout=DEADLINE) as client:
        answer = client.post(f"{mixed_relay.v1}/completions", json=local_stream_body(4))
        assert answer.status_code == 200
    maps = Path(f"/proc/{mixed_relay.proc.pid}/maps").read_text()
    assert "libllama" not in maps and "libggml" not in maps
    [worker] = worker_pids(mixed_relay)
    assert "libllama" in Path(f"/proc/{worker}/maps").read_text()


def test_killed_worker_ends_its_stream_with_an_error_and_spares_the_upstream_stream(
    mixed_relay: Relay, fake_upstream: FakeUpstream
) -> None:
    upstream_text: list[str] = []
    upstream_error: list[BaseException] = []
    started = threading.Event()

    def read_upstream() -> None:
        try:
            with openai.OpenAI(base_url=mixed_relay.v1, api_key="x", max_retries=0) as sdk:
                stream = sdk.chat.completions.create(
                    model="fake-model",
                    messages=[{"role": "user", "content": "hi"}],
                    stream=True,
                    extra_body={"fake": {"tokens": 40, "delay": 0.05}},
                )
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        upstream_text.append(chunk.choices[0].delta.content)
                        started.set()
        except BaseException as exc:
            upstream_error.append(exc)
            started.set()

    upstream = threading.Thread(target=read_upstream)
    upstream.start()
    with httpx.Client(timeout=DEADLINE) as client:
        with client.stream(
            "POST", f"{mixed_relay.v1}/completions", json=local_stream_body()
        ) as local:
            assert local.status_code == 200
            lines = local.iter_lines()
            local_text = ""
            while len(local_text) < 10:
                line = next(lines)
                if line.startswith("data: {"):
                    local_text += json.loads(line[6:])["choices"][0]["text"]
            assert started.wait(DEADLINE)
            [worker] = worker_pids(mixed_relay)
            os.kill(worker, signal.SIGKILL)
            rest = "\n".join(lines)
        events = data_events(rest)
        error = json.loads(events[-1])["error"]
        assert error["code"] == "model_crashed"
        assert "SIGKILL" in error["message"]
        assert "[DONE]" not in events

        upstream.join(DEADLINE)
        assert not upstream_error, upstream_error
        assert "".join(upstream_text) == expected_text(40)

        # A restarted worker answers the next request.
        again = client.post(f"{mixed_relay.v1}/completions", json=local_stream_body(4))
        assert again.status_code == 200
        assert data_events(again.text)[-1] == "[DONE]"
        assert worker_pids(mixed_relay) != [worker]
    assert mixed_relay.proc.poll() is None


def test_killed_worker_before_the_first_byte_is_a_503_model_crashed(mixed_relay: Relay) -> None:
    body = {**local_stream_body(), "stream": False}
    with httpx.Client(timeout=DEADLINE) as client:
        killer = threading.Timer(
            0.5, lambda: [os.kill(pid, signal.SIGKILL) for pid in worker_pids(mixed_relay)]
        )
        killer.start()
        response = client.post(f"{mixed_relay.v1}/completions", json=body)
        killer.join()
        assert_openai_error(response, 503, code="model_crashed")


def test_killed_worker_keeps_the_conversation_answer_as_error(mixed_relay: Relay) -> None:
    with httpx.Client(base_url=mixed_relay.url, timeout=DEADLINE) as client:
        conversation = client.post("/api/conversations", json={"model": MODEL}).json()
        url = f"/api/conversations/{conversation['id']}/messages"
        with client.stream("POST", url, json={"content": f"Continue: {COUNTING}"}) as answer:
            assert answer.status_code == 200
            text = ""
            lines = answer.iter_lines()
            while len(text) < 10:
                line = next(lines)
                if line.startswith("data: {") and '"choices"' in line:
                    text += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
            [worker] = worker_pids(mixed_relay)
            os.kill(worker, signal.SIGKILL)
            events = data_events("\n".join(lines))
        assert json.loads(events[-1])["error"]["code"] == "model_crashed"

        def saved() -> dict[str, Any] | None:
            detail = client.get(f"/api/conversations/{conversation['id']}").json()
            answer = detail["messages"][-1]
            return answer if answer["status"] != "streaming" else None

        answer = wait_for(saved, "the answer is saved")
        assert answer["status"] == "error"
        assert answer["content"].startswith(text)
        assert "SIGKILL" in answer["error"]


def test_a_worker_that_crashes_at_every_start_is_reported_unavailable(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    toml = fake_provider_toml(fake_upstream.base_url, models=("fake-model",))
    env = {
        FAULT_ENV: "abort-at-start",
        "TOKENRELAY_DATA_DIR": str(tmp_path / "data"),
        "TOKENRELAY_LOCAL__MAX_CRASHES": "3",
    }
    with (
        start_tokenrelay(tmp_path, config_toml=toml, env=env) as relay,
        httpx.Client(timeout=DEADLINE) as client,
    ):
        refused = client.post(f"{relay.v1}/completions", json=local_stream_body(4))
        error = assert_openai_error(refused, 503, code="model_unavailable")
        assert "SIGABRT" in str(error["message"])
        assert "3 times" in str(error["message"])
        # Not retried in a loop: the next request is refused at once, and nothing restarts.
        started = time.monotonic()
        again = client.post(f"{relay.v1}/completions", json=local_stream_body(4))
        assert_openai_error(again, 503, code="model_unavailable")
        assert time.monotonic() - started < 1.0
        assert worker_pids(relay) == []
        models = {m["id"]: m for m in client.get(f"{relay.v1}/models").json()["data"]}
        assert models[MODEL]["status"] == "unavailable"
        assert "SIGABRT" in models[MODEL]["status_reason"]
        # The server and its other providers go on.
        upstream = client.post(
            f"{relay.v1}/chat/completions",
            json={"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert upstream.status_code == 200
        assert relay.log_text().count("killed by SIGABRT") >= 3


def test_extra_buffers_that_crash_are_turned_off_once_and_remembered(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    env = {FAULT_ENV: "segv-with-extra-buffers", "TOKENRELAY_DATA_DIR": str(data)}
    with (
        start_tokenrelay(tmp_path / "first", env=env) as first,
        httpx.Client(timeout=DEADLINE) as client,
    ):
        answer = client.post(f"{first.v1}/completions", json=local_stream_body(4))
        assert answer.status_code == 200
        assert data_events(answer.text)[-1] == "[DONE]"
        lines = [line for line in first.log_text().splitlines() if "extra buffer types" in line]
        assert len(lines) == 1 and "SIGSEGV" in lines[0]
    decisions = json.loads((data / "local-model.json").read_text())
    assert [entry["extra_buffers"] for entry in decisions.values()] == [False]

    # The next start remembers: no crash first.
    with (
        start_tokenrelay(tmp_path / "second", env=env) as second,
        httpx.Client(timeout=DEADLINE) as client,
    ):
        answer = client.post(f"{second.v1}/completions", json=local_stream_body(4))
        assert answer.status_code == 200
        assert "SIGSEGV" not in second.log_text()


def test_extra_buffers_setting_overrides_the_probe(tmp_path: Path) -> None:
    env = {
        FAULT_ENV: "segv-with-extra-buffers",
        "TOKENRELAY_DATA_DIR": str(tmp_path / "data"),
        "TOKENRELAY_LOCAL__EXTRA_BUFFERS": "off",
    }
    with start_tokenrelay(tmp_path, env=env) as relay, httpx.Client(timeout=DEADLINE) as client:
        answer = client.post(f"{relay.v1}/completions", json=local_stream_body(4))
        assert answer.status_code == 200
        assert "SIGSEGV" not in relay.log_text()
    assert not (tmp_path / "data" / "local-model.json").exists()


def test_metrics_show_the_local_queue_and_worker_restarts(mixed_relay: Relay) -> None:
    queue, restarts = "tokenrelay_local_queue_depth", "tokenrelay_local_worker_restarts_total"
    assert scrape(mixed_relay)[queue] == 0
    assert scrape(mixed_relay)[restarts] == 0
    waited: list[int] = []

    def wait_in_line() -> None:
        with httpx.Client(timeout=60) as client:
            waited.append(
                client.post(f"{mixed_relay.v1}/completions", json=local_stream_body(2)).status_code
            )

    with (
        httpx.Client(timeout=DEADLINE) as client,
        client.stream("POST", f"{mixed_relay.v1}/completions", json=local_stream_body()) as local,
    ):
        lines = local.iter_lines()
        next(lines)  # the one instance is busy with this answer
        behind = [threading.Thread(target=wait_in_line) for _ in range(2)]
        for thread in behind:
            thread.start()
        wait_for(lambda: scrape(mixed_relay)[queue] == 2, "two requests wait")
        [worker] = worker_pids(mixed_relay)
        os.kill(worker, signal.SIGKILL)
        for _ in lines:  # the answer ends with an error event
            pass
    wait_for(lambda: scrape(mixed_relay)[restarts] == 1, "the worker is restarted")
    for thread in behind:
        thread.join(DEADLINE)
    assert waited == [200, 200]  # answered by the restarted worker
    assert scrape(mixed_relay)[queue] == 0
