"""Replicas: several ``tokenrelay serve`` processes sharing PostgreSQL and Redis act as one.

Two replicas run for the whole module, on different ports, with one PostgreSQL database (made
for this module) and Redis; tests that kill a replica start a third. A client may resume any
stream on any replica, Stop reaches the replica running the answer, a conversation is busy on
all of them, and a replica that dies is noticed by its lease running out: its readers end with
``interrupted`` and a restarted replica marks only its answers ``interrupted``. Skipped without
Redis or PostgreSQL, except under CI=true, where they must run.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from conftest import Relay, assert_openai_error, relay_to
from fake_upstream import FakeUpstream, expected_text
from postgres_server import fresh_database, require_postgres
from redis_server import REDIS_URL, delete_server_keys, require_redis
from resumable import (
    Entry,
    chat_body,
    error_of,
    open_stream,
    read_stream,
    send_message,
    text_of,
)

LEASE = 2.0
"""``lease_seconds``: a dead replica's answers count as interrupted this long after it died."""

GRACE = 2.0
"""``stream_grace``: short, so a test sees whether readers on another replica keep an answer."""

INTERRUPTED_WITHIN = LEASE + 10.0
"""Seconds a reader of a dead replica's stream may wait for its ``interrupted`` end."""


@dataclass
class Cluster:
    """What the replicas share, and the keys the tests made in Redis (to delete after)."""

    fake: FakeUpstream
    env: dict[str, str]
    factory: pytest.TempPathFactory
    streams: set[str] = field(default_factory=set)
    conversations: set[str] = field(default_factory=set)

    @contextmanager
    def replica(self, name: str) -> Iterator[Relay]:
        with relay_to(self.fake, self.factory.mktemp(name), env=self.env) as relay:
            yield relay


@pytest.fixture(scope="module")
def cluster(
    fake_upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    require_redis()
    admin_url = require_postgres()
    with fresh_database(admin_url) as database_url:
        env = {
            "TOKENRELAY_DATABASE_URL": database_url,
            "TOKENRELAY_REDIS_URL": REDIS_URL,
            "TOKENRELAY_LEASE_SECONDS": str(LEASE),
            "TOKENRELAY_STREAM_GRACE": str(GRACE),
        }
        cluster = Cluster(fake_upstream, env, tmp_path_factory)
        try:
            yield cluster
        finally:
            delete_server_keys(streams=cluster.streams, conversations=cluster.conversations)


@pytest.fixture(scope="module")
def one(cluster: Cluster) -> Iterator[Relay]:
    with cluster.replica("one") as relay:
        yield relay


@pytest.fixture(scope="module")
def two(cluster: Cluster, one: Relay) -> Iterator[Relay]:
    with cluster.replica("two") as relay:
        yield relay


def _client(relay: Relay) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=relay.url, timeout=30.0)


async def _conversation(client: httpx.AsyncClient, cluster: Cluster) -> str:
    response = await client.post("/api/conversations", json={"model": "fake-model"})
    assert response.status_code == 201, response.text
    conversation_id: str = response.json()["id"]
    cluster.conversations.add(conversation_id)
    return conversation_id


async def _answer(client: httpx.AsyncClient, conversation_id: str) -> dict[str, Any]:
    """The conversation's last message, as stored."""
    response = await client.get(f"/api/conversations/{conversation_id}")
    assert response.status_code == 200, response.text
    message: dict[str, Any] = response.json()["messages"][-1]
    assert message["role"] == "assistant"
    return message


async def _rest(got: AsyncIterator[Entry]) -> list[Entry]:
    return [entry async for entry in got]


def _kill(relay: Relay) -> None:
    """SIGKILL: no shutdown, no final writes, as a crashed machine."""
    relay.proc.kill()
    relay.proc.wait(timeout=10)


async def _read(client: httpx.AsyncClient, stream_id: str, after: int) -> AsyncIterator[Entry]:
    async with read_stream(client, stream_id, after) as got:
        async for entry in got:
            yield entry


async def _collect(client: httpx.AsyncClient, stream_id: str, after: int) -> list[Entry]:
    return [entry async for entry in _read(client, stream_id, after)]


