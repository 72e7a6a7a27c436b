"""The usage ledger: one row per request to a model, written in batches; and the summary of
those rows that ``tokenrelay usage`` and ``GET /api/usage`` both show.

``record`` is synchronous and only appends to a list (it runs as an answer ends, on the answer's
task); a background task writes what is pending every ``flush_interval`` seconds in one
transaction. Bounded: past ``max_pending`` rows (the database is down, say) the oldest are
dropped and counted in a warning, rather than the gateway's memory growing. On shutdown what
is pending is written.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from datetime import UTC, datetime, timedelta
from typing import Any

from tokenrelay.errors import InvalidRequest
from tokenrelay.storage.keys import KeyStore
from tokenrelay.storage.models import utcnow
from tokenrelay.storage.usage import BUCKETS, Bucket, UsageRow, UsageStore

__all__ = ["MAX_BUCKETS", "UsageLedger", "parse_time", "usage_summary"]

MAX_BUCKETS = 2000
"""Buckets one summary may span: a minute bucket covers 33 hours at most."""
_BUCKET_SECONDS = {"minute": 60, "hour": 3600, "day": 86400}

_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_time(text: str, now: datetime) -> datetime:
    """``2026-11-30``, ``2026-11-30T15:00:00+00:00`` (UTC if no zone), or an age before
    ``now``: ``30m``, ``24h``, ``7d``, ``2w``. Raises ``ValueError`` for anything else."""
    text = text.strip()
    unit = _UNITS.get(text[-1:].lower())
    if unit is not None and text[:-1].isdigit():
        try:
            return now - timedelta(seconds=int(text[:-1]) * unit)
        except OverflowError:  # before year 1: no time at all
            raise ValueError(f"{text} is longer ago than any date") from None
    value = datetime.fromisoformat(text)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


logger = logging.getLogger(__name__)


class UsageLedger:
    def __init__(
        self, store: UsageStore, *, flush_interval: float = 1.0, max_pending: int = 50_000
    ) -> None:
        self.store = store
        self._pending: deque[UsageRow] = deque(maxlen=max_pending)
        self._flush_interval = flush_interval
        self._max_pending = max_pending
        self._dropped = 0
        self._writer: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def record(self, row: UsageRow) -> None:
        if len(self._pending) == self._max_pending:
            self._dropped += 1  # the oldest leaves as this one comes
        self._pending.append(row)

    async def start(self) -> None:
        self._writer = asyncio.create_task(self._write_forever(), name="usage ledger")

    async def aclose(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
        try:
            await self.flush()
        except Exception:
            logger.exception("writing the last usage rows failed")

    async def flush(self) -> None:
        """Write every pending row now (``GET /api/usage`` does, to show this process's latest)."""
        async with self._lock:
            if self._dropped:
                logger.warning(
                    "usage: %d row(s) dropped while the database was unreachable", self._dropped
                )
                self._dropped = 0
            rows = list(self._pending)
            self._pending.clear()
            try:
                await self.store.add(rows)
            except BaseException:
                # Kept for the next try, before what came meanwhile, within the bound.
                waiting = rows + list(self._pending)
                self._dropped += max(0, len(waiting) - self._max_pending)
                self._pending = deque(waiting, maxlen=self._max_pending)
                raise

    async def _write_forever(self) -> None:
        while True:
            await asyncio.sleep(self._flush_interval)
            try:
                await self.flush()
            except Exception:
                logger.exception("writing usage rows failed; retrying")


async def usage_summary(
    usage: UsageStore,
    keys: KeyStore,
    *,
    since: str | None,
    until: str | None,
    key: str | None,
    bucket: str,
) -> dict[str, Any]:
    """The summary ``GET /api/usage`` and ``tokenrelay usage`` show, from their arguments."""
    now = utcnow()
    try:
        start = parse_time(since, now) if since else now - timedelta(hours=24)
        end = parse_time(until, now) if until else now + timedelta(seconds=1)
    except ValueError:
        raise InvalidRequest(
            "A time is an ISO date or datetime, or an age like 30m, 24h or 7d.", param="since"
        ) from None
    if bucket not in BUCKETS:
        raise InvalidRequest("bucket is one of minute, hour, day.", param="bucket")
    if end <= start:
        raise InvalidRequest("until must be after since.", param="until")
    if (end - start).total_seconds() / _BUCKET_SECONDS[bucket] > MAX_BUCKETS:
        raise InvalidRequest(
            f"That range has more than {MAX_BUCKETS} {bucket}s; use a larger bucket.",
            param="bucket",
        )
    key_id = (await keys.by_name(key)).id if key else None
    bucketed: Bucket = bucket  # type: ignore[assignment]  # checked against BUCKETS above
    return await usage.summary(since=start, until=end, key_id=key_id, bucket=bucketed)
