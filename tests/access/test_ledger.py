"""The usage ledger when its database fails: rows wait (bounded, the oldest dropped first and
counted) and are written once it works again. A real SQLite file whose ``usage`` table is
renamed away and back stands for the database going away."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tokenrelay.access.usage import UsageLedger
from tokenrelay.storage.database import Database
from tokenrelay.storage.usage import UsageRow, UsageStore


def _row(n: int) -> UsageRow:
    return UsageRow(
        created_at=datetime.now(UTC),
        key_id=None,
        route="/v1/chat/completions",
        model=f"model-{n}",
        provider="fake",
        prompt_tokens=n,
        completion_tokens=n,
        ttft_ms=1,
        duration_ms=2,
        status="complete",
        client_left=False,
    )


async def test_rows_wait_for_the_database_within_a_bound(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "usage.db"
    async with Database(f"sqlite+aiosqlite:///{path}") as database:
        await database.start()
        ledger = UsageLedger(UsageStore(database), max_pending=3)
        with sqlite3.connect(path) as db:
            db.execute("ALTER TABLE usage RENAME TO usage_away")
        for n in range(2):
            ledger.record(_row(n))
        with pytest.raises(Exception):  # noqa: B017  (the driver's own error type)
            await ledger.flush()
        for n in range(2, 5):
            ledger.record(_row(n))  # 5 waiting rows for a bound of 3: the 2 oldest go
        with sqlite3.connect(path) as db:
            db.execute("ALTER TABLE usage_away RENAME TO usage")
        await ledger.flush()
        with sqlite3.connect(path) as db:
            models = [row[0] for row in db.execute("SELECT model FROM usage ORDER BY id")]
        assert models == ["model-2", "model-3", "model-4"]
        assert "2 row(s) dropped" in caplog.text
        await ledger.aclose()