def _wait_for_lease_to_lapse(stream_id: str, timeout: float = LEASE + 10) -> None:
    """Until no process holds the answer's owner lease (the killed one renews it no more)."""
    deadline = time.monotonic() + timeout
    with redis.Redis.from_url(REDIS_URL) as client:
        while client.exists(f"tokenrelay:answer:{stream_id}"):
            assert time.monotonic() < deadline, f"the lease of {stream_id} did not lapse"
            time.sleep(0.05)  # polling with a deadline


async def test_stream_started_on_one_replica_resumes_on_the_other(
    cluster: Cluster, one: Relay, two: Relay, fake_upstream: FakeUpstream
) -> None:
    """The client drops on one and reads the rest on two, for longer than the grace: readers
    on another replica keep the answer going as readers on its own do."""
    seed = int.from_bytes(os.urandom(4))
    rng = random.Random(seed)
    words = 40
    async with _client(one) as first, _client(two) as second, asyncio.timeout(60):
        body = chat_body(tokens=words, gate="resume", gate_after=10)
        async with open_stream(first, body) as (stream_id, got):
            cluster.streams.add(stream_id)
            record = fake_upstream.last_request()
            had = [await anext(got) for _ in range(6)]
        # Dropped on one; the answer runs on there, held mid-way by the upstream.
        async with read_stream(second, stream_id, 6) as rest:
            had += [await anext(rest) for _ in range(5)]  # up to the gate: 10 words
            reading = asyncio.create_task(_rest(rest))
            done, _ = await asyncio.wait({reading}, timeout=GRACE + 2)
            assert not done, f"the answer ended while read on two: {reading.result()[-1:]}"
            assert record.outcome is None
            fake_upstream.open_gate("resume")
            had += await reading
        # And after its end, from anywhere in it.
        after = rng.randint(0, len(had))
        late = [entry async for entry in _read(second, stream_id, after)]

    assert text_of(had) == expected_text(words), seed
    assert [seq for seq, _ in had] == list(range(1, len(had) + 1))
    assert had[-1][1] == "data: [DONE]"
    assert late == had[after:], seed


async def test_cancel_through_the_other_replica_stops_the_answer_for_every_reader(
    cluster: Cluster, one: Relay, two: Relay, fake_upstream: FakeUpstream
) -> None:
    async with _client(one) as first, _client(two) as second, asyncio.timeout(60):
        body = chat_body(tokens=50, gate="cancel", gate_after=3)
        async with open_stream(first, body) as (stream_id, got):
            cluster.streams.add(stream_id)
            record = fake_upstream.last_request()
            async with read_stream(second, stream_id) as watching:
                had = [await anext(got) for _ in range(4)]
                watched = [await anext(watching) for _ in range(4)]
                cancelled = await second.post(f"/api/streams/{stream_id}/cancel")
                had += await _rest(got)
                watched += await _rest(watching)

    assert cancelled.json() == {"cancelled": True}
    assert await asyncio.to_thread(record.wait_for_outcome, 5) == "abandoned"
    assert watched == had
    assert had[-1][1] == "data: [DONE]"
    assert text_of(had) == expected_text(3)


async def test_conversation_written_through_one_is_read_and_stopped_through_the_other(
    cluster: Cluster, one: Relay, two: Relay, fake_upstream: FakeUpstream
) -> None:
    async with _client(one) as first, _client(two) as second, asyncio.timeout(60):
        conversation_id = await _conversation(first, cluster)
        fake_upstream.defaults = {"tokens": 50, "gate": "stop", "gate_after": 5}
        async with send_message(first, conversation_id, "Tell me a story.") as (stream_id, got):
            cluster.streams.add(stream_id)
            record = fake_upstream.last_request()
            had = [await anext(got) for _ in range(6)]  # the role chunk and 5 words
            answer = await _answer(second, conversation_id)
            assert answer["status"] == "streaming"
            assert answer["stream_id"] == stream_id
            async with read_stream(second, stream_id) as watched_on_two:
                watched = [await anext(watched_on_two) for _ in range(6)]
                stopped = await second.post(f"/api/conversations/{conversation_id}/stop")
                watched += await _rest(watched_on_two)
            had += await _rest(got)
        answer = await _answer(second, conversation_id)
        on_one = await _answer(first, conversation_id)

    assert stopped.status_code == 200, stopped.text
    assert stopped.json() == {"stopped": True}
    assert await asyncio.to_thread(record.wait_for_outcome, 5) == "abandoned"
    assert watched == had
    assert text_of(had) == expected_text(5)
    assert answer["status"] == on_one["status"] == "stopped"
    assert answer["content"] == expected_text(5)


