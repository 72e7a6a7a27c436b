"""Alembic migrations; ``versions/`` holds one numbered, hand-reviewed file per schema change."""
