"""The embedded SmolLM2-135M model end to end: a real server with no API key and no upstream.

Clients are the openai SDK (sync and async) and httpx where the bytes themselves matter. Servers
are module-scoped to pay the start-up once; a request that should finish quickly is bounded by
``max_tokens`` or, for the endpoints that have no such knob (``/api/ask``, the CLI), by a small
context window. Waits are bounded: every client has a timeout, and no test sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from conftest import (
    Relay,
    _clean_env,
    _free_port,
    assert_openai_error,
    data_events,
    start_tokenrelay,
    stream_chunks,
)

MODEL = "smollm2-135m-instruct"
HAIKU: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Write a haiku about rivers."}
]
# SmolLM2 counts on and on without ever ending its answer: a reliably long generation.
COUNTING = "1, 2, 3, 4, 5,"
COUNT_TO_TEN: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Count from 1 to 10, separated by commas."}
]
DEADLINE = 30.0
"""Seconds any single request or wait may take before the test fails."""
# Caps answers that no `max_tokens` bounds (/api/ask, the CLI) at a few seconds of decoding.
SMALL_CONTEXT = {"TOKENRELAY_LOCAL__CONTEXT_SIZE": "256"}


@pytest.fixture(scope="module")
def local_relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    """A fresh install: no key, no providers, so the local model answers everything."""
    with start_tokenrelay(tmp_path_factory.mktemp("local"), env=SMALL_CONTEXT) as running:
        yield running


@pytest.fixture(scope="module")
def one_slot_relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    """One model instance and one waiting place: a third concurrent request is refused."""
    env = {"TOKENRELAY_LOCAL__INSTANCES": "1", "TOKENRELAY_LOCAL__QUEUE_SIZE": "1"}
    with start_tokenrelay(tmp_path_factory.mktemp("one-slot"), env=env) as running:
        yield running


@pytest.fixture
def client(local_relay: Relay) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=local_relay.v1, api_key="unused", max_retries=0, timeout=DEADLINE
    ) as sdk:
        yield sdk


@pytest.fixture
async def aclient(local_relay: Relay) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=local_relay.v1, api_key="unused", max_retries=0, timeout=DEADLINE
    ) as sdk:
        yield sdk


def _content_of(chunk: dict[str, Any]) -> str:
    """The text of a chat or legacy completion chunk ("" for the role, finish and usage chunks)."""
    if not chunk["choices"]:
        return ""
    choice = chunk["choices"][0]
    text = choice["delta"].get("content") if "delta" in choice else choice["text"]
    return text or ""


async def _first_text(lines: AsyncIterator[str]) -> str:
    """Read a stream's lines until some text arrives (a chat stream opens with the role).

    The caller keeps ``lines`` (``response.aiter_lines()``) for as long as the stream should
    stay open: an abandoned line iterator is finalised, and that closes the connection.
    """
    async for line in lines:
        if line.startswith("data: {"):
            text = _content_of(json.loads(line[len("data: ") :]))
            if text:
                return text
    raise AssertionError("the stream ended before any text")


# Listing and routing.


def test_models_lists_the_local_model(client: openai.OpenAI) -> None:
    assert [model.id for model in client.models.list()] == [MODEL]


def test_any_model_name_is_answered_locally_without_upstreams(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="gpt-4o-mini", messages=HAIKU, max_tokens=8, temperature=0
    )
    assert completion.model == MODEL
    assert completion.choices[0].message.content
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=HAIKU, max_tokens=8, temperature=0, stream=True
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == completion.choices[0].message.content


# Streaming.


async def test_streamed_chat_reads_cleanly_through_the_sdk(
    aclient: openai.AsyncOpenAI, client: openai.OpenAI
) -> None:
    request: dict[str, Any] = {
        "model": MODEL,
        "messages": HAIKU,
        "max_tokens": 48,
        "temperature": 0,
    }
    stream = await aclient.chat.completions.create(
        **request, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]

    first, *middle, finish, usage_chunk = chunks
    assert first.choices[0].delta.role == "assistant"
    assert not first.choices[0].delta.content
    assert all(c.choices[0].finish_reason is None for c in middle)
    assert finish.choices[0].finish_reason in ("stop", "length")
    assert finish.choices[0].delta.content is None
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1
    pieces = [c.choices[0].delta.content for c in middle if c.choices[0].delta.content]
    assert len(pieces) >= 5, "the text should arrive token by token"

    # The same request, not streamed: the same answer, counted the same way.
    whole = client.chat.completions.create(**request)
    text = "".join(pieces)
    assert text == whole.choices[0].message.content
    assert finish.choices[0].finish_reason == whole.choices[0].finish_reason
    assert usage_chunk.usage == whole.usage
    # Each decoded token is sent as its own delta as soon as it is decoded; only a token that
    # ends inside a multi-byte character (or text held back for a stop sequence) could differ,
    # and this answer is plain ASCII with no stop sequence.
    assert text.isascii()
    assert usage_chunk.usage.completion_tokens == len(pieces)


def test_streamed_chat_bytes_arrive_as_they_are_decoded(local_relay: Relay) -> None:
    body = {
        "model": MODEL,
        "messages": HAIKU,
        "max_tokens": 48,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    reads_with_text = 0  # socket reads that brought some of the answer's text
    events: list[str] = []
    buffer = b""
    with httpx.stream(
        "POST", f"{local_relay.v1}/chat/completions", json=body, timeout=DEADLINE
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert "content-length" not in response.headers
        for read in response.iter_raw():
            complete, _, buffer = (buffer + read).rpartition(b"\n\n")
            new = data_events(complete)
            events += new
            reads_with_text += any(_content_of(json.loads(e)) for e in new if e != "[DONE]")
    assert buffer == b""
    assert events[-1] == "[DONE]"
    assert reads_with_text >= 5, "the text should reach the client in many pieces, not at the end"
    *chunks, usage_chunk = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert usage_chunk["choices"] == []
    usage = usage_chunk["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_streamed_completion_ends_with_length(client: openai.OpenAI) -> None:
    stream = client.completions.create(
        model=MODEL,
        prompt=COUNTING,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    *text_chunks, finish, usage_chunk = chunks
    assert finish.choices[0].finish_reason == "length"
    assert usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == 8
    assert "".join(c.choices[0].text for c in text_chunks).startswith(" 6, 7")


# Whole answers.


def test_chat_usage_adds_up(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL, messages=HAIKU, max_tokens=48, temperature=0
    )
    usage = completion.usage
    assert usage is not None
    assert usage.prompt_tokens > 0
    assert usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.role == "assistant"


def test_completion_usage_adds_up(client: openai.OpenAI) -> None:
    completion = client.completions.create(
        model=MODEL, prompt=COUNTING, max_tokens=6, temperature=0
    )
    usage = completion.usage
    assert usage is not None
    assert usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert completion.object == "text_completion"


def test_small_max_tokens_ends_with_length(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(
        model=MODEL, messages=COUNT_TO_TEN, max_tokens=5, temperature=0
    )
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage is not None
    assert chat.usage.completion_tokens == 5
    legacy = client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=5, temperature=0)
    assert legacy.choices[0].finish_reason == "length"
    assert legacy.usage is not None
    assert legacy.usage.completion_tokens == 5


def test_stop_sequence_ends_the_answer_before_it(client: openai.OpenAI) -> None:
    # Without the stop, both answers run past ", 9,"; with it they end just before.
    chat_request: dict[str, Any] = {
        "model": MODEL,
        "messages": COUNT_TO_TEN,
        "max_tokens": 40,
        "temperature": 0,
    }
    unstopped = client.chat.completions.create(**chat_request).choices[0].message.content
    assert unstopped is not None
    assert ", 9," in unstopped
    chat = client.chat.completions.create(**chat_request, stop=[", 9,"])
    assert chat.choices[0].message.content == unstopped[: unstopped.index(", 9,")]
    assert chat.choices[0].finish_reason == "stop"

    legacy = client.completions.create(
        model=MODEL, prompt=COUNTING, max_tokens=40, temperature=0, stop=", 9,"
    )
    assert legacy.choices[0].text == " 6, 7, 8"
    assert legacy.choices[0].finish_reason == "stop"


def test_seed_makes_sampling_at_temperature_one_reproducible(client: openai.OpenAI) -> None:
    def chat(seed: int) -> str | None:
        completion = client.chat.completions.create(
            model=MODEL, messages=HAIKU, max_tokens=16, temperature=1, seed=seed
        )
        return completion.choices[0].message.content

    def legacy(seed: int) -> str:
        return (
            client.completions.create(
                model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=1, seed=seed
            )
            .choices[0]
            .text
        )

    for sample in (chat, legacy):
        first = sample(1234)
        assert first
        assert sample(1234) == first
        assert {sample(1), sample(2)} != {first}, "different seeds should not all agree"


def test_temperature_zero_is_deterministic(client: openai.OpenAI) -> None:
    def chat() -> str | None:
        completion = client.chat.completions.create(
            model=MODEL, messages=HAIKU, max_tokens=16, temperature=0
        )
        return completion.choices[0].message.content

    def legacy() -> str:
        return (
            client.completions.create(
                model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=0
            )
            .choices[0]
            .text
        )

    for sample in (chat, legacy):
        first = sample()
        assert first
        assert sample() == first


# The tutorial's endpoints and the CLI.


def test_ask_answers_in_json(local_relay: Relay) -> None:
    response = httpx.get(
        f"{local_relay.url}/api/ask", params={"prompt": "Say hello."}, timeout=DEADLINE
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["model"] == MODEL
    assert answer["answer"].strip()
    assert answer["finish_reason"] in ("stop", "length")
    usage = answer["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_ask_stream_is_an_event_stream_ending_with_done(local_relay: Relay) -> None:
    with httpx.stream(
        "GET",
        f"{local_relay.url}/api/ask/stream",
        params={"prompt": "Hyperf 是什么?"},
        timeout=DEADLINE,
    ) as response:
        chunks = stream_chunks(response)
    assert {chunk["model"] for chunk in chunks} == {MODEL}
    assert "".join(_content_of(chunk) for chunk in chunks).strip()
    assert chunks[-1]["usage"]["completion_tokens"] > 0


def test_cli_ask_answers_in_process(tmp_path: Path) -> None:
    env = _clean_env(
        {
            **SMALL_CONTEXT,
            "TOKENRELAY_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'tokenrelay.db'}",
        }
    )
    done = subprocess.run(
        [sys.executable, "-m", "tokenrelay", "ask", "Hyperf 是什么?"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    assert "Traceback" not in done.stderr


# Admission, cancelling and shutdown with one instance.


async def test_full_queue_refuses_with_429_and_retry_after(one_slot_relay: Relay) -> None:
    long = {"model": MODEL, "prompt": COUNTING, "max_tokens": 2000, "temperature": 0}
    short = {"model": MODEL, "prompt": COUNTING, "max_tokens": 4, "temperature": 0}
    async with httpx.AsyncClient(base_url=one_slot_relay.v1, timeout=DEADLINE) as http:
        contenders: list[asyncio.Task[httpx.Response]] = []
        try:
            async with http.stream("POST", "/completions", json={**long, "stream": True}) as busy:
                assert busy.status_code == 200
                busy_lines = busy.aiter_lines()
                await _first_text(busy_lines)  # the one instance is decoding

                # Two requests race for the one waiting place: the loser is refused at once,
                # the winner waits (a waiting stream gets its headers only when it starts).
                contenders = [
                    asyncio.create_task(
                        http.send(
                            http.build_request(
                                "POST", "/completions", json={**short, "stream": True}
                            ),
                            stream=True,
                        )
                    )
                    for _ in range(2)
                ]
                done, pending = await asyncio.wait(
                    contenders, timeout=DEADLINE, return_when=asyncio.FIRST_COMPLETED
                )
                assert len(done) == 1 and len(pending) == 1, "exactly one request should wait"
                refused = done.pop().result()
                await refused.aread()
                _assert_rate_limited(refused)
                [waiting] = pending

                # Now the instance and the waiting place are both taken: any more is refused.
                _assert_rate_limited(await http.post("/completions", json=short))
                _assert_rate_limited(await http.post("/chat/completions", json=_chat(short)))
                async with openai.AsyncOpenAI(
                    base_url=one_slot_relay.v1, api_key="unused", max_retries=0, timeout=DEADLINE
                ) as sdk:
                    with pytest.raises(openai.RateLimitError) as error:
                        await sdk.chat.completions.create(**_chat(short), stream=True)
                assert int(error.value.response.headers["retry-after"]) >= 1
                assert not waiting.done(), "the waiting request should not start before its turn"

            # The first stream is closed: the waiting request gets the instance and finishes.
            response = await asyncio.wait_for(waiting, DEADLINE)
            assert response.status_code == 200
            events = data_events(await response.aread())
            assert events[-1] == "[DONE]"
            assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
        finally:
            for task in contenders:
                task.cancel()
            await asyncio.gather(*contenders, return_exceptions=True)


def _chat(body: dict[str, Any]) -> dict[str, Any]:
    """The chat version of a completion request: the prompt as the user's message."""
    chat = {key: value for key, value in body.items() if key != "prompt"}
    return {**chat, "messages": [{"role": "user", "content": body["prompt"]}]}


