"""The upstream is untrusted: whatever it sends, the client gets an answer or a clear error.

Each test makes the fake upstream misbehave in one way (a key echoed in every error field, a
redirect, a huge event, a gzip bomb, a wrong content type, a stream that stops early or only
pings, a broken model list) and checks, over real sockets, what a client of tokenrelay sees:
never the key, never a redirect's target, never a non-answer relayed as a success.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai._streaming import SSEDecoder

from conftest import (
    NO_LOCAL_MODEL,
    Relay,
    assert_no_leak,
    assert_openai_error,
    data_events,
    fake_provider_toml,
    relay_to,
    start_tokenrelay,
)
from fake_upstream import INTERNAL_SECRET, LEAKED_KEY, FakeUpstream, expected_text

READ_TIMEOUT = 1.0
MAX_REQUEST_SECONDS = 2.5
MAX_EVENT_BYTES = 64 * 1024
MAX_RESPONSE_BYTES = 1024 * 1024


def _chat(stream: bool = False, **fake: Any) -> dict[str, Any]:
    return {
        "model": "fake-model",
        "messages": [{"role": "user", "content": "hello"}],
        "stream": stream,
        "fake": fake,
    }


def _post(relay: Relay, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{relay.v1}/chat/completions", json=body, timeout=30)


def _stream(relay: Relay, body: dict[str, Any]) -> list[str]:
    """The ``data:`` payloads of a streamed answer that started (a 200), read to its end."""
    with httpx.stream("POST", f"{relay.v1}/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200, response.read()
        # read() raises if the body is cut short: the relay must end it properly.
        return data_events(response.read())


def _ends_with_one_error(events: list[str]) -> dict[str, Any]:
    """Check that the stream's only error event is its last; return that error."""
    errors = [event for event in events if event.startswith('{"error"')]
    assert len(errors) == 1, events[-3:]
    assert events[-1] == errors[0], "nothing may follow the error event"
    assert_no_leak(errors[0])
    error: dict[str, Any] = json.loads(errors[0])["error"]
    assert {"message", "type", "param", "code"} <= set(error)
    return error


def _content(events: list[str]) -> str:
    chunks = [json.loads(e) for e in events if e != "[DONE]" and not e.startswith('{"error"')]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def _assert_key_not_logged(relay: Relay) -> None:
    assert LEAKED_KEY not in relay.log_text()


@pytest.fixture(scope="module")
def guarded(
    fake_upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Relay]:
    """A relay with small bounds, so that tests reach them in moments."""
    bounds: dict[str, str | float] = {
        "read_timeout": READ_TIMEOUT,
        "max_request_seconds": MAX_REQUEST_SECONDS,
        "max_event_bytes": MAX_EVENT_BYTES,
        "max_response_bytes": MAX_RESPONSE_BYTES,
    }
    with relay_to(fake_upstream, tmp_path_factory.mktemp("guarded"), extra=bounds) as running:
        yield running


@pytest.fixture(scope="module")
def other_host() -> Iterator[FakeUpstream]:
    """Another server, where a redirect might send tokenrelay (and the prompt, and the key)."""
    with FakeUpstream(models=["other-model"]) as fake:
        yield fake


# -- keys never pass through ---------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("status", [400, 401, 429, 500])
def test_every_field_of_an_upstream_error_is_scrubbed(
    relay: Relay, stream: bool, status: int
) -> None:
    response = _post(relay, _chat(stream, status=status, leak_everywhere=True))

    expected = {400: 400, 401: 502, 429: 429, 500: 502}[status]
    error = assert_openai_error(response, expected)
    assert "***" in str(error["message"])
    if status != 401:  # a credentials error is always ours: upstream_error
        assert error["type"] == "invalid_key_***"
    assert error["param"] == "key=***"
    assert error["code"] == "bad_***"
    _assert_key_not_logged(relay)


