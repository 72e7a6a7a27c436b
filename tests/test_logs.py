"""``tokenrelay serve``'s logs: JSON lines with request ids, and never a key or a prompt."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from conftest import NO_LOCAL_MODEL, Relay, closed_port_url, fake_provider_toml, start_tokenrelay
from fake_upstream import LEAKED_KEY, FakeUpstream

PROMPT = "Tell me about the zebra-quasar-7731 please"
"""A prompt no log line could hold by chance."""
SECRET_WORD = "zebra-quasar-7731"


@pytest.fixture
def json_relay(fake_upstream: FakeUpstream, tmp_path: Path) -> Iterator[Relay]:
    env = {**NO_LOCAL_MODEL, "TOKENRELAY_LOG_FORMAT": "json"}
    toml = fake_provider_toml(fake_upstream.base_url)
    with start_tokenrelay(tmp_path, config_toml=toml, env=env) as relay:
        yield relay


def _records(relay: Relay) -> list[dict[str, Any]]:
    """Every line the server printed, each of which must be one JSON object."""
    return [json.loads(line) for line in relay.log_text().splitlines()]


def test_json_logs_are_one_object_per_line_with_the_request_id(json_relay: Relay) -> None:
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=json_relay.v1, timeout=30) as client:
        streamed = client.post(
            "/chat/completions",
            json={**body, "stream": True},
            headers={"X-Request-Id": "stream-1"},
        )
        failed = client.post("/chat/completions", json={**body, "fake": {"status": 500}})
    assert streamed.headers["x-request-id"] == "stream-1"
    failed_id = failed.headers["x-request-id"]

    records = _records(json_relay)
    for record in records:
        assert {"time", "level", "logger", "message", "request_id", "pid"} <= set(record)
    access = {r["request_id"]: r for r in records if r["logger"] == "uvicorn.access"}
    assert access["stream-1"]["path"] == "/v1/chat/completions"
    assert access["stream-1"]["status"] == 200
    assert access[failed_id]["status"] == 502
    # tokenrelay's own record, made while serving the failed request, names that request.
    (upstream,) = [r for r in records if r["message"] == "provider fake answered 500"]
    assert upstream["logger"] == "tokenrelay.providers.openai_compat"
    assert upstream["request_id"] == failed_id
    started = [r for r in records if r["message"].startswith("Application startup complete")]
    assert started and started[0]["request_id"] is None


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_no_key_or_prompt_reaches_the_log(
    fake_upstream: FakeUpstream, tmp_path: Path, log_format: str
) -> None:
    """A run with an upstream key, a distinctive prompt, and every kind of upstream failure,
    logged at the most verbose level."""
    toml = fake_provider_toml(fake_upstream.base_url) + fake_provider_toml(
        closed_port_url(), name="down", models=("down-model",)
    )
    env = {**NO_LOCAL_MODEL, "TOKENRELAY_LOG_FORMAT": log_format, "TOKENRELAY_LOG_LEVEL": "debug"}
    messages: list[Any] = [{"role": "user", "content": PROMPT}]
    failures: list[dict[str, Any]] = [
        {"status": 401},
        {"status": 429, "retry_after": "1"},
        {"status": 500, "leak_everywhere": True},
        {"status": 400, "leak_everywhere": True},
        {"error_after": 1, "leak_everywhere": True},
        {"fail_after": 1},
        {"body": "not json", "content_type": "application/json"},
    ]
    with (
        start_tokenrelay(tmp_path, config_toml=toml, env=env) as relay,
        openai.OpenAI(base_url=relay.v1, api_key="unused", max_retries=0, timeout=30) as sdk,
        httpx.Client(base_url=relay.url, timeout=30) as client,
    ):
        sdk.chat.completions.create(model="fake-model", messages=messages)
        list(sdk.chat.completions.create(model="fake-model", messages=messages, stream=True))
        sdk.completions.create(model="fake-model", prompt=PROMPT)
        sdk.responses.create(model="fake-model", input=PROMPT)
        for stream in (False, True):
            for failure in failures:
                try:
                    answer = sdk.chat.completions.create(
                        model="fake-model",
                        messages=messages,
                        stream=stream,
                        extra_body={"fake": failure},
                    )
                    if stream:
                        list(answer)  # type: ignore[arg-type]
                except openai.APIError:
                    pass
        with pytest.raises(openai.APIError):
            sdk.chat.completions.create(model="down-model", messages=messages)
        assert client.get("/api/ask", params={"prompt": PROMPT}).status_code == 200
        assert client.get("/api/ask/stream", params={"prompt": PROMPT}).status_code == 200
        conversation = client.post("/api/conversations", json={"model": "fake-model"}).json()
        sent = client.post(
            f"/api/conversations/{conversation['id']}/messages", json={"content": PROMPT}
        )
        assert sent.status_code == 200
        log = relay.log_text()

    assert "/api/ask/stream" in log  # the access log was written, without its query
    assert "provider fake answered 500" in log
    assert LEAKED_KEY not in log
    assert SECRET_WORD not in log
