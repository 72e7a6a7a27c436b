"""Alembic's entry point for tokenrelay's migrations.

``Database.migrate()`` passes an open connection in ``config.attributes["connection"]``. Run from
the ``alembic`` command line instead (``-c src/tokenrelay/storage/migrations/alembic.ini``), it
connects to ``sqlalchemy.url`` from that file, else ``TOKENRELAY_DATABASE_URL``, else the default.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from alembic import context
from sqlalchemy.engine import Connection

from tokenrelay.storage.database import Database, default_database_url
from tokenrelay.storage.models import Base

config = context.config


def _configure(**options: Any) -> None:
    context.configure(
        target_metadata=Base.metadata,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        render_as_batch=True,
        compare_type=True,
        **options,
    )


def _run(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


async def _run_from_command_line(url: str) -> None:
    database = Database(url)
    try:
        async with database.migration_transaction() as connection:
            await connection.run_sync(_run)
    finally:
        await database.close()


def _url() -> str:
    return (
        config.get_main_option("sqlalchemy.url")
        or os.environ.get("TOKENRELAY_DATABASE_URL")
        or default_database_url()
    )


if context.is_offline_mode():
    _configure(url=_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()
elif (connection := config.attributes.get("connection")) is not None:
    _run(connection)
else:
    asyncio.run(_run_from_command_line(_url()))