async def test_conversation_busy_holds_across_replicas(
    cluster: Cluster, one: Relay, two: Relay, fake_upstream: FakeUpstream
) -> None:
    async with _client(one) as first, _client(two) as second, asyncio.timeout(60):
        conversation_id = await _conversation(first, cluster)
        fake_upstream.defaults = {"tokens": 20, "gate": "busy", "gate_after": 3}
        async with send_message(first, conversation_id, "First question.") as (stream_id, got):
            cluster.streams.add(stream_id)
            had = [await anext(got) for _ in range(4)]
            busy = [
                await client.post(path, json=body)
                for client in (second, first)
                for path, body in (
                    (f"/api/conversations/{conversation_id}/messages", {"content": "Again?"}),
                    (f"/api/conversations/{conversation_id}/regenerate", {}),
                )
            ]
            fake_upstream.open_gate("busy")
            had += await _rest(got)
        fake_upstream.defaults = {"tokens": 3}
        async with send_message(second, conversation_id, "Second question.") as (next_id, got):
            cluster.streams.add(next_id)
            answered = await _rest(got)
        conversation = (await second.get(f"/api/conversations/{conversation_id}")).json()

    for response in busy:
        assert_openai_error(response, 400, code="conversation_busy")
    assert text_of(had) == expected_text(20)
    assert text_of(answered) == expected_text(3)
    assert [(m["role"], m["status"]) for m in conversation["messages"]] == [
        ("user", "complete"),
        ("assistant", "complete"),
        ("user", "complete"),
        ("assistant", "complete"),
    ]


async def test_killed_replica_ends_its_readers_elsewhere_with_interrupted(
    cluster: Cluster, two: Relay, fake_upstream: FakeUpstream
) -> None:
    """Never a hang, never a silent cut: what the dead replica wrote, then ``interrupted``."""
    with cluster.replica("doomed") as doomed:
        async with (
            _client(doomed) as there,
            _client(two) as second,
            asyncio.timeout(INTERRUPTED_WITHIN + 30),
        ):
            body = chat_body(tokens=50, gate="kill", gate_after=10)
            async with open_stream(there, body) as (stream_id, got):
                cluster.streams.add(stream_id)
                had = [await anext(got) for _ in range(11)]
                # A reader on two that has everything so far: it is all in Redis.
                async with read_stream(second, stream_id) as watching:
                    watched = [await anext(watching) for _ in range(11)]
                    _kill(doomed)
                    killed_at = time.monotonic()
                    async with read_stream(second, stream_id, 8) as resumed:
                        rest = await _rest(resumed)
                    watched += await _rest(watching)
                    ended_at = time.monotonic()

    for events in (had[:8] + rest, watched):
        assert [seq for seq, _ in events[:-1]] == list(range(1, 12))
        assert text_of(events) == expected_text(10)
        error = error_of(events)
        assert error is not None, events[-1]
        assert error["code"] == "interrupted"
        assert "data: [DONE]" not in events[-1][1]
    assert ended_at - killed_at < INTERRUPTED_WITHIN


async def test_answers_of_a_killed_replica_end_interrupted_on_stop_or_next_question(
    cluster: Cluster, two: Relay, fake_upstream: FakeUpstream
) -> None:
    """With no replica restarted: a Stop through another replica, or the next question, finds
    the dead replica's answer and marks it ``interrupted``, not ``stopped`` nor left
    ``streaming`` (answering) for ever."""
    async with _client(two) as second, asyncio.timeout(INTERRUPTED_WITHIN + 60):
        stopped_id = await _conversation(second, cluster)
        asked_id = await _conversation(second, cluster)
        with cluster.replica("doomed") as doomed:
            async with _client(doomed) as there, AsyncExitStack() as held:
                for gate, conversation_id in (("stopped", stopped_id), ("asked", asked_id)):
                    fake_upstream.defaults = {"tokens": 20, "gate": gate, "gate_after": 3}
                    stream_id, got = await held.enter_async_context(
                        send_message(there, conversation_id, "Hello?")
                    )
                    cluster.streams.add(stream_id)
                    assert [await anext(got) for _ in range(4)]
                _kill(doomed)
        stop = await second.post(f"/api/conversations/{stopped_id}/stop")
        stopped = (await second.get(f"/api/conversations/{stopped_id}")).json()
        fake_upstream.defaults = {"tokens": 2}
        async with send_message(second, asked_id, "Anyone?") as (next_stream, got):
            cluster.streams.add(next_stream)
            answered = await _rest(got)
        asked = (await second.get(f"/api/conversations/{asked_id}")).json()

    assert stop.json() == {"stopped": True}
    assert stopped["messages"][-1]["status"] == "interrupted"
    assert expected_text(3).startswith(stopped["messages"][-1]["content"])  # saved each second
    assert not stopped["answering"]
    assert text_of(answered) == expected_text(2)
    assert [m["status"] for m in asked["messages"]] == [
        "complete",
        "interrupted",
        "complete",
        "complete",
    ]
    assert not asked["answering"]