def test_in_band_error_event_is_scrubbed_before_it_is_relayed(
    relay: Relay, openai_client: openai.OpenAI
) -> None:
    events = _stream(relay, _chat(True, tokens=5, error_after=2, leak_everywhere=True))

    error = _ends_with_one_error(events)
    assert error["param"] == "key=***"
    assert error["code"] == "bad_***"
    assert "The server had an error" in error["message"]
    assert _content(events) == expected_text(2)

    stream = openai_client.chat.completions.create(
        model="fake-model",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_body={"fake": {"error_after": 1}},
    )
    with pytest.raises(openai.APIError) as caught:
        for _chunk in stream:
            pass
    assert "The server had an error" in str(caught.value)
    assert LEAKED_KEY not in str(caught.value)
    _assert_key_not_logged(relay)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_error_in_a_2xx_answer_is_a_502_scrubbed(relay: Relay, stream: bool) -> None:
    leaky = {"error": {"message": f"bad key {LEAKED_KEY}", "type": "x", "code": LEAKED_KEY}}
    response = _post(relay, _chat(stream, body=json.dumps(leaky)))

    error = assert_openai_error(response, 502)
    assert error["message"] == "bad key ***"
    assert error["code"] == "***"


def test_in_band_error_is_stored_scrubbed(fake_upstream: FakeUpstream, tmp_path: Path) -> None:
    fake_upstream.defaults = {"tokens": 4, "error_after": 2, "leak_everywhere": True}
    with relay_to(fake_upstream, tmp_path) as relay, httpx.Client(base_url=relay.url) as api:
        conversation = api.post("/api/conversations", json={"model": "fake-model"}).json()
        url = f"/api/conversations/{conversation['id']}"
        with api.stream("POST", f"{url}/messages", json={"content": "hi"}) as response:
            raw = response.read()
        assistant = api.get(url).json()["messages"][-1]

    assert LEAKED_KEY not in raw.decode()
    assert assistant["status"] == "error"
    assert assistant["content"] == expected_text(2)
    assert "The server had an error" in assistant["error"]
    assert_no_leak(assistant["error"])
    for path in tmp_path.glob("tokenrelay.db*"):  # the database, its journal and WAL files
        assert LEAKED_KEY.encode() not in path.read_bytes(), path


# -- redirects are never followed ----------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_redirect_to_another_host_is_a_502_and_that_host_gets_nothing(
    relay: Relay, other_host: FakeUpstream, stream: bool
) -> None:
    other_host.reset()
    target = f"{other_host.base_url}/chat/completions"

    response = _post(relay, _chat(stream, redirect=target, redirect_status=307))

    error = assert_openai_error(response, 502, code="upstream_redirect")
    assert "'fake'" in str(error["message"])
    assert other_host.requests == []


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_redirect_to_an_internal_url_never_reaches_the_client(
    relay: Relay, other_host: FakeUpstream, stream: bool
) -> None:
    other_host.reset()

    response = _post(
        relay, _chat(stream, redirect=f"{other_host.root_url}/secret", redirect_status=302)
    )

    assert_openai_error(response, 502, code="upstream_redirect")
    assert INTERNAL_SECRET not in response.text
    assert other_host.requests == []


# -- bounded sizes -------------------------------------------------------------------------


def test_event_over_max_event_bytes_ends_the_stream_with_an_error(
    guarded: Relay, fake_upstream: FakeUpstream
) -> None:
    events = _stream(guarded, _chat(True, event_bytes=64 * MAX_EVENT_BYTES, write_size=4096))

    error = _ends_with_one_error(events)
    assert error["code"] == "upstream_response_too_large"
    assert "'fake'" in error["message"]
    assert fake_upstream.last_request().wait_for_outcome(5) == "abandoned"


def test_upstream_that_never_sends_a_newline_gets_an_error_after_the_bound(
    guarded: Relay, fake_upstream: FakeUpstream
) -> None:
    events = _stream(guarded, _chat(True, no_newline=64 * MAX_EVENT_BYTES, write_size=1024))

    error = _ends_with_one_error(events)
    assert error["code"] == "upstream_response_too_large"
    # The relay stopped reading at the bound, long before the 4 MiB were sent.
    record = fake_upstream.last_request()
    assert record.wait_for_outcome(5) == "abandoned"
    assert len(record.sent) < 32 * MAX_EVENT_BYTES


