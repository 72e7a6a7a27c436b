"""Limits per key over real sockets: requests and tokens per minute, in one process and across
two ``tokenrelay serve`` processes sharing Redis, with OpenAI's ``x-ratelimit-*`` headers."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from access.conftest import ADMIN_KEY, bearer, make_key
from conftest import Relay, assert_openai_error, relay_to
from fake_upstream import FakeUpstream
from postgres_server import fresh_database, require_postgres
from redis_server import REDIS_URL, require_redis
from tcp_proxy import DroppingProxy

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}]}


@pytest.fixture(scope="module")
def keyed(fake_upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    with relay_to(
        fake_upstream, tmp_path_factory.mktemp("limits"), env={"TOKENRELAY_ADMIN_KEY": ADMIN_KEY}
    ) as relay:
        yield relay


def test_requests_per_minute_with_openais_headers(keyed: Relay) -> None:
    secret = make_key(keyed, "rpm-3", rpm=3)
    remaining = []
    for stream in (False, True, False):
        with httpx.stream(
            "POST",
            f"{keyed.v1}/chat/completions",
            json={**CHAT, "stream": stream},
            headers=bearer(secret),
            timeout=10,
        ) as response:
            response.read()
            assert response.status_code == 200, response.text
            assert response.headers["x-ratelimit-limit-requests"] == "3"
            assert response.headers["x-ratelimit-reset-requests"].endswith("s")
            remaining.append(int(response.headers["x-ratelimit-remaining-requests"]))
    assert remaining == [2, 1, 0]
    refused = httpx.post(
        f"{keyed.v1}/chat/completions", json=CHAT, headers=bearer(secret), timeout=10
    )
    error = assert_openai_error(refused, 429, code="rate_limit_exceeded")
    assert "3 per minute" in str(error["message"])
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    # Another key has its own window.
    other = make_key(keyed, "rpm-3-other", rpm=3)
    assert (
        httpx.post(
            f"{keyed.v1}/chat/completions", json=CHAT, headers=bearer(other), timeout=10
        ).status_code
        == 200
    )


def test_tokens_per_minute_count_streamed_tokens(keyed: Relay) -> None:
    secret = make_key(keyed, "tpm-100", tpm=100)
    body = {**CHAT, "stream": True, "fake": {"tokens": 150}}
    with httpx.stream(
        "POST", f"{keyed.v1}/chat/completions", json=body, headers=bearer(secret), timeout=10
    ) as response:
        response.read()
        assert response.status_code == 200
        assert response.headers["x-ratelimit-limit-tokens"] == "100"
        assert int(response.headers["x-ratelimit-remaining-tokens"]) < 100
    # The answer's 150 tokens were charged (past the limit): the next request waits.
    refused = httpx.post(
        f"{keyed.v1}/chat/completions", json=CHAT, headers=bearer(secret), timeout=10
    )
    error = assert_openai_error(refused, 429, code="rate_limit_exceeded")
    assert "tokens" in str(error["message"])
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"


def test_a_prompt_larger_than_the_token_limit_is_refused(keyed: Relay) -> None:
    secret = make_key(keyed, "tpm-10", tpm=10)
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 400}]}
    refused = httpx.post(f"{keyed.v1}/chat/completions", json=big, headers=bearer(secret))
    assert_openai_error(refused, 429, code="rate_limit_exceeded")


def test_limits_apply_to_conversations_and_responses(keyed: Relay) -> None:
    secret = make_key(keyed, "rpm-2-everywhere", rpm=2)
    conversation = httpx.post(
        f"{keyed.url}/api/conversations", json={"model": "fake-model"}, headers=bearer(secret)
    ).json()["id"]
    first = httpx.post(
        f"{keyed.url}/api/conversations/{conversation}/messages",
        json={"content": "Hello"},
        headers=bearer(secret),
        timeout=10,
    )
    assert first.status_code == 200 and first.headers["x-ratelimit-remaining-requests"] == "1"
    second = httpx.post(
        f"{keyed.v1}/responses",
        json={"model": "fake-model", "input": "Hi"},
        headers=bearer(secret),
        timeout=10,
    )
    assert second.status_code == 200 and second.headers["x-ratelimit-remaining-requests"] == "0"
    third = httpx.post(
        f"{keyed.url}/api/conversations/{conversation}/messages",
        json={"content": "Again"},
        headers=bearer(secret),
        timeout=10,
    )
    assert_openai_error(third, 429)
    # The refused question was not stored.
    detail = httpx.get(
        f"{keyed.url}/api/conversations/{conversation}", headers=bearer(secret)
    ).json()
    assert [m["content"] for m in detail["messages"] if m["role"] == "user"] == ["Hello"]


@pytest.fixture(scope="module")
def two_replicas(
    fake_upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Relay, Relay]]:
    require_redis()
    admin_url = require_postgres()
    with fresh_database(admin_url) as database_url:
        env = {
            "TOKENRELAY_ADMIN_KEY": ADMIN_KEY,
            "TOKENRELAY_DATABASE_URL": database_url,
            "TOKENRELAY_REDIS_URL": REDIS_URL,
        }
        with (
            relay_to(fake_upstream, tmp_path_factory.mktemp("a"), env=env) as a,
            relay_to(fake_upstream, tmp_path_factory.mktemp("b"), env=env) as b,
        ):
            yield a, b


def test_fifty_at_once_on_ten_rpm_across_two_replicas(two_replicas: tuple[Relay, Relay]) -> None:
    a, b = two_replicas
    secret = make_key(a, "ten-rpm", rpm=10)

    async def burst() -> list[int]:
        limits = httpx.Limits(max_connections=60)
        async with httpx.AsyncClient(timeout=30, limits=limits) as client:
            calls = [
                client.post(
                    f"{(a, b)[i % 2].v1}/chat/completions",
                    json={**CHAT, "stream": i % 3 == 0},
                    headers=bearer(secret),
                )
                for i in range(50)
            ]
            return [response.status_code for response in await asyncio.gather(*calls)]

    statuses = asyncio.run(burst())
    assert statuses.count(200) == 10, statuses
    assert statuses.count(429) == 40, statuses


def test_one_token_window_across_two_replicas(
    two_replicas: tuple[Relay, Relay], tmp_path: Path
) -> None:
    a, b = two_replicas
    secret = make_key(b, "shared-tpm", tpm=100)
    spent = httpx.post(
        f"{a.v1}/chat/completions",
        json={**CHAT, "fake": {"tokens": 120}},
        headers=bearer(secret),
        timeout=10,
    )
    assert spent.status_code == 200
    refused = httpx.post(f"{b.v1}/chat/completions", json=CHAT, headers=bearer(secret))
    assert_openai_error(refused, 429, code="rate_limit_exceeded")


def test_limits_without_redis_are_a_503_never_unchecked(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    """Redis goes away after start-up: a limited key's call is refused with 503, a key with no
    limits is not held up, and the limits work again once Redis is back."""
    require_redis()
    redis = DroppingProxy(f"tcp://{REDIS_URL.split('://', 1)[1].split('/', 1)[0]}")
    env = {
        "TOKENRELAY_ADMIN_KEY": ADMIN_KEY,
        "TOKENRELAY_REDIS_URL": f"redis://127.0.0.1:{redis.port}/9",
    }
    try:
        with relay_to(fake_upstream, tmp_path, env=env) as relay:
            limited = make_key(relay, "limited-without-redis", rpm=100)
            free = make_key(relay, "free-without-redis")
            ok = httpx.post(f"{relay.v1}/chat/completions", json=CHAT, headers=bearer(limited))
            assert ok.status_code == 200, ok.text
            redis.drop()
            refused = httpx.post(
                f"{relay.v1}/chat/completions", json=CHAT, headers=bearer(limited), timeout=30
            )
            assert_openai_error(refused, 503, code="redis_unavailable")
            unlimited = httpx.post(
                f"{relay.v1}/chat/completions", json=CHAT, headers=bearer(free), timeout=30
            )
            assert unlimited.status_code == 200, unlimited.text
            redis.restore()
            again = httpx.post(
                f"{relay.v1}/chat/completions", json=CHAT, headers=bearer(limited), timeout=30
            )
            assert again.status_code == 200, again.text
            assert again.headers["x-ratelimit-remaining-requests"] == "98"
    finally:
        redis.close()