async def test_restarted_replica_marks_only_dead_answers_interrupted(
    cluster: Cluster, one: Relay, two: Relay, fake_upstream: FakeUpstream
) -> None:
    async with _client(one) as first, _client(two) as second, asyncio.timeout(120):
        dead_id = await _conversation(first, cluster)
        live_id = await _conversation(first, cluster)
        with cluster.replica("doomed") as doomed:
            async with _client(doomed) as there:
                fake_upstream.defaults = {"tokens": 20, "gate": "dead", "gate_after": 3}
                async with send_message(there, dead_id, "Hello?") as (dead_stream, got):
                    cluster.streams.add(dead_stream)
                    await anext(got)
                    _kill(doomed)
        # An answer live on one the whole time.
        fake_upstream.defaults = {"tokens": 20, "gate": "live", "gate_after": 3}
        async with send_message(first, live_id, "Still there?") as (live_stream, got):
            cluster.streams.add(live_stream)
            had = [await anext(got) for _ in range(4)]
            await asyncio.to_thread(_wait_for_lease_to_lapse, dead_stream)
            with cluster.replica("restarted") as restarted:
                async with _client(restarted) as again:
                    dead = await _answer(again, dead_id)
                    live = await _answer(again, live_id)
                    fake_upstream.open_gate("live")
                    had += await _rest(got)
        finished = await _answer(second, live_id)
        # The dead answer's conversation is not left busy.
        fake_upstream.defaults = {"tokens": 2}
        async with send_message(second, dead_id, "Again?") as (next_stream, got):
            cluster.streams.add(next_stream)
            answered = await _rest(got)

    assert dead["status"] == "interrupted"
    assert live["status"] == "streaming"
    assert finished["status"] == "complete"
    assert finished["content"] == text_of(had) == expected_text(20)
    assert text_of(answered) == expected_text(2)


async def test_serve_workers_resume_across_workers(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    """``--workers 2`` with Redis: each resume opens a new connection, which the kernel hands
    to either worker; every one gets exactly the rest."""
    require_redis()
    seed = int.from_bytes(os.urandom(4))
    rng = random.Random(seed)
    env = {"TOKENRELAY_REDIS_URL": REDIS_URL}
    no_reuse = httpx.Limits(max_keepalive_connections=0)
    streams: set[str] = set()
    try:
        with relay_to(fake_upstream, tmp_path, env=env, args=["--workers", "2"]) as relay:
            async with (
                httpx.AsyncClient(base_url=relay.url, timeout=30.0, limits=no_reuse) as client,
                asyncio.timeout(60),
            ):
                body = chat_body(tokens=30, gate="workers", gate_after=10)
                async with open_stream(client, body) as (stream_id, got):
                    streams.add(stream_id)
                    had = [await anext(got) for _ in range(11)]
                points = [rng.randint(0, 11) for _ in range(12)]
                resumes = [
                    asyncio.create_task(_collect(client, stream_id, after)) for after in points
                ]
                fake_upstream.open_gate("workers")
                results = await asyncio.gather(*resumes)
    finally:
        delete_server_keys(streams=streams)

    for after, rest in zip(points, results, strict=True):
        assert text_of(had[:after] + rest) == expected_text(30), f"after {after} ({seed})"
        assert rest[-1][1] == "data: [DONE]"
