"""The PostgreSQL that storage and scale-out tests share, and databases that never outlive a test.

PostgreSQL is found at ``TOKENRELAY_TEST_POSTGRES_URL`` or on 127.0.0.1:5432 (database ``test``,
as ``postgres`` or the current user). Tests create randomly named databases beside it and drop
them afterwards, so parallel runs never see each other's tables. Without a server those tests
are skipped, except under CI=true, where they fail.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import asyncpg
import pytest
import sqlalchemy as sa

__all__ = [
    "POSTGRES_URL_ENV",
    "asyncpg_dsn",
    "fresh_database",
    "postgres_candidates",
    "require_postgres",
]

POSTGRES_URL_ENV = "TOKENRELAY_TEST_POSTGRES_URL"


def postgres_candidates() -> list[str]:
    if os.environ.get(POSTGRES_URL_ENV):
        return [os.environ[POSTGRES_URL_ENV]]
    users = dict.fromkeys(["postgres", getpass.getuser()])
    return [f"postgresql+asyncpg://{user}@127.0.0.1:5432/test" for user in users]


def asyncpg_dsn(url: sa.URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


async def _execute(url: sa.URL, sql: str) -> None:
    connection = await asyncpg.connect(asyncpg_dsn(url), timeout=5)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


def require_postgres() -> sa.URL:
    """A URL that can create databases; else a skip (a failure under CI=true) saying why."""
    failures = []
    for candidate in postgres_candidates():
        url = sa.make_url(candidate)
        try:
            asyncio.run(_execute(url, "SELECT 1"))
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            failures.append(f"{url.render_as_string()}: {exc!r}")
            continue
        return url
    reason = f"PostgreSQL unreachable ({'; '.join(failures)}); set {POSTGRES_URL_ENV} to test it"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@contextmanager
def fresh_database(admin_url: sa.URL) -> Iterator[str]:
    """The URL of a new, empty database beside ``admin_url``'s, dropped when the block ends."""
    name = f"tokenrelay_test_{secrets.token_hex(6)}"
    asyncio.run(_execute(admin_url, f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        # FORCE: servers killed midway, or a failed test, may still hold connections.
        asyncio.run(_execute(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
