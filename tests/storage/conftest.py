"""Fixtures giving each test its own empty database: a SQLite file, then a PostgreSQL database.

PostgreSQL is found at ``TOKENRELAY_TEST_POSTGRES_URL`` or on 127.0.0.1:5432 (database ``test``,
as ``postgres`` or the current user). Each test gets a freshly created, randomly named database
beside it, dropped afterwards, so parallel runs never see each other's tables. Without a server
the PostgreSQL half is skipped, except on CI (``CI=true``), where it fails.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio
import sqlalchemy as sa

from postgres_server import POSTGRES_URL_ENV, asyncpg_dsn, fresh_database, postgres_candidates
from tokenrelay.storage import ConversationStore, Database


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def postgres_admin_url() -> sa.URL:
    """A URL that can create databases, or a skip (a failure on CI) saying why there is none."""
    failures = []
    for candidate in postgres_candidates():
        url = sa.make_url(candidate)
        try:
            connection = await asyncpg.connect(asyncpg_dsn(url), timeout=5)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            failures.append(f"{url.render_as_string()}: {exc!r}")
            continue
        await connection.close()
        return url
    reason = f"PostgreSQL unreachable ({'; '.join(failures)}); set {POSTGRES_URL_ENV} to test it"
    if os.environ.get("CI") == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'tokenrelay.db'}"


@pytest.fixture
async def postgresql_url(postgres_admin_url: sa.URL) -> AsyncIterator[str]:
    name = f"tokenrelay_test_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(asyncpg_dsn(postgres_admin_url), timeout=5)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield postgres_admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        # FORCE: a test that failed midway may still hold connections.
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def _postgres_execute(url: sa.URL, sql: str) -> None:
    async def run() -> None:
        connection = await asyncpg.connect(asyncpg_dsn(url), timeout=5)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    asyncio.run(run())


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def module_database_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """An empty database shared by a module's tests, once per backend: for a server under test,
    which is started once per module rather than once per test."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('sqlite') / 'tokenrelay.db'}"
        return
    admin_url: sa.URL = request.getfixturevalue("postgres_admin_url")
    with fresh_database(admin_url) as url:
        yield url


def execute_sql(database_url: str, sql: str) -> None:
    """Run ``sql`` (several statements allowed) on a database, as its administrator would."""
    url = sa.make_url(database_url)
    if url.get_backend_name() == "sqlite":
        with sqlite3.connect(str(url.database)) as connection:
            connection.executescript(sql)
        connection.close()
        return
    _postgres_execute(url, sql)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    """The URL of an empty database, once per backend."""
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    """A started (migrated) database."""
    database = Database(database_url)
    await database.start()
    yield database
    await database.close()


@pytest.fixture
def store(db: Database) -> ConversationStore:
    return ConversationStore(db)
