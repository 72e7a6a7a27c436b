"""The one owner of tokenrelay's database connection: engine, sessions, migrations, start-up repair.

SQLite (a file in the user's data directory) is the default; PostgreSQL is chosen by URL when
several workers or machines share one history. Both go through the same async SQLAlchemy engine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import platformdirs
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import NullPool

from tokenrelay.storage.models import Message, MessageStatus, utcnow

__all__ = ["MIGRATIONS_DIR", "Database", "alembic_config", "create_engine", "default_database_url"]

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"

# Any constant works; it only has to be the same in every tokenrelay process sharing the database.
_PG_MIGRATION_LOCK = 0x746F6B656E72  # "tokenr"

# How long a SQLite writer waits for another one before failing with "database is locked".
_SQLITE_BUSY_TIMEOUT_MS = 15_000


def default_database_url() -> str:
    """``sqlite+aiosqlite:///<user data dir>/tokenrelay.db``, creating the directory if needed."""
    directory = Path(platformdirs.user_data_dir("tokenrelay", appauthor=False))
    directory.mkdir(parents=True, exist_ok=True)
    return f"sqlite+aiosqlite:///{directory / 'tokenrelay.db'}"


def _is_sqlite_memory(url: sa.URL) -> bool:
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def create_engine(url: str | sa.URL, *, migrating: bool = False, echo: bool = False) -> AsyncEngine:
    """An async engine for ``url``, with SQLite set up for a server rather than a script.

    ``migrating`` gives a pool-less engine whose SQLite transactions start ``BEGIN IMMEDIATE``
    with foreign keys off, as Alembic's batch migrations (copy table, drop old, rename) require.
    """
    url = make_url(url)
    options: dict[str, Any] = {"echo": echo}
    if migrating:
        options["poolclass"] = NullPool
    engine = create_async_engine(url, **options)
    if url.get_backend_name() == "sqlite":
        _configure_sqlite(engine, migrating=migrating)
    return engine


def _configure_sqlite(engine: AsyncEngine, *, migrating: bool) -> None:
    pragmas = (
        # busy_timeout first: switching to WAL needs a lock another process may hold.
        f"PRAGMA busy_timeout = {_SQLITE_BUSY_TIMEOUT_MS}",
        # WAL: readers never block the writer, which appends streamed text many times a second.
        "PRAGMA journal_mode = WAL",
        # With WAL, NORMAL cannot corrupt the file; a power cut may lose the last commits only.
        "PRAGMA synchronous = NORMAL",
        f"PRAGMA foreign_keys = {'OFF' if migrating else 'ON'}",
    )
    begin = "BEGIN IMMEDIATE" if migrating else "BEGIN"

    @sa.event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # sqlite3 opens transactions itself, but not before SELECT or DDL; let SQLAlchemy do it.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in pragmas:
            if pragma.startswith("PRAGMA journal_mode"):
                _switch_to_wal(cursor, pragma)
            else:
                cursor.execute(pragma)
        cursor.close()

    @sa.event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Connection) -> None:
        connection.exec_driver_sql(begin)


_WAL_ATTEMPTS = 40
_WAL_RETRY_SECONDS = 0.05


def _switch_to_wal(cursor: Any, pragma: str) -> None:
    """Put a new database file in WAL mode, waiting out another process doing the same.

    Switching takes an exclusive lock, and SQLite answers "database is locked" to the others at
    once (no busy handler for that lock); the mode is persistent, so whoever switched it first
    has done it for everyone. Bounded: ``_WAL_ATTEMPTS`` short waits, at start-up only.
    """
    for attempt in range(_WAL_ATTEMPTS):
        try:
            cursor.execute(pragma)
            return
        except Exception as exc:
            if "locked" not in str(exc) or attempt == _WAL_ATTEMPTS - 1:
                raise
        cursor.execute("PRAGMA journal_mode")
        if str(cursor.fetchone()[0]).lower() == "wal":
            return
        time.sleep(_WAL_RETRY_SECONDS)  # a new file's first connections only, never per request


