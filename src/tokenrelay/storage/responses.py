"""Stored Responses API answers: the response, its input items, and its chain of earlier ones.

Like the conversation store, every method is one short transaction returning frozen
dataclasses. Items, output, usage and errors are kept in OpenAI's JSON shapes as given; nothing
here knows how they are made. Stored responses are never kept forever by accident: ``expire``
deletes those older than an age (the server runs it on a timer).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import aliased

from tokenrelay.errors import InvalidRequest, TokenrelayError
from tokenrelay.storage.database import Database
from tokenrelay.storage.models import (
    ResponseInputItem,
    ResponseStatus,
    StoredResponse,
    new_id,
    owned_by,
    utcnow,
)

__all__ = [
    "InputItemPage",
    "ResponseNotFound",
    "ResponseRecord",
    "ResponseStore",
    "ResponseTurn",
]

# How far ``chain`` follows ``previous_response_id``: far beyond any real agent loop, and a
# guard against a cycle written by hand into the database.
MAX_CHAIN = 10_000


class ResponseNotFound(TokenrelayError):
    """404, worded as OpenAI words it; ``param`` names the field that held the id, if any."""

    status = 404
    type = "invalid_request_error"

    def __init__(self, response_id: str, *, param: str | None = None) -> None:
        what = "Previous response" if param == "previous_response_id" else "Response"
        super().__init__(f"{what} with id '{response_id}' not found.", param=param)


@dataclass(frozen=True, slots=True)
class ResponseRecord:
    id: str
    model: str
    status: ResponseStatus
    background: bool
    previous_response_id: str | None
    fields: dict[str, Any]
    output: list[dict[str, Any]]
    usage: dict[str, Any] | None
    error: dict[str, Any] | None
    incomplete_reason: str | None
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None


@dataclass(frozen=True, slots=True)
class ResponseTurn:
    """One response of a chain with its input items, for replaying it as history."""

    response: ResponseRecord
    input_items: tuple[dict[str, Any], ...]


@dataclass(frozen=True, slots=True)
class InputItemPage:
    """One page of input items, in OpenAI's list shape (``first_id``, ``last_id``, ``has_more``)."""

    data: tuple[dict[str, Any], ...]
    first_id: str | None
    last_id: str | None
    has_more: bool


