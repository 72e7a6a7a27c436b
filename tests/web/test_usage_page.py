"""The pages on a tokenrelay that needs keys: the chat page's key, and the admin's usage page.

Each test gets a server of its own with ``TOKENRELAY_ADMIN_KEY`` set (so every request needs a
key) and a fresh database, whose usage the page, ``GET /api/usage`` and ``tokenrelay usage
--json`` must count alike.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from conftest import Relay, _clean_env, relay_to
from fake_upstream import FakeUpstream

from .conftest import reload_chat, send_prompt

pytest.importorskip("playwright.sync_api", reason="Playwright is not installed")

from playwright.sync_api import Page, expect

ADMIN_KEY = "test-admin-key-4b1d9e"
SINCE, BUCKET = "24h", "hour"
"""The usage page's default range, asked of the API and the CLI too."""
_USAGE_DEADLINE = 15.0
"""Seconds for a request's usage row to be written after its answer ended."""
_FIGURES = (
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "errors",
    "rate_limited",
    "client_left",
    "ttft_ms_avg",
)
"""The columns of the page's tables after the name, in order."""
_NO_FIGURE = "\u2013"
"""What the page shows for an average of nothing (an en dash)."""

# For each of the usage page's charts: how many pixels of its canvas have the colour of one of
# its lines (as its legend shows them, after the time axis' entry), within a little antialiasing.
_LINE_PIXELS = """() => [...document.querySelectorAll(".plot")].map((plot) => {
  const canvas = plot.querySelector("canvas");
  const colours = [...plot.querySelectorAll(".u-series:not(:first-child) .u-marker")]
    .map((marker) => getComputedStyle(marker).borderColor.match(/\\d+/g)?.slice(0, 3).map(Number))
    .filter(Boolean);
  const { data } = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height);
  let count = 0;
  for (let at = 0; at < data.length; at += 4) {
    const near = (c) => Math.abs(data[at] - c[0]) + Math.abs(data[at + 1] - c[1])
      + Math.abs(data[at + 2] - c[2]) < 24;
    if (data[at + 3] > 200 && colours.some(near)) count += 1;
  }
  return { chart: plot.dataset.chart, width: canvas.width, height: canvas.height, count };
})"""


@pytest.fixture
def keyed_relay(fake_upstream: FakeUpstream, tmp_path: Path) -> Iterator[Relay]:
    """A tokenrelay that needs a key, its database in ``tmp_path`` (see ``_database_url``)."""
    with relay_to(fake_upstream, tmp_path, env={"TOKENRELAY_ADMIN_KEY": ADMIN_KEY}) as relay:
        yield relay


def _database_url(tmp_path: Path) -> str:
    """The database ``start_tokenrelay`` gives a server started in ``tmp_path``."""
    return f"sqlite+aiosqlite:///{tmp_path / 'tokenrelay.db'}"


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _create_key(relay: Relay, name: str) -> str:
    response = httpx.post(
        f"{relay.url}/api/keys", json={"name": name}, headers=_bearer(ADMIN_KEY), timeout=10
    )
    assert response.status_code == 201, response.text
    secret: str = response.json()["key"]
    return secret


def _api_usage(relay: Relay, requests: int) -> dict[str, Any]:
    """``GET /api/usage`` once it counts ``requests`` requests (rows are written as answers end)."""
    deadline = time.monotonic() + _USAGE_DEADLINE
    while True:
        response = httpx.get(
            f"{relay.url}/api/usage",
            params={"since": SINCE, "bucket": BUCKET},
            headers=_bearer(ADMIN_KEY),
            timeout=10,
        )
        assert response.status_code == 200, response.text
        summary: dict[str, Any] = response.json()
        if summary["totals"]["requests"] >= requests:
            return summary
        assert time.monotonic() < deadline, f"usage still short of {requests}: {summary}"
        time.sleep(0.1)  # polling, bounded by the deadline above


