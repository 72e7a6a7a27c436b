"""Whose conversations and stored responses these are: the gateway key that made them.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30

Written by hand and frozen, like 0001: it must not import ``tokenrelay.storage.models``.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    for table in ("conversations", "responses"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("owner", sa.String(32), nullable=True))
            batch.create_index(f"ix_{table}_owner", ["owner"])


def downgrade() -> None:
    for table in ("conversations", "responses"):
        with op.batch_alter_table(table) as batch:
            batch.drop_index(f"ix_{table}_owner")
            batch.drop_column("owner")
