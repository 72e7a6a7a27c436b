"""``/api/conversations``: chats kept on the server, answered as EventStreams."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError
from starlette.responses import Response

from tokenrelay.api.auth import caller_of
from tokenrelay.api.relay import body_doc, generations_of, read_body, settings_of
from tokenrelay.api.sse import EventStreamResponse
from tokenrelay.relay.chat import ChatService, ChatTurn
from tokenrelay.storage.conversations import ConversationRecord
from tokenrelay.storage.models import MessageStatus

__all__ = ["BODY_MODELS", "router"]

router = APIRouter(prefix="/api/conversations", tags=["Conversations"])


class _StoredBody(BaseModel):
    """A body whose text is stored: unknown fields and NUL characters are refused with a 400."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="after")
    @classmethod
    def _no_nul(cls, value: object) -> object:
        # PostgreSQL cannot store U+0000 in text: refuse it here, naming the field, rather than
        # let the database fail. (Lone surrogates never get this far: the JSON parser refuses.)
        if isinstance(value, str) and "\x00" in value:
            raise PydanticCustomError("string_nul", "must not contain the NUL character (U+0000)")
        return value


class NewConversation(_StoredBody):
    title: str | None = Field(default=None, max_length=500)
    model: str | None = Field(default=None, min_length=1, max_length=200)
    system: str | None = Field(default=None, max_length=100_000, description="System prompt.")


class Rename(_StoredBody):
    title: str | None = Field(max_length=500)


class NewMessage(_StoredBody):
    content: str = Field(min_length=1, max_length=1_000_000)
    model: str | None = Field(default=None, min_length=1, max_length=200)


class Regenerate(_StoredBody):
    model: str | None = Field(default=None, min_length=1, max_length=200)


class ConversationOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    title: str | None
    model: str | None
    system: str | None
    created_at: datetime
    updated_at: datetime


class MessageOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    role: str
    content: str
    status: str = Field(description="`streaming`, `complete`, `stopped`, `error`, `interrupted`.")
    error: str | None
    model: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    created_at: datetime
    stream_id: str | None = Field(
        description="The answer's event log while it streams: read or resume it at "
        "`GET /api/streams/{stream_id}`."
    )


class ConversationWithMessages(ConversationOut):
    messages: list[MessageOut]
    answering: bool = Field(description="An answer is being written right now.")


class ConversationList(BaseModel):
    data: list[ConversationOut]
    has_more: bool
    next_cursor: str | None = Field(description="Pass as `after` for the next page.")


_EVENT_STREAM_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "`event: message` with the stored messages' ids, then OpenAI chat "
        "chunks, then `data: [DONE]`.",
        "content": {"text/event-stream": {}},
    }
}


def _chat(request: Request) -> ChatService:
    chat: ChatService = request.app.state.chat
    return chat


async def _owned(request: Request, conversation_id: str) -> ChatService:
    """The chat service, once the caller is known to own the conversation (404 otherwise)."""
    chat = _chat(request)
    await chat.store.require_owner(conversation_id, caller_of(request).key_id)
    return chat


def _conversation(record: ConversationRecord) -> ConversationOut:
    return ConversationOut.model_validate(record, from_attributes=True)


@router.post(
    "", status_code=201, response_model=ConversationOut, openapi_extra=body_doc(NewConversation)
)
async def create_conversation(request: Request) -> ConversationOut:
    """Start a conversation, optionally with a title, a model and a system prompt."""
    new, _, _ = await read_body(request, NewConversation)
    chat = _chat(request)
    caller = caller_of(request)
    if new.model is not None:
        chat.gateway.provider_for(caller, new.model)  # 404, or 403 for a key's other models
    return _conversation(
        await chat.store.create_conversation(
            title=new.title, model=new.model, system=new.system, owner=caller.key_id
        )
    )


@router.get("", response_model=ConversationList)
async def list_conversations(
    request: Request,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    after: Annotated[str | None, Query(description="A `next_cursor` from the page before.")] = None,
) -> ConversationList:
    """Conversations, most recently active first."""
    page = await _chat(request).store.list_conversations(
        limit=limit, after=after, owner=caller_of(request).key_id
    )
    return ConversationList(
        data=[_conversation(c) for c in page.conversations],
        has_more=page.next_cursor is not None,
        next_cursor=page.next_cursor,
    )


@router.get("/{conversation_id}", response_model=ConversationWithMessages)
async def get_conversation(request: Request, conversation_id: str) -> ConversationWithMessages:
    """A conversation with all its messages, oldest first."""
    chat = await _owned(request, conversation_id)
    detail = await chat.store.get_conversation(conversation_id)
    return ConversationWithMessages(
        **_conversation(detail).model_dump(),
        messages=[MessageOut.model_validate(m) for m in detail.messages],
        answering=any(m.status == MessageStatus.STREAMING for m in detail.messages),
    )


@router.patch("/{conversation_id}", response_model=ConversationOut, openapi_extra=body_doc(Rename))
async def rename_conversation(request: Request, conversation_id: str) -> ConversationOut:
    """Rename a conversation."""
    rename, _, _ = await read_body(request, Rename)
    store = (await _owned(request, conversation_id)).store
    return _conversation(await store.rename_conversation(conversation_id, rename.title))


@router.delete("/{conversation_id}", status_code=204, response_class=Response)
async def delete_conversation(request: Request, conversation_id: str) -> Response:
    """Delete a conversation and its messages (a running answer is stopped first)."""
    await (await _owned(request, conversation_id)).delete(conversation_id)
    return Response(status_code=204)


@router.post("/{conversation_id}/messages", response_class=Response, responses=_EVENT_STREAM_DOC)
async def send_message(request: Request, conversation_id: str) -> Response:
    """Add the user's message and stream the assistant's answer, which is saved as it grows."""
    new, _, _ = await read_body(request, NewMessage)
    chat = await _owned(request, conversation_id)
    turn = await chat.send(conversation_id, new.content, new.model, caller_of(request))
    return await _answer_stream(request, turn)


@router.post("/{conversation_id}/regenerate", response_class=Response, responses=_EVENT_STREAM_DOC)
async def regenerate(request: Request, conversation_id: str) -> Response:
    """Answer the last question again, replacing the previous answer."""
    # The body is optional here: an empty POST regenerates with the conversation's model.
    options = (await read_body(request, Regenerate))[0] if await request.body() else Regenerate()
    chat = await _owned(request, conversation_id)
    turn = await chat.regenerate(conversation_id, options.model, caller_of(request))
    return await _answer_stream(request, turn)


async def _answer_stream(request: Request, turn: ChatTurn) -> Response:
    """The stored messages, then the answer's log from its start, as this connection's stream."""
    generation = turn.generation
    entries = await generations_of(request).log.read(generation.stream_id, 0)
    return EventStreamResponse(
        generation.stream_id,
        entries,
        reader_of=generation,
        preamble=turn.preamble(),
        ping_interval=settings_of(request).ping_interval,
        headers=turn.headers,
    )


@router.post("/{conversation_id}/stop")
async def stop(request: Request, conversation_id: str) -> dict[str, bool]:
    """Stop the answer being written; what was written so far is kept, marked `stopped`."""
    chat = await _owned(request, conversation_id)  # 404 for an unknown id, or another's
    return {"stopped": await chat.stop(conversation_id)}


BODY_MODELS: list[type[BaseModel]] = [NewConversation, Rename, NewMessage, Regenerate]
"""Bodies documented by reference: ``tokenrelay.app`` adds their schemas to the OpenAPI spec."""