def _assert_rate_limited(response: httpx.Response) -> None:
    assert_openai_error(response, 429, code="rate_limit_exceeded")
    assert response.json()["error"]["type"] == "rate_limit_error"
    assert int(response.headers["Retry-After"]) >= 1


async def test_client_disconnect_frees_the_model(one_slot_relay: Relay) -> None:
    async with openai.AsyncOpenAI(
        base_url=one_slot_relay.v1, api_key="unused", max_retries=0, timeout=DEADLINE
    ) as sdk:
        # Left alone, this would keep the only instance busy for about 2000 / 120 = 16 s.
        stream = await sdk.completions.create(
            model=MODEL, prompt=COUNTING, max_tokens=2000, temperature=0, stream=True
        )
        read = 0
        async for chunk in stream:
            read += bool(chunk.choices[0].text)
            if read == 3:
                break
        await stream.close()

        started = time.perf_counter()
        following = await sdk.completions.create(
            model=MODEL, prompt=COUNTING, max_tokens=4, temperature=0, stream=True
        )
        async for chunk in following:
            if chunk.choices[0].text:
                break
        first_token = time.perf_counter() - started
        await following.close()
    assert first_token < 2.0, f"the next request waited {first_token:.1f} s for the instance"


# Misconfigured models.


def _refused_chats(relay: Relay, status: int, code: str) -> list[dict[str, object]]:
    """Ask for a chat completion, unstreamed then streamed, and return the two errors.

    Both must be refused with ``status`` and ``code``, in OpenAI's error shape.
    """
    errors = []
    for stream in (False, True):
        response = httpx.post(
            f"{relay.v1}/chat/completions",
            json={"model": MODEL, "messages": HAIKU, "stream": stream},
            timeout=DEADLINE,
        )
        errors.append(assert_openai_error(response, status, code=code))
    return errors


