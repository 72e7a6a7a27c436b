"""Chat-completion answers turned into the Responses API's events and Response objects.

``ResponseStream`` is fed the chunk events of one streamed chat completion, as a provider yields
them (whole events, several per piece), and returns the Responses events they stand for, framed
for SSE, numbered by ``sequence_number`` from 0, in OpenAI's order: ``response.created`` and
``response.in_progress``; per output item ``response.output_item.added``, its content or
argument deltas and ``response.output_item.done`` with the whole item; then one terminal event,
``response.completed``, ``response.incomplete`` (the answer hit ``max_output_tokens``) or
``response.failed``. Its ``response()`` is the Response object at any moment, for a ``GET`` while
the answer runs. ``response_from_completion`` builds the same object from a whole (not streamed)
chat completion.

Each returned event is one ``bytes``, so a caller that appends them to an event log one by one
gets log positions equal to the events' sequence numbers.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from tokenrelay.errors import TokenrelayError
from tokenrelay.responses.history import ToolName
from tokenrelay.sse import encode_event
from tokenrelay.storage.models import ResponseStatus, new_id
from tokenrelay.storage.responses import ResponseRecord

__all__ = [
    "ResponseStream",
    "response_error",
    "response_from_completion",
    "response_from_record",
    "response_object",
    "usage_from_chat",
]

# How a chat answer's finish reason ends the response; any other reason completes it.
_INCOMPLETE_REASONS = {"length": "max_output_tokens", "content_filter": "content_filter"}

_RUNNING = (ResponseStatus.QUEUED, ResponseStatus.IN_PROGRESS)

# OpenAI's Response.error.code is one of a fixed list; these are the ones a gateway can mean.
_RATE_LIMIT_CODE = "rate_limit_exceeded"
_SERVER_ERROR_CODE = "server_error"


def usage_from_chat(usage: Mapping[str, Any]) -> dict[str, Any]:
    """A chat ``usage`` in the Responses shape (input/output tokens and their details)."""
    prompt = usage.get("prompt_tokens") or 0
    completion = usage.get("completion_tokens") or 0
    prompt_details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
    return {
        "input_tokens": prompt,
        "input_tokens_details": {
            "cached_tokens": prompt_details.get("cached_tokens") or 0,
            "cache_write_tokens": 0,
        },
        "output_tokens": completion,
        "output_tokens_details": {
            "reasoning_tokens": completion_details.get("reasoning_tokens") or 0,
        },
        "total_tokens": usage.get("total_tokens") or prompt + completion,
    }


def response_error(error: TokenrelayError | Mapping[str, Any]) -> dict[str, Any]:
    """The ``error`` of a failed Response: a code from OpenAI's list, and a message for users.

    ``error`` is a raised ``TokenrelayError`` or the body of an in-band error event (already
    scrubbed by the provider); an internal exception's text never gets here.
    """
    message: object
    if isinstance(error, TokenrelayError):
        code, message = error.code, error.message
        limited = error.status == 429
    else:
        code, message = error.get("code"), error.get("message")
        limited = False
    limited = limited or code == _RATE_LIMIT_CODE
    if not isinstance(message, str) or not message:
        message = "The model failed while answering."
    return {"code": _RATE_LIMIT_CODE if limited else _SERVER_ERROR_CODE, "message": message}


def response_object(
    *,
    response_id: str,
    created_at: int,
    status: ResponseStatus,
    fields: Mapping[str, Any],
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
    incomplete_reason: str | None = None,
    completed_at: int | None = None,
) -> dict[str, Any]:
    """The Response object in OpenAI's shape; ``fields`` are the request's echoed settings
    (``ChatTranslation.fields``), also kept in storage."""
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "completed_at": completed_at,
        "error": error,
        "incomplete_details": {"reason": incomplete_reason} if incomplete_reason else None,
        **fields,
        "output": output,
        "usage": usage,
    }


def response_from_record(record: ResponseRecord) -> dict[str, Any]:
    """The Response object of a stored response (``GET /v1/responses/{id}``)."""
    return response_object(
        response_id=record.id,
        created_at=int(record.created_at.timestamp()),
        status=record.status,
        fields=record.fields,
        output=record.output,
        usage=record.usage,
        error=record.error,
        incomplete_reason=record.incomplete_reason,
        completed_at=int(record.completed_at.timestamp()) if record.completed_at else None,
    )


@dataclass(slots=True)
class _Message:
    """The open assistant message: its item, the index of its open part, and that part's text."""

    item: dict[str, Any]
    output_index: int
    part_type: str = ""
    pieces: list[str] = field(default_factory=list)


