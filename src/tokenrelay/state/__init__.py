"""What several processes must agree on: leases and a broadcast, in memory or in Redis.

- Leases: ``claim(key, owner, ttl)`` takes a key nobody holds, ``renew`` extends it and
  ``release`` gives it up (both only by its owner), ``holder`` says who has it. An owner lease
  per running answer (renewed while it runs) lets a restarting replica tell its own dead
  answers from another replica's live ones; a lease per conversation makes "busy" hold across
  replicas.
- Broadcast: ``publish(channel, message)`` reaches every ``subscribe(channel, callback)`` in
  every process, so a Stop pressed on one replica reaches the one running the answer.

Wiring (the lead's plan): one ``SharedState`` per process from ``create_shared_state(settings)``,
``await state.start()`` in the app's lifespan, ``aclose()`` at shutdown. Subscribe once to a
``cancel`` channel with a callback that looks the answer up locally and cancels it (one
subscription per process, not per answer, costs no round trip per answer); ``publish("cancel",
stream_id)`` from the route. Keys and channels are prefixed (``tokenrelay:``).
"""

from __future__ import annotations

from redis.asyncio import Redis

from tokenrelay.config import Settings
from tokenrelay.state.base import Callback, SharedState, Subscription
from tokenrelay.state.memory import MemoryState
from tokenrelay.state.redis_state import RedisState

__all__ = [
    "Callback",
    "MemoryState",
    "RedisState",
    "SharedState",
    "Subscription",
    "create_shared_state",
]


def create_shared_state(
    source: Settings | str | None = None,
    *,
    client: Redis | None = None,
    prefix: str = "tokenrelay:",
) -> SharedState:
    """Memory for one process, Redis when ``source`` (``Settings.redis_url`` or a URL) or
    ``client`` names one."""
    if isinstance(source, Settings):
        url = source.redis_url.get_secret_value() if source.redis_url is not None else None
    else:
        url = source
    if url is None and client is None:
        return MemoryState()
    return RedisState(url, client=client, prefix=prefix)
