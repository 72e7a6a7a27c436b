"""The Redis that the streams and state tests share, and keys that never outlive a test.

Tests use ``TOKENRELAY_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/9``) under a key
prefix of their own. A ``tokenrelay serve`` process writes under ``tokenrelay:`` itself: tests
that run one delete exactly the keys of the streams and conversations they made
(``delete_server_keys``), since others may use the same database. Without a reachable Redis
those tests are skipped, except under CI=true, where CI starts Redis and a skip would hide a
broken backend: there they fail.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable

import pytest
import redis
from redis.asyncio import Redis

__all__ = ["REDIS_URL", "delete_prefix", "delete_server_keys", "new_prefix", "require_redis"]

REDIS_URL = os.environ.get("TOKENRELAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
_IN_CI = os.environ.get("CI", "").lower() == "true"
_SERVER = "tokenrelay:"  # the prefix of a server's keys


def require_redis() -> None:
    """Skip (fail under CI=true) unless Redis answers at ``REDIS_URL``."""
    try:
        with redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2) as client:
            client.ping()
    except redis.RedisError as exc:
        reason = f"Redis is not reachable at {REDIS_URL} ({type(exc).__name__})"
        if _IN_CI:
            pytest.fail(f"{reason}; CI must run the Redis backend tests")
        pytest.skip(reason)


def new_prefix() -> str:
    """A key prefix no other test (or engineer sharing this Redis) uses."""
    return f"tokenrelay:test-{secrets.token_hex(6)}:"


async def delete_prefix(prefix: str) -> None:
    client = Redis.from_url(REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(match=prefix + "*", count=1000)]
        if keys:
            await client.unlink(*keys)
    finally:
        await client.aclose()


def delete_server_keys(*, streams: Iterable[str] = (), conversations: Iterable[str] = ()) -> None:
    """Delete the keys a tokenrelay server made for these streams and conversations.

    Anything missed expires by itself (streams after ``stream_ttl``, leases after
    ``lease_seconds``); this only keeps the shared database tidy.
    """
    keys: list[str] = []
    for stream_id in streams:
        keys += [f"{_SERVER}stream:{stream_id}", f"{_SERVER}stream:{stream_id}:alive"]
        keys.append(f"{_SERVER}answer:{stream_id}")
    keys += [f"{_SERVER}busy:{conversation_id}" for conversation_id in conversations]
    if keys:
        with redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2) as client:
            client.unlink(*keys)
