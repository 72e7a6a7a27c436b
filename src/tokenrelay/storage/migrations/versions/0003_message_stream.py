"""The event log a streaming answer is written to.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30

Written by hand and frozen, like 0001: it must not import ``tokenrelay.storage.models``.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("stream_id", sa.String(40), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("stream_id")
