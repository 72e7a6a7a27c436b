"""Fail-over: a model served by several ``[[providers]]`` tables is asked of each in file order.

Two fake upstreams, ``first`` and ``second``, behind one real ``tokenrelay serve``. A fault is set
on one fake only, through its ``defaults`` (a request's own ``fake`` options would reach every
deployment alike). Which fake was asked, and how often, is read from the fakes themselves.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from conftest import (
    NO_LOCAL_MODEL,
    Relay,
    assert_openai_error,
    closed_port_url,
    data_events,
    fake_provider_toml,
    start_tokenrelay,
)
from fake_upstream import LEAKED_KEY, FakeUpstream, expected_text

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]
READ_TIMEOUT = 1.0
"""Seconds `first` may keep its headers back before it counts as timed out."""
COOLING_FAILURES = 2
COOLDOWN = 3.0
"""Seconds `first-cooling` is skipped: long enough that a request right after its last failure
surely falls inside it, even on a loaded machine."""
NEVER = 1000
"""``failover_max_failures`` of the tables whose cool-down no test is about."""


@pytest.fixture(scope="module")
def first() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture(scope="module")
def second() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture(autouse=True)
def _fresh_fakes(first: FakeUpstream, second: FakeUpstream) -> None:
    first.reset()
    second.reset()


@pytest.fixture(scope="module")
def relay(
    first: FakeUpstream, second: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Relay]:
    """Model names, each with its deployments in file order:

    ``shared-model``  first, second
    ``dead-first``    dead (nothing listens), second
    ``three-model``   dead, first, second
    ``cooling-model`` first-cooling (skipped after 2 failures for COOLDOWN s), second
    ``both-cooling``  first-both (1 failure: 30 s), second-both (1 failure: 60 s)
    """
    steady = {"failover_max_failures": NEVER}
    toml = (
        fake_provider_toml(
            closed_port_url(),
            name="dead",
            models=("dead-first", "three-model"),
            extra={**steady, "connect_timeout": 2.0},
        )
        + fake_provider_toml(
            first.base_url,
            name="first",
            models=("shared-model", "three-model"),
            extra={**steady, "read_timeout": READ_TIMEOUT},
        )
        + fake_provider_toml(
            first.base_url,
            name="first-cooling",
            models=("cooling-model",),
            extra={"failover_max_failures": COOLING_FAILURES, "failover_cooldown": COOLDOWN},
        )
        + fake_provider_toml(
            first.base_url,
            name="first-both",
            models=("both-cooling",),
            extra={"failover_max_failures": 1, "failover_cooldown": 30.0},
        )
        + fake_provider_toml(
            second.base_url,
            name="second",
            models=("shared-model", "dead-first", "three-model", "cooling-model"),
            extra=steady,
        )
        + fake_provider_toml(
            second.base_url,
            name="second-both",
            models=("both-cooling",),
            extra={"failover_max_failures": 1, "failover_cooldown": 60.0},
        )
    )
    with start_tokenrelay(
        tmp_path_factory.mktemp("failover"), config_toml=toml, env=NO_LOCAL_MODEL
    ) as running:
        yield running


@pytest.fixture
def client(relay: Relay) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=relay.v1, api_key="unused", max_retries=0, timeout=30.0) as sdk:
        yield sdk


def _ask(client: openai.OpenAI, model: str, *, stream: bool) -> str:
    """The answer's text, streamed or whole, read through the openai SDK."""
    if stream:
        chunks = client.chat.completions.create(model=model, messages=MESSAGES, stream=True)
        return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    completion = client.chat.completions.create(model=model, messages=MESSAGES)
    return completion.choices[0].message.content or ""


def _asked(fake: FakeUpstream) -> int:
    return len(fake.chat_requests())


# -- before the first byte: the next deployment answers ----------------------------------------

FAULTS: dict[str, tuple[str, dict[str, Any]]] = {
    "500": ("shared-model", {"status": 500}),
    "429": ("shared-model", {"status": 429, "retry_after": "20"}),
    "timeout": ("shared-model", {"headers_delay": READ_TIMEOUT * 10}),
    "unreachable": ("dead-first", {}),
}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_failure_before_the_first_byte_is_answered_by_the_next_deployment(
    relay: Relay,
    client: openai.OpenAI,
    first: FakeUpstream,
    second: FakeUpstream,
    fault: str,
    stream: bool,
) -> None:
    model, first.defaults = FAULTS[fault]

    assert _ask(client, model, stream=stream) == expected_text(5)

    assert _asked(first) == (0 if fault == "unreachable" else 1)
    assert _asked(second) == 1
    failed = "dead" if fault == "unreachable" else "first"
    log = relay.log_text()
    assert f"deployment {failed} failed before the first byte" in log
    assert LEAKED_KEY not in log


def test_three_deployments_are_tried_in_file_order(
    client: openai.OpenAI, first: FakeUpstream, second: FakeUpstream
) -> None:
    first.defaults = {"status": 503}

    assert _ask(client, "three-model", stream=True) == expected_text(5)

    (asked_first,) = first.chat_requests()
    (asked_second,) = second.chat_requests()
    assert asked_first.received_at < asked_second.received_at


