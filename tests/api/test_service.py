"""``/healthz``, ``/readyz`` and ``/metrics`` on real servers, ready or not."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import NO_LOCAL_MODEL, Relay, fake_provider_toml, start_tokenrelay
from fake_upstream import FakeUpstream
from redis_server import REDIS_URL, require_redis
from tcp_proxy import DroppingProxy

POSTGRES_URL = os.environ.get(
    "TOKENRELAY_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
METRICS = {
    "tokenrelay_requests",
    "tokenrelay_time_to_first_token_seconds",
    "tokenrelay_request_duration_seconds",
    "tokenrelay_tokens",
    "tokenrelay_active_streams",
    "tokenrelay_upstream_errors",
}


def test_healthz_and_its_old_name_answer_while_serving(relay: Relay) -> None:
    for path in ("/healthz", "/health"):
        answer = httpx.get(f"{relay.url}{path}")
        assert answer.status_code == 200
        assert answer.json() == {"status": "ok"}


def test_readyz_is_ready_with_a_database_and_an_upstream(relay: Relay) -> None:
    answer = httpx.get(f"{relay.url}/readyz")
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"status": "ready", "checks": {"database": "ok", "providers": "ok"}}


def test_readyz_without_a_provider_says_so(tmp_path: Path) -> None:
    with start_tokenrelay(tmp_path, env=NO_LOCAL_MODEL) as relay:
        answer = httpx.get(f"{relay.url}/readyz")
        healthz = httpx.get(f"{relay.url}/healthz")
    assert answer.status_code == 503
    body = answer.json()
    assert body["status"] == "not ready"
    assert body["not_ready"] == ["providers"]
    assert body["checks"] == {"database": "ok", "providers": "no provider is configured"}
    assert healthz.status_code == 200  # alive all the same


def test_readyz_with_the_local_model_given_up_names_why(tmp_path: Path) -> None:
    # The only provider is the local model, whose worker dies at every start: after
    # `max_crashes` it is reported unavailable, and the server is not ready any more.
    env = {
        "TOKENRELAY_TEST_WORKER_FAULT": "abort-at-start",
        "TOKENRELAY_DATA_DIR": str(tmp_path / "data"),
        "TOKENRELAY_LOCAL__MAX_CRASHES": "1",
    }
    with start_tokenrelay(tmp_path, env=env) as relay:
        assert httpx.get(f"{relay.url}/readyz").status_code == 200  # not loaded yet: usable
        body = {"model": "smollm2-135m-instruct", "prompt": "hi", "max_tokens": 2}
        refused = httpx.post(f"{relay.v1}/completions", json=body, timeout=60)
        assert refused.status_code == 503
        answer = httpx.get(f"{relay.url}/readyz")
    assert answer.status_code == 503
    assert answer.json()["not_ready"] == ["providers"]
    reason = answer.json()["checks"]["providers"]
    assert reason.startswith("the local model is unavailable: ")
    assert "SIGABRT" in reason


def _dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://")


@pytest.fixture
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database's URL (dropped afterwards), or a skip (a failure on CI)."""
    name = f"tokenrelay_test_{secrets.token_hex(6)}"

    async def execute(sql: str) -> None:
        connection = await asyncpg.connect(_dsn(POSTGRES_URL), timeout=5)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    try:
        asyncio.run(execute(f'CREATE DATABASE "{name}"'))
    except (OSError, asyncpg.PostgresError) as exc:
        reason = f"PostgreSQL unreachable at {POSTGRES_URL} ({type(exc).__name__})"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        asyncio.run(execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def test_readyz_names_the_database_and_redis_when_they_stop_answering(
    fake_upstream: FakeUpstream, postgres_database: str, tmp_path: Path
) -> None:
    require_redis()
    host = postgres_database.split("@", 1)[1].split("/", 1)[0]
    database = DroppingProxy(f"tcp://{host}")
    redis = DroppingProxy(f"tcp://{REDIS_URL.split('://', 1)[1].split('/', 1)[0]}")
    env = {
        **NO_LOCAL_MODEL,
        "TOKENRELAY_DATABASE_URL": postgres_database.replace(host, f"127.0.0.1:{database.port}"),
        "TOKENRELAY_REDIS_URL": f"redis://127.0.0.1:{redis.port}/9",
    }
    try:
        toml = fake_provider_toml(fake_upstream.base_url)
        with start_tokenrelay(tmp_path, config_toml=toml, env=env) as relay:
            ready = httpx.get(f"{relay.url}/readyz", timeout=10)
            assert ready.status_code == 200, ready.text
            assert ready.json()["checks"] == {"database": "ok", "redis": "ok", "providers": "ok"}

            database.drop()
            redis.drop()
            answer = httpx.get(f"{relay.url}/readyz", timeout=10)
            assert answer.status_code == 503
            assert answer.json() == {
                "status": "not ready",
                "not_ready": ["database", "redis"],
                "checks": {
                    "database": "did not answer SELECT 1",
                    "redis": "did not answer PING",
                    "providers": "ok",
                },
            }
            assert httpx.get(f"{relay.url}/healthz").status_code == 200

            database.restore()
            redis.restore()
            again = httpx.get(f"{relay.url}/readyz", timeout=10)
            assert again.status_code == 200, again.text
    finally:
        database.close()
        redis.close()


def test_metrics_answer_in_prometheus_text_format(relay: Relay) -> None:
    httpx.get(f"{relay.url}/healthz")
    answer = httpx.get(f"{relay.url}/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain; version=")
    families = {family.name: family for family in text_string_to_metric_families(answer.text)}
    assert set(families) >= METRICS
    assert "tokenrelay_local_queue_depth" not in families  # no local model in this server
    assert families["tokenrelay_requests"].type == "counter"
    assert families["tokenrelay_time_to_first_token_seconds"].type == "histogram"
    assert families["tokenrelay_active_streams"].type == "gauge"
    healthz = [
        s for s in families["tokenrelay_requests"].samples if s.labels["route"] == "/healthz"
    ]
    assert healthz and healthz[0].labels == {"route": "/healthz", "model": "", "status": "200"}