class ResponseStore:
    """Create, read, update, list the input of, delete and expire stored responses.

    A missing id raises ``ResponseNotFound`` (404 at the API); an ``after`` cursor that names no
    item of the response raises ``InvalidRequest`` naming ``after``.
    """

    def __init__(self, database: Database) -> None:
        self._sessions: async_sessionmaker[AsyncSession] = database.sessions

    async def create(
        self,
        *,
        model: str,
        fields: Mapping[str, Any],
        input_items: Sequence[Mapping[str, Any]],
        response_id: str | None = None,
        status: ResponseStatus | str = ResponseStatus.IN_PROGRESS,
        background: bool = False,
        previous_response_id: str | None = None,
        created_at: datetime | None = None,
        owner: str | None = None,
    ) -> ResponseRecord:
        """Store a new response and its input items (each needs an ``id``), with no output yet."""
        now = created_at or utcnow()
        row = StoredResponse(
            id=response_id or new_id("resp"),
            model=model,
            status=ResponseStatus(status),
            background=background,
            previous_response_id=previous_response_id,
            fields=dict(fields),
            output=[],
            usage=None,
            error=None,
            incomplete_reason=None,
            created_at=now,
            updated_at=now,
            completed_at=None,
            owner=owner,
        )
        items = [
            {"response_id": row.id, "position": position, "item_id": item["id"], "item": item}
            for position, item in enumerate(input_items)
        ]
        async with self._sessions.begin() as session:
            session.add(row)
            await session.flush()
            if items:
                await session.execute(sa.insert(ResponseInputItem), items)
        return _record(row)

    async def require_owner(
        self, response_id: str, owner: str | None, *, param: str | None = None
    ) -> None:
        """Raise ``ResponseNotFound`` unless ``owner`` (a key's id; None for the admin and the
        local user) made the response: another key's response is not there for this caller."""
        query = sa.select(StoredResponse.id).where(
            StoredResponse.id == response_id, owned_by(StoredResponse.owner, owner)
        )
        async with self._sessions() as session:
            if await session.scalar(query) is None:
                raise ResponseNotFound(response_id, param=param)

    async def get(self, response_id: str) -> ResponseRecord:
        async with self._sessions() as session:
            row = await session.get(StoredResponse, response_id)
        if row is None:
            raise ResponseNotFound(response_id)
        return _record(row)

    async def update(
        self,
        response_id: str,
        *,
        status: ResponseStatus | str | None = None,
        output: Sequence[Mapping[str, Any]] | None = None,
        usage: Mapping[str, Any] | None = None,
        error: Mapping[str, Any] | None = None,
        incomplete_reason: str | None = None,
        completed_at: datetime | None = None,
        if_status: Collection[ResponseStatus | str] | None = None,
    ) -> ResponseRecord:
        """Change the given fields (``None`` leaves one as it is) and return the response.

        With ``if_status``, change nothing unless the response's status is one of those, as one
        statement: a cancel (``if_status=("queued", "in_progress")``) and the answer finishing
        cannot both win. Compare the returned status to learn which did.
        """
        values: dict[str, Any] = {
            name: value
            for name, value in (
                ("usage", dict(usage) if usage is not None else None),
                ("error", dict(error) if error is not None else None),
                ("incomplete_reason", incomplete_reason),
                ("completed_at", completed_at),
            )
            if value is not None
        }
        if output is not None:
            values["output"] = [dict(item) for item in output]
        if status is not None:
            values["status"] = ResponseStatus(status)
        statement = sa.update(StoredResponse).where(StoredResponse.id == response_id)
        if if_status is not None:
            allowed = [ResponseStatus(value) for value in if_status]
            statement = statement.where(StoredResponse.status.in_(allowed))
        statement = statement.values(updated_at=utcnow(), **values).returning(StoredResponse)
        async with self._sessions.begin() as session:
            row = await session.scalar(statement, execution_options=_NO_SYNC)
        if row is None:
            return await self.get(response_id)  # raises ResponseNotFound if it is missing
        return _record(row)

    async def delete(self, response_id: str) -> None:
        """Delete a response; ``ON DELETE CASCADE`` removes its input items."""
        statement = (
            sa.delete(StoredResponse)
            .where(StoredResponse.id == response_id)
            .returning(StoredResponse.id)
        )
        async with self._sessions.begin() as session:
            deleted = await session.scalar(statement, execution_options=_NO_SYNC)
        if deleted is None:
            raise ResponseNotFound(response_id)

    async def expire(self, older_than: timedelta) -> int:
        """Delete every response created more than ``older_than`` ago; returns how many."""
        cutoff = utcnow() - older_than
        statement = sa.delete(StoredResponse).where(StoredResponse.created_at < cutoff)
        async with self._sessions.begin() as session:
            result = await session.execute(statement, execution_options=_NO_SYNC)
        count: int = result.rowcount  # type: ignore[attr-defined]  # a CursorResult for DELETE
        return count

    async def fail_orphans(
        self, owned: Callable[[str], Awaitable[bool]], error: Mapping[str, Any]
    ) -> int:
        """Mark responses still queued or in progress ``failed`` with ``error`` unless
        ``owned(id)`` says a live process answers them; how many were.

        Their process died without writing their end, which nothing else would ever write.
        """
        running = (ResponseStatus.QUEUED, ResponseStatus.IN_PROGRESS)
        async with self._sessions() as session:
            ids = (
                await session.scalars(
                    sa.select(StoredResponse.id).where(StoredResponse.status.in_(running))
                )
            ).all()
        orphans = [response_id for response_id in ids if not await owned(response_id)]
        if not orphans:
            return 0
        statement = (
            sa.update(StoredResponse)
            .where(StoredResponse.id.in_(orphans), StoredResponse.status.in_(running))
            .values(status=ResponseStatus.FAILED, error=dict(error), updated_at=utcnow())
        )
        async with self._sessions.begin() as session:
            result = await session.execute(statement, execution_options=_NO_SYNC)
        count: int = result.rowcount  # type: ignore[attr-defined]  # a CursorResult for UPDATE
        return count

    async def list_input_items(
        self,
        response_id: str,
        *,
        after: str | None = None,
        limit: int = 20,
        order: Literal["asc", "desc"] = "desc",
    ) -> InputItemPage:
        """A page of the response's input items, as OpenAI pages them.

        ``order`` ``desc`` (OpenAI's default) lists the newest item first; ``after`` is an item
        id from the previous page (its ``last_id``), and the page starts just past it.
        """
        if not 1 <= limit <= 100:
            raise InvalidRequest("`limit` must be from 1 to 100.", param="limit")
        newest_first = order == "desc"
        position = ResponseInputItem.position
        query = (
            sa.select(ResponseInputItem.item)
            .where(ResponseInputItem.response_id == response_id)
            .order_by(position.desc() if newest_first else position.asc())
            .limit(limit + 1)
        )
        async with self._sessions() as session:
            exists = await session.scalar(
                sa.select(StoredResponse.id).where(StoredResponse.id == response_id)
            )
            if exists is None:
                raise ResponseNotFound(response_id)
            if after is not None:
                start = await session.scalar(
                    sa.select(sa.func.min(position)).where(
                        ResponseInputItem.response_id == response_id,
                        ResponseInputItem.item_id == after,
                    )
                )
                if start is None:
                    raise InvalidRequest(
                        f"No input item with id '{after}' in this response.", param="after"
                    )
                query = query.where(position < start if newest_first else position > start)
            rows = list((await session.scalars(query)).all())
        page = tuple(rows[:limit])
        return InputItemPage(
            data=page,
            first_id=page[0]["id"] if page else None,
            last_id=page[-1]["id"] if page else None,
            has_more=len(rows) > limit,
        )

    async def chain(self, response_id: str) -> list[ResponseTurn]:
        """The response named by ``previous_response_id`` and all before it, oldest first.

        Raises ``ResponseNotFound`` (naming ``previous_response_id``) when any link is missing,
        deleted or expired: a history with a hole would answer a different conversation.
        """
        links = (
            sa.select(
                StoredResponse.id,
                StoredResponse.previous_response_id,
                sa.literal(0).label("depth"),
            )
            .where(StoredResponse.id == response_id)
            .cte("links", recursive=True)
        )
        earlier = aliased(StoredResponse)
        links = links.union_all(
            sa.select(earlier.id, earlier.previous_response_id, links.c.depth + 1)
            .join(links, earlier.id == links.c.previous_response_id)
            .where(links.c.depth < MAX_CHAIN)
        )
        async with self._sessions() as session:
            found = (
                await session.execute(
                    sa.select(StoredResponse, links.c.depth)
                    .join(links, StoredResponse.id == links.c.id)
                    .order_by(links.c.depth.desc())
                )
            ).all()
            ids = [row.id for row, _ in found]
            items = (
                await session.execute(
                    sa.select(ResponseInputItem.response_id, ResponseInputItem.item)
                    .where(ResponseInputItem.response_id.in_(ids))
                    .order_by(ResponseInputItem.response_id, ResponseInputItem.position)
                )
            ).all()
        if not found:
            raise ResponseNotFound(response_id, param="previous_response_id")
        oldest = found[0][0]
        if oldest.previous_response_id is not None:
            raise ResponseNotFound(oldest.previous_response_id, param="previous_response_id")
        by_response: dict[str, list[dict[str, Any]]] = {}
        for owner, item in items:
            by_response.setdefault(owner, []).append(item)
        return [
            ResponseTurn(response=_record(row), input_items=tuple(by_response.get(row.id, ())))
            for row, _ in found
        ]


# Each session is new and short, so there are no loaded objects for an UPDATE to keep in step.
_NO_SYNC = {"synchronize_session": False}


def _record(row: StoredResponse) -> ResponseRecord:
    return ResponseRecord(
        id=row.id,
        model=row.model,
        status=row.status,
        background=row.background,
        previous_response_id=row.previous_response_id,
        fields=row.fields,
        output=row.output,
        usage=row.usage,
        error=row.error,
        incomplete_reason=row.incomplete_reason,
        created_at=row.created_at,
        updated_at=row.updated_at,
        completed_at=row.completed_at,
    )
