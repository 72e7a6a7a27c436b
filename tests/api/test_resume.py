"""Resuming streams: every drop point, every reader, on both event-log backends.

One suite, run against a ``tokenrelay serve`` keeping its logs in memory and one keeping them
in Redis Streams (under CI=true the Redis half must run). A client that lost its connection
reads ``GET /api/streams/{id}`` with ``Last-Event-ID`` and must get exactly the rest: joined to
what it had, the uninterrupted answer, entry for entry. The fake upstream's ``gate`` holds an
answer mid-stream, so tests act while it is known to be running, without sleeping.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionChunk

from conftest import Relay, assert_openai_error, relay_to
from fake_upstream import FakeUpstream
from redis_server import REDIS_URL, delete_server_keys, require_redis
from resumable import RESUMABLE, Entry, chat_body, error_of, open_stream, read_stream, text_of

GRACE = 3.0
"""The servers' ``stream_grace``: how long a resumable answer waits for a reader to return."""

CANCEL_DEADLINE = 0.2
"""Seconds from a plain stream's client leaving to its upstream request being closed."""

# Words with their whitespace as the fake streams them (a piece per chunk): newlines, runs of
# spaces and non-ASCII text too, so a resumed text that lost or repeated a piece shows.
LONG_TEXT = "".join(
    f"mot{i}ñ\n" if i % 17 == 0 else f"word{i}  " if i % 5 == 0 else f"w{i} " for i in range(400)
)
LONG_ENTRIES = 400 + 3
"""A role chunk, a chunk per word, the finishing chunk and ``[DONE]``: one entry each."""

DROPS = 200


@dataclass
class Server:
    """A tokenrelay under test and the streams the tests made on it (to clean up after)."""

    relay: Relay
    backend: str
    streams: set[str] = field(default_factory=set)

    @property
    def url(self) -> str:
        return self.relay.url

    def client(
        self, *, timeout: float = 30.0, limits: httpx.Limits | None = None
    ) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.url, timeout=timeout, limits=limits or httpx.Limits()
        )


def _start(
    backend: str, fake: FakeUpstream, factory: pytest.TempPathFactory, **env: str
) -> Iterator[Server]:
    if backend == "redis":
        require_redis()
        env["TOKENRELAY_REDIS_URL"] = REDIS_URL
    with relay_to(fake, factory.mktemp(backend), env=env) as relay:
        server = Server(relay, backend)
        try:
            yield server
        finally:
            if backend == "redis":
                delete_server_keys(streams=server.streams)


@pytest.fixture(scope="module", params=["memory", "redis"])
def server(
    request: pytest.FixtureRequest,
    fake_upstream: FakeUpstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Server]:
    yield from _start(
        request.param, fake_upstream, tmp_path_factory, TOKENRELAY_STREAM_GRACE=str(GRACE)
    )


