"""The OpenAI Agents SDK (``openai-agents``) against tokenrelay, changing only its client.

The agent has a function tool; the fake upstream answers a request without a tool result with a
call of that tool and the next one (which holds the result) with text, so each run is a real
agent loop: the model calls the tool, the SDK runs it and sends the output back as a
``function_call_output`` item, the model answers. The SDK speaks the Responses API by default.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from agents import (
    Agent,
    Runner,
    function_tool,
    set_default_openai_api,
    set_default_openai_client,
    set_tracing_disabled,
)
from agents.models import _openai_shared

from conftest import Relay
from fake_upstream import FakeUpstream

MODEL = "fake-model"
ANSWER = "It is sunny in Paris, 21 degrees."
TOOL_OUTPUT = "sunny, 21 celsius"
DEADLINE = 30.0


@pytest.fixture
async def agent_client(relay: Relay) -> AsyncIterator[openai.AsyncOpenAI]:
    """What a user does: point the SDK's default client at tokenrelay, with tracing off (its
    traces would go to OpenAI). Put back afterwards, so no other test sees it."""
    client = openai.AsyncOpenAI(
        base_url=relay.v1, api_key="unused", max_retries=0, timeout=DEADLINE
    )
    previous = _openai_shared.get_default_openai_client()
    set_default_openai_client(client, use_for_tracing=False)
    set_default_openai_api("responses")
    set_tracing_disabled(True)
    try:
        yield client
    finally:
        _openai_shared.set_default_openai_client(previous)
        await client.close()


def _weather_agent(calls: list[tuple[str, str]]) -> Agent[Any]:
    @function_tool
    def get_weather(location: str, unit: str) -> str:
        """The current weather in a city."""
        calls.append((location, unit))
        return TOOL_OUTPUT

    return Agent(
        name="Weather", instructions="Answer weather questions.", model=MODEL, tools=[get_weather]
    )


def _messages(fake: FakeUpstream, index: int) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = fake.chat_requests()[index].json["messages"]
    return messages


async def test_agent_calls_its_tool_then_answers(
    agent_client: openai.AsyncOpenAI, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.defaults = {"tool_call_then_text": True, "text": ANSWER}
    calls: list[tuple[str, str]] = []

    result = await Runner.run(_weather_agent(calls), "What is the weather in Paris?")

    assert result.final_output == ANSWER
    assert calls == [("Paris, France", "celsius")]
    assert len(fake_upstream.chat_requests()) == 2
    first, second = _messages(fake_upstream, 0), _messages(fake_upstream, 1)
    assert first == [
        {"role": "system", "content": "Answer weather questions."},
        {"role": "user", "content": "What is the weather in Paris?"},
    ]
    [call] = second[2]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert second[3] == {"role": "tool", "tool_call_id": call["id"], "content": TOOL_OUTPUT}
    assert fake_upstream.chat_requests()[0].json["tools"][0]["function"]["name"] == "get_weather"


async def test_streamed_agent_run_streams_the_answer(
    agent_client: openai.AsyncOpenAI, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.defaults = {"tool_call_then_text": True, "text": ANSWER}
    calls: list[tuple[str, str]] = []

    result = Runner.run_streamed(_weather_agent(calls), "What is the weather in Paris?")
    kinds: list[str] = []
    deltas: list[str] = []
    async for event in result.stream_events():
        if event.type == "raw_response_event":
            kinds.append(event.data.type)
            if event.data.type == "response.output_text.delta":
                deltas.append(event.data.delta)

    assert result.final_output == ANSWER
    assert "".join(deltas) == ANSWER
    assert calls == [("Paris, France", "celsius")]
    assert "response.function_call_arguments.delta" in kinds
    assert kinds.count("response.completed") == 2  # one per model turn
    assert all(record.stream for record in fake_upstream.chat_requests())


async def test_agent_run_continues_from_a_previous_response_id(
    agent_client: openai.AsyncOpenAI, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.defaults = {"tool_call_then_text": True, "text": ANSWER}
    calls: list[tuple[str, str]] = []
    agent = _weather_agent(calls)
    first = await Runner.run(agent, "What is the weather in Paris?")
    assert first.last_response_id is not None
    fake_upstream.defaults = {"text": "You asked about Paris."}

    second = await Runner.run(
        agent, "Which city did I ask about?", previous_response_id=first.last_response_id
    )

    assert second.final_output == "You asked about Paris."
    assert calls == [("Paris, France", "celsius")]  # the tool ran in the first run only
    # Only the new question was sent; tokenrelay replayed the first run from storage.
    messages = _messages(fake_upstream, 2)
    assert messages[0] == {"role": "system", "content": "Answer weather questions."}
    assert [m["role"] for m in messages[1:]] == ["user", "assistant", "tool", "assistant", "user"]
    assert messages[1]["content"] == "What is the weather in Paris?"
    assert messages[3]["content"] == TOOL_OUTPUT
    assert messages[4]["content"] == ANSWER
    assert messages[5]["content"] == "Which city did I ask about?"
    retrieved = await agent_client.responses.retrieve(second.last_response_id or "")
    assert retrieved.previous_response_id == first.last_response_id
