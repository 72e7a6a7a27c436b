"""The tables tokenrelay keeps: conversations and their messages, stored Responses, gateway
keys and the usage of every request to a model.

The schema itself is created by the numbered migrations in ``storage/migrations/versions``, never by
``metadata.create_all``; these models describe it for queries and for ``alembic --autogenerate``,
and a test checks that the two agree.
"""

from __future__ import annotations

import re
import secrets
import string
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = [
    "ApiKey",
    "Base",
    "Conversation",
    "Message",
    "MessageRole",
    "MessageStatus",
    "ResponseInputItem",
    "ResponseStatus",
    "StoredResponse",
    "StorableString",
    "StorableText",
    "UTCDateTime",
    "UsageRecord",
    "new_id",
    "owned_by",
    "storable",
    "utcnow",
]

_ID_ALPHABET = string.ascii_letters + string.digits


def new_id(prefix: str) -> str:
    """A public id such as ``conv_3kTq9ZxW1bYc0aPd``: 16 base62 characters (~95 random bits).

    Alphanumeric only, so an id survives URLs, double-click selection and shell quoting as is.
    """
    return f"{prefix}_{''.join(secrets.choice(_ID_ALPHABET) for _ in range(16))}"


def utcnow() -> datetime:
    return datetime.now(UTC)


def owned_by(owner_column: Mapped[str | None], owner: str | None) -> sa.ColumnElement[bool]:
    """Rows whose ``owner`` is ``owner``: a key's id, or None (the operator's, made without a
    key), which SQL compares with ``IS NULL``."""
    return owner_column.is_(None) if owner is None else owner_column == owner


