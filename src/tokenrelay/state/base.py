"""What several processes must agree on: the ``SharedState`` protocol.

Leases (an owner per running answer, "conversation busy") and a broadcast (Stop pressed on one
replica must reach the replica running the answer). One process needs neither Redis nor locks:
the memory backend answers from a dict and calls subscribers directly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

__all__ = ["SharedState", "Subscription", "Callback"]

Callback = Callable[[str], None]
"""Called with each message published on a subscribed channel, on the event loop; keep it short
(e.g. look up the local answer and cancel it). An exception it raises is logged, not spread."""


class Subscription(Protocol):
    async def aclose(self) -> None:
        """Stop calling back; idempotent."""
        ...


class SharedState(Protocol):
    async def start(self) -> None:
        """Connect (Redis); call once before use."""
        ...

    async def aclose(self) -> None:
        """Drop every subscription and close connections."""
        ...

    async def claim(self, key: str, owner: str, ttl: float) -> bool:
        """Take ``key`` for ``owner`` for ``ttl`` seconds if nobody holds it (SET NX PX)."""
        ...

    async def renew(self, key: str, owner: str, ttl: float) -> bool:
        """Extend ``owner``'s hold to ``ttl`` seconds from now; False if it is not theirs."""
        ...

    async def release(self, key: str, owner: str) -> bool:
        """Give ``key`` up; False (and nothing changes) if ``owner`` does not hold it."""
        ...

    async def holder(self, key: str) -> str | None:
        """Who holds ``key`` now, or None (never held, released or expired)."""
        ...

    async def publish(self, channel: str, message: str) -> None:
        """Deliver ``message`` to every subscriber of ``channel``, in every process."""
        ...

    async def subscribe(self, channel: str, callback: Callback) -> Subscription:
        """Call ``callback`` with each later message on ``channel``.

        When this returns, the subscription is in force: a message published after it
        (from any process) reaches ``callback``.
        """
        ...
