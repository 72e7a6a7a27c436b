"""What the gateway-key tests share: an admin key, making keys over HTTP, running the CLI."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx

from conftest import NO_LOCAL_MODEL, Relay, _clean_env

ADMIN_KEY = "tr-admin-" + "A1b2C3d4" * 5
"""The admin key the servers of these tests are given (``TOKENRELAY_ADMIN_KEY``)."""

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}

T = TypeVar("T")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def make_key(relay: Relay, name: str, **fields: Any) -> str:
    """Create a key through ``POST /api/keys`` with the admin key; its secret."""
    response = httpx.post(
        f"{relay.url}/api/keys", json={"name": name, **fields}, headers=ADMIN, timeout=10
    )
    assert response.status_code == 201, response.text
    secret: str = response.json()["key"]
    return secret


def database_url(relay: Relay) -> str:
    """The SQLite database ``start_tokenrelay`` gave ``relay``."""
    return f"sqlite+aiosqlite:///{relay.log_path.parent / 'tokenrelay.db'}"


def cli(*args: str, database: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m tokenrelay ...`` on ``database``, with a clean environment."""
    return subprocess.run(
        [sys.executable, "-m", "tokenrelay", *args],
        env=_clean_env({**NO_LOCAL_MODEL, "TOKENRELAY_DATABASE_URL": database, **env}),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def eventually(check: Callable[[], T | None], *, within: float, what: str) -> T:
    """Poll ``check`` until it returns something other than None (a state that another process
    reaches in its own time, such as a cache expiring); fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within} s: {what}")
        time.sleep(0.1)