def test_missing_model_file_is_a_503_naming_it(tmp_path: Path) -> None:
    missing = "/nonexistent/model.gguf"
    with start_tokenrelay(tmp_path, env={"TOKENRELAY_LOCAL__PATH": missing}) as relay:
        for error in _refused_chats(relay, 503, "model_unavailable"):
            assert missing in str(error["message"])
        response = httpx.post(
            f"{relay.v1}/completions",
            json={"model": MODEL, "prompt": COUNTING},
            timeout=DEADLINE,
        )
        assert_openai_error(response, 503, code="model_unavailable")
        assert "Traceback" not in relay.log_text()


def test_missing_model_file_with_eager_load_stops_the_server(tmp_path: Path) -> None:
    missing = "/nonexistent/model.gguf"
    env = _clean_env(
        {
            "TOKENRELAY_LOCAL__PATH": missing,
            "TOKENRELAY_LOCAL__LOAD": "eager",
            "TOKENRELAY_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'tokenrelay.db'}",
        }
    )
    command = [sys.executable, "-m", "tokenrelay", "serve", "--host", "127.0.0.1"]
    done = subprocess.run(
        [*command, "--port", str(_free_port())],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    log = done.stdout + done.stderr
    assert done.returncode != 0, log
    assert f"The local model file {missing} does not exist." in log
    assert "Traceback" not in log, f"a missing file is a user error, not a crash:\n{log}"


def test_model_without_chat_template_answers_completions_only(
    tmp_path: Path, model_without_template: Path
) -> None:
    env = {"TOKENRELAY_LOCAL__PATH": str(model_without_template)}
    with start_tokenrelay(tmp_path, env=env) as relay:
        for error in _refused_chats(relay, 400, "model_has_no_chat_template"):
            assert "/v1/completions" in str(error["message"])
        with openai.OpenAI(
            base_url=relay.v1, api_key="unused", max_retries=0, timeout=DEADLINE
        ) as sdk:
            completion = sdk.completions.create(
                model=MODEL, prompt=COUNTING, max_tokens=4, temperature=0
            )
    assert completion.choices[0].text.startswith(" 6")
    assert completion.choices[0].finish_reason == "length"
