"""Responses requests, validated and translated to chat completions, in the forms clients send.

The Agents SDK bodies below are what ``openai-agents`` 0.24 sent (recorded against a server
answering through this translator); the Codex CLI body is ``codex exec`` 0.171's second turn,
recorded the same way and trimmed (long instructions cut, machine details removed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from openai.types.responses import Response, ResponseItem
from pydantic import TypeAdapter

from tokenrelay.errors import InvalidRequest
from tokenrelay.responses.events import response_object
from tokenrelay.responses.history import chain_items, chat_messages
from tokenrelay.responses.request import ChatTranslation, parse_request, translate

DATA = Path(__file__).parent / "data"

WEATHER_TOOL = {
    "name": "get_weather",
    "parameters": {
        "properties": {"city": {"title": "City", "type": "string"}},
        "required": ["city"],
        "title": "get_weather_args",
        "type": "object",
        "additionalProperties": False,
    },
    "strict": True,
    "type": "function",
    "description": "Weather for a city.",
}
CHAT_WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city.",
        "parameters": WEATHER_TOOL["parameters"],
        "strict": True,
    },
}


def _translate(body: dict[str, Any], **options: Any) -> ChatTranslation:
    return translate(parse_request(body), **options)


def _refused(body: dict[str, Any], **options: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        _translate(body, **options)
    assert caught.value.status == 400
    return caught.value


def test_a_string_input_is_one_user_message_after_the_instructions() -> None:
    chat = _translate(
        {
            "model": "m",
            "input": "Hello",
            "instructions": "Be brief.",
            "max_output_tokens": 50,
            "temperature": 0.2,
            "top_p": 0.9,
            "stream": True,
        }
    )
    assert chat.body == {
        "model": "m",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello"},
        ],
        "max_tokens": 50,
        "temperature": 0.2,
        "top_p": 0.9,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    [item] = chat.input_items
    assert item["id"].startswith("msg_")
    assert item["content"] == [{"type": "input_text", "text": "Hello"}]


def test_not_streamed_sends_no_stream_options() -> None:
    body = _translate({"model": "m", "input": "Hi", "stream": False}).body
    assert "stream" not in body and "stream_options" not in body


def test_messages_with_and_without_type_in_every_role() -> None:
    chat = _translate(
        {
            "model": "m",
            "input": [
                {"role": "system", "content": "sys"},
                {
                    "type": "message",
                    "role": "developer",
                    "content": [{"type": "input_text", "text": "dev"}],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "one "},
                        {"type": "input_text", "text": "two"},
                    ],
                },
                {
                    "type": "message",
                    "id": "msg_earlier",
                    "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": "answer", "annotations": []}],
                },
                {"role": "assistant", "content": "plain"},
                {"role": "user", "content": "again"},
            ],
        }
    )
    assert chat.body["messages"] == [
        {"role": "system", "content": "sys"},
        {"role": "system", "content": "dev"},
        {"role": "user", "content": "one two"},
        {"role": "assistant", "content": "answer"},
        {"role": "assistant", "content": "plain"},
        {"role": "user", "content": "again"},
    ]
    assert chat.input_items[3]["id"] == "msg_earlier"
    assert chat.input_items[4]["content"] == [
        {"type": "output_text", "text": "plain", "annotations": []}
    ]


def test_input_items_are_what_the_sdk_lists_as_input_items() -> None:
    chat = _translate(
        {
            "model": "m",
            "input": [
                {"role": "developer", "content": "dev"},
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"},
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "out"},
            ],
        }
    )
    items = TypeAdapter(list[ResponseItem]).validate_python(chat.input_items)
    assert [item.type for item in items] == [
        "message",
        "message",
        "message",
        "function_call",
        "function_call_output",
    ]
    assert len({item.id for item in items}) == 5


def test_an_agent_loop_turn_becomes_tool_calls_and_tool_messages() -> None:
    # The Agents SDK's second request of a run, without previous_response_id.
    chat = _translate(
        {
            "model": "test-model",
            "include": [],
            "input": [
                {"content": "What is the weather in Paris?", "role": "user"},
                {
                    "arguments": '{"city": "Paris"}',
                    "call_id": "call_0",
                    "name": "get_weather",
                    "type": "function_call",
                    "id": "fc_3fyF9wFlDWWAoCy4",
                    "status": "completed",
                },
                {"call_id": "call_0", "output": "sunny in Paris", "type": "function_call_output"},
            ],
            "instructions": "Be brief.",
            "tools": [WEATHER_TOOL],
        }
    )
    assert chat.body == {
        "model": "test-model",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is the weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_0",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_0", "content": "sunny in Paris"},
        ],
        "tools": [CHAT_WEATHER_TOOL],
    }
    assert chat.input_items[1]["id"] == "fc_3fyF9wFlDWWAoCy4"
    assert chat.input_items[2]["id"].startswith("fco_")


def test_several_calls_and_the_text_before_them_are_one_assistant_message() -> None:
    messages = _translate(
        {
            "model": "m",
            "input": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "Let me look."},
                {"type": "function_call", "call_id": "a", "name": "f", "arguments": "{}"},
                {"type": "function_call", "call_id": "b", "name": "g", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "a", "output": "A"},
                {"type": "function_call_output", "call_id": "b", "output": "B"},
            ],
        }
    ).body["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool"]
    assert messages[1]["content"] == "Let me look."
    assert [call["id"] for call in messages[1]["tool_calls"]] == ["a", "b"]


def test_previous_response_history_comes_before_the_new_input() -> None:
    # What the store replays for previous_response_id: the earlier request's input, its output.
    earlier_input = _translate({"model": "m", "input": "Weather in Paris?"}).input_items
    earlier_output = [
        {
            "id": "fc_1",
            "type": "function_call",
            "status": "completed",
            "call_id": "call_0",
            "name": "get_weather",
            "arguments": '{"city":"Paris"}',
        }
    ]
    history = chain_items([(earlier_input, earlier_output)])
    # The Agents SDK's next request then carries only the function's output.
    chat = _translate(
        {
            "model": "m",
            "include": [],
            "input": [
                {"call_id": "call_0", "output": "sunny in Paris", "type": "function_call_output"}
            ],
            "instructions": "Be brief.",
            "previous_response_id": "resp_earlier",
            "tools": [WEATHER_TOOL],
        },
        history=history,
    )
    assert [m["role"] for m in chat.body["messages"]] == ["system", "user", "assistant", "tool"]
    assert chat.body["messages"][0] == {"role": "system", "content": "Be brief."}
    assert chat.body["messages"][2]["tool_calls"][0]["function"]["name"] == "get_weather"
    # Only the new input is this response's input, and errors about history name `input`.
    assert [item["type"] for item in chat.input_items] == ["function_call_output"]
    assert chat.param_for("messages[1].content") == "input"
    assert chat.param_for("messages[3].content") == "input[0].content"


def test_chat_history_from_stored_output_messages() -> None:
    output = [
        {
            "id": "msg_1",
            "type": "message",
            "status": "incomplete",
            "role": "assistant",
            "content": [
                {"type": "output_text", "text": "Part", "annotations": [], "logprobs": []},
                {"type": "refusal", "refusal": " and no."},
            ],
        }
    ]
    assert chat_messages(output) == [{"role": "assistant", "content": "Part and no."}]


def test_reasoning_items_are_kept_as_input_but_not_sent_to_the_model() -> None:
    reasoning = {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "opaque"}
    chat = _translate({"model": "m", "input": [reasoning, {"role": "user", "content": "go"}]})
    assert chat.body["messages"] == [{"role": "user", "content": "go"}]
    assert chat.input_items[0] == reasoning


def test_function_tools_and_tool_choice_map_to_chat() -> None:
    tools = [WEATHER_TOOL, {"type": "function", "name": "noargs"}]
    for choice, expected in [
        ("required", "required"),
        ("none", "none"),
        (
            {"type": "function", "name": "get_weather"},
            {"type": "function", "function": {"name": "get_weather"}},
        ),
        (
            {
                "type": "allowed_tools",
                "mode": "auto",
                "tools": [{"type": "function", "name": "noargs"}],
            },
            {
                "type": "allowed_tools",
                "allowed_tools": {
                    "mode": "auto",
                    "tools": [{"type": "function", "function": {"name": "noargs"}}],
                },
            },
        ),
    ]:
        body = _translate({"model": "m", "input": "x", "tools": tools, "tool_choice": choice}).body
        assert body["tool_choice"] == expected
        assert body["tools"][0] == CHAT_WEATHER_TOOL
        assert body["tools"][1] == {
            "type": "function",
            "function": {"name": "noargs", "parameters": {"type": "object", "properties": {}}},
        }


def test_a_tool_choice_naming_an_unknown_tool_is_refused() -> None:
    error = _refused(
        {
            "model": "m",
            "input": "x",
            "tools": [WEATHER_TOOL],
            "tool_choice": {"type": "function", "name": "nope"},
        }
    )
    assert error.param == "tool_choice.name"
    error = _refused({"model": "m", "input": "x", "tool_choice": "required"})
    assert error.param == "tool_choice"


@pytest.mark.parametrize(
    "tool", ["web_search", "file_search", "code_interpreter", "computer_use_preview", "mcp"]
)
def test_hosted_tools_are_refused_naming_the_tool(tool: str) -> None:
    body = {"model": "m", "input": "x", "tools": [WEATHER_TOOL, {"type": tool}]}
    error = _refused(body)
    assert error.param == "tools[1].type"
    assert tool in error.message


def test_hosted_tools_are_dropped_when_the_provider_says_so() -> None:
    body = {"model": "m", "input": "x", "tools": [{"type": "web_search"}, WEATHER_TOOL]}
    chat = _translate(body, drop_unsupported_tools=True)
    assert chat.body["tools"] == [CHAT_WEATHER_TOOL]
    assert [tool["type"] for tool in chat.fields["tools"]] == ["function"]
    only_hosted = _translate(
        {"model": "m", "input": "x", "tools": [{"type": "web_search"}], "tool_choice": "auto"},
        drop_unsupported_tools=True,
    )
    assert "tools" not in only_hosted.body and "tool_choice" not in only_hosted.body


def test_the_codex_cli_request_translates_with_hosted_tools_dropped() -> None:
    body = json.loads((DATA / "codex_exec_second_turn.json").read_text())
    error = _refused(body)
    assert error.param == "tools[8].type"  # its web_search tool

    chat = _translate(body, drop_unsupported_tools=True)
    messages = chat.body["messages"]
    assert [m["role"] for m in messages] == [
        "system",
        "system",
        "user",
        "user",
        "assistant",
        "tool",
    ]
    assert messages[4]["tool_calls"][0]["function"]["name"] == "exec_command"
    assert messages[5]["tool_call_id"] == messages[4]["tool_calls"][0]["id"]
    names = [tool["function"]["name"] for tool in chat.body["tools"]]
    assert "multi_agent_v1__spawn_agent" in names  # its namespaced tools, flattened
    assert chat.tool_names["multi_agent_v1__spawn_agent"] == ("spawn_agent", "multi_agent_v1")
    assert chat.body["prompt_cache_key"] == body["prompt_cache_key"]
    assert chat.body["parallel_tool_calls"] is True
    # Codex's own bookkeeping and its reasoning-summary wish reach no model.
    assert not {"client_metadata", "reasoning_effort", "include", "store"} & chat.body.keys()
    assert chat.input_items[0]["id"] == body["input"][0]["id"]
    assert chat.fields["store"] is False


def test_a_namespaced_call_in_history_uses_the_flattened_name() -> None:
    chat = _translate(
        {
            "model": "m",
            "tools": [
                {
                    "type": "namespace",
                    "name": "crm",
                    "description": "CRM tools",
                    "tools": [{"type": "function", "name": "lookup"}],
                }
            ],
            "input": [
                {"role": "user", "content": "find Ann"},
                {
                    "type": "function_call",
                    "call_id": "c",
                    "name": "lookup",
                    "namespace": "crm",
                    "arguments": "{}",
                },
                {"type": "function_call_output", "call_id": "c", "output": "found"},
            ],
        }
    )
    assert chat.body["messages"][1]["tool_calls"][0]["function"]["name"] == "crm__lookup"
    assert chat.body["tools"][0]["function"]["name"] == "crm__lookup"


def test_images_pass_through_as_chat_image_parts() -> None:
    url = "data:image/png;base64,iVBORw0KGgo="
    messages = _translate(
        {
            "model": "m",
            "input": [
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "What is this?"},
                        {"type": "input_image", "image_url": url, "detail": "low"},
                        {"type": "input_file", "file_data": "JVBERi0=", "filename": "a.pdf"},
                    ],
                }
            ],
        }
    ).body["messages"]
    assert messages == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": url, "detail": "low"}},
                {"type": "file", "file": {"file_data": "JVBERi0=", "filename": "a.pdf"}},
            ],
        }
    ]


def test_an_image_a_function_returned_follows_the_tool_message() -> None:
    url = "https://example.invalid/cat.png"
    messages = _translate(
        {
            "model": "m",
            "input": [
                {"type": "function_call", "call_id": "c", "name": "view_image", "arguments": "{}"},
                {
                    "type": "function_call_output",
                    "call_id": "c",
                    "output": [
                        {"type": "input_text", "text": "the image:"},
                        {"type": "input_image", "image_url": url},
                    ],
                },
                {"role": "user", "content": "describe it"},
            ],
        }
    ).body["messages"]
    assert [m["role"] for m in messages] == ["assistant", "tool", "user", "user"]
    assert messages[1]["content"] == "the image:"
    assert messages[2]["content"] == [
        {"type": "image_url", "image_url": {"url": url, "detail": "auto"}}
    ]


@pytest.mark.parametrize(
    ("part", "role", "param"),
    [
        ({"type": "input_image", "file_id": "file_1"}, "user", "input[0].content[0].image_url"),
        ({"type": "input_file", "file_id": "file_1"}, "user", "input[0].content[0].file_data"),
        ({"type": "input_file", "file_url": "https://x"}, "user", "input[0].content[0].file_data"),
        ({"type": "input_audio", "input_audio": {}}, "user", "input[0].content[0].type"),
        ({"type": "input_image", "image_url": "https://x"}, "system", "input[0].content[0]"),
    ],
)
def test_parts_that_cannot_be_sent_are_refused_naming_the_field(
    part: dict[str, Any], role: str, param: str
) -> None:
    error = _refused({"model": "m", "input": [{"role": role, "content": [part]}]})
    assert error.param == param


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m", "input": "x", "surprise": 1}, "surprise"),
        ({"model": "m", "input": "x", "conversation": "conv_1"}, "conversation"),
        ({"model": "m", "input": "x", "prompt": {"id": "pmpt_1"}}, "prompt"),
        ({"model": "m", "input": "x", "max_tool_calls": 3}, "max_tool_calls"),
        ({"model": "m", "input": "x", "top_logprobs": 2}, "top_logprobs"),
        ({"model": "m", "input": "x", "include": ["message.output_text.logprobs"]}, "include[0]"),
        ({"model": "m", "input": "x", "background": True, "store": False}, "store"),
        ({"model": "m", "input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
        ({"model": "m", "input": [{"type": "web_search_call", "id": "ws"}]}, "input[0].type"),
        (
            {"model": "m", "input": [{"role": "user", "content": [{"type": "input_text"}]}]},
            "input[0].content[0].text",
        ),
        (
            {
                "model": "m",
                "input": [{"role": "user", "content": [{"type": "input_text", "text": 3}]}],
            },
            "input[0].content[0].text",
        ),
        ({"model": "m", "input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
        (
            {"model": "m", "input": [{"type": "function_call", "name": "f", "arguments": "{}"}]},
            "input[0].call_id",
        ),
        ({"model": "m", "input": "x", "tools": [{"type": "function"}]}, "tools[0].name"),
        ({"model": "m", "input": "x", "temperature": "hot"}, "temperature"),
        ({"model": "m", "input": "x", "reasoning": {"effort": 3}}, "reasoning.effort"),
        ({"model": "m", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"model": "m", "input": "x", "text": {"format": {"type": "xml"}}}, "text.format.type"),
        ({"model": "m", "input": "x", "text": {"format": {"type": "json_schema"}}}, "text.format"),
        ({"model": "m", "input": []}, "input"),
        ({"input": "x"}, "model"),
    ],
)
def test_what_cannot_be_honoured_is_refused_naming_the_field(
    body: dict[str, Any], param: str
) -> None:
    assert _refused(body).param == param


def test_fields_real_clients_always_send_are_accepted() -> None:
    chat = _translate(
        {
            "model": "m",
            "input": "x",
            "include": ["reasoning.encrypted_content"],
            "reasoning": {"effort": "low", "summary": "auto"},
            "parallel_tool_calls": False,
            "prompt_cache_key": "k",
            "client_metadata": {"session_id": "s"},
            "store": False,
            "truncation": "auto",
            "user": "u",
            "safety_identifier": "s1",
            "service_tier": "auto",
            "metadata": {"a": "b"},
            "stream_options": {"include_obfuscation": False},
            "text": {"format": {"type": "text"}, "verbosity": "low"},
        }
    )
    assert chat.body == {
        "model": "m",
        "messages": [{"role": "user", "content": "x"}],
        "user": "u",
        "safety_identifier": "s1",
        "service_tier": "auto",
        "prompt_cache_key": "k",
        "verbosity": "low",
        "reasoning_effort": "low",
    }
    assert chat.truncate is True


def test_a_json_schema_format_becomes_a_response_format() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    body = _translate(
        {
            "model": "m",
            "input": "x",
            "text": {
                "format": {"type": "json_schema", "name": "out", "schema": schema, "strict": True}
            },
        }
    ).body
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "out", "schema": schema, "strict": True},
    }


def test_echoed_fields_make_a_response_the_sdk_reads() -> None:
    chat = _translate(
        {
            "model": "m",
            "input": "x",
            "instructions": "Be brief.",
            "tools": [WEATHER_TOOL],
            "tool_choice": {"type": "function", "name": "get_weather"},
            "metadata": {"k": "v"},
            "reasoning": {"summary": "auto"},
            "text": {"format": {"type": "json_object"}},
        }
    )
    response = Response.model_validate(
        response_object(
            response_id="resp_1", created_at=1, status="queued", fields=chat.fields, output=[]
        )
    )
    assert response.instructions == "Be brief."
    assert response.tools[0].type == "function"
    assert response.metadata == {"k": "v"}
    assert response.store is True


def test_chat_parameters_map_back_to_responses_parameters() -> None:
    chat = _translate({"model": "m", "input": "x", "instructions": "i"})
    assert chat.param_for("max_tokens") == "max_output_tokens"
    assert chat.param_for("messages[0].content") == "instructions"
    assert chat.param_for("messages[1].content") == "input[0].content"
    assert chat.param_for("messages[7]") == "input"
    assert chat.param_for("tools") == "tools"
    assert chat.param_for("response_format") == "text.format"
    assert chat.param_for(None) is None


def test_a_body_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(InvalidRequest):
        parse_request(["model"])
