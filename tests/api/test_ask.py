"""The tutorial's endpoints: ``/api/ask`` answers in JSON, ``/api/ask/stream`` as an EventStream."""

from __future__ import annotations

from pathlib import Path

import httpx

from conftest import Relay, assert_openai_error, relay_to, stream_chunks
from fake_upstream import FakeUpstream, expected_text


def test_ask_returns_the_whole_answer(relay: Relay, fake_upstream: FakeUpstream) -> None:
    response = httpx.get(
        f"{relay.url}/api/ask", params={"prompt": "What is Hyperf?", "model": "fake-model"}
    )

    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["answer"] == expected_text(5)
    assert answer["model"] == "fake-model"
    assert answer["finish_reason"] == "stop"
    assert answer["usage"]["completion_tokens"] == 5
    sent = fake_upstream.last_request().json
    assert sent["messages"] == [{"role": "user", "content": "What is Hyperf?"}]


def test_ask_without_a_model_uses_the_first_listed(
    relay: Relay, fake_upstream: FakeUpstream
) -> None:
    response = httpx.get(f"{relay.url}/api/ask", params={"prompt": "hi"})

    assert response.status_code == 200, response.text
    assert response.json()["answer"] == expected_text(5)


def test_ask_without_a_model_uses_the_configured_default(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    with relay_to(fake_upstream, tmp_path, env={"TOKENRELAY_DEFAULT_MODEL": "fake-other"}) as relay:
        response = httpx.get(f"{relay.url}/api/ask", params={"prompt": "hi"})

    assert response.status_code == 200, response.text
    assert response.json()["model"] == "fake-other"
    assert fake_upstream.last_request().json["model"] == "fake-other"


def test_ask_stream_is_an_event_stream_of_openai_chunks(
    relay: Relay, fake_upstream: FakeUpstream
) -> None:
    prompt = "Hyperf 是什么?"
    with httpx.stream(
        "GET", f"{relay.url}/api/ask/stream", params={"prompt": prompt, "model": "fake-model"}
    ) as response:
        chunks = stream_chunks(response)

    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == expected_text(5)
    record = fake_upstream.last_request()
    assert record.json["messages"][0]["content"] == prompt
    assert record.json["stream"] is True


def test_ask_without_a_prompt_is_a_400(relay: Relay) -> None:
    response = httpx.get(f"{relay.url}/api/ask", params={"model": "fake-model"})
    assert_openai_error(response, 400, param="prompt")


def test_ask_for_an_unknown_model_is_a_404(relay: Relay) -> None:
    response = httpx.get(f"{relay.url}/api/ask", params={"prompt": "hi", "model": "nope"})
    assert_openai_error(response, 404, code="model_not_found")
