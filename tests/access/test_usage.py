"""Usage accounting over real sockets: a row per call to a model, whoever made it and however it
ended, and the same summary from ``GET /api/usage`` and ``tokenrelay usage``.

A streamed call is accounted for even when its client did not ask for usage (the upstream is
asked, and the client never sees that chunk) and even when its client left before the end.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from access.conftest import ADMIN, ADMIN_KEY, bearer, cli, database_url, eventually, make_key
from conftest import Relay, relay_to, without_event_ids
from fake_upstream import FakeUpstream, expected_text

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "Hi there"}]}


@pytest.fixture()
def keyed(fake_upstream: FakeUpstream, tmp_path: Path) -> Iterator[Relay]:
    """A server of the test's own: its usage table holds only that test's calls."""
    with relay_to(fake_upstream, tmp_path, env={"TOKENRELAY_ADMIN_KEY": ADMIN_KEY}) as relay:
        yield relay


def _rows(relay: Relay) -> list[dict[str, Any]]:
    """The usage rows, once ``/api/usage`` has made the server write what it holds."""
    assert httpx.get(f"{relay.url}/api/usage", headers=ADMIN, timeout=10).status_code == 200
    path = database_url(relay).removeprefix("sqlite+aiosqlite:///")
    with sqlite3.connect(path) as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute("SELECT * FROM usage ORDER BY id")]


def test_a_stream_is_accounted_for_without_showing_usage(
    keyed: Relay, fake_upstream: FakeUpstream
) -> None:
    secret = make_key(keyed, "streamer")
    client = openai.OpenAI(base_url=keyed.v1, api_key=secret, max_retries=0)
    chunks = list(client.chat.completions.create(**CHAT, stream=True))  # type: ignore[call-overload]
    assert all(chunk.usage is None and chunk.choices for chunk in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected_text(5)
    sent = fake_upstream.last_request().json
    assert sent["stream_options"] == {"include_usage": True}
    [row] = _rows(keyed)
    assert row["prompt_tokens"] == 2 and row["completion_tokens"] == 5
    assert row["status"] == "complete" and not row["client_left"] and not row["estimated"]
    assert row["route"] == "/v1/chat/completions" and row["model"] == "fake-model"
    assert row["provider"] == "fake" and row["ttft_ms"] is not None
    key_id = httpx.get(f"{keyed.url}/api/keys", headers=ADMIN).json()["data"][0]["id"]
    assert row["key_id"] == key_id


def test_a_client_that_asked_for_usage_gets_it_unchanged(
    keyed: Relay, fake_upstream: FakeUpstream
) -> None:
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{keyed.v1}/chat/completions", json=body, headers=ADMIN) as r:
        received = r.read()
    assert without_event_ids(received) == bytes(fake_upstream.last_request().sent)
    assert b'"choices":[]' in received
    [row] = _rows(keyed)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (2, 5)


def test_a_client_that_left_is_accounted_for(keyed: Relay, fake_upstream: FakeUpstream) -> None:
    body = {**CHAT, "stream": True, "fake": {"tokens": 50, "gate": "left", "gate_after": 10}}
    with httpx.stream("POST", f"{keyed.v1}/chat/completions", json=body, headers=ADMIN) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data:")
            if seen == 11:  # the role chunk and 10 words: the upstream is held now
                break
    record = fake_upstream.last_request()
    assert record.wait_for_outcome(10) == "abandoned"

    def stopped_row() -> dict[str, Any] | None:
        rows = _rows(keyed)
        return rows[0] if rows else None

    row = eventually(stopped_row, within=10, what="the row of a stream whose client left")
    assert row["status"] == "stopped" and row["client_left"] and row["estimated"]
    assert row["completion_tokens"] >= 10 and row["prompt_tokens"] > 0


def test_a_resumable_stream_runs_on_and_gets_its_real_usage(
    keyed: Relay, fake_upstream: FakeUpstream
) -> None:
    body = {**CHAT, "stream": True, "fake": {"tokens": 30, "delay": 0.01}}
    headers = {**ADMIN, "X-Tokenrelay-Resumable": "true"}
    with httpx.stream("POST", f"{keyed.v1}/chat/completions", json=body, headers=headers) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break  # leave after the first chunk; the answer goes on for stream_grace
    assert fake_upstream.last_request().wait_for_outcome(15) == "completed"

    def finished_row() -> dict[str, Any] | None:
        rows = _rows(keyed)
        return rows[0] if rows and rows[0]["status"] == "complete" else None

    row = eventually(finished_row, within=10, what="the row of the finished answer")
    assert row["completion_tokens"] == 30 and row["client_left"] and not row["estimated"]


def test_whole_errors_and_refusals_each_have_a_row(keyed: Relay) -> None:
    limited = make_key(keyed, "one-rpm", rpm=1)
    whole = httpx.post(f"{keyed.v1}/chat/completions", json=CHAT, headers=bearer(limited))
    assert whole.status_code == 200
    assert (
        httpx.post(f"{keyed.v1}/chat/completions", json=CHAT, headers=bearer(limited)).status_code
        == 429
    )
    failing = {**CHAT, "fake": {"status": 500}}
    assert httpx.post(f"{keyed.v1}/chat/completions", json=failing, headers=ADMIN).status_code
    in_band = {**CHAT, "stream": True, "fake": {"tokens": 10, "error_after": 2}}
    httpx.post(f"{keyed.v1}/chat/completions", json=in_band, headers=ADMIN).read()
    rows = _rows(keyed)
    assert [r["status"] for r in rows] == ["complete", "rate_limited", "error", "error"]
    assert (rows[0]["prompt_tokens"], rows[0]["completion_tokens"]) == (2, 5)
    assert rows[0]["ttft_ms"] == rows[0]["duration_ms"]
    assert rows[2]["key_id"] is None  # the admin is no key's holder
    assert (rows[2]["prompt_tokens"], rows[2]["completion_tokens"]) == (0, 0)


def test_the_api_and_the_cli_give_the_same_summary(keyed: Relay, tmp_path: Path) -> None:
    alice, bob = make_key(keyed, "alice"), make_key(keyed, "bob")
    for key, stream in ((alice, False), (alice, True), (bob, True)):
        body = {**CHAT, "stream": stream}
        httpx.post(f"{keyed.v1}/chat/completions", json=body, headers=bearer(key)).read()
    httpx.post(
        f"{keyed.v1}/completions",
        json={"model": "fake-other", "prompt": "Say hi"},
        headers=bearer(bob),
    )
    api = httpx.get(
        f"{keyed.url}/api/usage", params={"since": "1h", "bucket": "minute"}, headers=ADMIN
    ).json()
    assert api["totals"]["requests"] == 4
    assert api["totals"]["completion_tokens"] == 20
    by_key = {k["key_name"]: k["requests"] for k in api["by_key"]}
    assert by_key == {"alice": 2, "bob": 2}
    assert {m["model"]: m["requests"] for m in api["by_model"]} == {
        "fake-model": 3,
        "fake-other": 1,
    }
    assert sum(s["requests"] for s in api["series"]) == 4
    printed = cli(
        "usage",
        "--since",
        "1h",
        "--bucket",
        "minute",
        "--json",
        database=database_url(keyed),
        cwd=tmp_path,
    )
    assert printed.returncode == 0, printed.stderr
    summary = json.loads(printed.stdout)
    for part in ("totals", "by_key", "by_model", "series"):
        assert summary[part] == api[part], part
    one = httpx.get(f"{keyed.url}/api/usage", params={"key": "alice"}, headers=ADMIN).json()
    assert one["totals"]["requests"] == 2
    table = cli("usage", "--key", "bob", database=database_url(keyed), cwd=tmp_path)
    assert "bob" in table.stdout and "alice" not in table.stdout


def test_bad_usage_queries_are_400(keyed: Relay) -> None:
    for params in (
        {"since": "yesterday"},
        {"bucket": "week"},
        {"since": "90d", "bucket": "minute"},
        {"since": "1h", "until": "2h"},
        {"since": "3000000d"},
        {"since": "99999999999d"},
    ):
        response = httpx.get(f"{keyed.url}/api/usage", params=params, headers=ADMIN)
        assert response.status_code == 400, (params, response.text)
    assert (
        httpx.get(f"{keyed.url}/api/usage", params={"key": "nobody"}, headers=ADMIN).status_code
        == 404
    )


def test_with_accounting_off_nothing_is_asked_or_kept(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    with relay_to(fake_upstream, tmp_path, env={"TOKENRELAY_USAGE_ACCOUNTING": "false"}) as relay:
        raw = (
            b'{"model": "fake-model", "stream": true,'
            b' "messages": [{"role": "user", "content": "Hi"}]}'
        )
        with httpx.stream(
            "POST",
            f"{relay.v1}/chat/completions",
            content=raw,
            headers={"Content-Type": "application/json"},
        ) as response:
            response.read()
        assert fake_upstream.last_request().body == raw  # not a byte changed
        assert _rows(relay) == []
