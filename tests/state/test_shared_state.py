"""Leases and the cancel broadcast hold across processes (two Redis handles) as within one."""

from __future__ import annotations

import asyncio
import time

from tokenrelay.state import Callback, SharedState

States = tuple[SharedState, SharedState]
_DEADLINE = 10.0


async def test_a_claim_is_exclusive(states: States) -> None:
    one, two = states
    assert await one.claim("answer:1", "replica-a", 30)
    assert not await two.claim("answer:1", "replica-b", 30)
    assert not await one.claim("answer:1", "replica-a", 30)  # not re-entrant either
    assert await two.holder("answer:1") == "replica-a"
    assert await two.holder("answer:2") is None


async def test_only_the_owner_renews_or_releases(states: States) -> None:
    one, two = states
    assert await one.claim("busy:c1", "replica-a", 30)
    assert not await two.renew("busy:c1", "replica-b", 30)
    assert not await two.release("busy:c1", "replica-b")
    assert await two.holder("busy:c1") == "replica-a"
    assert await one.renew("busy:c1", "replica-a", 30)
    assert await one.release("busy:c1", "replica-a")
    assert await two.holder("busy:c1") is None
    assert not await one.renew("busy:c1", "replica-a", 30)  # released is released
    assert await two.claim("busy:c1", "replica-b", 30)


async def test_an_expired_claim_is_free_for_another(states: States) -> None:
    one, two = states
    assert await one.claim("answer:9", "replica-a", 0.2)
    deadline = time.monotonic() + _DEADLINE
    while not await two.claim("answer:9", "replica-b", 30):
        assert time.monotonic() < deadline, "the claim never expired"
        await asyncio.sleep(0.02)  # polling for the expiry, with a deadline
    assert await one.holder("answer:9") == "replica-b"
    # The old owner, back late, can neither extend nor drop the new holder's claim.
    assert not await one.renew("answer:9", "replica-a", 30)
    assert not await one.release("answer:9", "replica-a")
    assert await two.holder("answer:9") == "replica-b"


async def test_a_renewed_claim_outlives_its_first_ttl(states: States) -> None:
    one, two = states
    assert await one.claim("answer:5", "replica-a", 0.3)
    assert await one.renew("answer:5", "replica-a", 30)
    await asyncio.sleep(0.5)  # past the first ttl: the passage of time is what is tested
    assert await two.holder("answer:5") == "replica-a"


async def test_a_publish_reaches_subscribers_elsewhere(states: States) -> None:
    one, two = states
    got: list[tuple[str, str]] = []
    arrived = asyncio.Event()

    def on_cancel(name: str) -> Callback:
        def callback(message: str) -> None:
            got.append((name, message))
            arrived.set()

        return callback

    def failing(message: str) -> None:
        raise RuntimeError("a broken subscriber must not stop the others")

    broken = await two.subscribe("cancel", failing)
    first = await two.subscribe("cancel", on_cancel("first"))
    second = await two.subscribe("cancel", on_cancel("second"))
    await one.publish("cancel", "st_1")
    deadline = time.monotonic() + _DEADLINE
    while len(got) < 2:
        arrived.clear()
        await asyncio.wait_for(arrived.wait(), deadline - time.monotonic())
    assert sorted(got) == [("first", "st_1"), ("second", "st_1")]

    await first.aclose()
    await broken.aclose()
    got.clear()
    arrived.clear()
    await one.publish("other", "st_x")  # another channel: nobody here listens
    await one.publish("cancel", "st_2")
    await asyncio.wait_for(arrived.wait(), _DEADLINE)
    # Messages arrive in order on one connection: had "st_x" or a closed subscription's
    # delivery been coming, it would have come before "st_2".
    assert got == [("second", "st_2")]
    await second.aclose()
