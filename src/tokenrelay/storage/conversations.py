"""Conversations and their messages, as the rest of tokenrelay reads and writes them.

Every method is one short transaction and returns frozen dataclasses rather than ORM objects, so a
result can cross tasks and outlive its session without lazy loads. Nothing here knows about
models, prompts or streaming; callers decide what to store.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import selectinload

from tokenrelay.errors import InvalidRequest, TokenrelayError
from tokenrelay.storage.database import Database
from tokenrelay.storage.models import (
    Conversation,
    Message,
    MessageRole,
    MessageStatus,
    new_id,
    owned_by,
    utcnow,
)

__all__ = [
    "ConversationDetail",
    "ConversationNotFound",
    "ConversationPage",
    "ConversationRecord",
    "ConversationStore",
    "InvalidCursor",
    "MessageNotFound",
    "MessageRecord",
]


class ConversationNotFound(TokenrelayError):
    status = 404
    type = "invalid_request_error"
    code = "conversation_not_found"

    def __init__(self, conversation_id: str) -> None:
        super().__init__(f"No conversation found with id '{conversation_id}'.")


class MessageNotFound(TokenrelayError):
    status = 404
    type = "invalid_request_error"
    code = "message_not_found"

    def __init__(self, message_id: str) -> None:
        super().__init__(f"No message found with id '{message_id}'.")


class InvalidCursor(InvalidRequest):
    def __init__(self) -> None:
        super().__init__(
            "The pagination cursor is not valid; pass one from a previous page.", param="after"
        )


@dataclass(frozen=True, slots=True)
class ConversationRecord:
    id: str
    title: str | None
    model: str | None
    system: str | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class ConversationDetail(ConversationRecord):
    """A conversation with all its messages, oldest first."""

    messages: tuple[MessageRecord, ...]


@dataclass(frozen=True, slots=True)
class ConversationPage:
    """One page, newest first; ``next_cursor`` fetches the next one and is None on the last."""

    conversations: tuple[ConversationRecord, ...]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class MessageRecord:
    id: str
    conversation_id: str
    position: int
    role: MessageRole
    content: str
    status: MessageStatus
    error: str | None
    model: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    created_at: datetime
    updated_at: datetime
    stream_id: str | None = None


class ConversationStore:
    """Create, list, read, rename and delete conversations; add, update and delete messages.

    Missing ids raise ``ConversationNotFound`` / ``MessageNotFound`` (HTTP 404 when they reach
    the API); a malformed page cursor raises ``InvalidCursor`` (400). Text is kept as
    ``models.storable`` makes it: a NUL or a lone surrogate becomes U+FFFD, on every backend.
    """

    def __init__(self, database: Database) -> None:
        self._sessions: async_sessionmaker[AsyncSession] = database.sessions

    async def create_conversation(
        self,
        *,
        title: str | None = None,
        model: str | None = None,
        system: str | None = None,
        owner: str | None = None,
    ) -> ConversationRecord:
        now = utcnow()
        row = Conversation(
            id=new_id("conv"),
            title=title,
            model=model,
            system=system,
            created_at=now,
            updated_at=now,
            owner=owner,
        )
        async with self._sessions.begin() as session:
            session.add(row)
        return _conversation(row)

    async def list_conversations(
        self, *, limit: int = 20, after: str | None = None, owner: str | None = None
    ) -> ConversationPage:
        """``owner``'s conversations by ``updated_at``, newest first; ``after`` is a page's
        ``next_cursor``. The owner None is the admin's and the local user's.

        The cursor holds the last row's sort key rather than an offset, so a conversation that
        moves to the top between two pages neither repeats nor hides another one.
        """
        if limit < 1:
            raise ValueError("limit must be at least 1")
        query = (
            sa.select(Conversation)
            .where(owned_by(Conversation.owner, owner))
            .order_by(Conversation.updated_at.desc(), Conversation.id.desc())
            .limit(limit + 1)
        )
        if after is not None:
            key = sa.tuple_(Conversation.updated_at, Conversation.id)
            query = query.where(key < _decode_cursor(after))
        async with self._sessions() as session:
            rows = (await session.scalars(query)).all()
        page = tuple(_conversation(row) for row in rows[:limit])
        next_cursor = _encode_cursor(page[-1]) if len(rows) > limit else None
        return ConversationPage(conversations=page, next_cursor=next_cursor)

    async def require_owner(self, conversation_id: str, owner: str | None) -> None:
        """Raise ``ConversationNotFound`` unless ``owner`` owns the conversation: another
        key's conversation is not there for this caller, not even as a 403."""
        query = sa.select(Conversation.id).where(
            Conversation.id == conversation_id, owned_by(Conversation.owner, owner)
        )
        async with self._sessions() as session:
            if await session.scalar(query) is None:
                raise ConversationNotFound(conversation_id)

    async def get_conversation(self, conversation_id: str) -> ConversationDetail:
        async with self._sessions() as session:
            row = await session.get(
                Conversation, conversation_id, options=[selectinload(Conversation.messages)]
            )
            if row is None:
                raise ConversationNotFound(conversation_id)
            messages = tuple(_message(message) for message in row.messages)
        return ConversationDetail(**_conversation_fields(row), messages=messages)

    async def rename_conversation(
        self, conversation_id: str, title: str | None
    ) -> ConversationRecord:
        """Set the title; ``updated_at`` stays, so a rename does not reorder the list."""
        statement = (
            sa.update(Conversation)
            .where(Conversation.id == conversation_id)
            .values(title=title)
            .returning(Conversation)
        )
        async with self._sessions.begin() as session:
            row = await session.scalar(statement, execution_options=_NO_SYNC)
        if row is None:
            raise ConversationNotFound(conversation_id)
        return _conversation(row)

    async def delete_conversation(self, conversation_id: str) -> None:
        """Delete a conversation; the database's ``ON DELETE CASCADE`` removes its messages."""
        statement = (
            sa.delete(Conversation)
            .where(Conversation.id == conversation_id)
            .returning(Conversation.id)
        )
        async with self._sessions.begin() as session:
            deleted = await session.scalar(statement, execution_options=_NO_SYNC)
        if deleted is None:
            raise ConversationNotFound(conversation_id)

    async def add_message(
        self,
        conversation_id: str,
        role: MessageRole | str,
        content: str = "",
        *,
        status: MessageStatus | str = MessageStatus.COMPLETE,
        model: str | None = None,
        stream_id: str | None = None,
    ) -> MessageRecord:
        """Append a message at the end of the conversation and move the conversation to the top.

        For an answer about to stream, add it with ``status="streaming"`` and empty content,
        then ``update_message`` it as text arrives.
        """
        now = utcnow()
        async with self._sessions.begin() as session:
            # Touch the conversation first: the row lock (PostgreSQL) or write lock (SQLite) this
            # takes serialises concurrent adds, so MAX(position) + 1 below cannot be raced.
            touched = await session.scalar(
                sa.update(Conversation)
                .where(Conversation.id == conversation_id)
                .values(updated_at=now)
                .returning(Conversation.id),
                execution_options=_NO_SYNC,
            )
            if touched is None:
                raise ConversationNotFound(conversation_id)
            position = await session.scalar(
                sa.select(sa.func.coalesce(sa.func.max(Message.position) + 1, 0)).where(
                    Message.conversation_id == conversation_id
                )
            )
            row = Message(
                id=new_id("msg"),
                conversation_id=conversation_id,
                position=position,
                role=MessageRole(role),
                content=content,
                status=MessageStatus(status),
                model=model,
                stream_id=stream_id,
                created_at=now,
                updated_at=now,
            )
            session.add(row)
        return _message(row)

    async def streaming_answer(self, conversation_id: str) -> MessageRecord | None:
        """The conversation's answer being written right now, if any (on any process)."""
        async with self._sessions() as session:
            row = await session.scalar(
                sa.select(Message)
                .where(
                    Message.conversation_id == conversation_id,
                    Message.status == MessageStatus.STREAMING,
                )
                .order_by(Message.position.desc())
                .limit(1)
            )
        return None if row is None else _message(row)

    async def interrupt_answer(self, message_id: str) -> bool:
        """Mark an answer still ``streaming`` ``interrupted``: the process writing it died.

        False, and nothing changes, if it ended meanwhile (its writer's own final status wins).
        """
        statement = (
            sa.update(Message)
            .where(Message.id == message_id, Message.status == MessageStatus.STREAMING)
            .values(status=MessageStatus.INTERRUPTED, updated_at=utcnow())
            .returning(Message.id)
        )
        async with self._sessions.begin() as session:
            changed = await session.scalar(statement, execution_options=_NO_SYNC)
        return changed is not None

    async def update_message(
        self,
        message_id: str,
        *,
        content: str | None = None,
        append: str | None = None,
        status: MessageStatus | str | None = None,
        error: str | None = None,
        model: str | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
    ) -> MessageRecord:
        """Change the given fields of a message; ``None`` leaves a field as it is.

        ``content`` replaces the text, ``append`` adds to its end inside the database, so a
        streaming answer sends only the new piece each time. Passing both is an error.
        """
        if content is not None and append is not None:
            raise ValueError("pass content or append, not both")
        values: dict[str, Any] = {
            name: value
            for name, value in (
                ("content", content),
                ("error", error),
                ("model", model),
                ("prompt_tokens", prompt_tokens),
                ("completion_tokens", completion_tokens),
            )
            if value is not None
        }
        if append is not None:
            values["content"] = Message.content + append
        if status is not None:
            values["status"] = MessageStatus(status)
        statement = (
            sa.update(Message)
            .where(Message.id == message_id)
            .values(updated_at=utcnow(), **values)
            .returning(Message)
        )
        async with self._sessions.begin() as session:
            row = await session.scalar(statement, execution_options=_NO_SYNC)
        if row is None:
            raise MessageNotFound(message_id)
        return _message(row)

    async def delete_message(self, message_id: str) -> None:
        """Delete one message, e.g. an answer about to be regenerated.

        The others keep their positions: order is preserved, numbering may then have a gap.
        """
        statement = sa.delete(Message).where(Message.id == message_id).returning(Message.id)
        async with self._sessions.begin() as session:
            deleted = await session.scalar(statement, execution_options=_NO_SYNC)
        if deleted is None:
            raise MessageNotFound(message_id)

    async def get_message(self, message_id: str) -> MessageRecord:
        async with self._sessions() as session:
            row = await session.get(Message, message_id)
        if row is None:
            raise MessageNotFound(message_id)
        return _message(row)


