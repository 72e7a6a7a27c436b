"""Responses *items* (messages, function calls, their outputs) as a chat-completions history.

Items come from a request's input (normalized by ``request.normalize_input``) or from storage
(the input and output of earlier responses, for ``previous_response_id``); both are plain dicts
in OpenAI's item shapes, already validated, so nothing here raises.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, NamedTuple, overload

__all__ = ["ToolName", "chain_items", "chat_messages", "chat_tool_name"]

# Joins a namespace and a tool name into one chat tool name; chat tool names allow [A-Za-z0-9_-].
NAMESPACE_SEPARATOR = "__"


class ToolName(NamedTuple):
    """A Responses function tool's name and the namespace it was declared in, if any."""

    name: str
    namespace: str | None = None


def chat_tool_name(name: str, namespace: str | None) -> str:
    """The chat tool name for a Responses function tool: namespaced tools are flattened."""
    return f"{namespace}{NAMESPACE_SEPARATOR}{name}" if namespace else name


def chain_items(
    chain: Iterable[tuple[Sequence[Mapping[str, Any]], Sequence[Mapping[str, Any]]]],
) -> list[Mapping[str, Any]]:
    """The history a ``previous_response_id`` stands for: each earlier response's input items,
    then its output items, oldest response first."""
    items: list[Mapping[str, Any]] = []
    for input_items, output in chain:
        items.extend(input_items)
        items.extend(output)
    return items


@overload
def chat_messages(
    items: Iterable[Mapping[str, Any]],
    tool_names: Mapping[str, ToolName] = ...,
    *,
    sources: Literal[False] = ...,
) -> list[dict[str, Any]]: ...


@overload
def chat_messages(
    items: Iterable[Mapping[str, Any]],
    tool_names: Mapping[str, ToolName] = ...,
    *,
    sources: Literal[True],
) -> tuple[list[dict[str, Any]], list[int]]: ...


def chat_messages(
    items: Iterable[Mapping[str, Any]],
    tool_names: Mapping[str, ToolName] | None = None,
    *,
    sources: bool = False,
) -> list[dict[str, Any]] | tuple[list[dict[str, Any]], list[int]]:
    """Chat messages for ``items``; with ``sources``, also the index of each one's item.

    - ``system`` and ``developer`` messages become ``system`` (chat templates of open models
      predate ``developer``; OpenAI treats the two alike);
    - consecutive function calls, and the assistant text right before them, become one assistant
      message with ``tool_calls``, as a chat model produced them;
    - images or files a function returned follow the tool messages as a user message, because
      a chat ``tool`` message carries text only;
    - reasoning items are skipped: opaque state of another model, nothing a chat model can read.
    """
    messages: list[dict[str, Any]] = []
    origins: list[int] = []
    pending: list[dict[str, Any]] = []  # non-text parts of function outputs, not yet placed

    def add(message: dict[str, Any], origin: int) -> None:
        messages.append(message)
        origins.append(origin)

    for index, item in enumerate(items):
        kind = item.get("type") or "message"
        if pending and kind != "function_call_output":
            add({"role": "user", "content": pending}, origins[-1])
            pending = []
        if kind == "message":
            role = item["role"]
            add(
                {
                    "role": "system" if role == "developer" else role,
                    "content": _chat_content(item["content"]),
                },
                index,
            )
        elif kind == "function_call":
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {
                    "name": chat_tool_name(item["name"], item.get("namespace")),
                    "arguments": item["arguments"],
                },
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                add({"role": "assistant", "content": None, "tool_calls": [call]}, index)
        elif kind == "function_call_output":
            output = item["output"]
            text = output if isinstance(output, str) else ""
            if not isinstance(output, str):
                parts = _chat_parts(output)
                text = "".join(part["text"] for part in parts if part["type"] == "text")
                pending.extend(part for part in parts if part["type"] != "text")
            add({"role": "tool", "tool_call_id": item["call_id"], "content": text}, index)
        # Anything else (reasoning) has no chat form; see the docstring.
    if pending:
        add({"role": "user", "content": pending}, origins[-1])
    return (messages, origins) if sources else messages


def _chat_content(content: str | Sequence[Mapping[str, Any]]) -> str | list[dict[str, Any]]:
    """A string when the parts are all text (what every chat template reads), else chat parts."""
    if isinstance(content, str):
        return content
    parts = _chat_parts(content)
    if all(part["type"] == "text" for part in parts):
        return "".join(part["text"] for part in parts)
    return parts


def _chat_parts(parts: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    chat: list[dict[str, Any]] = []
    for part in parts:
        kind = part["type"]
        if kind in ("input_text", "output_text"):
            chat.append({"type": "text", "text": part["text"]})
        elif kind == "refusal":
            chat.append({"type": "text", "text": part["refusal"]})
        elif kind == "input_image":
            image: dict[str, Any] = {"url": part["image_url"]}
            if part.get("detail") in ("low", "high", "auto"):
                image["detail"] = part["detail"]
            chat.append({"type": "image_url", "image_url": image})
        elif kind == "input_file":
            file = {"file_data": part["file_data"]}
            if part.get("filename"):
                file["filename"] = part["filename"]
            chat.append({"type": "file", "file": file})
    return chat