def _cli_usage(tmp_path: Path) -> dict[str, Any]:
    """``tokenrelay usage --json`` on the server's database, as its admin runs it."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tokenrelay",
            "usage",
            "--json",
            "--since",
            SINCE,
            "--bucket",
            BUCKET,
        ],
        env=_clean_env({"TOKENRELAY_DATABASE_URL": _database_url(tmp_path)}),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    summary: dict[str, Any] = json.loads(result.stdout)
    return summary


def _shown(field: str, value: int | float | None) -> str:
    """A figure as the page shows it (en-US): grouped thousands, tenths of a ms, a dash for none."""
    if value is None:
        return _NO_FIGURE
    return f"{value:,.1f}" if field == "ttft_ms_avg" else f"{value:,}"


def _table_rows(page: Page, table: str) -> list[list[str]]:
    rows: list[list[str]] = page.locator(f"{table} tbody tr").evaluate_all(
        "(rows) => rows.map((row) => [...row.cells].map((cell) => cell.textContent))"
    )
    return rows


def _expected_rows(lines: list[dict[str, Any]], name: str) -> list[list[str]]:
    return [
        [line[name] if line[name] is not None else "(no key)"]
        + [_shown(field, line[field]) for field in _FIGURES]
        for line in lines
    ]


def _chat(client: openai.OpenAI, model: str, tokens: int, *, stream: bool = False) -> str:
    messages: Any = [{"role": "user", "content": "How are you?"}]
    extra = {"fake": {"tokens": tokens}}
    if not stream:
        completion = client.chat.completions.create(
            model=model, messages=messages, extra_body=extra
        )
        return completion.choices[0].message.content or ""
    chunks = client.chat.completions.create(
        model=model, messages=messages, stream=True, extra_body=extra
    )
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)


def _enter_key(page: Page, label: str, key: str) -> None:
    page.get_by_label(label, exact=True).fill(key)
    page.get_by_role("button", name="Continue").click()


def test_usage_page_shows_what_the_api_and_the_cli_count(
    page: Page, keyed_relay: Relay, fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    keys = {name: _create_key(keyed_relay, name) for name in ("alice", "<b>bob</b>")}
    for number, key in enumerate(keys.values()):
        with openai.OpenAI(base_url=keyed_relay.v1, api_key=key, max_retries=0) as client:
            assert _chat(client, "fake-model", 3 + number) != ""
            assert _chat(client, "fake-other", 5, stream=True) != ""
            assert _chat(client, "fake-model", 2, stream=True) != ""
    with openai.OpenAI(base_url=keyed_relay.v1, api_key=keys["alice"], max_retries=0) as client:
        # The upstream refuses one request and breaks off another mid-stream.
        with pytest.raises(openai.APIStatusError):
            client.chat.completions.create(
                model="fake-model",
                messages=[{"role": "user", "content": "Fail"}],
                extra_body={"fake": {"status": 500}},
            )
        with pytest.raises(openai.APIError):
            for _ in client.chat.completions.create(
                model="fake-other",
                messages=[{"role": "user", "content": "Fail midway"}],
                stream=True,
                extra_body={"fake": {"tokens": 10, "fail_after": 2}},
            ):
                pass

    api = _api_usage(keyed_relay, requests=8)
    assert api["totals"]["requests"] == 8
    assert api["totals"]["errors"] == 2
    assert {line["key_name"] for line in api["by_key"]} == set(keys)
    assert {line["model"] for line in api["by_model"]} == {"fake-model", "fake-other"}
    cli = _cli_usage(tmp_path)
    for part in ("totals", "by_key", "by_model", "series"):
        assert cli[part] == api[part], part

    page.goto(f"{keyed_relay.url}/usage")
    expect(page.get_by_role("dialog")).to_be_visible()
    _enter_key(page, "Admin key", ADMIN_KEY)
    page.wait_for_selector("body[data-ready]")

    assert _table_rows(page, "#by-key") == _expected_rows(api["by_key"], "key_name")
    assert _table_rows(page, "#by-model") == _expected_rows(api["by_model"], "model")
    expect(page.locator("#totals [data-field=requests]")).to_have_text("8")
    expect(page.locator("#totals [data-field=errors]")).to_have_text("2")
    # A key's name is whatever its creator typed: shown as text, never as markup.
    assert page.locator("#by-key b").count() == 0

    # Four charts, each drawn with its lines: pixels of the legend's colours on the canvas.
    drawn = page.evaluate(_LINE_PIXELS)
    assert [chart["chart"] for chart in drawn] == ["requests", "tokens", "errors", "ttft"]
    for chart in drawn:
        assert chart["width"] > 200 and chart["height"] > 100, chart
        assert chart["count"] > 10, chart
    legend = page.locator("[data-chart=requests] .u-series th")
    expect(legend).to_have_text(["Time", "alice", "<b>bob</b>"])

    # The lines split by model instead.
    page.get_by_role("radio", name="By model").check()
    expect(legend).to_have_text(["Time", "fake-model", "fake-other"])
    for chart in page.evaluate(_LINE_PIXELS):
        assert chart["count"] > 10, chart

    # The key stays in this browser's storage only: not in the address, not in the page.
    assert ADMIN_KEY not in page.url
    assert ADMIN_KEY not in page.content()


def test_chat_page_asks_for_a_key_and_keeps_it(
    page: Page, keyed_relay: Relay, fake_upstream: FakeUpstream
) -> None:
    key = _create_key(keyed_relay, "browser")
    fake_upstream.defaults = {"tokens": 3}
    wrong = httpx.get(f"{keyed_relay.v1}/models", headers=_bearer("tr-wrong"), timeout=10)
    assert wrong.status_code == 401

    page.goto(keyed_relay.url)
    dialog = page.get_by_role("dialog")
    expect(dialog).to_be_visible()
    _enter_key(page, "API key", "tr-wrong")
    expect(dialog.get_by_role("alert")).to_have_text(wrong.json()["error"]["message"])

    _enter_key(page, "API key", key)
    expect(dialog).to_be_hidden()
    page.wait_for_selector("body[data-ready]")
    send_prompt(page, "Hello with a key")
    answer = page.locator(".message-assistant")
    expect(answer).to_have_attribute("data-status", "complete")
    expect(answer.locator(".markdown")).to_have_text("word0 word1 word2")

    # Kept across a reload: no question asked, and the conversation is there.
    reload_chat(page)
    expect(dialog).to_be_hidden()
    expect(page.locator(".conversation-link")).to_have_text(["Hello with a key"])
    assert key not in page.url
    assert key not in page.content()

    # Forgetting it asks again.
    page.get_by_role("button", name="Forget key").click()
    expect(dialog).to_be_visible()
    assert page.evaluate("localStorage.getItem('tokenrelay.key')") is None


def test_usage_page_refuses_a_key_that_is_not_the_admins(page: Page, keyed_relay: Relay) -> None:
    key = _create_key(keyed_relay, "not-the-admin")
    refused = httpx.get(f"{keyed_relay.url}/api/usage", headers=_bearer(key), timeout=10)
    assert refused.status_code == 403

    page.goto(f"{keyed_relay.url}/usage")
    _enter_key(page, "Admin key", key)
    dialog = page.get_by_role("dialog")
    expect(dialog.get_by_role("alert")).to_have_text(refused.json()["error"]["message"])
    expect(page.locator("#by-key tbody tr")).to_have_count(0)
    assert page.locator("body[data-ready]").count() == 0
