"""Save ``docs/screenshot.png``: the chat page showing a real conversation.

Runs tokenrelay against the fake upstream (no model needed), chats through the page in headless
Chromium and captures the window. Usage: ``.venv/bin/python tests/web/screenshot.py [PATH]``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

_TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(_TESTS))

import httpx  # noqa: E402
from playwright.sync_api import expect, sync_playwright  # noqa: E402

from conftest import NO_LOCAL_MODEL, fake_provider_toml, start_tokenrelay  # noqa: E402
from fake_upstream import FakeUpstream  # noqa: E402
from web.conftest import CHROMIUM, CHROMIUM_ARGS  # noqa: E402

MODELS = ["llama-3.1-8b-instruct", "qwen2.5-7b-instruct", "smollm2-360m-instruct"]
EARLIER = [
    "Plan a three-day trip to Lisbon",
    "Why does my asyncio task never finish?",
    "Summarise the SSE spec in five bullets",
    "Regex for ISO 8601 dates",
]
QUESTION = "Compare HTTP/1.1, HTTP/2 and HTTP/3, then show me how to read a streamed answer."
ANSWER = """Here is how the three versions differ:

| Version  | Multiplexing         | Transport | Header compression |
|----------|----------------------|-----------|--------------------|
| HTTP/1.1 | no (one at a time)   | TCP       | none               |
| HTTP/2   | yes, over one stream | TCP       | HPACK              |
| HTTP/3   | yes, no head-of-line | QUIC/UDP  | QPACK              |

To read a streamed answer from tokenrelay with the OpenAI SDK:

```python
from openai import OpenAI

client = OpenAI(base_url="http://localhost:8080/v1", api_key="unused")
stream = client.chat.completions.create(
    model="llama-3.1-8b-instruct",
    messages=[{"role": "user", "content": "Hello!"}],
    stream=True,
)
for chunk in stream:
    print(chunk.choices[0].delta.content or "", end="", flush=True)
```

Each chunk arrives as soon as the model writes it, so **the first words show up at once**.
"""


def main(target: Path) -> None:
    with (
        FakeUpstream(MODELS) as fake,
        tempfile.TemporaryDirectory() as tmp,
        start_tokenrelay(
            Path(tmp),
            config_toml=fake_provider_toml(fake.base_url, models=tuple(MODELS)),
            env=NO_LOCAL_MODEL,
        ) as relay,
    ):
        for title in EARLIER:
            httpx.post(f"{relay.url}/api/conversations", json={"title": title}).raise_for_status()
        fake.defaults = {"text": ANSWER}
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(
                viewport={"width": 1280, "height": 900}, device_scale_factor=1, color_scheme="light"
            )
            page.goto(relay.url)
            page.wait_for_selector("body[data-ready]")
            page.locator("#prompt").fill(QUESTION)
            page.locator("#prompt").press("Enter")
            answer = page.locator(".message-assistant:last-child")
            expect(answer).to_have_attribute("data-status", "complete", timeout=15_000)
            page.locator("#prompt").fill("Which one should my internal API use?")
            page.mouse.move(0, 0)
            target.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(target))
            browser.close()
    print(f"saved {target}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else _TESTS.parent / "docs" / "screenshot.png")
