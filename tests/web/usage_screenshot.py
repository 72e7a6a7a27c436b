"""Save ``docs/usage.png``: the usage page over a day of a small team's traffic.

Runs tokenrelay against the fake upstream with an admin key, makes a few real calls with three
keys, and adds a day of *sample* usage rows (the page can only show a day that has passed) to
its database with the store the server itself writes with, then captures the page in headless
Chromium. Usage: ``.venv/bin/python tests/web/usage_screenshot.py [PATH]``.
"""

from __future__ import annotations

import asyncio
import math
import random
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

_TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(_TESTS))

import httpx  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

from conftest import NO_LOCAL_MODEL, fake_provider_toml, start_tokenrelay  # noqa: E402
from fake_upstream import FakeUpstream  # noqa: E402
from tokenrelay.storage.database import Database  # noqa: E402
from tokenrelay.storage.usage import UsageRow, UsageStore  # noqa: E402
from web.conftest import CHROMIUM, CHROMIUM_ARGS  # noqa: E402

ADMIN_KEY = "tr-admin-screenshot-" + "x" * 24
MODELS = ["llama-3.1-8b-instruct", "qwen2.5-7b-instruct", "smollm2-360m-instruct"]
TEAM = {"web-app": 40, "ci-pipeline": 14, "data-team": 22}
"""Each key's calls per hour at the day's busiest."""


def _sample_day(key_ids: dict[str, str]) -> list[UsageRow]:
    """A working day's calls per key: busy in office hours, a CI burst at night, some errors."""
    rng = random.Random(7)
    now = datetime.now(UTC)
    rows = []
    for hour in range(1, 24):
        start = now - timedelta(hours=hour)
        office = max(0.05, math.sin(math.pi * ((start.hour - 7) % 24) / 12))
        for name, peak in TEAM.items():
            calls = round(
                peak * (1.0 if name == "ci-pipeline" and start.hour in (2, 3) else office)
            )
            for _ in range(rng.randint(calls // 2, calls)):
                model = rng.choice(MODELS[:2] if name != "ci-pipeline" else MODELS[1:])
                failed = rng.random() < 0.03
                rows.append(
                    UsageRow(
                        created_at=start + timedelta(seconds=rng.uniform(0, 3599)),
                        key_id=key_ids[name],
                        route="/v1/chat/completions",
                        model=model,
                        provider="fake",
                        prompt_tokens=rng.randint(200, 1500),
                        completion_tokens=0 if failed else rng.randint(50, 700),
                        ttft_ms=None
                        if failed
                        else rng.randint(180, 450 if "llama" in model else 300),
                        duration_ms=rng.randint(800, 9000),
                        status="error" if failed else "complete",
                        client_left=rng.random() < 0.02,
                    )
                )
    return rows


def main(target: Path) -> None:
    with (
        FakeUpstream(MODELS) as fake,
        tempfile.TemporaryDirectory() as tmp,
        start_tokenrelay(
            Path(tmp),
            config_toml=fake_provider_toml(fake.base_url, models=tuple(MODELS)),
            env={**NO_LOCAL_MODEL, "TOKENRELAY_ADMIN_KEY": ADMIN_KEY},
        ) as relay,
    ):
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        key_ids = {}
        for name in TEAM:
            made = httpx.post(f"{relay.url}/api/keys", json={"name": name}, headers=admin)
            made.raise_for_status()
            key_ids[name] = made.json()["id"]
            for model in MODELS[:2]:
                httpx.post(
                    f"{relay.v1}/chat/completions",
                    json={"model": model, "messages": [{"role": "user", "content": "Hi"}]},
                    headers={"Authorization": f"Bearer {made.json()['key']}"},
                ).raise_for_status()

        async def add_sample_day() -> None:
            async with Database(f"sqlite+aiosqlite:///{Path(tmp) / 'tokenrelay.db'}") as db:
                await UsageStore(db).add(_sample_day(key_ids))

        asyncio.run(add_sample_day())
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(
                viewport={"width": 1280, "height": 1000},
                device_scale_factor=1,
                color_scheme="light",
                locale="en-US",
            )
            page.goto(f"{relay.url}/usage")
            page.get_by_label("Admin key", exact=True).fill(ADMIN_KEY)
            page.get_by_role("button", name="Continue").click()
            page.wait_for_selector("body[data-ready]")
            page.mouse.move(0, 0)
            target.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(target))
            browser.close()
    print(f"saved {target}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else _TESTS.parent / "docs" / "usage.png")
