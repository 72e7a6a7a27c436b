"""Stored Responses API answers and their input items.

Revision ID: 0002
Revises: 0001
Create Date: 2025-12-01

Written by hand and frozen, like 0001: it must not import ``tokenrelay.storage.models``.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None

_STATUSES = ("queued", "in_progress", "completed", "incomplete", "failed", "cancelled")


def upgrade() -> None:
    op.create_table(
        "responses",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("background", sa.Boolean(), nullable=False),
        sa.Column("previous_response_id", sa.String(32), nullable=True),
        sa.Column("fields", sa.JSON(), nullable=False),
        sa.Column("output", sa.JSON(), nullable=False),
        sa.Column("usage", sa.JSON(), nullable=True),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.Column("incomplete_reason", sa.String(32), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_responses")),
        sa.CheckConstraint(
            f"status IN ({', '.join(repr(status) for status in _STATUSES)})",
            name=op.f("ck_responses_status"),
        ),
    )
    # Expiry deletes by age.
    op.create_index(op.f("ix_responses_created_at"), "responses", ["created_at"])
    op.create_table(
        "response_input_items",
        sa.Column("response_id", sa.String(32), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("item_id", sa.String(200), nullable=False),
        sa.Column("item", sa.JSON(), nullable=False),
        # Also the index that serves "items of a response, in order".
        sa.PrimaryKeyConstraint("response_id", "position", name=op.f("pk_response_input_items")),
        sa.ForeignKeyConstraint(
            ["response_id"],
            ["responses.id"],
            name=op.f("fk_response_input_items_response_id_responses"),
            ondelete="CASCADE",
        ),
    )
    # Finds the ``after`` cursor of a page.
    op.create_index(
        op.f("ix_response_input_items_response_id_item_id"),
        "response_input_items",
        ["response_id", "item_id"],
    )


def downgrade() -> None:
    op.drop_index(
        op.f("ix_response_input_items_response_id_item_id"), table_name="response_input_items"
    )
    op.drop_table("response_input_items")
    op.drop_index(op.f("ix_responses_created_at"), table_name="responses")
    op.drop_table("responses")
