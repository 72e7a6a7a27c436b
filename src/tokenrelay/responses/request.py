"""A ``POST /v1/responses`` body: validated, then translated into a chat-completions request.

The Responses API is answered for every model by translating it to chat completions, so each
field either has a chat equivalent, is the caller's business (``store``, ``background``,
``previous_response_id``, ``metadata``), or is refused with a 400 naming it: a field a model cannot
honour is never dropped silently. Unknown top-level fields are refused as OpenAI refuses them;
inside items and tools, extra keys that clients echo back (``id``, ``status``, ``annotations``...)
are accepted. The chat history itself is built from *items* (``history.py``), so stored items of
earlier responses and the new input go through the same code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    Tag,
    ValidationError,
)

from tokenrelay.errors import InvalidRequest
from tokenrelay.responses.history import ToolName, chat_messages, chat_tool_name
from tokenrelay.storage.models import new_id

__all__ = [
    "ChatTranslation",
    "FunctionTool",
    "NamespaceTool",
    "ResponsesRequest",
    "normalize_input",
    "parse_request",
    "translate",
]

_Number = StrictInt | StrictFloat


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


def _by_type(known: frozenset[str]) -> Any:
    """A discriminator picking the member tagged ``type=<type>``, or ``type=other``.

    Tags hold an ``=`` so that ``_clean_loc`` can drop them from error locations: pydantic puts
    the tag it chose into the location, and no field name contains one.
    """

    def pick(value: Any) -> str:
        kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
        return f"type={kind}" if kind in known else "type=other"

    return Discriminator(pick)


# --- content parts and items -----------------------------------------------------------------


class TextPart(_Open):
    type: Literal["input_text", "output_text"]
    text: StrictStr


class RefusalPart(_Open):
    type: Literal["refusal"]
    refusal: StrictStr


class ImagePart(_Open):
    type: Literal["input_image"]
    image_url: StrictStr | None = None
    file_id: StrictStr | None = None
    detail: StrictStr | None = None


class FilePart(_Open):
    type: Literal["input_file"]
    file_data: StrictStr | None = None
    file_id: StrictStr | None = None
    file_url: StrictStr | None = None
    filename: StrictStr | None = None


class OtherPart(_Open):
    type: StrictStr


_PART_TYPES = frozenset({"input_text", "output_text", "refusal", "input_image", "input_file"})
ContentPart = Annotated[
    Annotated[TextPart, Tag("type=input_text")]
    | Annotated[TextPart, Tag("type=output_text")]
    | Annotated[RefusalPart, Tag("type=refusal")]
    | Annotated[ImagePart, Tag("type=input_image")]
    | Annotated[FilePart, Tag("type=input_file")]
    | Annotated[OtherPart, Tag("type=other")],
    _by_type(_PART_TYPES),
]


class MessageItem(_Open):
    """A message, with or without ``type: "message"`` (the SDKs' "easy" input message)."""

    type: Literal["message"] | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: StrictStr | list[ContentPart]


class FunctionCallItem(_Open):
    type: Literal["function_call"]
    call_id: StrictStr = Field(min_length=1)
    name: StrictStr = Field(min_length=1)
    arguments: StrictStr
    namespace: StrictStr | None = None


class FunctionCallOutputItem(_Open):
    type: Literal["function_call_output"]
    call_id: StrictStr = Field(min_length=1)
    output: StrictStr | list[ContentPart]


class ReasoningItem(_Open):
    """Reasoning from an earlier turn: opaque model state a translated model cannot read."""

    type: Literal["reasoning"]


class OtherItem(_Open):
    type: StrictStr


def _item_type(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    if kind is None or kind == "message":
        return "type=message"
    return f"type={kind}" if kind in _ITEM_TYPES else "type=other"


_ITEM_TYPES = frozenset({"function_call", "function_call_output", "reasoning"})
InputItem = Annotated[
    Annotated[MessageItem, Tag("type=message")]
    | Annotated[FunctionCallItem, Tag("type=function_call")]
    | Annotated[FunctionCallOutputItem, Tag("type=function_call_output")]
    | Annotated[ReasoningItem, Tag("type=reasoning")]
    | Annotated[OtherItem, Tag("type=other")],
    Discriminator(_item_type),
]


# --- tools -----------------------------------------------------------------------------------


class FunctionTool(_Open):
    """``{type: function, name, description, parameters, strict}``; newer keys are accepted."""

    type: Literal["function"]
    name: StrictStr = Field(min_length=1)
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class OtherTool(_Open):
    """A hosted tool (``web_search``, ``file_search``...) that only OpenAI's servers can run."""

    type: StrictStr


NamespaceMember = Annotated[
    Annotated[FunctionTool, Tag("type=function")] | Annotated[OtherTool, Tag("type=other")],
    _by_type(frozenset({"function"})),
]


class NamespaceTool(_Open):
    """Function tools grouped under a name (the Codex CLI sends its sub-agent tools so)."""

    type: Literal["namespace"]
    name: StrictStr = Field(min_length=1)
    description: StrictStr | None = None
    tools: list[NamespaceMember]


Tool = Annotated[
    Annotated[FunctionTool, Tag("type=function")]
    | Annotated[NamespaceTool, Tag("type=namespace")]
    | Annotated[OtherTool, Tag("type=other")],
    _by_type(frozenset({"function", "namespace"})),
]


class ToolChoiceFunction(_Strict):
    type: Literal["function"]
    name: StrictStr = Field(min_length=1)
    namespace: StrictStr | None = None


class AllowedTool(_Open):
    type: StrictStr
    name: StrictStr | None = None
    namespace: StrictStr | None = None


class ToolChoiceAllowed(_Strict):
    type: Literal["allowed_tools"]
    mode: Literal["auto", "required"]
    tools: list[AllowedTool]


class ToolChoiceOther(_Open):
    type: StrictStr


ToolChoice = Annotated[
    Annotated[ToolChoiceFunction, Tag("type=function")]
    | Annotated[ToolChoiceAllowed, Tag("type=allowed_tools")]
    | Annotated[ToolChoiceOther, Tag("type=other")],
    _by_type(frozenset({"function", "allowed_tools"})),
]


# --- the request -----------------------------------------------------------------------------


class TextFormat(_Open):
    type: Literal["text", "json_object", "json_schema"]
    name: StrictStr | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: StrictStr | None = None
    strict: StrictBool | None = None


class TextConfig(_Strict):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningConfig(_Strict):
    effort: StrictStr | None = None
    summary: StrictStr | None = None
    generate_summary: StrictStr | None = None


class StreamOptions(_Strict):
    include_obfuscation: StrictBool | None = None


class ResponsesRequest(_Strict):
    """``POST /v1/responses``: the fields OpenAI documents, and those its own clients send."""

    model: StrictStr = Field(min_length=1)
    input: StrictStr | list[InputItem] | None = None
    instructions: StrictStr | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    store: StrictBool | None = None
    background: StrictBool | None = None
    previous_response_id: StrictStr | None = None
    metadata: dict[str, StrictStr] | None = Field(default=None, max_length=16)
    max_output_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: _Number | None = Field(default=None, ge=0, le=2)
    top_p: _Number | None = Field(default=None, ge=0, le=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    include: list[StrictStr] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    user: StrictStr | None = None
    safety_identifier: StrictStr | None = None
    service_tier: StrictStr | None = None
    prompt_cache_key: StrictStr | None = None
    prompt_cache_retention: StrictStr | None = None
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=20)
    # Sent by the Codex CLI for its own bookkeeping; never reaches a model.
    client_metadata: dict[str, Any] | None = None
    # Documented by OpenAI but meaningless without OpenAI's servers; refused when set.
    conversation: Any = None
    prompt: Any = None
    max_tool_calls: Any = None
    context_management: Any = None
    prompt_cache_options: Any = None
    moderation: Any = None
    background_options: Any = None


# Set, these need OpenAI's own servers (stored prompts, conversations, server-side tool loops).
_REFUSED_FIELDS = (
    "conversation",
    "prompt",
    "max_tool_calls",
    "context_management",
    "prompt_cache_options",
    "moderation",
    "background_options",
)

# Fields with the same meaning and name in a chat-completions request.
_PASSED_THROUGH = (
    "temperature",
    "top_p",
    "parallel_tool_calls",
    "user",
    "safety_identifier",
    "service_tier",
    "prompt_cache_key",
    "prompt_cache_retention",
)

# Where a chat field came from, for errors an upstream reports about the translated request.
_CHAT_PARAMS = {
    "max_tokens": "max_output_tokens",
    "max_completion_tokens": "max_output_tokens",
    "response_format": "text.format",
    "verbosity": "text.verbosity",
    "reasoning_effort": "reasoning.effort",
    "stream_options": "stream",
    "functions": "tools",
    "messages": "input",
}


def parse_request(body: object) -> ResponsesRequest:
    """Validate a decoded JSON body; a 400 names the first bad field as OpenAI would.

    Of pydantic's errors the one reaching deepest wins: for ``content: "x" | [parts]`` given a
    list, the error inside the list says more than "expected a string".
    """
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    try:
        return ResponsesRequest.model_validate(body)
    except ValidationError as exc:
        errors = exc.errors()
        best = max(errors, key=lambda error: len(_clean_loc(error["loc"])))
        raise _invalid(best) from None


def _clean_loc(loc: tuple[int | str, ...]) -> list[int | str]:
    # pydantic puts the union member it tried into the location: a tag or a type's name.
    return [p for p in loc if isinstance(p, int) or not ("=" in p or "[" in p or p in _KINDS)]


_KINDS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _param_name(loc: Sequence[int | str]) -> str:
    name = ""
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name


def _invalid(error: Mapping[str, Any]) -> InvalidRequest:
    param = _param_name(_clean_loc(error["loc"])) or None
    kind = error["type"]
    if kind == "missing":
        return InvalidRequest(f"Missing required parameter: '{param}'.", param=param)
    if kind == "extra_forbidden":
        return InvalidRequest(f"Unknown parameter: '{param}'.", param=param)
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return InvalidRequest(f"Invalid type for '{param}': expected an object.", param=param)
    reason = str(error.get("msg", "invalid")).rstrip(".")
    return InvalidRequest(f"Invalid value for '{param}': {reason}.", param=param)


# --- translation -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChatTranslation:
    """What one Responses request becomes.

    ``body``: the chat-completions request to send. ``input_items``: this request's input as
    items with ids, to store and to list. ``fields``: the request's settings as the Response
    object echoes them (``events.response_object``). ``tool_names``: each chat tool name back to
    the Responses ``(name, namespace)``, for the function calls of the answer.
    ``truncate``: ``truncation: "auto"`` was asked; the caller may trim the oldest items.
    """

    body: dict[str, Any]
    input_items: list[dict[str, Any]]
    fields: dict[str, Any]
    tool_names: dict[str, ToolName]
    truncate: bool = False
    message_params: tuple[str | None, ...] = field(default=())

    def param_for(self, chat_param: str | None) -> str | None:
        """The Responses parameter behind a chat one, to rename an upstream's 400 for the client.

        ``messages[3].content`` -> ``input[1].content`` when message 3 came from input item 1;
        ``max_tokens`` -> ``max_output_tokens``.
        """
        if chat_param is None:
            return None
        head, dot, rest = chat_param.partition(".")
        if head.startswith("messages["):
            index = head[len("messages[") : -1]
            position = int(index) if index.isdigit() else len(self.message_params)
            source = self.message_params[position] if position < len(self.message_params) else None
            if source is None:
                return "input"
            return source + dot + rest if source.startswith("input[") else source
        return _CHAT_PARAMS.get(head, chat_param)


def translate(
    request: ResponsesRequest,
    *,
    history: Sequence[Mapping[str, Any]] = (),
    drop_unsupported_tools: bool = False,
) -> ChatTranslation:
    """Translate a validated request into a chat-completions request.

    ``history``: with ``previous_response_id``, the earlier responses' stored input and output
    items, oldest first (``history.chain_items``); their ``instructions`` are not carried over,
    as OpenAI does not carry them. ``drop_unsupported_tools``: drop hosted tools instead of
    refusing them (a provider setting).
    """
    _refuse_unsupported(request)
    tools, tool_names, echoed_tools = _tools(request.tools, drop=drop_unsupported_tools)
    items = normalize_input(request.input)
    messages: list[dict[str, Any]] = []
    params: list[str | None] = []
    if request.instructions:
        messages.append({"role": "system", "content": request.instructions})
        params.append("instructions")
    # One pass over old and new items: a new function call may follow the last assistant text.
    chat, origins = chat_messages([*history, *items], tool_names, sources=True)
    if not chat:
        raise InvalidRequest("Missing required parameter: 'input'.", param="input")
    messages.extend(chat)
    params.extend(
        f"input[{origin - len(history)}]" if origin >= len(history) else None for origin in origins
    )

    body: dict[str, Any] = {"model": request.model, "messages": messages}
    for name in _PASSED_THROUGH:
        value = getattr(request, name)
        if value is not None:
            body[name] = value
    if request.max_output_tokens is not None:
        body["max_tokens"] = request.max_output_tokens
    if tools:
        body["tools"] = tools
        if request.tool_choice is not None:
            body["tool_choice"] = _tool_choice(request.tool_choice, tool_names)
    elif request.tool_choice not in (None, "none", "auto"):
        raise InvalidRequest(
            "`tool_choice` asks for a tool, but no tools are given.", param="tool_choice"
        )
    else:
        # With every tool dropped, "none" still holds and "auto" means the same.
        body.pop("parallel_tool_calls", None)
    _text(request.text, body)
    if request.reasoning is not None and request.reasoning.effort is not None:
        body["reasoning_effort"] = request.reasoning.effort
    if request.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return ChatTranslation(
        body=body,
        input_items=items,
        fields=_fields(request, echoed_tools),
        tool_names=tool_names,
        truncate=request.truncation == "auto",
        message_params=tuple(params),
    )


def normalize_input(value: str | list[Any] | None) -> list[dict[str, Any]]:
    """The input as items in OpenAI's stored shapes, each with an id (the client's, if sent).

    This is what ``GET /v1/responses/{id}/input_items`` lists and what a later
    ``previous_response_id`` replays. Parts a chat model cannot be sent are refused here, with
    the ``input[i]...`` parameter named.
    """
    if value is None:
        return []
    if isinstance(value, str):
        return [_message("user", [{"type": "input_text", "text": value}], None)]
    items: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        param = f"input[{i}]"
        extra = item.model_extra or {}
        item_id = extra.get("id") if isinstance(extra.get("id"), str) else None
        if isinstance(item, MessageItem):
            items.append(_message(item.role, _parts(item.content, item.role, param), item_id))
        elif isinstance(item, FunctionCallItem):
            call: dict[str, Any] = {
                "id": item_id or new_id("fc"),
                "type": "function_call",
                "call_id": item.call_id,
                "name": item.name,
                "arguments": item.arguments,
                "status": "completed",
            }
            if item.namespace:
                call["namespace"] = item.namespace
            items.append(call)
        elif isinstance(item, FunctionCallOutputItem):
            output = item.output
            items.append(
                {
                    "id": item_id or new_id("fco"),
                    "type": "function_call_output",
                    "call_id": item.call_id,
                    "output": output
                    if isinstance(output, str)
                    else _parts(output, "tool", f"{param}.output"),
                    "status": "completed",
                }
            )
        elif isinstance(item, ReasoningItem):
            reasoning = item.model_dump()
            reasoning["id"] = item_id or new_id("rs")
            items.append(reasoning)
        else:
            what = (
                "Item references are not supported; send the item itself."
                if item.type == "item_reference"
                else f"Input items of type '{item.type}' are not supported; send messages, "
                "function calls and function call outputs."
            )
            raise InvalidRequest(what, param=f"{param}.type")
    return items


def _message(role: str, content: list[dict[str, Any]], item_id: str | None) -> dict[str, Any]:
    return {
        "id": item_id or new_id("msg"),
        "type": "message",
        "role": role,
        "status": "completed",
        "content": content,
    }


def _parts(content: str | list[Any], role: str, param: str) -> list[dict[str, Any]]:
    """Content parts in the stored shape: ``output_text`` for the assistant, else ``input_*``."""
    text_type = "output_text" if role == "assistant" else "input_text"

    def text(value: str) -> dict[str, Any]:
        part: dict[str, Any] = {"type": text_type, "text": value}
        if role == "assistant":
            part["annotations"] = []
        return part

    if isinstance(content, str):
        return [text(content)]
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        where = f"{param}.content[{j}]" if role != "tool" else f"{param}[{j}]"
        if isinstance(part, TextPart):
            parts.append(text(part.text))
        elif isinstance(part, RefusalPart) and role == "assistant":
            parts.append({"type": "refusal", "refusal": part.refusal})
        elif isinstance(part, ImagePart | FilePart) and role not in ("user", "tool"):
            raise InvalidRequest(
                f"Only user messages and function outputs may hold images or files, not "
                f"'{role}' messages.",
                param=where,
            )
        elif isinstance(part, ImagePart):
            if not part.image_url:
                raise InvalidRequest(
                    "Images must be sent as `image_url` (a URL or a data URL); uploaded file "
                    "ids are not supported.",
                    param=f"{where}.image_url",
                )
            image: dict[str, Any] = {"type": "input_image", "image_url": part.image_url}
            image["detail"] = part.detail or "auto"
            parts.append(image)
        elif isinstance(part, FilePart):
            if not part.file_data:
                raise InvalidRequest(
                    "Files must be sent inline as `file_data`; file ids and URLs are not "
                    "supported.",
                    param=f"{where}.file_data",
                )
            file: dict[str, Any] = {"type": "input_file", "file_data": part.file_data}
            if part.filename:
                file["filename"] = part.filename
            parts.append(file)
        else:
            raise InvalidRequest(
                f"Content parts of type '{part.type}' are not supported here.",
                param=f"{where}.type",
            )
    return parts


def _refuse_unsupported(request: ResponsesRequest) -> None:
    for name in _REFUSED_FIELDS:
        if getattr(request, name) is not None:
            raise InvalidRequest(
                f"`{name}` is not supported by this server: it needs OpenAI's own state.",
                param=name,
            )
    if request.top_logprobs:
        raise InvalidRequest("`top_logprobs` is not supported.", param="top_logprobs")
    for i, value in enumerate(request.include or ()):
        if value == "message.output_text.logprobs":
            raise InvalidRequest(
                "Log probabilities are not supported; remove this value.", param=f"include[{i}]"
            )
    if request.background and request.store is False:
        raise InvalidRequest("A background response must be stored (`store: true`).", param="store")


def _tools(
    tools: list[FunctionTool | NamespaceTool | OtherTool] | None, *, drop: bool
) -> tuple[list[dict[str, Any]], dict[str, ToolName], list[dict[str, Any]]]:
    """The chat tools, the map from their names back, and the tools the Response echoes."""
    chat: list[dict[str, Any]] = []
    names: dict[str, ToolName] = {}
    echoed: list[dict[str, Any]] = []

    def add(tool: FunctionTool, namespace: str | None, param: str) -> None:
        name = chat_tool_name(tool.name, namespace)
        if name in names:
            raise InvalidRequest(f"Duplicate tool name: '{tool.name}'.", param=f"{param}.name")
        names[name] = ToolName(tool.name, namespace)
        function: dict[str, Any] = {"name": name}
        if tool.description is not None:
            function["description"] = tool.description
        function["parameters"] = (
            tool.parameters if tool.parameters is not None else {"type": "object", "properties": {}}
        )
        if tool.strict is not None:
            function["strict"] = tool.strict
        chat.append({"type": "function", "function": function})

    for i, tool in enumerate(tools or ()):
        if isinstance(tool, FunctionTool):
            add(tool, None, f"tools[{i}]")
        elif isinstance(tool, NamespaceTool):
            for j, member in enumerate(tool.tools):
                if not isinstance(member, FunctionTool):
                    _unsupported_tool(member.type, f"tools[{i}].tools[{j}].type", drop=False)
                    continue
                add(member, tool.name, f"tools[{i}].tools[{j}]")
        else:
            _unsupported_tool(tool.type, f"tools[{i}].type", drop=drop)
            continue
        echoed.append(tool.model_dump(exclude_none=True, by_alias=True))
    return chat, names, echoed


def _unsupported_tool(kind: str, param: str, *, drop: bool) -> None:
    if drop:
        return
    raise InvalidRequest(
        f"The tool type '{kind}' is not supported by this model; only function tools are. "
        "The provider's `drop_unsupported_tools` setting drops such tools instead.",
        param=param,
    )


def _tool_choice(choice: Any, names: Mapping[str, ToolName]) -> Any:
    if isinstance(choice, str):
        return choice
    if isinstance(choice, ToolChoiceFunction):
        name = chat_tool_name(choice.name, choice.namespace)
        if name not in names:
            raise InvalidRequest(
                f"`tool_choice` names '{choice.name}', which is not among `tools`.",
                param="tool_choice.name",
            )
        return {"type": "function", "function": {"name": name}}
    if isinstance(choice, ToolChoiceAllowed):
        allowed = []
        for i, tool in enumerate(choice.tools):
            name = chat_tool_name(tool.name or "", tool.namespace)
            if tool.type != "function" or name not in names:
                raise InvalidRequest(
                    "`tool_choice.tools` may only name function tools given in `tools`.",
                    param=f"tool_choice.tools[{i}]",
                )
            allowed.append({"type": "function", "function": {"name": name}})
        return {"type": "allowed_tools", "allowed_tools": {"mode": choice.mode, "tools": allowed}}
    raise InvalidRequest(
        f"`tool_choice` of type '{choice.type}' is not supported; only function tools are.",
        param="tool_choice.type",
    )


def _text(text: TextConfig | None, body: dict[str, Any]) -> None:
    if text is None:
        return
    if text.verbosity is not None:
        body["verbosity"] = text.verbosity
    fmt = text.format
    if fmt is None or fmt.type == "text":
        return
    if fmt.type == "json_object":
        body["response_format"] = {"type": "json_object"}
        return
    if fmt.schema_ is None or not fmt.name:
        raise InvalidRequest(
            "A `json_schema` format needs a `name` and a `schema`.", param="text.format"
        )
    schema: dict[str, Any] = {"name": fmt.name, "schema": fmt.schema_}
    if fmt.description is not None:
        schema["description"] = fmt.description
    if fmt.strict is not None:
        schema["strict"] = fmt.strict
    body["response_format"] = {"type": "json_schema", "json_schema": schema}


def _fields(request: ResponsesRequest, tools: list[dict[str, Any]]) -> dict[str, Any]:
    """The request's settings as OpenAI echoes them on the Response object."""
    choice = request.tool_choice
    text = request.text.model_dump(exclude_none=True, by_alias=True) if request.text else {}
    text.setdefault("format", {"type": "text"})
    return {
        "model": request.model,
        "instructions": request.instructions,
        "max_output_tokens": request.max_output_tokens,
        "metadata": request.metadata or {},
        "parallel_tool_calls": (
            True if request.parallel_tool_calls is None else request.parallel_tool_calls
        ),
        "previous_response_id": request.previous_response_id,
        "reasoning": (
            request.reasoning.model_dump(exclude_none=True) if request.reasoning else None
        ),
        "store": True if request.store is None else request.store,
        "background": bool(request.background),
        "temperature": request.temperature,
        "text": text,
        "tool_choice": (
            "auto"
            if choice is None
            else choice
            if isinstance(choice, str)
            else choice.model_dump(exclude_none=True)
        ),
        "tools": tools,
        "top_p": request.top_p,
        "truncation": request.truncation or "disabled",
        "user": request.user,
        "safety_identifier": request.safety_identifier,
        "prompt_cache_key": request.prompt_cache_key,
        "service_tier": request.service_tier,
    }
