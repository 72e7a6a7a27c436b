"""The stored-responses store, run against SQLite and PostgreSQL alike."""

from __future__ import annotations

import asyncio
from datetime import UTC, timedelta

import pytest
import sqlalchemy as sa
from alembic import command
from openai.types.responses import Response, ResponseItem
from pydantic import TypeAdapter
from sqlalchemy.engine import Connection

from tokenrelay.errors import InvalidRequest
from tokenrelay.responses.events import response_from_record
from tokenrelay.responses.request import parse_request, translate
from tokenrelay.storage import Database
from tokenrelay.storage.database import alembic_config
from tokenrelay.storage.models import ResponseInputItem, ResponseStatus, utcnow
from tokenrelay.storage.responses import ResponseNotFound, ResponseRecord, ResponseStore

FIELDS = translate(parse_request({"model": "m", "input": "x"})).fields


def _items(*texts: str) -> list[dict[str, object]]:
    return translate(parse_request({"model": "m", "input": list(map(_user, texts))})).input_items


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


@pytest.fixture
def responses(db: Database) -> ResponseStore:
    return ResponseStore(db)


async def _item_rows(db: Database) -> int:
    async with db.sessions() as session:
        return await session.scalar(sa.select(sa.func.count()).select_from(ResponseInputItem)) or 0


async def test_create_then_get_returns_the_same_response(responses: ResponseStore) -> None:
    items = _items("first", "second")
    created = await responses.create(
        model="m",
        fields=FIELDS,
        input_items=items,
        background=True,
        status="queued",
        previous_response_id="resp_before",
    )
    assert created.id.startswith("resp_")
    assert created.status is ResponseStatus.QUEUED
    assert created.created_at.tzinfo is UTC

    fetched = await responses.get(created.id)
    assert fetched == created
    assert fetched.fields == FIELDS
    assert fetched.output == [] and fetched.usage is None and fetched.completed_at is None
    page = await responses.list_input_items(created.id, order="asc")
    assert list(page.data) == items


async def test_missing_ids_raise_not_found(responses: ResponseStore) -> None:
    for call in (
        responses.get("resp_missing"),
        responses.update("resp_missing", status="completed"),
        responses.delete("resp_missing"),
        responses.list_input_items("resp_missing"),
    ):
        with pytest.raises(ResponseNotFound) as caught:
            await call
        assert caught.value.status == 404
        assert caught.value.to_dict()["error"]["message"] == (
            "Response with id 'resp_missing' not found."
        )


async def test_update_changes_only_the_given_fields(responses: ResponseStore) -> None:
    created = await responses.create(model="m", fields=FIELDS, input_items=_items("q"))
    output = [
        {
            "id": "msg_1",
            "type": "message",
            "status": "in_progress",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Hé ✓", "annotations": []}],
        }
    ]
    running = await responses.update(created.id, output=output)
    assert running.status is ResponseStatus.IN_PROGRESS
    assert running.output == output
    assert running.updated_at >= created.updated_at

    usage = {"input_tokens": 1, "output_tokens": 2, "total_tokens": 3}
    finished_at = utcnow()
    done = await responses.update(
        created.id,
        status=ResponseStatus.INCOMPLETE,
        usage=usage,
        incomplete_reason="max_output_tokens",
        completed_at=finished_at,
    )
    assert (done.status, done.usage, done.incomplete_reason) == (
        ResponseStatus.INCOMPLETE,
        usage,
        "max_output_tokens",
    )
    assert done.output == output
    assert done.completed_at == finished_at
    assert await responses.get(created.id) == done

    failed = await responses.update(
        created.id, status="failed", error={"code": "server_error", "message": "boom"}
    )
    assert failed.error == {"code": "server_error", "message": "boom"}
    assert failed.usage == usage


async def test_only_one_of_cancel_and_finish_wins(responses: ResponseStore) -> None:
    created = await responses.create(model="m", fields=FIELDS, input_items=[])
    running = ("queued", "in_progress")
    cancelled, completed = await asyncio.gather(
        responses.update(created.id, status="cancelled", if_status=running),
        responses.update(created.id, status="completed", if_status=running),
    )
    final = await responses.get(created.id)
    assert final.status in (ResponseStatus.CANCELLED, ResponseStatus.COMPLETED)
    assert cancelled.status is final.status and completed.status is final.status
    # A finished response is not cancelled afterwards.
    again = await responses.update(created.id, status="cancelled", if_status=running)
    assert again.status is final.status


async def test_fail_orphans_fails_only_running_responses_nobody_owns(
    responses: ResponseStore,
) -> None:
    made = {
        name: await responses.create(model="m", fields=FIELDS, input_items=[], status=status)
        for name, status in [
            ("queued", "queued"),
            ("running", "in_progress"),
            ("owned", "in_progress"),
            ("done", "completed"),
        ]
    }
    error = {"code": "server_error", "message": "stopped"}

    async def owned(response_id: str) -> bool:
        return response_id == made["owned"].id

    assert await responses.fail_orphans(owned, error) == 2

    for name, status in [
        ("queued", "failed"),
        ("running", "failed"),
        ("owned", "in_progress"),
        ("done", "completed"),
    ]:
        record = await responses.get(made[name].id)
        assert record.status == status, name
        assert record.error == (error if status == "failed" else None)
    assert await responses.fail_orphans(owned, error) == 0


