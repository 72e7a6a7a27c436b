"""Limits per key: requests per minute, tokens per minute, tokens per day.

The windows are the ``limits`` library's, in memory for one process or in Redis when
``TOKENRELAY_REDIS_URL`` is set, so every worker and replica counts against one window:

- requests: a *moving window* (one timestamp per request, checked and added in one atomic step
  by a Lua script in Redis): exact, so 50 requests at once on a 10-RPM key let exactly 10 through;
- tokens: a *sliding window counter* (two counters, the previous window weighted): a request
  costs many tokens, which a moving window would store one by one.

A request is admitted when the requests window has room and the token windows have room for
its prompt (estimated from its size); tokens are then charged as they flow (``charge``, every
second for a running stream, then settled with the answer's reported usage), past the limit if
an answer runs long: the next request waits instead.

Every answer to a limited key carries OpenAI's ``x-ratelimit-*`` headers; a refusal is a 429
with ``Retry-After`` too.
"""

from __future__ import annotations

import math
import time
from typing import Any

from limits import RateLimitItem, RateLimitItemPerDay, RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage, RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter
from redis.exceptions import RedisError

from tokenrelay.errors import RateLimited, RedisUnavailable
from tokenrelay.storage.keys import KeyRecord

__all__ = ["Limiter", "duration_text"]

_NAMESPACE = "tokenrelay"
_REDIS_TIMEOUT = 5.0
"""Seconds Redis may take to connect or answer a limit's check: a stalled Redis is a 503."""
_UNBOUNDED = 2**52
"""A limit no charge reaches: what ``charge`` passes so that tokens already spent always count."""


def duration_text(seconds: float) -> str:
    """A wait as OpenAI's headers write it: ``20ms``, ``6s``, ``1m30s``, ``2h0m5s``."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def _refusal(window: str, wait: float, headers: dict[str, str]) -> RateLimited:
    """The 429 for a full ``window``, free again in ``wait`` seconds (OpenAI's wording)."""
    return RateLimited(
        f"Rate limit reached for {window} Try again in {duration_text(wait)}.",
        retry_after=max(1, math.ceil(wait)),
        headers=headers,
    )


class Limiter:
    """Admits requests of limited keys, and charges their tokens."""

    def __init__(self, redis_url: str | None = None) -> None:
        self._storage: Any
        if redis_url:
            # The same redis-py the rest of tokenrelay uses (limits defaults to coredis).
            self._storage = RedisStorage(
                "async+" + redis_url,
                implementation="redispy",
                key_prefix=_NAMESPACE,
                socket_timeout=_REDIS_TIMEOUT,
                socket_connect_timeout=_REDIS_TIMEOUT,
            )
        else:
            self._storage = MemoryStorage()
        self._requests = MovingWindowRateLimiter(self._storage)
        self._tokens = SlidingWindowCounterRateLimiter(self._storage)

    async def aclose(self) -> None:
        """Close the Redis connections (``limits`` offers no close of its own)."""
        if isinstance(self._storage, RedisStorage):
            client = getattr(self._storage.bridge, "storage", None)
            if client is not None:
                await client.aclose()

    async def admit(self, key: KeyRecord, prompt_tokens: int) -> dict[str, str]:
        """Count one request of ``key`` needing ``prompt_tokens``; its rate-limit headers.

        Raises ``RateLimited`` (429, with the same headers and ``Retry-After``) when a window
        is full; a refused request is not counted in the requests window. Without Redis the
        limits cannot be checked: ``RedisUnavailable`` (503), never a call let through unchecked.
        """
        try:
            return await self._admit(key, prompt_tokens)
        except RedisError as exc:
            raise RedisUnavailable("Redis cannot be reached to check this key's limits.") from exc

    async def _admit(self, key: KeyRecord, prompt_tokens: int) -> dict[str, str]:
        headers: dict[str, str] = {}
        if key.rpm:
            item: RateLimitItem = RateLimitItemPerMinute(key.rpm, namespace=_NAMESPACE)
            admitted = await self._requests.hit(item, key.id)
            wait = await self._describe(self._requests, item, key.id, "requests", headers)
            if not admitted:
                raise _refusal(f"requests: {key.rpm} per minute on this key.", wait, headers)
        for item, per in self._token_items(key):
            cost = max(1, prompt_tokens)
            admitted = await self._tokens.hit(item, key.id, cost=cost)
            wait = await self._describe(self._tokens, item, key.id, "tokens", headers)
            if not admitted:
                raise _refusal(
                    f"tokens: {item.amount} per {per} on this key "
                    f"(this request needs about {cost}).",
                    wait,
                    headers,
                )
        return headers

    async def charge(self, key: KeyRecord, tokens: int) -> None:
        """Count ``tokens`` more against ``key``'s token windows, past their limits if need be."""
        if tokens <= 0:
            return
        for item, _ in self._token_items(key):
            await self._storage.acquire_sliding_window_entry(
                item.key_for(key.id), _UNBOUNDED, item.get_expiry(), tokens
            )

    @staticmethod
    def _token_items(key: KeyRecord) -> list[tuple[RateLimitItem, str]]:
        items: list[tuple[RateLimitItem, str]] = []
        if key.tpm:
            items.append((RateLimitItemPerMinute(key.tpm, namespace=_NAMESPACE), "minute"))
        if key.tokens_per_day:
            items.append((RateLimitItemPerDay(key.tokens_per_day, namespace=_NAMESPACE), "day"))
        return items

    @staticmethod
    async def _describe(
        limiter: MovingWindowRateLimiter | SlidingWindowCounterRateLimiter,
        item: RateLimitItem,
        key_id: str,
        what: str,
        headers: dict[str, str],
    ) -> float:
        """Set the ``x-ratelimit-*-{what}`` headers (the first window of each kind wins: per
        minute before per day); return the seconds until the window has room again."""
        stats = await limiter.get_window_stats(item, key_id)
        wait = max(0.0, stats.reset_time - time.time())
        if f"x-ratelimit-limit-{what}" not in headers:
            headers[f"x-ratelimit-limit-{what}"] = str(item.amount)
            headers[f"x-ratelimit-remaining-{what}"] = str(max(0, stats.remaining))
            headers[f"x-ratelimit-reset-{what}"] = duration_text(wait)
        return wait
