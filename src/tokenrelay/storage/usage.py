"""The usage of every request to a model, one row each, and its summaries.

Rows arrive in batches from the gateway's ledger (``access/usage.py``); summaries are computed
by the database (``GROUP BY``), by key, by model and per time bucket, so ``tokenrelay usage``,
``GET /api/usage`` and the usage page show the same numbers from the same query.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.sql.elements import ColumnElement

from tokenrelay.storage.database import Database
from tokenrelay.storage.models import ApiKey, UsageRecord

__all__ = ["BUCKETS", "Bucket", "UsageRow", "UsageStore"]

Bucket = Literal["minute", "hour", "day"]
BUCKETS: dict[str, int] = {"minute": 16, "hour": 13, "day": 10}
"""Each bucket as the length of the ``YYYY-MM-DD HH:MM`` prefix it keeps."""
_PG_FORMATS = {"minute": "YYYY-MM-DD HH24:MI", "hour": "YYYY-MM-DD HH24", "day": "YYYY-MM-DD"}
_FAILED = ("error", "interrupted")


@dataclass(frozen=True, slots=True)
class UsageRow:
    created_at: datetime
    key_id: str | None
    route: str
    model: str
    provider: str
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: int | None
    duration_ms: int
    status: str
    client_left: bool
    estimated: bool = False


class UsageStore:
    def __init__(self, database: Database) -> None:
        self._sessions: async_sessionmaker[AsyncSession] = database.sessions
        self._postgres = database.engine.dialect.name == "postgresql"

    async def add(self, rows: Sequence[UsageRow]) -> None:
        """Store a batch in one transaction (one ``INSERT`` with many rows)."""
        if not rows:
            return
        async with self._sessions.begin() as session:
            await session.execute(sa.insert(UsageRecord), [asdict(row) for row in rows])

    async def summary(
        self,
        *,
        since: datetime,
        until: datetime,
        key_id: str | None = None,
        bucket: Bucket = "hour",
    ) -> dict[str, Any]:
        """Totals, by key, by model, and per ``bucket`` by key and model, in ``[since, until)``.

        Buckets are UTC, named by their start (``2026-11-30 15`` for an hour).
        """
        where: list[ColumnElement[bool]] = [
            UsageRecord.created_at >= since,
            UsageRecord.created_at < until,
        ]
        if key_id is not None:
            where.append(UsageRecord.key_id == key_id)
        figures = _figures()
        bucket_of = self._bucket(bucket)
        key_name = sa.func.coalesce(ApiKey.name, sa.null()).label("key_name")
        joined = (
            sa.select().select_from(UsageRecord).outerjoin(ApiKey, ApiKey.id == UsageRecord.key_id)
        )
        async with self._sessions() as session:
            totals = (await session.execute(joined.add_columns(*figures).where(*where))).one()
            by_key = await session.execute(
                joined.add_columns(UsageRecord.key_id, key_name, *figures)
                .where(*where)
                .group_by(UsageRecord.key_id, ApiKey.name)
                .order_by(sa.desc("requests"))
            )
            by_model = await session.execute(
                joined.add_columns(UsageRecord.model, *figures)
                .where(*where)
                .group_by(UsageRecord.model)
                .order_by(sa.desc("requests"))
            )
            series = await session.execute(
                joined.add_columns(
                    bucket_of.label("bucket"),
                    UsageRecord.key_id,
                    key_name,
                    UsageRecord.model,
                    *figures,
                )
                .where(*where)
                .group_by("bucket", UsageRecord.key_id, ApiKey.name, UsageRecord.model)
                .order_by("bucket")
            )
            return {
                "object": "usage.summary",
                "since": since.isoformat(),
                "until": until.isoformat(),
                "bucket": bucket,
                "totals": _numbers(totals._mapping),
                "by_key": [
                    {"key_id": r.key_id, "key_name": r.key_name, **_numbers(r._mapping)}
                    for r in by_key
                ],
                "by_model": [{"model": r.model, **_numbers(r._mapping)} for r in by_model],
                "series": [
                    {
                        "bucket": r.bucket,
                        "key_id": r.key_id,
                        "key_name": r.key_name,
                        "model": r.model,
                        **_numbers(r._mapping),
                    }
                    for r in series
                ],
            }

    def _bucket(self, bucket: Bucket) -> ColumnElement[str]:
        if self._postgres:
            return sa.func.to_char(
                sa.func.timezone("UTC", UsageRecord.created_at), _PG_FORMATS[bucket]
            )
        # SQLite keeps UTC datetimes as "YYYY-MM-DD HH:MM:SS.ffffff" text.
        return sa.func.substr(UsageRecord.created_at, 1, BUCKETS[bucket])


def _figures() -> list[sa.Label[Any]]:
    """The numbers every summary line has, as SQL aggregates."""
    return [
        sa.func.count().label("requests"),
        sa.func.coalesce(sa.func.sum(UsageRecord.prompt_tokens), 0).label("prompt_tokens"),
        sa.func.coalesce(sa.func.sum(UsageRecord.completion_tokens), 0).label("completion_tokens"),
        sa.func.count().filter(UsageRecord.status.in_(_FAILED)).label("errors"),
        sa.func.count().filter(UsageRecord.status == "rate_limited").label("rate_limited"),
        sa.func.count().filter(UsageRecord.client_left.is_(True)).label("client_left"),
        sa.func.avg(UsageRecord.ttft_ms).label("ttft_ms_avg"),
        sa.func.count(UsageRecord.ttft_ms).label("ttft_count"),
        sa.func.avg(UsageRecord.duration_ms).label("duration_ms_avg"),
    ]


def _numbers(row: Any) -> dict[str, Any]:
    ttft, duration = row["ttft_ms_avg"], row["duration_ms_avg"]
    return {
        "requests": int(row["requests"]),
        "prompt_tokens": int(row["prompt_tokens"]),
        "completion_tokens": int(row["completion_tokens"]),
        "errors": int(row["errors"]),
        "rate_limited": int(row["rate_limited"]),
        "client_left": int(row["client_left"]),
        "ttft_ms_avg": round(float(ttft), 1) if ttft is not None else None,
        "ttft_count": int(row["ttft_count"]),  # what ``ttft_ms_avg`` averages: to combine lines
        "duration_ms_avg": round(float(duration), 1) if duration is not None else None,
    }
