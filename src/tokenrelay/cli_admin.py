"""``tokenrelay keys`` and ``tokenrelay usage``: the admin's commands, on the server's database.

They work on the database directly (the same one the server uses, by ``TOKENRELAY_DATABASE_URL``
or the default file), so they need no running server and no admin key: whoever can read the
server's settings is its admin already. A running server sees a new or revoked key within
``access.keys.CACHE_SECONDS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Coroutine
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import click
import orjson

if TYPE_CHECKING:
    from tokenrelay.config import Settings
    from tokenrelay.storage.database import Database

__all__ = ["keys", "usable_keys", "usage"]


@contextlib.asynccontextmanager
async def _database(settings: Settings | None = None) -> AsyncIterator[Database]:
    from tokenrelay.config import Settings
    from tokenrelay.storage.database import Database

    settings = settings or Settings()
    database = Database(settings.database_url)
    try:
        await database.migrate()  # only migrate: a server may be running on it right now
        yield database
    finally:
        await database.close()


async def usable_keys(settings: Settings) -> int:
    """How many keys could be used now (``serve`` refuses an open address with none)."""
    from tokenrelay.storage.keys import KeyStore

    async with _database(settings) as database:
        return await KeyStore(database).count_usable()


def _run(work: Coroutine[Any, Any, None]) -> None:
    from tokenrelay.errors import TokenrelayError

    try:
        asyncio.run(work)
    except TokenrelayError as exc:
        raise click.ClickException(exc.message) from None


def _expiry(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter("an ISO date or datetime, e.g. 2027-01-31") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


@click.group()
def keys() -> None:
    """Gateway keys: create, list, revoke."""


@keys.command("create")
@click.option("--name", required=True, help="A name for the key's holder (unique).")
@click.option("--rpm", type=click.IntRange(min=1), help="Requests per minute.")
@click.option("--tpm", type=click.IntRange(min=1), help="Tokens per minute.")
@click.option("--tokens-per-day", type=click.IntRange(min=1), help="Tokens per day.")
@click.option("--models", help="Comma-separated model names it may use [default: all].")
@click.option("--expires", help="Date (UTC) or ISO datetime after which it is refused.")
def create(
    name: str,
    rpm: int | None,
    tpm: int | None,
    tokens_per_day: int | None,
    models: str | None,
    expires: str | None,
) -> None:
    """Create a key and print it, once: only its hash is kept."""
    from tokenrelay.access.keys import create_key
    from tokenrelay.storage.keys import KeyStore

    expires_at = _expiry(expires)
    allowed = [m.strip() for m in models.split(",") if m.strip()] if models else None

    async def work() -> None:
        async with _database() as database:
            record, secret = await create_key(
                KeyStore(database),
                name=name,
                rpm=rpm,
                tpm=tpm,
                tokens_per_day=tokens_per_day,
                models=allowed,
                expires_at=expires_at,
            )
        click.echo(secret)
        click.echo(f"key {record.name!r} created; this is the only time it is shown.", err=True)

    _run(work())


@keys.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per key.")
def list_keys(as_json: bool) -> None:
    """Every key with its limits (never the key itself)."""
    from tokenrelay.storage.keys import KeyStore

    async def work() -> None:
        async with _database() as database:
            records = await KeyStore(database).list()
        if as_json:
            for record in records:
                click.echo(orjson.dumps(record.public()).decode())
            return
        if not records:
            click.echo("no keys (a server on loopback needs none)")
            return
        click.echo(f"{'NAME':20} {'KEY':9} {'RPM':>7} {'TPM':>9} {'TOK/DAY':>10}  MODELS  STATE")
        now = datetime.now(UTC)
        for r in records:
            state = (
                "revoked"
                if r.revoked_at is not None
                else "expired"
                if not r.usable(now)
                else "active"
            )
            click.echo(
                f"{r.name[:20]:20} {r.hint:9} {_n(r.rpm):>7} {_n(r.tpm):>9} "
                f"{_n(r.tokens_per_day):>10}  {','.join(r.models) if r.models else '*'}  {state}"
            )

    _run(work())


def _n(value: int | None) -> str:
    return "-" if value is None else str(value)


@keys.command("revoke")
@click.argument("name")
def revoke(name: str) -> None:
    """Revoke a key; servers refuse it within seconds."""
    from tokenrelay.storage.keys import KeyStore

    async def work() -> None:
        async with _database() as database:
            await KeyStore(database).revoke(name)
        click.echo(f"key {name!r} revoked", err=True)

    _run(work())


@click.command()
@click.option("--key", "key_name", help="One key's usage, by its name.")
@click.option("--since", default="24h", show_default=True, help="ISO time or age: 30m, 24h, 7d.")
@click.option("--until", default=None, help="ISO time or age [default: now].")
@click.option(
    "--bucket", type=click.Choice(["minute", "hour", "day"]), default="hour", show_default=True
)
@click.option("--json", "as_json", is_flag=True, help="The summary as GET /api/usage gives it.")
def usage(key_name: str | None, since: str, until: str | None, bucket: str, as_json: bool) -> None:
    """Requests, tokens, errors and time to first token, by key and by model."""
    from tokenrelay.access.usage import usage_summary
    from tokenrelay.storage.keys import KeyStore
    from tokenrelay.storage.usage import UsageStore

    async def work() -> None:
        async with _database() as database:
            summary = await usage_summary(
                UsageStore(database),
                KeyStore(database),
                since=since,
                until=until,
                key=key_name,
                bucket=bucket,
            )
        if as_json:
            sys.stdout.write(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode() + "\n")
            return
        click.echo(f"usage from {summary['since']} to {summary['until']}")
        _table("TOTAL", [("all", summary["totals"])])
        _table("KEY", [(k["key_name"] or "(no key)", k) for k in summary["by_key"]])
        _table("MODEL", [(m["model"], m) for m in summary["by_model"]])

    _run(work())


def _table(title: str, rows: list[tuple[str, dict[str, Any]]]) -> None:
    click.echo(
        f"\n{title:24} {'REQUESTS':>8} {'PROMPT':>9} {'COMPLETION':>10} {'ERRORS':>6} "
        f"{'LIMITED':>7} {'LEFT':>5} {'TTFT ms':>8}"
    )
    for name, n in rows:
        ttft = "-" if n["ttft_ms_avg"] is None else f"{n['ttft_ms_avg']:.0f}"
        click.echo(
            f"{name[:24]:24} {n['requests']:>8} {n['prompt_tokens']:>9} "
            f"{n['completion_tokens']:>10} {n['errors']:>6} {n['rate_limited']:>7} "
            f"{n['client_left']:>5} {ttft:>8}"
        )