# Each session is new and short, so there are no loaded objects for an UPDATE to keep in step.
_NO_SYNC = {"synchronize_session": False}


def _conversation_fields(row: Conversation) -> dict[str, Any]:
    return {
        "id": row.id,
        "title": row.title,
        "model": row.model,
        "system": row.system,
        "created_at": row.created_at,
        "updated_at": row.updated_at,
    }


def _conversation(row: Conversation) -> ConversationRecord:
    return ConversationRecord(**_conversation_fields(row))


def _message(row: Message) -> MessageRecord:
    return MessageRecord(
        id=row.id,
        conversation_id=row.conversation_id,
        position=row.position,
        role=row.role,
        content=row.content,
        status=row.status,
        error=row.error,
        model=row.model,
        prompt_tokens=row.prompt_tokens,
        completion_tokens=row.completion_tokens,
        created_at=row.created_at,
        updated_at=row.updated_at,
        stream_id=row.stream_id,
    )


def _encode_cursor(conversation: ConversationRecord) -> str:
    key = f"{conversation.updated_at.isoformat()}|{conversation.id}"
    return base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        key = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        timestamp, conversation_id = key.split("|")
        updated_at = datetime.fromisoformat(timestamp)
        if updated_at.tzinfo is None:
            raise ValueError("naive timestamp")
        # A hand-made cursor may name an instant outside what a datetime can hold in UTC.
        updated_at = updated_at.astimezone(UTC)
    except (binascii.Error, UnicodeDecodeError, ValueError, OverflowError) as exc:
        raise InvalidCursor() from exc
    return updated_at, conversation_id
