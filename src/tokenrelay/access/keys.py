"""Gateway keys: made here, checked here, and who a request comes from (``Caller``).

A key is ``tr-`` and 43 base64url characters (256 random bits). Only its SHA-256 is stored;
a request's key is hashed and looked up by that hash, then compared in constant time. Lookups
are cached for a few seconds (bounded), so a streamed request costs no database round trip on
the hot path; a revocation through this process clears the cache at once, and one made
elsewhere (the CLI, another replica) takes effect within ``CACHE_SECONDS``.

Auth is *required* when an admin key is configured or any usable key exists; otherwise (a fresh
install on loopback: ``serve`` refuses any other address without keys) the one local user may
call everything, key management included.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.exc import SQLAlchemyError

from tokenrelay.errors import DatabaseUnavailable, Forbidden, InvalidRequest, Unauthorized
from tokenrelay.storage.keys import KeyRecord, KeyStore
from tokenrelay.storage.models import utcnow

__all__ = [
    "CACHE_SECONDS",
    "KEY_PREFIX",
    "OPERATOR",
    "Authenticator",
    "Caller",
    "create_key",
    "hash_secret",
    "hint_of",
    "is_loopback",
    "new_secret",
]

KEY_PREFIX = "tr-"
CACHE_SECONDS = 5.0
_CACHE_SIZE = 10_000
_MAX_SECRET = 200
"""Characters of a presented key read at most: anything longer is no key of ours."""


def is_loopback(host: str) -> bool:
    """Whether a server bound to ``host`` is reachable from this machine only."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a name: it may resolve anywhere
        return False


def new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def hint_of(secret: str) -> str:
    """What lists show of a key: ``tr-…Wx9Q``."""
    return f"{KEY_PREFIX}…{secret[-4:]}"


async def create_key(
    store: KeyStore,
    *,
    name: str,
    rpm: int | None = None,
    tpm: int | None = None,
    tokens_per_day: int | None = None,
    models: Sequence[str] | None = None,
    expires_at: datetime | None = None,
) -> tuple[KeyRecord, str]:
    """Make a key: its record, and its secret, which exists only in this return value."""
    if expires_at is not None and expires_at <= utcnow():
        raise InvalidRequest("A key's expiry must be in the future.", param="expires_at")
    secret = new_secret()
    record = await store.create(
        name=name,
        secret_hash=hash_secret(secret),
        hint=hint_of(secret),
        rpm=rpm,
        tpm=tpm,
        tokens_per_day=tokens_per_day,
        models=models,
        expires_at=expires_at,
    )
    return record, secret


@dataclass(frozen=True, slots=True)
class Caller:
    """Who a request comes from: a key's holder, the admin, or the local user of a server
    that requires no key (who is also its admin)."""

    key: KeyRecord | None
    admin: bool

    @property
    def key_id(self) -> str | None:
        return self.key.id if self.key is not None else None

    def require_admin(self) -> None:
        if not self.admin:
            raise Forbidden(
                "This needs the admin key (TOKENRELAY_ADMIN_KEY).", code="admin_key_required"
            )


OPERATOR = Caller(key=None, admin=True)
"""The server's operator: the admin key's holder, or the local user of a server that needs no
key (and the terminal's user)."""


class Authenticator:
    """Turns a request's key into a ``Caller``, or refuses it."""

    def __init__(self, store: KeyStore, *, admin_key: str | None, always: bool = False) -> None:
        """``always``: a key is required even with none defined (a non-loopback server: one
        whose last key was revoked must not fall open)."""
        self._store = store
        self._always = always
        self._admin_hash = hash_secret(admin_key) if admin_key else None
        self._cache: OrderedDict[str, tuple[float, KeyRecord | None]] = OrderedDict()
        self._required: tuple[float, bool] = (0.0, False)

    async def required(self) -> bool:
        """Whether requests need a key: always off loopback, else when an admin key is set or
        any usable key exists."""
        if self._always or self._admin_hash is not None:
            return True
        checked, required = self._required
        now = time.monotonic()
        if now - checked < CACHE_SECONDS:
            return required
        try:
            required = await self._store.count_usable() > 0
        except SQLAlchemyError as exc:
            raise _unreachable() from exc
        self._required = (now, required)
        return required

    async def identify(self, secret: str | None) -> Caller:
        """The caller presenting ``secret`` (None: no key was sent)."""
        if not await self.required():
            return OPERATOR
        if not secret:
            raise Unauthorized(
                "You didn't provide an API key. Send it as `Authorization: Bearer tr-...`."
            )
        if len(secret) > _MAX_SECRET:
            raise Unauthorized("Incorrect API key provided.")
        digest = hash_secret(secret)
        if self._admin_hash is not None and hmac.compare_digest(digest, self._admin_hash):
            return OPERATOR
        record = await self._lookup(digest)
        if record is None or not hmac.compare_digest(record.secret_hash, digest):
            raise Unauthorized("Incorrect API key provided.")
        if record.revoked_at is not None:
            raise Unauthorized("This API key has been revoked.")
        if not record.usable(utcnow()):
            raise Unauthorized("This API key has expired.")
        return Caller(key=record, admin=False)

    def forget(self) -> None:
        """Drop every cached lookup (a key was created or revoked here)."""
        self._cache.clear()
        self._required = (0.0, False)

    async def _lookup(self, digest: str) -> KeyRecord | None:
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and now - cached[0] < CACHE_SECONDS:
            return cached[1]
        try:
            record = await self._store.find(digest)
        except SQLAlchemyError as exc:  # keys seen in the last seconds still work
            raise _unreachable() from exc
        self._cache[digest] = (now, record)
        self._cache.move_to_end(digest)
        while len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return record


def _unreachable() -> DatabaseUnavailable:
    return DatabaseUnavailable("The database cannot be reached to check this API key.")