async def test_input_items_page_as_openai_pages_them(responses: ResponseStore) -> None:
    items = _items("0", "1", "2", "3", "4")
    ids = [item["id"] for item in items]
    created = await responses.create(model="m", fields=FIELDS, input_items=items)

    first = await responses.list_input_items(created.id, limit=2)
    assert [item["id"] for item in first.data] == [ids[4], ids[3]]  # newest first by default
    assert (first.first_id, first.last_id, first.has_more) == (ids[4], ids[3], True)
    second = await responses.list_input_items(created.id, limit=2, after=first.last_id)
    assert [item["id"] for item in second.data] == [ids[2], ids[1]]
    last = await responses.list_input_items(created.id, limit=2, after=second.last_id)
    assert [item["id"] for item in last.data] == [ids[0]]
    assert last.has_more is False

    ascending = await responses.list_input_items(created.id, order="asc", after=ids[1])
    assert [item["id"] for item in ascending.data] == ids[2:]
    assert ascending.has_more is False
    listed = TypeAdapter(list[ResponseItem]).validate_python(list(ascending.data))
    assert [item.type for item in listed] == ["message"] * 3

    with pytest.raises(InvalidRequest) as caught:
        await responses.list_input_items(created.id, after="msg_unknown")
    assert caught.value.param == "after"
    with pytest.raises(InvalidRequest) as caught:
        await responses.list_input_items(created.id, limit=101)
    assert caught.value.param == "limit"


async def test_a_response_without_input_lists_an_empty_page(responses: ResponseStore) -> None:
    created = await responses.create(model="m", fields=FIELDS, input_items=[])
    page = await responses.list_input_items(created.id)
    assert (page.data, page.first_id, page.last_id, page.has_more) == ((), None, None, False)


async def test_delete_removes_the_response_and_its_items(
    db: Database, responses: ResponseStore
) -> None:
    kept = await responses.create(model="m", fields=FIELDS, input_items=_items("keep"))
    gone = await responses.create(model="m", fields=FIELDS, input_items=_items("a", "b"))
    await responses.delete(gone.id)
    with pytest.raises(ResponseNotFound):
        await responses.get(gone.id)
    assert await _item_rows(db) == 1
    assert (await responses.get(kept.id)).id == kept.id


async def test_expire_deletes_only_responses_older_than_the_age(
    db: Database, responses: ResponseStore
) -> None:
    old = await responses.create(
        model="m",
        fields=FIELDS,
        input_items=_items("old"),
        created_at=utcnow() - timedelta(days=31),
    )
    new = await responses.create(model="m", fields=FIELDS, input_items=_items("new"))
    assert await responses.expire(timedelta(days=30)) == 1
    with pytest.raises(ResponseNotFound):
        await responses.get(old.id)
    assert (await responses.get(new.id)).id == new.id
    assert await _item_rows(db) == 1
    assert await responses.expire(timedelta(days=30)) == 0


async def _chain_of_three(responses: ResponseStore) -> list[ResponseRecord]:
    records: list[ResponseRecord] = []
    for turn in range(3):
        record = await responses.create(
            model="m",
            fields=FIELDS,
            input_items=_items(f"question {turn}"),
            previous_response_id=records[-1].id if records else None,
        )
        output = [
            {
                "id": f"msg_answer{turn}",
                "type": "message",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": f"answer {turn}", "annotations": []}],
            }
        ]
        records.append(await responses.update(record.id, status="completed", output=output))
    return records


async def test_chain_follows_previous_responses_oldest_first(responses: ResponseStore) -> None:
    records = await _chain_of_three(responses)
    chain = await responses.chain(records[-1].id)
    assert [turn.response for turn in chain] == records
    assert [turn.input_items[0]["content"][0]["text"] for turn in chain] == [
        "question 0",
        "question 1",
        "question 2",
    ]
    assert [turn.response.output[0]["id"] for turn in chain] == [
        "msg_answer0",
        "msg_answer1",
        "msg_answer2",
    ]
    assert [turn.response.id for turn in await responses.chain(records[0].id)] == [records[0].id]


async def test_a_chain_with_a_missing_link_is_not_found(responses: ResponseStore) -> None:
    records = await _chain_of_three(responses)
    with pytest.raises(ResponseNotFound) as caught:
        await responses.chain("resp_unknown")
    assert caught.value.param == "previous_response_id"
    assert "Previous response with id 'resp_unknown'" in caught.value.message

    await responses.delete(records[0].id)
    with pytest.raises(ResponseNotFound) as caught:
        await responses.chain(records[2].id)
    assert records[0].id in caught.value.message


async def test_a_stored_response_reads_as_an_sdk_response(responses: ResponseStore) -> None:
    [*_, last] = await _chain_of_three(responses)
    usage = {
        "input_tokens": 3,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": 2,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 5,
    }
    record = await responses.update(last.id, usage=usage, completed_at=utcnow())
    response = Response.model_validate(response_from_record(record))
    assert response.id == last.id
    assert response.status == "completed"
    assert response.output_text == "answer 2"
    assert response.created_at == int(record.created_at.timestamp())
    assert response.usage is not None and response.usage.total_tokens == 5


async def test_downgrade_to_the_first_revision_drops_the_response_tables(db: Database) -> None:
    def tables(connection: Connection) -> set[str]:
        return set(sa.inspect(connection).get_table_names())

    def downgrade(connection: Connection) -> None:
        command.downgrade(alembic_config(connection), "0001")

    async with db.migration_transaction() as connection:
        await connection.run_sync(downgrade)
    async with db.engine.connect() as connection:
        left = await connection.run_sync(tables)
    assert "conversations" in left
    assert not {"responses", "response_input_items"} & left
    await db.migrate()
    async with db.engine.connect() as connection:
        assert {"responses", "response_input_items"} <= await connection.run_sync(tables)