def test_a_conversation_answer_fails_over_too(
    relay: Relay, first: FakeUpstream, second: FakeUpstream
) -> None:
    first.defaults = {"status": 500}
    with httpx.Client(base_url=relay.url, timeout=30.0) as api:
        created = api.post("/api/conversations", json={"model": "shared-model"})
        assert created.status_code == 201, created.text
        conversation_id = created.json()["id"]

        answer = api.post(f"/api/conversations/{conversation_id}/messages", json={"content": "hi"})

        assert answer.status_code == 200, answer.text
        assert data_events(answer.content)[-1] == "[DONE]"
        assistant = api.get(f"/api/conversations/{conversation_id}").json()["messages"][-1]
    assert (assistant["status"], assistant["content"]) == ("complete", expected_text(5))
    assert (_asked(first), _asked(second)) == (1, 1)


def test_a_responses_api_answer_fails_over_too(
    client: openai.OpenAI, first: FakeUpstream, second: FakeUpstream
) -> None:
    first.defaults = {"status": 429}

    response = client.responses.create(model="shared-model", input="hi", store=False)

    assert response.output_text == expected_text(5)
    assert (_asked(first), _asked(second)) == (1, 1)


# -- no fail-over ----------------------------------------------------------------------------


def test_a_failure_after_bytes_reached_the_client_is_an_error_not_a_retry(
    client: openai.OpenAI, first: FakeUpstream, second: FakeUpstream
) -> None:
    first.defaults = {"fail_after": 2}
    received = []

    chunks = client.chat.completions.create(model="shared-model", messages=MESSAGES, stream=True)
    with pytest.raises(openai.APIError, match="first"):
        for chunk in chunks:
            if chunk.choices:
                received.append(chunk.choices[0].delta.content or "")

    assert "".join(received) == expected_text(2)
    assert first.chat_requests()[0].wait_for_outcome(5.0) == "failed"
    assert _asked(second) == 0

    # The contrast: the same stream failing before its first byte is answered by `second`.
    first.defaults = {"status": 500}
    assert _ask(client, "shared-model", stream=True) == expected_text(5)
    assert _asked(second) == 1


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_client_error_is_returned_as_is_and_not_failed_over(
    relay: Relay, first: FakeUpstream, second: FakeUpstream, stream: bool
) -> None:
    body = {"model": "shared-model", "messages": MESSAGES, "stream": stream}
    first.defaults = {"status": 400, "message": "Unsupported value: 'temperature'."}

    response = httpx.post(f"{relay.v1}/chat/completions", json=body, timeout=30.0)

    error = assert_openai_error(response, 400)
    assert error["message"] == "Unsupported value: 'temperature'."
    assert (_asked(first), _asked(second)) == (1, 0)

    # The contrast: the upstream's own trouble with the same request is failed over.
    first.defaults = {"status": 500}
    response = httpx.post(f"{relay.v1}/chat/completions", json=body, timeout=30.0)
    assert response.status_code == 200, response.text
    assert (_asked(first), _asked(second)) == (2, 1)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_when_every_deployment_fails_the_client_gets_the_last_error(
    relay: Relay, first: FakeUpstream, second: FakeUpstream, stream: bool
) -> None:
    first.defaults = {"status": 500}
    second.defaults = {"status": 429, "retry_after": "7"}

    response = httpx.post(
        f"{relay.v1}/chat/completions",
        json={"model": "shared-model", "messages": MESSAGES, "stream": stream},
        timeout=30.0,
    )

    error = assert_openai_error(response, 429)
    assert error["type"] == "rate_limit_error"
    assert response.headers["retry-after"] == "7"
    assert (_asked(first), _asked(second)) == (1, 1)


# -- cool-down -------------------------------------------------------------------------------


def test_a_failing_deployment_is_skipped_during_its_cooldown_then_asked_again(
    client: openai.OpenAI, first: FakeUpstream, second: FakeUpstream
) -> None:
    first.defaults = {"status": 500}
    for _ in range(COOLING_FAILURES):
        assert _ask(client, "cooling-model", stream=False) == expected_text(5)
    failures = first.chat_requests()
    assert len(failures) == COOLING_FAILURES
    # The cool-down began once the last failure's answer came back: after the fake received it.
    cooling_until = failures[-1].received_at + COOLDOWN

    assert _ask(client, "cooling-model", stream=True) == expected_text(5)
    assert time.monotonic() < cooling_until, "too slow to test inside the cool-down"
    assert _asked(first) == COOLING_FAILURES  # skipped, not asked at all
    assert _asked(second) == COOLING_FAILURES + 1

    # After the cool-down, the next request asks it again (and still gets a clean answer).
    deadline = cooling_until + 20.0
    while _asked(first) == COOLING_FAILURES:
        assert time.monotonic() < deadline, "the deployment was never asked again"
        assert _ask(client, "cooling-model", stream=False) == expected_text(5)
        time.sleep(0.1)  # the pause between polls, not a synchronisation
    asked_again = first.chat_requests()[-1]
    assert asked_again.received_at >= cooling_until

    # It failed once more: that alone puts it back in cool-down.
    asked = _asked(second)
    assert _ask(client, "cooling-model", stream=False) == expected_text(5)
    assert _asked(first) == COOLING_FAILURES + 1
    assert _asked(second) == asked + 1


def test_when_every_deployment_cools_down_they_are_tried_anyway_soonest_back_first(
    client: openai.OpenAI, first: FakeUpstream, second: FakeUpstream
) -> None:
    first.defaults = {"status": 500}
    second.defaults = {"status": 502}
    with pytest.raises(openai.APIStatusError):
        _ask(client, "both-cooling", stream=False)
    assert (_asked(first), _asked(second)) == (1, 1)  # both cool down now, first-both sooner
    first.defaults = {}

    assert _ask(client, "both-cooling", stream=True) == expected_text(5)
    assert (_asked(first), _asked(second)) == (2, 1)
