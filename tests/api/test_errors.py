"""Every failure reaches the client in OpenAI's error shape, with no secret and no traceback."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from conftest import (
    NO_LOCAL_MODEL,
    Relay,
    assert_no_leak,
    assert_openai_error,
    closed_port_url,
    data_events,
    fake_provider_toml,
    start_tokenrelay,
)
from fake_upstream import LEAKED_KEY, FakeUpstream

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]
MAX_BODY_BYTES = 4096
READ_TIMEOUT = 0.5


def _post(relay: Relay, body: Any, path: str = "chat/completions") -> httpx.Response:
    return httpx.post(f"{relay.v1}/{path}", json=body, timeout=30)


def _post_raw(relay: Relay, raw: bytes, path: str = "chat/completions") -> httpx.Response:
    return httpx.post(
        f"{relay.v1}/{path}",
        content=raw,
        headers={"Content-Type": "application/json"},
        timeout=30,
    )


def _chat(**fields: Any) -> dict[str, Any]:
    return {"model": "fake-model", "messages": MESSAGES, **fields}


def _assert_key_not_logged(relay: Relay) -> None:
    assert LEAKED_KEY not in relay.log_text()


@pytest.fixture(scope="module")
def strict_relay(
    fake_upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Relay]:
    """Small body limit, a short read timeout, and a provider nobody answers for."""
    toml = fake_provider_toml(
        fake_upstream.base_url, name="fake", extra={"read_timeout": READ_TIMEOUT}
    ) + fake_provider_toml(
        closed_port_url(), name="dead-box", models=("dead-model",), extra={"connect_timeout": 2.0}
    )
    with start_tokenrelay(
        tmp_path_factory.mktemp("strict"),
        config_toml=toml,
        env={**NO_LOCAL_MODEL, "TOKENRELAY_MAX_BODY_BYTES": str(MAX_BODY_BYTES)},
    ) as running:
        yield running


# -- the client's mistakes ------------------------------------------------------------------


@pytest.mark.parametrize("path", ["chat/completions", "completions"])
def test_malformed_json_is_a_400(relay: Relay, path: str) -> None:
    assert_openai_error(_post_raw(relay, b'{"model": "fake-model",', path), 400)


@pytest.mark.parametrize("raw", [b"[1, 2, 3]", b'"a string"', b"42", b"null", b""])
def test_body_that_is_not_an_object_is_a_400(relay: Relay, raw: bytes) -> None:
    assert_openai_error(_post_raw(relay, raw), 400)


@pytest.mark.parametrize("missing", ["model", "messages"])
def test_missing_required_field_names_the_param(relay: Relay, missing: str) -> None:
    body = _chat()
    del body[missing]
    assert_openai_error(_post(relay, body), 400, param=missing)


def test_missing_prompt_names_the_param(relay: Relay) -> None:
    assert_openai_error(_post(relay, {"model": "fake-model"}, "completions"), 400, param="prompt")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", "ten"),
        ("stream", "yes"),
        ("temperature", "hot"),
        ("messages", "hello"),
        ("model", 42),
        ("stream_options", {"include_usage": "please"}),
        ("n", 1.5),
    ],
)
def test_mistyped_field_is_a_400_naming_it(relay: Relay, field: str, value: Any) -> None:
    error = assert_openai_error(_post(relay, _chat(**{field: value})), 400)
    assert isinstance(error["param"], str)
    assert error["param"].startswith(field)


def test_sdk_raises_bad_request_for_invalid_messages(openai_client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.chat.completions.create(
            model="fake-model",
            messages=[{"role": "wizard", "content": "hi"}],  # type: ignore[list-item, misc]  # the invalid role is the point
        )
    assert caught.value.status_code == 400


def test_unknown_model_is_a_404(relay: Relay, openai_client: openai.OpenAI) -> None:
    assert_openai_error(
        _post(relay, _chat(model="no-such-model")), 404, code="model_not_found", param="model"
    )
    with pytest.raises(openai.NotFoundError):
        openai_client.chat.completions.create(
            model="no-such-model",
            messages=MESSAGES,
        )


def test_unknown_route_is_a_404_in_the_same_shape(relay: Relay) -> None:
    assert_openai_error(httpx.get(f"{relay.v1}/engines/davinci"), 404)
    assert_openai_error(httpx.post(f"{relay.url}/nowhere", json={}), 404)


def test_wrong_method_is_a_405_in_the_same_shape(relay: Relay) -> None:
    assert_openai_error(httpx.get(f"{relay.v1}/chat/completions"), 405)


def test_body_over_the_limit_is_a_413(strict_relay: Relay, fake_upstream: FakeUpstream) -> None:
    padding = "x" * MAX_BODY_BYTES
    oversized = _chat(messages=[{"role": "user", "content": padding}])
    assert_openai_error(_post(strict_relay, oversized), 413)

    # Without Content-Length (chunked upload) the limit must hold while reading.
    raw = json.dumps(oversized).encode()
    chunked = httpx.post(
        f"{strict_relay.v1}/chat/completions",
        content=(raw[i : i + 1024] for i in range(0, len(raw), 1024)),
        headers={"Content-Type": "application/json"},
    )
    assert_openai_error(chunked, 413)
    assert fake_upstream.requests == []

    under = _post(strict_relay, _chat(messages=[{"role": "user", "content": "x" * 1000}]))
    assert under.status_code == 200


# -- the upstream's failures ----------------------------------------------------------------


def test_upstream_401_is_a_gateway_error_without_the_key(
    relay: Relay, openai_client: openai.OpenAI
) -> None:
    response = _post(relay, _chat(fake={"status": 401}))

    error = assert_openai_error(response, 502)
    assert "Incorrect API key provided" in str(error["message"])
    with pytest.raises(openai.APIStatusError) as caught:
        openai_client.chat.completions.create(
            model="fake-model",
            messages=MESSAGES,
            stream=True,
            extra_body={"fake": {"status": 401}},
        )
    assert caught.value.status_code == 502
    assert LEAKED_KEY not in str(caught.value)
    _assert_key_not_logged(relay)


def test_upstream_429_passes_retry_after_on(relay: Relay) -> None:
    for stream in (False, True):
        response = _post(relay, _chat(stream=stream, fake={"status": 429, "retry_after": "7"}))

        error = assert_openai_error(response, 429)
        assert response.headers["retry-after"] == "7"
        assert "Rate limit reached" in str(error["message"])
    _assert_key_not_logged(relay)


@pytest.mark.parametrize(
    ("upstream", "expected", "message"),
    [(500, 502, "The server had an error"), (503, 503, "currently overloaded")],
)
def test_upstream_server_errors_map_to_gateway_statuses(
    relay: Relay, upstream: int, expected: int, message: str
) -> None:
    response = _post(relay, _chat(fake={"status": upstream}))

    error = assert_openai_error(response, expected)
    assert message in str(error["message"])
    _assert_key_not_logged(relay)


def test_upstream_400_keeps_its_status_and_message(relay: Relay) -> None:
    response = _post(relay, _chat(fake={"status": 400, "message": "tools[0] is not valid"}))

    error = assert_openai_error(response, 400)
    assert error["message"] == "tools[0] is not valid"


def test_unreachable_upstream_is_a_502_naming_the_provider(
    strict_relay: Relay, fake_upstream: FakeUpstream
) -> None:
    for stream in (False, True):
        response = _post(strict_relay, _chat(model="dead-model", stream=stream))

        error = assert_openai_error(response, 502)
        assert "dead-box" in str(error["message"])


def test_silent_upstream_is_a_504(strict_relay: Relay, fake_upstream: FakeUpstream) -> None:
    whole = _post(strict_relay, _chat(fake={"first_delay": READ_TIMEOUT * 6}))
    assert_openai_error(whole, 504)

    no_headers = _post(strict_relay, _chat(stream=True, fake={"headers_delay": READ_TIMEOUT * 6}))
    assert_openai_error(no_headers, 504)


def test_upstream_silent_mid_stream_ends_with_an_error_event(
    strict_relay: Relay, fake_upstream: FakeUpstream
) -> None:
    body = _chat(stream=True, fake={"first_delay": READ_TIMEOUT * 6})
    with httpx.stream("POST", f"{strict_relay.v1}/chat/completions", json=body) as response:
        assert response.status_code == 200
        events = data_events(response.read())

    error = json.loads(events[-1])["error"]
    assert error["code"] == "upstream_timeout"
    assert fake_upstream.last_request().wait_for_outcome(5) == "abandoned"


def test_failure_mid_stream_is_one_error_event_then_a_clean_end(
    relay: Relay, fake_upstream: FakeUpstream
) -> None:
    body = _chat(stream=True, fake={"tokens": 5, "fail_after": 2})
    with httpx.stream("POST", f"{relay.v1}/chat/completions", json=body) as response:
        assert response.status_code == 200
        # read() raises if the chunked body is cut short: the relay must end it properly.
        raw = response.read()

    events = data_events(raw)
    errors = [event for event in events if '"error"' in event]
    assert len(errors) == 1
    assert events[-1] == errors[0], "nothing may follow the error event"
    error = json.loads(errors[0])["error"]
    assert {"message", "type", "param", "code"} <= set(error)
    assert_no_leak(raw.decode())
    content = "".join(
        json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1]
    )
    assert content == "word0 word1 "
    assert fake_upstream.last_request().wait_for_outcome(5) == "failed"


def test_sdk_raises_api_error_on_a_failed_stream(openai_client: openai.OpenAI) -> None:
    stream = openai_client.chat.completions.create(
        model="fake-model",
        messages=MESSAGES,
        stream=True,
        extra_body={"fake": {"tokens": 5, "fail_after": 3}},
    )
    text = ""
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            text += chunk.choices[0].delta.content or ""

    assert text == "word0 word1 word2 "
    assert not isinstance(caught.value, openai.APIConnectionError)


async def test_async_sdk_raises_api_error_on_a_failed_stream(
    async_openai_client: openai.AsyncOpenAI,
) -> None:
    stream = await async_openai_client.completions.create(
        model="fake-model", prompt="hi", stream=True, extra_body={"fake": {"fail_after": 1}}
    )
    with pytest.raises(openai.APIError) as caught:
        async for _chunk in stream:
            pass
    assert not isinstance(caught.value, openai.APIConnectionError)


# -- whatever arrives -----------------------------------------------------------------------

_ODD_VALUES: list[Any] = [
    None,
    True,
    0,
    -1,
    10**30,
    -(10**30),
    1.5e300,
    -0.0,
    "",
    "ünïcödé ☕ 🙂",
    "\u0000\u202e",
    [],
    {},
    [None],
    {"": {"": [None]}},
    [[[[[[[[[[]]]]]]]]]],
    {"nested": {"deeper": [1, "two", {"three": None}]}},
    "x" * 2000,
]

_FIELDS = [
    "model",
    "messages",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "tools",
    "tool_choice",
    "response_format",
    "logprobs",
    "fake",
    "unknown_field",
]


def _odd_bodies(rng: random.Random) -> Iterator[Any]:
    for field in _FIELDS:
        for value in _ODD_VALUES:
            yield _chat(**{field: value})
    for value in _ODD_VALUES:
        yield {"model": "fake-model", "messages": [value]}
        yield {"model": "fake-model", "messages": [{"role": "user", "content": value}]}
        yield {"model": "fake-model", "messages": [{"role": value, "content": "hi"}]}
        yield value
    for _ in range(60):
        body = _chat()
        for field in rng.sample(_FIELDS, k=rng.randint(1, 5)):
            body[field] = rng.choice(_ODD_VALUES)
        yield body


_ODD_RAW = [
    b"{",
    b"}",
    b"\xff\xfe\x00",
    b'{"model": NaN, "messages": []}',
    b'{"model": "fake-model", "messages": [], "max_tokens": 1e999}',
    b'{"model": "\\ud800", "messages": []}',
    b'{"model": "fake-model", "model": 3}',
    b"[" * 5000 + b"]" * 5000,
    b'{"a":' * 3000 + b"1" + b"}" * 3000,
    b'{"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "x": '
    + b"[" * 3000
    + b"]" * 3000
    + b"}",
    # Deep, but shallow enough for a JSON parser to accept: this one reaches the upstream.
    b'{"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "x": '
    + b"[" * 200
    + b"]" * 200
    + b"}",
]


_JSON = {"Content-Type": "application/json"}


@pytest.mark.parametrize("path", ["chat/completions", "completions"])
def test_odd_bodies_never_cause_a_server_error(relay: Relay, path: str) -> None:
    rng = random.Random(20240601)
    with httpx.Client(timeout=30) as client:
        url = f"{relay.v1}/{path}"
        responses = [
            (body, client.post(url, content=json.dumps(body).encode(), headers=_JSON))
            for body in _odd_bodies(rng)
        ]
        responses += [(raw, client.post(url, content=raw, headers=_JSON)) for raw in _ODD_RAW]

    for body, response in responses:
        assert response.status_code < 500, (body, response.status_code, response.text[:500])
        if response.status_code >= 400:
            assert_openai_error(response, response.status_code)
    _assert_key_not_logged(relay)
