"""The memory backend of ``SharedState``: one process, so a dict and direct calls suffice."""

from __future__ import annotations

import logging
import time

from tokenrelay.state.base import Callback

__all__ = ["MemoryState"]

logger = logging.getLogger(__name__)


class _MemorySubscription:
    def __init__(self, state: MemoryState, channel: str, callback: Callback) -> None:
        self._state = state
        self._channel = channel
        self._callback = callback

    async def aclose(self) -> None:
        callbacks = self._state._channels.get(self._channel, [])
        if self._callback in callbacks:
            callbacks.remove(self._callback)


class MemoryState:
    """Leases and broadcast within this process; implements ``SharedState``."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[str, float]] = {}  # key -> (owner, monotonic deadline)
        self._channels: dict[str, list[Callback]] = {}

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        self._channels.clear()

    def _current(self, key: str) -> str | None:
        held = self._held.get(key)
        if held is None:
            return None
        if held[1] <= time.monotonic():
            del self._held[key]
            return None
        return held[0]

    async def claim(self, key: str, owner: str, ttl: float) -> bool:
        if self._current(key) is not None:
            return False
        self._held[key] = (owner, time.monotonic() + ttl)
        return True

    async def renew(self, key: str, owner: str, ttl: float) -> bool:
        if self._current(key) != owner:
            return False
        self._held[key] = (owner, time.monotonic() + ttl)
        return True

    async def release(self, key: str, owner: str) -> bool:
        if self._current(key) != owner:
            return False
        del self._held[key]
        return True

    async def holder(self, key: str) -> str | None:
        return self._current(key)

    async def publish(self, channel: str, message: str) -> None:
        for callback in list(self._channels.get(channel, ())):
            try:
                callback(message)
            except Exception:
                logger.exception("subscriber of %s failed", channel)

    async def subscribe(self, channel: str, callback: Callback) -> _MemorySubscription:
        self._channels.setdefault(channel, []).append(callback)
        return _MemorySubscription(self, channel, callback)