@dataclass(slots=True, eq=False)
class _Call:
    """One tool call being streamed; its item is added once its name is known."""

    call_id: str
    name: str = ""
    pieces: list[str] = field(default_factory=list)
    item: dict[str, Any] | None = None
    output_index: int = -1


class ResponseStream:
    """One streamed response: chat chunks in, Responses events out (see the module docstring).

    Call ``start()`` first, ``feed()`` with each piece of the chat stream (the terminal event is
    produced by the stream's ``[DONE]``), ``fail()`` when the provider raises, ``cancel()`` when
    the answer is stopped, and ``finish()`` when the provider's stream ends (a stream that ends
    before its ``[DONE]`` and finish reason fails). Once the response has ended, every call
    returns no events.
    """

    def __init__(
        self,
        response_id: str,
        *,
        fields: Mapping[str, Any],
        tool_names: Mapping[str, ToolName] | None = None,
        created_at: int | None = None,
    ) -> None:
        self.id = response_id
        self.fields = fields
        self.created_at = int(time.time()) if created_at is None else created_at
        self.status = ResponseStatus.QUEUED
        self.output: list[dict[str, Any]] = []
        self.usage: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self.incomplete_reason: str | None = None
        self.completed_at: int | None = None
        self.finish_reason: str | None = None
        self._tool_names = tool_names or {}
        self._sequence = 0
        self._message: _Message | None = None
        self._calls: dict[int, _Call] = {}
        self._open_call: _Call | None = None

    @property
    def done(self) -> bool:
        """Whether the response has reached an end (completed, incomplete, failed, cancelled)."""
        return self.status not in _RUNNING

    @property
    def sequence_number(self) -> int:
        """The number the next event will carry (the count of events so far)."""
        return self._sequence

    def response(self) -> dict[str, Any]:
        """The Response object now, open items with the text and arguments so far."""
        output = list(self.output)
        if self._message is not None:
            output[self._message.output_index] = self._message_snapshot(self._message)
        call = self._open_call
        if call is not None and call.item is not None:
            output[call.output_index] = {**call.item, "arguments": "".join(call.pieces)}
        return response_object(
            response_id=self.id,
            created_at=self.created_at,
            status=self.status,
            fields=self.fields,
            output=output,
            usage=self.usage,
            error=self.error,
            incomplete_reason=self.incomplete_reason,
            completed_at=self.completed_at,
        )

    def start(self, *, queued: bool = False) -> list[bytes]:
        """``response.created``, then ``response.in_progress`` (or ``response.queued`` for a
        background response that waits; it moves to in progress with its first chunk)."""
        if self._sequence:
            return []
        if queued:
            return [
                self._response_event("response.created"),
                self._response_event("response.queued"),
            ]
        self.status = ResponseStatus.IN_PROGRESS
        return [
            self._response_event("response.created"),
            self._response_event("response.in_progress"),
        ]

    def feed(self, events: bytes) -> list[bytes]:
        """The Responses events for whole chat-chunk events (``data: {...}`` lines)."""
        if self.done:
            return []
        out: list[bytes] = []
        if self.status is ResponseStatus.QUEUED:
            self.status = ResponseStatus.IN_PROGRESS
            out.append(self._response_event("response.in_progress"))
        for line in events.splitlines():
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                out.extend(self.finish())
                break
            if not payload:
                continue
            chunk = orjson.loads(payload)
            if not isinstance(chunk, dict):
                continue
            if "error" in chunk:
                error = chunk["error"]
                out.extend(self.fail(error if isinstance(error, dict) else {}))
                break
            self._chunk(chunk, out)
        return out

    def finish(self) -> list[bytes]:
        """Close the open items and end with ``response.completed`` or ``response.incomplete``."""
        if self.done:
            return []
        if self.finish_reason is None:
            return self.fail({"message": "The model's answer ended before it was complete."})
        reason = _INCOMPLETE_REASONS.get(self.finish_reason)
        out = self._close_items("incomplete" if reason else "completed")
        if reason is not None:
            self.status = ResponseStatus.INCOMPLETE
            self.incomplete_reason = reason
            out.append(self._response_event("response.incomplete"))
        else:
            self.status = ResponseStatus.COMPLETED
            self.completed_at = int(time.time())
            out.append(self._response_event("response.completed"))
        return out

    def fail(self, error: TokenrelayError | Mapping[str, Any]) -> list[bytes]:
        """Close the open items as incomplete and end with ``response.failed``."""
        if self.done:
            return []
        out = self._close_items("incomplete")
        self.status = ResponseStatus.FAILED
        self.error = response_error(error)
        out.append(self._response_event("response.failed"))
        return out

    def cancel(self) -> list[bytes]:
        """Close the open items as incomplete and mark the response cancelled.

        OpenAI has no event for a cancelled response: the stream just ends after the items'
        ``response.output_item.done``; a reader learns the status from the Response object.
        """
        if self.done:
            return []
        out = self._close_items("incomplete")
        self.status = ResponseStatus.CANCELLED
        return out

    # --- per chunk ---------------------------------------------------------------------------

    def _chunk(self, chunk: dict[str, Any], out: list[bytes]) -> None:
        usage = chunk.get("usage")
        if usage:
            self.usage = usage_from_chat(usage)
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            content = delta.get("content")
            if content:
                self._text(out, "output_text", content)
            refusal = delta.get("refusal")
            if refusal:
                self._text(out, "refusal", refusal)
            for call in delta.get("tool_calls") or ():
                self._call(out, call)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]

    def _text(self, out: list[bytes], part_type: str, piece: str) -> None:
        message = self._message
        if message is None:
            out.extend(self._close_items("completed"))
            item = {
                "id": new_id("msg"),
                "type": "message",
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            }
            message = self._message = _Message(item, len(self.output))
            self.output.append(item)
            out.append(self._item_event("response.output_item.added", item, message.output_index))
        if message.part_type != part_type:
            if message.part_type:
                out.extend(self._close_part(message))
            message.part_type = part_type
            part = _part(part_type, "")
            out.append(self._part_event("response.content_part.added", message, part))
        message.pieces.append(piece)
        kind = (
            "response.output_text.delta" if part_type == "output_text" else "response.refusal.delta"
        )
        payload: dict[str, Any] = {
            "item_id": message.item["id"],
            "output_index": message.output_index,
            "content_index": len(message.item["content"]),
            "delta": piece,
        }
        if part_type == "output_text":
            payload["logprobs"] = []
        out.append(self._event(kind, payload))

    def _call(self, out: list[bytes], delta: Mapping[str, Any]) -> None:
        index = delta.get("index", 0)
        call = self._calls.get(index)
        if call is None:
            call = self._calls[index] = _Call(call_id=delta.get("id") or new_id("call"))
        function = delta.get("function") or {}
        arguments = function.get("arguments") or ""
        if call.item is not None:
            if not arguments:
                return
            call.pieces.append(arguments)
            if call is self._open_call:
                out.append(self._arguments_delta(call, arguments))
            else:
                # An upstream that interleaves its calls' arguments (none we know of does): the
                # call was closed when the next began; keep the piece for the final output.
                call.item["arguments"] += arguments
            return
        # Not announced yet: gather until the name is known (it normally comes first, whole).
        if delta.get("id"):
            call.call_id = delta["id"]
        call.name += function.get("name") or ""
        if arguments:
            call.pieces.append(arguments)
        if not call.name:
            return
        # One item at a time, as OpenAI streams them: the text or call before this one is done.
        out.extend(self._close_items("completed"))
        name = self._tool_names.get(call.name, ToolName(call.name))
        item: dict[str, Any] = {
            "id": new_id("fc"),
            "type": "function_call",
            "status": "in_progress",
            "arguments": "",
            "call_id": call.call_id,
            "name": name.name,
        }
        if name.namespace:
            item["namespace"] = name.namespace
        call.item = item
        call.output_index = len(self.output)
        self.output.append(item)
        self._open_call = call
        out.append(self._item_event("response.output_item.added", item, call.output_index))
        if call.pieces:
            out.append(self._arguments_delta(call, "".join(call.pieces)))

    # --- closing items -----------------------------------------------------------------------

    def _close_items(self, status: str) -> list[bytes]:
        out = self._close_message(status) if self._message is not None else []
        if self._open_call is not None:
            out.extend(self._close_call(status))
        return out

    def _close_message(self, status: str) -> list[bytes]:
        message = self._message
        assert message is not None
        self._message = None
        out = self._close_part(message)
        message.item["status"] = status
        out.append(
            self._item_event("response.output_item.done", message.item, message.output_index)
        )
        return out

    def _close_part(self, message: _Message) -> list[bytes]:
        text = "".join(message.pieces)
        message.pieces = []
        part = _part(message.part_type, text)
        content_index = len(message.item["content"])
        message.item["content"].append(part)
        location = {
            "item_id": message.item["id"],
            "output_index": message.output_index,
            "content_index": content_index,
        }
        if message.part_type == "output_text":
            done = self._event(
                "response.output_text.done", {**location, "text": text, "logprobs": []}
            )
        else:
            done = self._event("response.refusal.done", {**location, "refusal": text})
        return [done, self._event("response.content_part.done", {**location, "part": part})]

    def _close_call(self, status: str) -> list[bytes]:
        call = self._open_call
        assert call is not None and call.item is not None
        self._open_call = None
        item = call.item
        item["arguments"] = "".join(call.pieces)
        item["status"] = status
        payload = {
            "item_id": item["id"],
            "output_index": call.output_index,
            "name": item["name"],
            "arguments": item["arguments"],
        }
        return [
            self._event("response.function_call_arguments.done", payload),
            self._item_event("response.output_item.done", item, call.output_index),
        ]

    # --- framing -----------------------------------------------------------------------------

    def _message_snapshot(self, message: _Message) -> dict[str, Any]:
        content = list(message.item["content"])
        if message.part_type:
            content.append(_part(message.part_type, "".join(message.pieces)))
        return {**message.item, "content": content}

    def _arguments_delta(self, call: _Call, delta: str) -> bytes:
        assert call.item is not None
        payload = {"item_id": call.item["id"], "output_index": call.output_index, "delta": delta}
        return self._event("response.function_call_arguments.delta", payload)

    def _item_event(self, kind: str, item: dict[str, Any], output_index: int) -> bytes:
        return self._event(kind, {"output_index": output_index, "item": item})

    def _part_event(self, kind: str, message: _Message, part: dict[str, Any]) -> bytes:
        payload = {
            "item_id": message.item["id"],
            "output_index": message.output_index,
            "content_index": len(message.item["content"]),
            "part": part,
        }
        return self._event(kind, payload)

    def _response_event(self, kind: str) -> bytes:
        return self._event(kind, {"response": self.response()})

    def _event(self, kind: str, payload: dict[str, Any]) -> bytes:
        payload["type"] = kind
        payload["sequence_number"] = self._sequence
        self._sequence += 1
        return encode_event(payload, event=kind)