@pytest.fixture(scope="module")
def peer(
    server: Server, fake_upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """Another process reading the same logs: with Redis, a second server sharing it (so its
    readers catch up with XRANGE and follow with XREAD); in memory, the server itself."""
    if server.backend == "memory":
        yield server
        return
    yield from _start(
        server.backend, fake_upstream, tmp_path_factory, TOKENRELAY_STREAM_GRACE=str(GRACE)
    )


@pytest.fixture(scope="module")
def short_lived(
    server: Server, fake_upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """A server on the same backend whose ended streams expire after half a second."""
    yield from _start(server.backend, fake_upstream, tmp_path_factory, TOKENRELAY_STREAM_TTL="0.5")


def _rng() -> tuple[random.Random, str]:
    seed = int.from_bytes(os.urandom(4))
    return random.Random(seed), f"seed {seed}"


async def _read_all(client: httpx.AsyncClient, stream_id: str, after: int | None) -> list[Entry]:
    async with read_stream(client, stream_id, after, query=bool(after) and after % 2 == 1) as got:
        return [entry async for entry in got]


async def test_200_drop_points_each_resume_to_the_exact_answer(
    server: Server, peer: Server
) -> None:
    """Half the readers resume the moment they dropped (following the live rest), half after
    the answer ended (all from the log); each gets exactly the entries after its drop. About
    half resume on ``peer`` (with Redis, another process); odd drop points resume with the
    ``last_event_id`` parameter, the others with the ``Last-Event-ID`` header."""
    rng, seed = _rng()
    drops = [rng.randint(0, LONG_ENTRIES) for _ in range(DROPS)]
    live = {d for i, d in enumerate(drops) if i % 2 == 0}
    late = [d for i, d in enumerate(drops) if i % 2 == 1]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with (
        server.client(limits=limits) as here,
        peer.client(limits=limits) as there,
        asyncio.timeout(120),
    ):
        resumed: dict[int, asyncio.Task[list[Entry]]] = {}

        def resume(d: int) -> None:
            if d not in resumed:
                client = there if rng.random() < 0.5 else here
                resumed[d] = asyncio.create_task(_read_all(client, stream_id, d or None))

        async with open_stream(here, chat_body(text=LONG_TEXT, delay=0.005)) as (stream_id, got):
            server.streams.add(stream_id)
            full: list[Entry] = []
            if 0 in live:
                resume(0)
            async for entry in got:
                full.append(entry)
                if entry[0] in live:  # a client that dropped right after this entry
                    resume(entry[0])
        for d in late:
            resume(d)
        results = {d: await task for d, task in resumed.items()}

    assert text_of(full) == LONG_TEXT
    assert [seq for seq, _ in full] == list(range(1, LONG_ENTRIES + 1))
    assert full[-1][1] == "data: [DONE]"
    assert set(results) == set(drops)
    for d, rest in results.items():
        assert rest == full[d:], f"resumed after entry {d} ({seed})"
        assert text_of(full[:d] + rest) == LONG_TEXT, f"drop at {d} ({seed})"


async def test_connections_dropped_mid_stream_resume_to_the_exact_answer(server: Server) -> None:
    rng, seed = _rng()
    text = LONG_TEXT[:400]
    count = len(text.split()) + 3

    async def drop_and_resume(client: httpx.AsyncClient, at: int) -> str:
        async with open_stream(client, chat_body(text=text, delay=0.01)) as (stream_id, got):
            server.streams.add(stream_id)
            had = [await anext(got) for _ in range(at)]
        # Leaving the block closed the connection mid-answer.
        rest = await _read_all(client, stream_id, at)
        assert [seq for seq, _ in had + rest] == list(range(1, count + 1)), f"at {at} ({seed})"
        return text_of(had + rest)

    async with server.client() as client, asyncio.timeout(60):
        points = [rng.randint(1, count - 2) for _ in range(5)]
        texts = await asyncio.gather(*(drop_and_resume(client, at) for at in points))

    assert texts == [text] * len(points), seed


def test_openai_sdk_reads_a_resumed_stream(server: Server) -> None:
    text = LONG_TEXT[:300]
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as client:
        stream = client.chat.completions.create(
            model="fake-model",
            messages=[{"role": "user", "content": "Go on."}],
            stream=True,
            extra_headers=RESUMABLE,
            extra_body={"fake": {"text": text, "delay": 0.01}},
        )
        stream_id = stream.response.headers["X-Tokenrelay-Stream"]
        server.streams.add(stream_id)
        first = [next(stream) for _ in range(5)]
        stream.close()  # the connection drops

    # The same client library reads the rest from tokenrelay's own route.
    with openai.OpenAI(base_url=f"{server.url}/api", api_key="unused", max_retries=0) as api:
        rest = api.get(
            f"/streams/{stream_id}",
            cast_to=ChatCompletionChunk,
            stream=True,
            stream_cls=openai.Stream[ChatCompletionChunk],
            options={"headers": {"Last-Event-ID": f"{stream_id}:5"}},
        )
        chunks = first + list(rest)

    assert all(isinstance(chunk, ChatCompletionChunk) for chunk in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("stream_id", ["st_000000000000000000000000", "no.such.stream", "x" * 101])
async def test_unknown_stream_is_a_404_in_openai_shape(server: Server, stream_id: str) -> None:
    async with server.client(timeout=5.0) as client:
        read = await client.get(f"/api/streams/{stream_id}")
        resumed = await client.get(
            f"/api/streams/{stream_id}", headers={"Last-Event-ID": f"{stream_id[:100]}:3"}
        )
        cancelled = await client.post(f"/api/streams/{stream_id}/cancel")

    for response in (read, resumed, cancelled):
        assert_openai_error(response, 404, code="stream_not_found")


async def test_expired_stream_is_a_404(short_lived: Server) -> None:
    async with short_lived.client(timeout=5.0) as client:
        async with open_stream(client, chat_body(tokens=3)) as (stream_id, got):
            short_lived.streams.add(stream_id)
            assert text_of([entry async for entry in got]) == "word0 word1 word2 "
        deadline = time.monotonic() + 15
        while (response := await client.get(f"/api/streams/{stream_id}")).status_code == 200:
            assert time.monotonic() < deadline, "the stream did not expire"
            await asyncio.sleep(0.1)  # polling with a deadline
        resumed = await client.get(
            f"/api/streams/{stream_id}", headers={"Last-Event-ID": f"{stream_id}:2"}
        )

    assert_openai_error(response, 404, code="stream_not_found")
    assert_openai_error(resumed, 404, code="stream_not_found")


@pytest.mark.parametrize(
    ("header", "query", "param"),
    [
        ("garbage", None, "Last-Event-ID"),
        ("{stream}", None, "Last-Event-ID"),
        ("{stream}:-1", None, "Last-Event-ID"),
        ("{stream}:1234567890123456789", None, "Last-Event-ID"),
        ("st_other:3", None, "Last-Event-ID"),
        (None, "{stream}:x", "last_event_id"),
        (None, "{stream}:1\nid: x", "last_event_id"),
        (None, "st_other:3", "last_event_id"),
    ],
)
async def test_malformed_last_event_id_is_a_400(
    server: Server, header: str | None, query: str | None, param: str
) -> None:
    async with server.client(timeout=5.0) as client:
        async with open_stream(client, chat_body(tokens=2)) as (stream_id, got):
            server.streams.add(stream_id)
            assert [entry async for entry in got]
        headers = {"Last-Event-ID": header.format(stream=stream_id)} if header else {}
        params = {"last_event_id": query.format(stream=stream_id)} if query else {}
        response = await client.get(f"/api/streams/{stream_id}", headers=headers, params=params)

    assert_openai_error(response, 400, param=param)


async def test_second_reader_watches_live(server: Server, fake_upstream: FakeUpstream) -> None:
    async with server.client() as client, asyncio.timeout(30):
        body = chat_body(tokens=20, gate="watch", gate_after=5)
        async with open_stream(client, body) as (stream_id, first):
            server.streams.add(stream_id)
            record = fake_upstream.last_request()
            had = [await anext(first) for _ in range(6)]  # the role chunk and 5 words
            async with read_stream(client, stream_id) as second:
                watched = [await anext(second) for _ in range(6)]
                # The upstream is still held mid-answer: the second reader is watching it live.
                assert record.outcome is None
                fake_upstream.open_gate("watch")
                watched += [entry async for entry in second]
            had += [entry async for entry in first]

    assert watched == had
    assert text_of(had) == "".join(f"word{i} " for i in range(20))


async def test_cancel_stops_the_answer_for_every_reader(
    server: Server, fake_upstream: FakeUpstream
) -> None:
    async with server.client() as client, asyncio.timeout(30):
        async with open_stream(client, chat_body(tokens=50, gate="cancel", gate_after=3)) as (
            stream_id,
            first,
        ):
            server.streams.add(stream_id)
            record = fake_upstream.last_request()
            async with read_stream(client, stream_id, 2) as second:
                had = [await anext(first) for _ in range(4)]
                watched = [await anext(second) for _ in range(2)]
                cancelled = await client.post(f"/api/streams/{stream_id}/cancel")
                had += [entry async for entry in first]
                watched += [entry async for entry in second]
        afterwards = await _read_all(client, stream_id, None)

    assert cancelled.status_code == 200
    assert cancelled.json() == {"cancelled": True}
    assert await asyncio.to_thread(record.wait_for_outcome, 5) == "abandoned"
    assert had[-1][1] == "data: [DONE]"
    assert text_of(had) == "word0 word1 word2 "
    assert watched == had[2:]
    assert afterwards == had


async def test_plain_stream_closes_the_upstream_when_its_client_leaves(
    server: Server, fake_upstream: FakeUpstream
) -> None:
    async with server.client() as client:
        body = chat_body(tokens=200, delay=0.02)
        async with open_stream(client, body, resumable=False) as (stream_id, got):
            server.streams.add(stream_id)
            record = fake_upstream.last_request()
            await anext(got)
            await anext(got)
            left_at = time.monotonic()

    assert await asyncio.to_thread(record.wait_for_outcome, 5) == "abandoned"
    assert record.outcome_at is not None
    waited = record.outcome_at - left_at
    assert waited < CANCEL_DEADLINE, f"the upstream request ran on for {waited:.3f} s"


async def test_resumable_stream_survives_its_client_leaving(
    server: Server, fake_upstream: FakeUpstream
) -> None:
    async with server.client() as client, asyncio.timeout(30):
        async with open_stream(client, chat_body(tokens=30, gate="leave", gate_after=3)) as (
            stream_id,
            got,
        ):
            server.streams.add(stream_id)
            record = fake_upstream.last_request()
            had = [await anext(got) for _ in range(4)]
        # Nobody reads it now; the answer goes on all the same.
        fake_upstream.open_gate("leave")
        assert await asyncio.to_thread(record.wait_for_outcome, GRACE) == "completed"
        rest = await _read_all(client, stream_id, had[-1][0])

    assert text_of(had + rest) == "".join(f"word{i} " for i in range(30))
    assert rest[-1][1] == "data: [DONE]"


async def test_resumable_stream_nobody_resumes_is_cancelled_after_the_grace(
    server: Server, fake_upstream: FakeUpstream
) -> None:
    async with server.client() as client, asyncio.timeout(30):
        async with open_stream(client, chat_body(tokens=30, gate="gone", gate_after=2)) as (
            stream_id,
            got,
        ):
            server.streams.add(stream_id)
            record = fake_upstream.last_request()
            had = [await anext(got) for _ in range(3)]
            left_at = time.monotonic()
        outcome = await asyncio.to_thread(record.wait_for_outcome, GRACE + 10)
        rest = await _read_all(client, stream_id, had[-1][0])

    assert outcome == "abandoned"
    assert record.outcome_at is not None
    waited = record.outcome_at - left_at
    assert GRACE - 0.1 <= waited < GRACE + 5, f"cancelled {waited:.2f} s after the client left"
    # What it said before is kept, and ends plainly.
    assert rest == [(4, "data: [DONE]")]
    assert error_of(had + rest) is None
