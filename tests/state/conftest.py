"""One shared-state suite on both backends. For memory, both handles are the one process's
state; for Redis, two ``RedisState`` objects with their own connections, like two replicas."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from redis_server import REDIS_URL, delete_prefix, new_prefix, require_redis
from tokenrelay.state import MemoryState, RedisState, SharedState


@pytest.fixture(params=["memory", "redis"])
async def states(request: pytest.FixtureRequest) -> AsyncIterator[tuple[SharedState, SharedState]]:
    if request.param == "memory":
        state = MemoryState()
        await state.start()
        yield state, state
        await state.aclose()
        return
    require_redis()
    prefix = new_prefix()
    one, two = RedisState(REDIS_URL, prefix=prefix), RedisState(REDIS_URL, prefix=prefix)
    await one.start()
    await two.start()
    yield one, two
    await one.aclose()
    await two.aclose()
    await delete_prefix(prefix)
