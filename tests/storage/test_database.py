"""Database start-up: migrations, SQLite settings, the default location, crash repair."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

from tokenrelay.storage import ConversationStore, Database, MessageStatus, default_database_url
from tokenrelay.storage.database import alembic_config
from tokenrelay.storage.models import Base


def _head() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


async def _tables(db: Database) -> set[str]:
    async with db.engine.connect() as connection:
        names = await connection.run_sync(lambda sync: sa.inspect(sync).get_table_names())
    return set(names)


async def _versions(db: Database) -> list[str]:
    async with db.engine.connect() as connection:
        result = await connection.execute(sa.text("SELECT version_num FROM alembic_version"))
        return list(result.scalars())


async def test_start_creates_the_schema_at_head(db: Database) -> None:
    assert {"conversations", "messages", "alembic_version"} <= await _tables(db)
    assert await _versions(db) == [_head()]


async def test_migrated_schema_matches_the_models(db: Database) -> None:
    def diff(connection: Connection) -> list[object]:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(context, Base.metadata))

    async with db.engine.connect() as connection:
        assert await connection.run_sync(diff) == []


async def test_second_start_keeps_data_and_changes_nothing(database_url: str) -> None:
    async with Database(database_url) as first:
        conversation = await ConversationStore(first).create_conversation(title="kept")
    async with Database(database_url) as second:
        assert await _versions(second) == [_head()]
        kept = await ConversationStore(second).get_conversation(conversation.id)
        assert kept.title == "kept"


async def test_concurrent_starts_migrate_once(database_url: str) -> None:
    databases = [Database(database_url) for _ in range(3)]
    try:
        await asyncio.gather(*(database.start() for database in databases))
        assert await _versions(databases[0]) == [_head()]
    finally:
        await asyncio.gather(*(database.close() for database in databases))


async def test_start_marks_unfinished_answers_interrupted(database_url: str) -> None:
    async with Database(database_url) as before_crash:
        store = ConversationStore(before_crash)
        conversation = await store.create_conversation()
        question = await store.add_message(conversation.id, "user", "Why is the sky blue?")
        answer = await store.add_message(
            conversation.id, "assistant", "Rayleigh", status="streaming"
        )
        done = await store.add_message(conversation.id, "assistant", "ok", status="complete")
        # No update_message(status=...) follows: the process "dies" here.

    async with Database(database_url) as after_restart:
        store = ConversationStore(after_restart)
        interrupted = await store.get_message(answer.id)
        assert interrupted.status is MessageStatus.INTERRUPTED
        assert interrupted.content == "Rayleigh"
        assert (await store.get_message(question.id)).status is MessageStatus.COMPLETE
        assert (await store.get_message(done.id)).status is MessageStatus.COMPLETE


async def test_sqlite_uses_wal_and_enforces_foreign_keys(sqlite_url: str) -> None:
    async with Database(sqlite_url) as db, db.engine.connect() as connection:
        journal = await connection.exec_driver_sql("PRAGMA journal_mode")
        foreign_keys = await connection.exec_driver_sql("PRAGMA foreign_keys")
        assert journal.scalar() == "wal"
        assert foreign_keys.scalar() == 1


async def test_default_database_is_a_file_in_the_user_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    expected = tmp_path / "data" / "tokenrelay" / "tokenrelay.db"
    assert default_database_url() == f"sqlite+aiosqlite:///{expected}"
    async with Database() as db:
        await ConversationStore(db).create_conversation()
    assert expected.is_file()


async def test_in_memory_sqlite_works_for_quick_experiments() -> None:
    async with Database("sqlite+aiosqlite://") as db:
        store = ConversationStore(db)
        conversation = await store.create_conversation(title="scratch")
        assert (await store.get_conversation(conversation.id)).title == "scratch"


async def test_check_constraints_reject_unknown_status(db: Database) -> None:
    store = ConversationStore(db)
    message = await store.add_message((await store.create_conversation()).id, "user", "hi")
    with pytest.raises(sa.exc.IntegrityError):
        async with db.engine.begin() as connection:
            await connection.execute(
                sa.text("UPDATE messages SET status = 'bogus' WHERE id = :id"), {"id": message.id}
            )
