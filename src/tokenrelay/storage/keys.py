"""Gateway keys as stored: created with a secret shown once, found by the secret's hash.

Every lookup goes through the ORM with bound parameters, never SQL built from a header (one of
LiteLLM's CVEs was an injection through ``Authorization``). The secret itself is never stored:
``secret_hash`` is all a stolen database holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tokenrelay.errors import InvalidRequest, TokenrelayError
from tokenrelay.storage.database import Database
from tokenrelay.storage.models import ApiKey, utcnow

__all__ = ["KeyExists", "KeyNotFound", "KeyRecord", "KeyStore"]


class KeyNotFound(TokenrelayError):
    status = 404
    type = "invalid_request_error"
    code = "key_not_found"

    def __init__(self, name: str) -> None:
        super().__init__(f"No key is named {name!r}.", param="name")


class KeyExists(TokenrelayError):
    status = 409
    type = "invalid_request_error"
    code = "key_exists"

    def __init__(self, name: str) -> None:
        super().__init__(f"A key named {name!r} exists already.", param="name")


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A key as everyone but its holder sees it: no secret, only its ``hint``."""

    id: str
    name: str
    hint: str
    secret_hash: str
    rpm: int | None
    tpm: int | None
    tokens_per_day: int | None
    models: tuple[str, ...] | None
    expires_at: datetime | None
    created_at: datetime
    revoked_at: datetime | None

    def usable(self, now: datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models

    @property
    def limits_tokens(self) -> bool:
        return bool(self.tpm or self.tokens_per_day)

    @property
    def limited(self) -> bool:
        return bool(self.rpm) or self.limits_tokens

    def public(self) -> dict[str, object]:
        """What ``keys list`` and ``GET /api/keys`` show (never the hash)."""
        return {
            "id": self.id,
            "name": self.name,
            "hint": self.hint,
            "rpm": self.rpm,
            "tpm": self.tpm,
            "tokens_per_day": self.tokens_per_day,
            "models": list(self.models) if self.models is not None else None,
            "expires_at": _iso(self.expires_at),
            "created_at": _iso(self.created_at),
            "revoked_at": _iso(self.revoked_at),
        }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


class KeyStore:
    """Create, list, find and revoke keys; each method is one short transaction."""

    def __init__(self, database: Database) -> None:
        self._sessions: async_sessionmaker[AsyncSession] = database.sessions

    async def create(
        self,
        *,
        name: str,
        secret_hash: str,
        hint: str,
        rpm: int | None = None,
        tpm: int | None = None,
        tokens_per_day: int | None = None,
        models: Sequence[str] | None = None,
        expires_at: datetime | None = None,
    ) -> KeyRecord:
        name = name.strip()
        if not name or len(name) > 100:
            raise InvalidRequest("A key's name is 1 to 100 characters.", param="name")
        row = ApiKey(
            name=name,
            secret_hash=secret_hash,
            hint=hint,
            rpm=rpm,
            tpm=tpm,
            tokens_per_day=tokens_per_day,
            models=list(models) if models is not None else None,
            expires_at=expires_at,
            created_at=utcnow(),
        )
        try:
            async with self._sessions.begin() as session:
                session.add(row)
        except IntegrityError:
            raise KeyExists(name) from None
        return _record(row)

    async def list(self) -> list[KeyRecord]:
        async with self._sessions() as session:
            rows = await session.scalars(sa.select(ApiKey).order_by(ApiKey.created_at, ApiKey.id))
            return [_record(row) for row in rows]

    async def find(self, secret_hash: str) -> KeyRecord | None:
        async with self._sessions() as session:
            row = await session.scalar(sa.select(ApiKey).where(ApiKey.secret_hash == secret_hash))
            return _record(row) if row is not None else None

    async def by_name(self, name: str) -> KeyRecord:
        async with self._sessions() as session:
            row = await session.scalar(sa.select(ApiKey).where(ApiKey.name == name))
            if row is None:
                raise KeyNotFound(name)
            return _record(row)

    async def revoke(self, name: str) -> KeyRecord:
        """Revoke the key named ``name`` (revoking twice keeps the first time)."""
        async with self._sessions.begin() as session:
            row = await session.scalar(sa.select(ApiKey).where(ApiKey.name == name))
            if row is None:
                raise KeyNotFound(name)
            if row.revoked_at is None:
                row.revoked_at = utcnow()
            return _record(row)

    async def count_usable(self) -> int:
        """Keys neither revoked nor expired: with none, a loopback server needs no key."""
        now = utcnow()
        async with self._sessions() as session:
            count = await session.scalar(
                sa.select(sa.func.count())
                .select_from(ApiKey)
                .where(ApiKey.revoked_at.is_(None))
                .where(sa.or_(ApiKey.expires_at.is_(None), ApiKey.expires_at > now))
            )
            return int(count or 0)


def _record(row: ApiKey) -> KeyRecord:
    return KeyRecord(
        id=row.id,
        name=row.name,
        hint=row.hint,
        secret_hash=row.secret_hash,
        rpm=row.rpm,
        tpm=row.tpm,
        tokens_per_day=row.tokens_per_day,
        models=tuple(row.models) if row.models is not None else None,
        expires_at=row.expires_at,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
    )
