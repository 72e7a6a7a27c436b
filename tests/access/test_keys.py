"""Gateway keys over real sockets: who may call, with which key, for which model.

A server with the admin key set requires a key on every route but the pages and health checks;
keys are made over HTTP (admin) or with ``tokenrelay keys``, stored hashed, refused once revoked
or expired; a key limited to some models gets 403 for the others. Without keys, a loopback
server needs none, and ``serve`` refuses a non-loopback address unless told otherwise.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import openai
import pytest

from access.conftest import (
    ADMIN,
    ADMIN_KEY,
    bearer,
    cli,
    database_url,
    eventually,
    make_key,
)
from conftest import Relay, assert_openai_error, relay_to, start_tokenrelay
from fake_upstream import FakeUpstream, expected_text
from postgres_server import fresh_database, require_postgres
from tcp_proxy import DroppingProxy

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}]}


@pytest.fixture(scope="module")
def keyed(fake_upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    """A server that requires keys: the admin key is set."""
    with relay_to(
        fake_upstream,
        tmp_path_factory.mktemp("keyed"),
        env={"TOKENRELAY_ADMIN_KEY": ADMIN_KEY},
    ) as relay:
        yield relay


def test_no_key_or_a_wrong_one_is_401_in_openais_shape(keyed: Relay) -> None:
    missing = httpx.post(f"{keyed.v1}/chat/completions", json=CHAT, timeout=10)
    assert_openai_error(missing, 401, code="invalid_api_key")
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = httpx.get(f"{keyed.v1}/models", headers=bearer("tr-" + "x" * 43), timeout=10)
    assert_openai_error(wrong, 401, code="invalid_api_key")
    not_bearer = httpx.get(f"{keyed.v1}/models", headers={"Authorization": "Basic abc"})
    assert_openai_error(not_bearer, 401, code="invalid_api_key")
    # Key management needs the admin key, and so does a conversation list.
    assert_openai_error(httpx.get(f"{keyed.url}/api/keys", timeout=10), 401)
    assert_openai_error(httpx.get(f"{keyed.url}/api/conversations", timeout=10), 401)


def test_pages_and_health_checks_need_no_key(keyed: Relay) -> None:
    for path in ("/", "/usage", "/healthz", "/readyz", "/openapi.json"):
        response = httpx.get(f"{keyed.url}{path}", timeout=10)
        assert response.status_code == 200, (path, response.text)


def test_a_key_made_over_http_works_with_the_openai_sdk(keyed: Relay) -> None:
    created = httpx.post(
        f"{keyed.url}/api/keys", json={"name": "sdk-user", "rpm": 100}, headers=ADMIN, timeout=10
    )
    assert created.status_code == 201, created.text
    secret = created.json()["key"]
    assert secret.startswith("tr-") and len(secret) == 46
    client = openai.OpenAI(base_url=keyed.v1, api_key=secret, max_retries=0)
    whole = client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    assert whole.choices[0].message.content == expected_text(5)
    streamed = client.chat.completions.create(**CHAT, stream=True)  # type: ignore[call-overload]
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == (
        expected_text(5)
    )
    # Azure clients send the key as `api-key`.
    azure = httpx.get(f"{keyed.v1}/models", headers={"api-key": secret}, timeout=10)
    assert azure.status_code == 200, azure.text
    # The list never shows the secret, only its hint; nor does the database hold it.
    listed = httpx.get(f"{keyed.url}/api/keys", headers=ADMIN, timeout=10).json()["data"]
    mine = next(k for k in listed if k["name"] == "sdk-user")
    assert mine["hint"] == "tr-…" + secret[-4:] and mine["rpm"] == 100
    assert secret not in str(listed) and secret[3:20] not in str(listed)
    with sqlite3.connect(database_url(keyed).removeprefix("sqlite+aiosqlite:///")) as db:
        rows = db.execute("SELECT * FROM api_keys").fetchall()
    assert secret not in str(rows)
    assert hashlib.sha256(secret.encode()).hexdigest() in str(rows)


def test_a_key_is_not_an_admin(keyed: Relay) -> None:
    secret = make_key(keyed, "not-admin")
    for method, path in (("GET", "/api/keys"), ("GET", "/api/usage"), ("DELETE", "/api/keys/x")):
        response = httpx.request(method, f"{keyed.url}{path}", headers=bearer(secret))
        assert_openai_error(response, 403, code="admin_key_required")


def test_a_key_limited_to_models_gets_403_for_others(keyed: Relay) -> None:
    secret = make_key(keyed, "only-a", models=["fake-other"])
    allowed = httpx.post(
        f"{keyed.v1}/chat/completions",
        json={**CHAT, "model": "fake-other"},
        headers=bearer(secret),
        timeout=10,
    )
    assert allowed.status_code == 200, allowed.text
    refused = httpx.post(
        f"{keyed.v1}/chat/completions", json=CHAT, headers=bearer(secret), timeout=10
    )
    assert_openai_error(refused, 403, code="model_not_allowed", param="model")
    responses = httpx.post(
        f"{keyed.v1}/responses",
        json={"model": "fake-model", "input": "Hi"},
        headers=bearer(secret),
        timeout=10,
    )
    assert_openai_error(responses, 403, code="model_not_allowed")


def test_revoked_at_once_here(keyed: Relay) -> None:
    secret = make_key(keyed, "short-lived")
    assert httpx.get(f"{keyed.v1}/models", headers=bearer(secret)).status_code == 200
    revoked = httpx.delete(f"{keyed.url}/api/keys/short-lived", headers=ADMIN, timeout=10)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"]
    after = httpx.get(f"{keyed.v1}/models", headers=bearer(secret), timeout=10)
    assert "revoked" in str(assert_openai_error(after, 401, code="invalid_api_key")["message"])
    again = httpx.post(
        f"{keyed.url}/api/keys", json={"name": "short-lived"}, headers=ADMIN, timeout=10
    )
    assert_openai_error(again, 409, code="key_exists")


def test_an_expired_key_is_refused(keyed: Relay) -> None:
    from tokenrelay.access.keys import hash_secret, hint_of, new_secret
    from tokenrelay.storage.database import Database
    from tokenrelay.storage.keys import KeyStore

    secret = new_secret()

    async def store_expired() -> None:
        async with Database(database_url(keyed)) as database:
            await KeyStore(database).create(
                name="expired",
                secret_hash=hash_secret(secret),
                hint=hint_of(secret),
                expires_at=datetime.now(UTC) - timedelta(minutes=1),
            )

    asyncio.run(store_expired())
    response = httpx.get(f"{keyed.v1}/models", headers=bearer(secret), timeout=10)
    assert "expired" in str(assert_openai_error(response, 401)["message"])


def test_bad_key_requests_are_400_not_500(keyed: Relay) -> None:
    for body in (
        {"name": ""},
        {"name": "x", "rpm": 0},
        {"name": "x", "expires_at": "2020-01-01"},
        {"name": "x", "expires_at": "2020-01-01T00:00:00Z"},
        {"name": "x", "bad": 1},
    ):
        response = httpx.post(f"{keyed.url}/api/keys", json=body, headers=ADMIN, timeout=10)
        assert_openai_error(response, 400)
    assert_openai_error(httpx.delete(f"{keyed.url}/api/keys/nobody", headers=ADMIN), 404)


def test_cli_keys_on_a_running_servers_database(keyed: Relay, tmp_path: Path) -> None:
    database = database_url(keyed)
    created = cli(
        "keys",
        "create",
        "--name",
        "from-cli",
        "--rpm",
        "7",
        "--models",
        "fake-other,b",
        database=database,
        cwd=tmp_path,
    )
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    assert secret.startswith("tr-") and "only time" in created.stderr
    listed = cli("keys", "list", database=database, cwd=tmp_path)
    assert "from-cli" in listed.stdout and secret not in listed.stdout + listed.stderr
    assert secret[-4:] in listed.stdout
    ok = httpx.post(
        f"{keyed.v1}/chat/completions",
        json={**CHAT, "model": "fake-other"},
        headers=bearer(secret),
        timeout=10,
    )
    assert ok.status_code == 200, ok.text
    assert cli("keys", "revoke", "from-cli", database=database, cwd=tmp_path).returncode == 0

    def refused() -> bool | None:
        response = httpx.get(f"{keyed.v1}/models", headers=bearer(secret), timeout=10)
        return True if response.status_code == 401 else None

    # The server's cache holds a lookup for CACHE_SECONDS (5 s).
    eventually(refused, within=15, what="a key revoked with the CLI is refused")
    missing = cli("keys", "revoke", "nobody", database=database, cwd=tmp_path)
    assert (
        missing.returncode == 1 and "nobody" in missing.stderr and "Traceback" not in missing.stderr
    )


def test_loopback_without_keys_needs_none_until_the_first_key(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    with relay_to(fake_upstream, tmp_path) as relay:
        open_call = httpx.post(f"{relay.v1}/chat/completions", json=CHAT, timeout=10)
        assert open_call.status_code == 200, open_call.text
        # The local user is the admin of a server that needs no key...
        created = httpx.post(f"{relay.url}/api/keys", json={"name": "first"}, timeout=10)
        assert created.status_code == 201, created.text
        secret = created.json()["key"]
        # ...and once a key exists, every call needs one.
        closed = httpx.post(f"{relay.v1}/chat/completions", json=CHAT, timeout=10)
        assert_openai_error(closed, 401)
        keyed_call = httpx.post(
            f"{relay.v1}/chat/completions", json=CHAT, headers=bearer(secret), timeout=10
        )
        assert keyed_call.status_code == 200


def test_serve_refuses_an_open_address_without_keys(tmp_path: Path) -> None:
    database = f"sqlite+aiosqlite:///{tmp_path / 'tokenrelay.db'}"
    refused = cli("serve", "--host", "0.0.0.0", "--port", "9", database=database, cwd=tmp_path)
    assert refused.returncode == 1
    message = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(message) == 1 and "--insecure-no-auth" in message[0], refused.stderr
    assert "Traceback" not in refused.stderr


def test_serve_on_an_open_address_with_insecure_no_auth(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    from conftest import fake_provider_toml

    with start_tokenrelay(
        tmp_path,
        config_toml=fake_provider_toml(fake_upstream.base_url),
        env={"TOKENRELAY_LOCAL__ENABLED": "false"},
        host="0.0.0.0",
        args=["--insecure-no-auth"],
    ) as relay:
        assert httpx.post(f"{relay.v1}/chat/completions", json=CHAT).status_code == 200


def test_serve_on_an_open_address_with_a_key_requires_it(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    from conftest import fake_provider_toml

    database = f"sqlite+aiosqlite:///{tmp_path / 'tokenrelay.db'}"
    secret = cli("keys", "create", "--name", "k", database=database, cwd=tmp_path).stdout.strip()
    with start_tokenrelay(
        tmp_path,
        config_toml=fake_provider_toml(fake_upstream.base_url),
        env={"TOKENRELAY_LOCAL__ENABLED": "false"},
        host="0.0.0.0",
    ) as relay:
        assert_openai_error(httpx.post(f"{relay.v1}/chat/completions", json=CHAT), 401)
        ok = httpx.post(f"{relay.v1}/chat/completions", json=CHAT, headers=bearer(secret))
        assert ok.status_code == 200
        # Revoking the last key does not open it: off loopback a key is always required.
        assert cli("keys", "revoke", "k", database=database, cwd=tmp_path).returncode == 0

        def refused() -> bool | None:
            response = httpx.get(f"{relay.v1}/models", headers=bearer(secret))
            return True if response.status_code == 401 else None

        eventually(refused, within=15, what="the revoked key is refused")
        assert_openai_error(httpx.get(f"{relay.v1}/models"), 401)


def test_cli_ask_through_a_server_that_requires_a_key(keyed: Relay, tmp_path: Path) -> None:
    secret = make_key(keyed, "terminal")
    database = database_url(keyed)
    refused = cli("ask", "--url", keyed.url, "Hi", database=database, cwd=tmp_path)
    assert refused.returncode == 1 and "API key" in refused.stderr, refused.stderr
    answered = cli(
        "ask",
        "--url",
        keyed.url,
        "-m",
        "fake-model",
        "Hi",
        database=database,
        cwd=tmp_path,
        TOKENRELAY_API_KEY=secret,
    )
    assert answered.returncode == 0, answered.stderr
    assert answered.stdout.strip() == expected_text(5).strip()


def test_keys_without_the_database_are_a_503_and_known_keys_go_on(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    """The database goes away: a key looked up in the last seconds still works, a key it would
    have to look up is refused with 503 in OpenAI's shape (never let through, never a 500)."""
    admin_url = require_postgres()
    with fresh_database(admin_url) as database_url:
        host = database_url.split("@", 1)[1].split("/", 1)[0]
        proxy = DroppingProxy(f"tcp://{host}")
        env = {
            "TOKENRELAY_ADMIN_KEY": ADMIN_KEY,
            "TOKENRELAY_DATABASE_URL": database_url.replace(host, f"127.0.0.1:{proxy.port}"),
        }
        try:
            with relay_to(fake_upstream, tmp_path, env=env) as relay:
                known, unseen = make_key(relay, "known"), make_key(relay, "unseen")
                ok = httpx.get(f"{relay.v1}/models", headers=bearer(known), timeout=10)
                assert ok.status_code == 200
                proxy.drop()
                still = httpx.get(f"{relay.v1}/models", headers=bearer(known), timeout=10)
                assert still.status_code == 200, still.text
                refused = httpx.get(f"{relay.v1}/models", headers=bearer(unseen), timeout=60)
                assert_openai_error(refused, 503, code="database_unavailable")
                proxy.restore()
        finally:
            proxy.close()
