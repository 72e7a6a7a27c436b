"""The usage ledger: one row per request to a model, written in batches.

``record`` is synchronous and only appends to a list (it runs as an answer ends, on the answer's
task); a background task writes what is pending every ``flush_interval`` seconds in one
transaction. Bounded: past ``max_pending`` rows (the database is down, say) the oldest are
dropped and counted in a warning, rather than the gateway's memory growing. On shutdown what
is pending is written.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

from tokenrelay.storage.usage import UsageRow, UsageStore

__all__ = ["UsageLedger", "parse_time"]

_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_time(text: str, now: datetime) -> datetime:
    """``2026-11-30``, ``2026-11-30T15:00:00+00:00`` (UTC if no zone), or an age before
    ``now``: ``30m``, ``24h``, ``7d``, ``2w``. Raises ``ValueError`` for anything else."""
    text = text.strip()
    unit = _UNITS.get(text[-1:].lower())
    if unit is not None and text[:-1].isdigit():
        return now - timedelta(seconds=int(text[:-1]) * unit)
    value = datetime.fromisoformat(text)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


logger = logging.getLogger(__name__)


class UsageLedger:
    def __init__(
        self, store: UsageStore, *, flush_interval: float = 1.0, max_pending: int = 50_000
    ) -> None:
        self.store = store
        self._pending: list[UsageRow] = []
        self._flush_interval = flush_interval
        self._max_pending = max_pending
        self._dropped = 0
        self._writer: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def record(self, row: UsageRow) -> None:
        self._pending.append(row)
        if len(self._pending) > self._max_pending:
            del self._pending[0]
            self._dropped += 1

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
            rows, self._pending = self._pending, []
            try:
                await self.store.add(rows)
            except BaseException:
                self._pending[:0] = rows  # kept for the next try, within the bound
                del self._pending[: max(0, len(self._pending) - self._max_pending)]
                raise

    async def _write_forever(self) -> None:
        while True:
            await asyncio.sleep(self._flush_interval)
            try:
                await self.flush()
            except Exception:
                logger.exception("writing usage rows failed; retrying")