class Database:
    """The async engine and session factory for one database URL.

    Call ``await start()`` once before use (it migrates the schema) and ``await close()`` at the
    end; ``async with Database(url) as db`` does both.
    """

    def __init__(self, url: str | None = None, *, echo: bool = False) -> None:
        self.url = make_url(url or default_database_url())
        self._echo = echo
        self.engine = create_engine(self.url, echo=echo)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    async def start(self, *, owned: Callable[[str], Awaitable[bool]] | None = None) -> None:
        """Migrate to the newest schema, then mark answers cut off by a crash as interrupted.

        Any message still ``streaming`` belongs to a generation that died with its process,
        unless ``owned(stream_id)`` says a live process still holds its lease (several
        replicas share the database).
        """
        await self.migrate()
        interrupted = await self.interrupt_orphans(owned)
        if interrupted:
            logger.warning("marked %d unfinished answer(s) as interrupted", interrupted)

    async def interrupt_orphans(self, owned: Callable[[str], Awaitable[bool]] | None = None) -> int:
        """Mark ``streaming`` answers whose writer is gone ``interrupted``; how many were."""
        async with self.sessions() as session:
            streaming = (
                await session.execute(
                    sa.select(Message.id, Message.stream_id).where(
                        Message.status == MessageStatus.STREAMING
                    )
                )
            ).all()
        orphans = [
            message_id
            for message_id, stream_id in streaming
            if owned is None or stream_id is None or not await owned(stream_id)
        ]
        if not orphans:
            return 0
        async with self.engine.begin() as connection:
            result = await connection.execute(
                sa.update(Message)
                .where(Message.id.in_(orphans), Message.status == MessageStatus.STREAMING)
                .values(status=MessageStatus.INTERRUPTED, updated_at=utcnow())
            )
        return result.rowcount

    async def migrate(self, revision: str = "head") -> None:
        """Run Alembic up to ``revision``; safe when several processes or tasks start at once.

        Alembic keeps its running context in module globals, so two migrations must never
        interleave, not even in one process; the lock taken below guarantees that too.
        """
        async with self.migration_transaction() as connection:
            await connection.run_sync(_upgrade, revision)

    @asynccontextmanager
    async def migration_transaction(self) -> AsyncIterator[AsyncConnection]:
        """One transaction that holds the migration lock until it commits.

        PostgreSQL: a transaction-scoped advisory lock. SQLite: ``BEGIN IMMEDIATE`` takes the write
        lock before Alembic reads the current revision, so a second process waits, then finds
        nothing to do.
        """
        # An in-memory database exists only inside the engine's one connection: migrate there.
        own_engine = not _is_sqlite_memory(self.url)
        engine = self.engine
        if own_engine:
            engine = create_engine(self.url, migrating=True, echo=self._echo)
        try:
            async with engine.begin() as connection:
                if connection.dialect.name == "postgresql":
                    await connection.execute(
                        sa.select(sa.func.pg_advisory_xact_lock(_PG_MIGRATION_LOCK))
                    )
                yield connection
                if connection.dialect.name == "sqlite":
                    await _check_foreign_keys(connection)
        finally:
            if own_engine:
                await engine.dispose()

    async def ping(self) -> None:
        """``SELECT 1``: raises if the database cannot answer (``/readyz``)."""
        async with self.engine.connect() as connection:
            await connection.execute(sa.text("SELECT 1"))

    async def close(self) -> None:
        await self.engine.dispose()

    async def __aenter__(self) -> Database:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"Database({self.url.render_as_string(hide_password=True)!r})"


async def _check_foreign_keys(connection: AsyncConnection) -> None:
    # Foreign keys were off during the migration; refuse to commit one that broke them.
    problems = (await connection.exec_driver_sql("PRAGMA foreign_key_check")).all()
    if problems:
        raise RuntimeError(f"migration left rows with broken foreign keys: {problems[:5]}")


def _upgrade(connection: Connection, revision: str) -> None:
    command.upgrade(alembic_config(connection), revision)


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration without an ini file; ``env.py`` migrates over ``connection``."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config
