"""The Redis backend of ``SharedState``: leases as keys, broadcast as pub/sub.

A lease is a key holding its owner's name with a TTL: ``claim`` is SET NX PX; ``renew`` and
``release`` compare the owner and act in one Lua script, so a process whose lease expired and
was claimed by another can never extend or delete the new holder's. Every process keeps one
pub/sub connection, read by one listener task that calls the local callbacks.
"""

from __future__ import annotations

import asyncio
import logging

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from tokenrelay.errors import RedisUnavailable
from tokenrelay.state.base import Callback

__all__ = ["RedisState"]

logger = logging.getLogger(__name__)

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""

_SUBSCRIBE_TIMEOUT = 5.0  # seconds Redis may take to confirm a SUBSCRIBE


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class _RedisSubscription:
    def __init__(self, state: RedisState, channel: bytes, callback: Callback) -> None:
        self._state = state
        self._channel = channel
        self._callback = callback

    async def aclose(self) -> None:
        await self._state._unsubscribe(self._channel, self._callback)


class RedisState:
    """Leases and broadcast shared by every process using the same Redis; ``SharedState``.

    ``client`` (``decode_responses=False``) may be shared and is then not closed by ``aclose``.
    """

    def __init__(
        self, url: str | None = None, *, client: Redis | None = None, prefix: str = "tokenrelay:"
    ) -> None:
        if client is None:
            if url is None:
                raise ValueError("RedisState needs a url or a client")
            client = Redis.from_url(url)
            self._owns_client = True
        else:
            self._owns_client = False
        self._client = client
        self._prefix = prefix.encode()
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._pubsub: PubSub | None = None
        self._listener: asyncio.Task[None] | None = None
        self._callbacks: dict[bytes, list[Callback]] = {}
        self._confirmed: dict[bytes, asyncio.Future[None]] = {}

    def _key(self, key: str) -> bytes:
        return self._prefix + key.encode()

    async def start(self) -> None:
        try:
            await self._client.ping()
        except RedisError as exc:
            raise RedisUnavailable("Redis (TOKENRELAY_REDIS_URL) cannot be reached.") from exc
        self._pubsub = self._client.pubsub()

    async def aclose(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
        if self._pubsub is not None:
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]  # unannotated upstream
        self._callbacks.clear()
        if self._owns_client:
            await self._client.aclose()

    async def claim(self, key: str, owner: str, ttl: float) -> bool:
        return bool(await self._client.set(self._key(key), owner, nx=True, px=_ms(ttl)))

    async def renew(self, key: str, owner: str, ttl: float) -> bool:
        return bool(await self._renew(keys=[self._key(key)], args=[owner, _ms(ttl)]))

    async def release(self, key: str, owner: str) -> bool:
        return bool(await self._release(keys=[self._key(key)], args=[owner]))

    async def holder(self, key: str) -> str | None:
        value = await self._client.get(self._key(key))
        return value.decode() if isinstance(value, bytes) else value

    async def publish(self, channel: str, message: str) -> None:
        await self._client.publish(self._key(channel), message)

    async def subscribe(self, channel: str, callback: Callback) -> _RedisSubscription:
        pubsub = self._pubsub
        if pubsub is None:
            raise RuntimeError("RedisState.start() was not called")
        name = self._key(channel)
        callbacks = self._callbacks.get(name)
        if callbacks is None:
            self._callbacks[name] = [callback]
            confirmed = self._confirmed[name] = asyncio.get_running_loop().create_future()
            await pubsub.subscribe(name)
            if self._listener is None:
                self._listener = asyncio.create_task(self._listen(pubsub), name="state listener")
        else:
            callbacks.append(callback)
            confirmed = self._confirmed[name]
        # Only once Redis confirmed the SUBSCRIBE is a publish from elsewhere sure to arrive.
        await asyncio.wait_for(asyncio.shield(confirmed), _SUBSCRIBE_TIMEOUT)
        return _RedisSubscription(self, name, callback)

    async def _unsubscribe(self, name: bytes, callback: Callback) -> None:
        callbacks = self._callbacks.get(name)
        if callbacks is None or callback not in callbacks:
            return
        callbacks.remove(callback)
        if not callbacks and self._pubsub is not None:
            del self._callbacks[name]
            self._confirmed.pop(name, None)
            await self._pubsub.unsubscribe(name)

    async def _listen(self, pubsub: PubSub) -> None:
        """Read the pub/sub connection for ever; redis-py resubscribes after a reconnect."""
        backoff = 0.05
        while True:
            try:
                message = await pubsub.get_message(timeout=1.0)
            except RedisError:
                logger.exception("reading Redis pub/sub failed; retrying in %.2f s", backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            backoff = 0.05
            if message is None:
                continue
            kind, name = message["type"], message["channel"]
            if kind == "subscribe":
                confirmed = self._confirmed.get(name)
                if confirmed is not None and not confirmed.done():
                    confirmed.set_result(None)
            elif kind == "message":
                data = message["data"]
                text = data.decode() if isinstance(data, bytes) else str(data)
                for callback in list(self._callbacks.get(name, ())):
                    try:
                        callback(text)
                    except Exception:
                        logger.exception("subscriber of %r failed", name)