class UTCDateTime(sa.TypeDecorator[datetime]):
    """An aware UTC datetime on every backend.

    PostgreSQL keeps ``timestamptz``; SQLite has no time zones and would hand back naive values, so
    values are stored as UTC and the zone is put back on the way out.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; tokenrelay stores aware UTC datetimes only")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable(text: str) -> str:
    """``text`` as every backend can keep it: NUL and lone surrogates become U+FFFD.

    PostgreSQL refuses U+0000 in any text value, and neither asyncpg nor sqlite3 can encode a
    lone surrogate. The API refuses both in what users send (400); what a model writes is kept
    with each such character replaced, rather than losing the whole answer.
    """
    return _UNSTORABLE.sub("\ufffd", text)


class StorableText(sa.TypeDecorator[str]):
    """``TEXT`` whose values pass through ``storable`` on the way in.

    Every bound value goes through it, those of ``WHERE`` clauses too, so an id taken from a URL
    that holds a NUL finds nothing instead of failing on PostgreSQL.
    """

    impl: Any = sa.Text
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        return None if value is None else storable(value)


class StorableString(StorableText):
    """``VARCHAR(length)`` with the same cleaning as ``StorableText``."""

    impl = sa.String
    cache_ok = True


class MessageRole(StrEnum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"


class MessageStatus(StrEnum):
    """Where a message's text stands.

    ``streaming`` while an answer is being written; ``complete`` when upstream finished;
    ``stopped`` when a user or the last reader cancelled it; ``error`` when upstream failed;
    ``interrupted`` when the server died while it was still ``streaming`` (set at start-up).
    """

    STREAMING = "streaming"
    COMPLETE = "complete"
    STOPPED = "stopped"
    ERROR = "error"
    INTERRUPTED = "interrupted"


def _enum_column(enum: type[StrEnum], name: str) -> sa.Enum:
    # A VARCHAR plus a CHECK constraint rather than a native PostgreSQL ENUM: adding a value later
    # is then an ordinary migration on both backends.
    return sa.Enum(
        enum,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda members: [member.value for member in members],
        validate_strings=True,
    )


class Base(DeclarativeBase):
    # Named constraints, so later migrations can drop or alter them by name on every backend.
    metadata = sa.MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class Conversation(Base):
    """A chat thread. ``updated_at`` moves when a message is added, and lists sort by it."""

    __tablename__ = "conversations"
    __table_args__ = (sa.Index(None, "updated_at", "id"),)

    id: Mapped[str] = mapped_column(
        StorableString(32), primary_key=True, default=lambda: new_id("conv")
    )
    title: Mapped[str | None] = mapped_column(StorableText)
    model: Mapped[str | None] = mapped_column(StorableString(200))
    system: Mapped[str | None] = mapped_column(StorableText)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    owner: Mapped[str | None] = mapped_column(sa.String(32), index=True)
    """The id of the gateway key that made it; None for the admin and the local user."""

    # lazy="raise": under asyncio an implicit load would fail obscurely; load messages explicitly.
    messages: Mapped[list[Message]] = relationship(
        back_populates="conversation",
        order_by="Message.position",
        cascade="all, delete-orphan",
        passive_deletes=True,
        lazy="raise",
    )


class Message(Base):
    """One turn of a conversation; ``position`` orders them (0, 1, 2... per conversation)."""

    __tablename__ = "messages"
    __table_args__ = (sa.UniqueConstraint("conversation_id", "position"),)

    id: Mapped[str] = mapped_column(
        StorableString(32), primary_key=True, default=lambda: new_id("msg")
    )
    conversation_id: Mapped[str] = mapped_column(
        StorableString(32), sa.ForeignKey("conversations.id", ondelete="CASCADE")
    )
    position: Mapped[int] = mapped_column(sa.Integer)
    role: Mapped[MessageRole] = mapped_column(_enum_column(MessageRole, "role"))
    content: Mapped[str] = mapped_column(StorableText, default="")
    status: Mapped[MessageStatus] = mapped_column(_enum_column(MessageStatus, "status"))
    error: Mapped[str | None] = mapped_column(StorableText)
    model: Mapped[str | None] = mapped_column(StorableString(200))
    prompt_tokens: Mapped[int | None] = mapped_column(sa.Integer)
    completion_tokens: Mapped[int | None] = mapped_column(sa.Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    stream_id: Mapped[str | None] = mapped_column(StorableString(40))
    """The event log an answer is written to while it streams (``GET /api/streams/{id}``)."""

    conversation: Mapped[Conversation] = relationship(back_populates="messages", lazy="raise")


class ResponseStatus(StrEnum):
    """Where a Responses API answer stands, with OpenAI's names.

    ``queued`` (background, not started), ``in_progress``; then ``completed``, ``incomplete``
    (cut by ``max_output_tokens`` or a content filter), ``failed`` or ``cancelled``.
    """

    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    INCOMPLETE = "incomplete"
    FAILED = "failed"
    CANCELLED = "cancelled"


class StoredResponse(Base):
    """A Responses API answer stored for ``GET``, ``previous_response_id`` and resume.

    ``fields`` holds the request's settings as the Response object echoes them (instructions,
    tools, temperature...); ``output``, ``usage`` and ``error`` are in OpenAI's shapes.
    ``previous_response_id`` is a plain column, not a foreign key: deleting or expiring an
    earlier response must not rewrite the later ones, whose chains then end with a 404.
    """

    __tablename__ = "responses"
    __table_args__ = (sa.Index(None, "created_at"),)

    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True, default=lambda: new_id("resp"))
    model: Mapped[str] = mapped_column(sa.String(200))
    status: Mapped[ResponseStatus] = mapped_column(_enum_column(ResponseStatus, "status"))
    background: Mapped[bool] = mapped_column(sa.Boolean, default=False)
    previous_response_id: Mapped[str | None] = mapped_column(sa.String(32))
    fields: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    output: Mapped[list[dict[str, Any]]] = mapped_column(sa.JSON)
    usage: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)
    error: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)
    incomplete_reason: Mapped[str | None] = mapped_column(sa.String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    owner: Mapped[str | None] = mapped_column(sa.String(32), index=True)
    """The id of the gateway key that made it; None for the admin and the local user."""


class ResponseInputItem(Base):
    """One item of a response's input, in order; ``item_id`` is the item's own (client) id.

    A row per item, so ``GET /v1/responses/{id}/input_items`` pages without loading them all.
    """

    __tablename__ = "response_input_items"
    __table_args__ = (
        sa.PrimaryKeyConstraint("response_id", "position"),
        sa.Index(None, "response_id", "item_id"),
    )

    response_id: Mapped[str] = mapped_column(
        sa.String(32), sa.ForeignKey("responses.id", ondelete="CASCADE")
    )
    position: Mapped[int] = mapped_column(sa.Integer)
    # Client-made ids can be long (the Codex CLI sends ``msg_`` and a UUID).
    item_id: Mapped[str] = mapped_column(sa.String(200))
    item: Mapped[dict[str, Any]] = mapped_column(sa.JSON)


class ApiKey(Base):
    """A gateway key: who may call which models, how often. The key itself is never stored.

    ``secret_hash`` is the SHA-256 of the whole key (``tr-`` and 43 random base64url characters,
    256 bits: no salt or slow hash is needed for a secret nobody chose), looked up through the
    ORM only. ``hint`` is what lists show: the prefix and the last four characters.
    A revoked key is kept, so its usage rows still name it.
    """

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True, default=lambda: new_id("key"))
    name: Mapped[str] = mapped_column(StorableString(100), unique=True)
    secret_hash: Mapped[str] = mapped_column(sa.String(64), unique=True)
    hint: Mapped[str] = mapped_column(sa.String(16))
    rpm: Mapped[int | None] = mapped_column(sa.Integer)
    tpm: Mapped[int | None] = mapped_column(sa.Integer)
    tokens_per_day: Mapped[int | None] = mapped_column(sa.Integer)
    models: Mapped[list[str] | None] = mapped_column(sa.JSON)
    """The model names this key may use; None for every model."""
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class UsageRecord(Base):
    """One request to a model: whose, which, how many tokens, how fast, how it ended.

    ``key_id`` is None for the local user of a server without keys. ``status`` is how the
    answer ended (``complete``, ``error``, ``stopped``, ``interrupted``, ``rate_limited``);
    ``client_left`` says the client went away before the end, whatever else happened.
    """

    __tablename__ = "usage"
    __table_args__ = (sa.Index(None, "created_at"), sa.Index(None, "key_id", "created_at"))

    id: Mapped[int] = mapped_column(
        sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    key_id: Mapped[str | None] = mapped_column(sa.String(32))
    route: Mapped[str] = mapped_column(sa.String(40))
    model: Mapped[str] = mapped_column(StorableString(200))
    provider: Mapped[str] = mapped_column(StorableString(100))
    prompt_tokens: Mapped[int] = mapped_column(sa.Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(sa.Integer, default=0)
    ttft_ms: Mapped[int | None] = mapped_column(sa.Integer)
    duration_ms: Mapped[int] = mapped_column(sa.Integer, default=0)
    status: Mapped[str] = mapped_column(sa.String(16))
    client_left: Mapped[bool] = mapped_column(sa.Boolean, default=False)
    estimated: Mapped[bool] = mapped_column(sa.Boolean, default=False)
    """The tokens are estimated: the answer ended before its provider reported usage (a client
    that left, a failure): the prompt from the request's size, the answer from its chunks."""
