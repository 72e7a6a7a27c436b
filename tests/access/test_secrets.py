"""No key anywhere it should not be: a run that provokes every upstream error, with a gateway
key, the admin key and the upstream's key in play, and then every response, every log line and
every database column searched for each of them."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import httpx

from access.conftest import ADMIN, ADMIN_KEY, bearer, database_url, make_key
from conftest import relay_to
from fake_upstream import LEAKED_KEY, FakeUpstream

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}]}

_MISBEHAVIOURS: list[dict[str, object]] = [
    {"status": status, "leak_everywhere": True} for status in (400, 401, 403, 404, 429, 500, 503)
] + [
    {"error_after": 2, "leak_everywhere": True},
    {"fail_after": 2},
    {"end_after": 2},
    {"redirect": "http://127.0.0.1:9/elsewhere"},
    {"gzip_bomb": True},
    {"body": "<html>" + LEAKED_KEY + "</html>", "content_type": "text/html"},
    {"body": ""},
]


def test_no_key_leaks_into_responses_logs_or_the_database(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    env = {
        "TOKENRELAY_ADMIN_KEY": ADMIN_KEY,
        "TOKENRELAY_LOG_FORMAT": "json",
        "TOKENRELAY_LOG_LEVEL": "debug",
    }
    with relay_to(fake_upstream, tmp_path, env=env) as relay:
        secret = make_key(relay, "user", rpm=1000, tpm=10**6)
        seen: list[str] = []
        for headers in (bearer(secret), ADMIN):
            for misbehaviour in _MISBEHAVIOURS:
                for stream in (False, True):
                    body = {**CHAT, "stream": stream, "fake": misbehaviour}
                    with httpx.stream(
                        "POST",
                        f"{relay.v1}/chat/completions",
                        json=body,
                        headers=headers,
                        timeout=30,
                    ) as response:
                        seen.append(response.read().decode(errors="replace"))
                        seen.append(str(response.headers))
            conversation = httpx.post(
                f"{relay.url}/api/conversations", json={"model": "fake-model"}, headers=headers
            ).json()["id"]
            fake_upstream.defaults = {"error_after": 1, "leak_everywhere": True}
            try:
                answer = httpx.post(
                    f"{relay.url}/api/conversations/{conversation}/messages",
                    json={"content": "Hello"},
                    headers=headers,
                    timeout=30,
                )
                seen.append(answer.text + str(answer.headers))
                responses = httpx.post(
                    f"{relay.v1}/responses",
                    json={"model": "fake-model", "input": "Hi", "stream": True},
                    headers=headers,
                    timeout=30,
                )
                seen.append(responses.text + str(responses.headers))
            finally:
                fake_upstream.reset()
        for path in ("/api/keys", "/api/usage", "/metrics", "/readyz", "/v1/models"):
            response = httpx.get(f"{relay.url}{path}", headers=ADMIN, timeout=10)
            seen.append(response.text + str(response.headers))
        log = relay.log_text()

    stored = []
    with sqlite3.connect(database_url(relay).removeprefix("sqlite+aiosqlite:///")) as db:
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            stored.extend(str(row) for row in db.execute(f'SELECT * FROM "{table}"'))
    # The run did provoke errors, in responses and in the log.
    assert sum('"error"' in text for text in seen) >= 2 * len(_MISBEHAVIOURS)
    assert "upstream" in log.lower()
    for name, key in (
        ("gateway key", secret),
        ("admin key", ADMIN_KEY),
        ("upstream key", LEAKED_KEY),
    ):
        for where, texts in (("a response", seen), ("the log", [log]), ("the database", stored)):
            for text in texts:
                assert key not in text, f"the {name} is in {where}: {text[:300]}"
                assert key[-12:] not in text, f"part of the {name} is in {where}: {text[:300]}"
    assert "usage" in tables and "api_keys" in tables