def _part(part_type: str, text: str) -> dict[str, Any]:
    if part_type == "refusal":
        return {"type": "refusal", "refusal": text}
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def response_from_completion(
    completion: Mapping[str, Any],
    *,
    response_id: str,
    fields: Mapping[str, Any],
    tool_names: Mapping[str, ToolName] | None = None,
    created_at: int | None = None,
) -> dict[str, Any]:
    """The Response object for a whole chat completion (a request without ``stream``)."""
    names = tool_names or {}
    choices = completion.get("choices") or [{}]
    choice = choices[0]
    message = choice.get("message") or {}
    reason = _INCOMPLETE_REASONS.get(choice.get("finish_reason") or "")
    status = ResponseStatus.INCOMPLETE if reason else ResponseStatus.COMPLETED
    output: list[dict[str, Any]] = []
    content = [
        _part(kind, message[key])
        for kind, key in (("output_text", "content"), ("refusal", "refusal"))
        if message.get(key)
    ]
    if content:
        output.append(
            {
                "id": new_id("msg"),
                "type": "message",
                "status": status,
                "role": "assistant",
                "content": content,
            }
        )
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        name = names.get(function.get("name", ""), ToolName(function.get("name", "")))
        item = {
            "id": new_id("fc"),
            "type": "function_call",
            "status": status,
            "arguments": function.get("arguments") or "",
            "call_id": call.get("id") or new_id("call"),
            "name": name.name,
        }
        if name.namespace:
            item["namespace"] = name.namespace
        output.append(item)
    now = int(time.time())
    usage = completion.get("usage")
    return response_object(
        response_id=response_id,
        created_at=now if created_at is None else created_at,
        status=status,
        fields=fields,
        output=output,
        usage=usage_from_chat(usage) if usage else None,
        incomplete_reason=reason,
        completed_at=None if reason else now,
    )