def test_stream_over_max_response_bytes_ends_with_an_error(
    guarded: Relay, fake_upstream: FakeUpstream
) -> None:
    word = "y" * (MAX_EVENT_BYTES // 2) + " "
    events = _stream(guarded, _chat(True, text=word * 40, delay=0.02))

    error = _ends_with_one_error(events)
    assert error["code"] == "upstream_response_too_large"
    assert 0 < len(_content(events)) < len(word * 40)
    assert fake_upstream.last_request().wait_for_outcome(5) == "abandoned"


def test_whole_answer_over_max_response_bytes_is_a_502(guarded: Relay) -> None:
    response = _post(guarded, _chat(text="z " * MAX_RESPONSE_BYTES))

    error = assert_openai_error(response, 502, code="upstream_response_too_large")
    assert "'fake'" in str(error["message"])


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_gzip_bomb_is_refused_without_inflating_it(
    relay: Relay, fake_upstream: FakeUpstream, stream: bool
) -> None:
    started = time.monotonic()
    response = _post(relay, _chat(stream, gzip_bomb=True))

    error = assert_openai_error(response, 502, code="upstream_invalid_response")
    assert "compressed" in str(error["message"])
    assert "'fake'" in str(error["message"])
    assert len(response.content) < 1000
    assert time.monotonic() - started < 2.0
    # tokenrelay asks for no compression at all.
    assert fake_upstream.last_request().headers["accept-encoding"] == "identity"


# -- the status and content type are checked -----------------------------------------------


@pytest.mark.parametrize(
    ("stream", "body", "content_type"),
    [
        (True, "<html><body>Welcome to the captive portal</body></html>", "text/html"),
        (True, '{"id": "chatcmpl-1", "choices": []}', "application/json"),
        (True, "", "text/event-stream"),
        (False, "<html><body>Welcome to the captive portal</body></html>", "text/html"),
        (False, "<html><body>Welcome to the captive portal</body></html>", "application/json"),
        (False, "", "application/json"),
        (False, "[1, 2, 3]", "application/json"),
    ],
    ids=[
        "stream-html",
        "stream-json",
        "stream-empty",
        "whole-html",
        "whole-html-as-json",
        "whole-empty",
        "whole-not-an-object",
    ],
)
def test_answer_that_is_not_what_was_asked_for_is_a_502(
    relay: Relay, stream: bool, body: str, content_type: str
) -> None:
    response = _post(relay, _chat(stream, body=body, content_type=content_type))

    error = assert_openai_error(response, 502, code="upstream_invalid_response")
    assert "'fake'" in str(error["message"])
    assert "captive portal" not in response.text


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_101_switching_protocols_is_a_502(
    relay: Relay, fake_upstream: FakeUpstream, stream: bool
) -> None:
    raw = "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"

    response = _post(relay, _chat(stream, raw=raw))

    error = assert_openai_error(response, 502, code="upstream_invalid_response")
    assert "101" in str(error["message"])
    assert fake_upstream.last_request().wait_for_outcome(5) == "abandoned"


# -- a stream that stops early is an error -------------------------------------------------


def test_stream_that_ends_without_done_or_finish_reason_is_an_error_event(
    relay: Relay, openai_client: openai.OpenAI
) -> None:
    events = _stream(relay, _chat(True, tokens=5, end_after=2))

    error = _ends_with_one_error(events)
    assert "'fake'" in error["message"]
    assert _content(events) == expected_text(2)

    stream = openai_client.chat.completions.create(
        model="fake-model",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_body={"fake": {"end_after": 0}},
    )
    with pytest.raises(openai.APIError) as caught:
        for _chunk in stream:
            pass
    assert not isinstance(caught.value, openai.APIConnectionError)

    # A finish_reason without [DONE] is a finished answer, as some servers send it.
    finished = _stream(relay, _chat(True, tokens=3, no_done=True))
    assert _content(finished) == expected_text(3)
    assert not any(event.startswith('{"error"') for event in finished)


def test_conversation_answer_cut_early_is_stored_as_an_error(
    relay: Relay, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.defaults = {"tokens": 5, "end_after": 2}
    with httpx.Client(base_url=relay.url, timeout=30) as api:
        conversation = api.post("/api/conversations", json={"model": "fake-model"}).json()
        url = f"/api/conversations/{conversation['id']}"
        with api.stream("POST", f"{url}/messages", json={"content": "hi"}) as response:
            assert response.status_code == 200
            events = list(SSEDecoder().iter_bytes(response.iter_bytes()))
        assistant = api.get(url).json()["messages"][-1]

    errors = [e.json()["error"] for e in events if e.data != "[DONE]" and "error" in e.json()]
    assert len(errors) == 1
    assert assistant["status"] == "error"
    assert assistant["content"] == expected_text(2)
    assert "stopped in the middle" in assistant["error"]


# -- time bounds ---------------------------------------------------------------------------


def test_upstream_sending_only_pings_times_out(guarded: Relay, fake_upstream: FakeUpstream) -> None:
    started = time.monotonic()
    events = _stream(guarded, _chat(True, pings=100, delay=0.1))  # 10 s of pings, then text

    error = _ends_with_one_error(events)
    assert error["code"] == "upstream_timeout"
    assert time.monotonic() - started < READ_TIMEOUT + 2.0
    assert _content(events) == ""
    assert fake_upstream.last_request().wait_for_outcome(5) == "abandoned"


def test_max_request_seconds_bounds_a_whole_answer(
    guarded: Relay, fake_upstream: FakeUpstream
) -> None:
    started = time.monotonic()
    # Data every 0.2 s, well within read_timeout, for 8 s in all.
    events = _stream(guarded, _chat(True, tokens=40, delay=0.2))

    elapsed = time.monotonic() - started
    error = _ends_with_one_error(events)
    assert error["code"] == "upstream_timeout"
    assert MAX_REQUEST_SECONDS - 0.5 < elapsed < MAX_REQUEST_SECONDS + 2.0
    assert 0 < len(_content(events)) < len(expected_text(40))
    assert fake_upstream.last_request().wait_for_outcome(5) == "abandoned"


# -- one broken model list breaks nothing else ----------------------------------------------

_BROKEN_MODELS = ("html", "garbage", "not_a_list", "error", "silent", "redirect")


@pytest.fixture(scope="module")
def broken_lists(other_host: FakeUpstream) -> Iterator[dict[str, FakeUpstream]]:
    """One upstream per way of answering ``GET /models`` wrongly."""
    fakes: dict[str, FakeUpstream] = {}
    try:
        for kind in _BROKEN_MODELS:
            fake = fakes[kind] = FakeUpstream(models=[f"{kind}-model"])
            fake.start()
            if kind == "redirect":
                fake.defaults = {"models_redirect": f"{other_host.base_url}/models"}
            else:
                fake.defaults = {"models_answer": kind}
        yield fakes
    finally:
        for fake in fakes.values():
            fake.stop()


def test_broken_model_lists_are_skipped_and_the_others_listed(
    fake_upstream: FakeUpstream,
    other_host: FakeUpstream,
    broken_lists: dict[str, FakeUpstream],
    tmp_path: Path,
) -> None:
    toml = fake_provider_toml(fake_upstream.base_url, name="good", models=("fake-*",))
    for kind, fake in broken_lists.items():
        toml += fake_provider_toml(
            fake.base_url, name=kind, models=(f"{kind}-*",), extra={"connect_timeout": 1.0}
        )
    other_host.reset()
    with start_tokenrelay(tmp_path, config_toml=toml, env=NO_LOCAL_MODEL) as relay:
        response = httpx.get(f"{relay.v1}/models", timeout=30)

        assert response.status_code == 200, response.text
        assert sorted(m["id"] for m in response.json()["data"]) == ["fake-model", "fake-other"]
        with openai.OpenAI(base_url=relay.v1, api_key="unused", max_retries=0) as client:
            assert {model.id for model in client.models.list()} == {"fake-model", "fake-other"}
        for fake in broken_lists.values():
            assert [r.path for r in fake.requests] == ["/v1/models"]
        assert other_host.requests == []
        _assert_key_not_logged(relay)
