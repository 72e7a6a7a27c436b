"""Browser fixtures: the system's headless Chromium driving the real page on a real tokenrelay.

Chromium comes from Debian (``apt-get install chromium``), never from ``playwright install``:
Playwright only drives the browser at ``CHROMIUM``. Without it (or without Playwright) these
tests skip, which ``CI=true`` turns into a failure.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from conftest import NO_LOCAL_MODEL, Relay, fake_provider_toml, start_tokenrelay
from fake_upstream import FakeUpstream, RecordedRequest

if TYPE_CHECKING:
    from aiohttp import web as aioweb
    from playwright.sync_api import Browser, BrowserContext, Page

__all__ = ["CHROMIUM", "CHROMIUM_ARGS", "PageFake", "open_chat", "send_prompt"]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
DESKTOP = {"width": 1280, "height": 860}
WAIT_MS = 15_000
"""How long a Playwright wait may take before the test fails (ms)."""

_PIECES = re.compile(r"\S+\s*|\s+")


class PageFake(FakeUpstream):
    """The fake upstream, steerable for requests that a browser makes.

    The page cannot put the fake's per-request ``fake`` options into its requests, so a test
    sets them here instead: ``answer_with(...)`` gives the options used by every chat request
    that carries none, and ``text`` replaces the ``"word0 word1 ..."`` answer with given text,
    streamed a word (with its trailing whitespace) per chunk. ``reset()`` restores the defaults.
    """

    def __init__(self, models: list[str] | None = None) -> None:
        super().__init__(models)
        self.options: dict[str, Any] = {}
        self.text: str | None = None

    def answer_with(self, text: str | None = None, **options: Any) -> None:
        self.text = text
        self.options = options

    def reset(self) -> None:
        super().reset()
        self.answer_with(None)

    def chat_requests(self) -> list[RecordedRequest]:
        """The chat completions tokenrelay has forwarded since the last reset."""
        return [r for r in list(self.requests) if r.path.endswith("/chat/completions")]

    async def _answer(
        self, request: aioweb.Request, record: RecordedRequest
    ) -> aioweb.StreamResponse:
        body = record.json
        if isinstance(body, dict) and "fake" not in body:
            options = dict(self.options)
            if self.text is not None:
                options["tokens"] = len(_PIECES.findall(self.text))
            record.json = {**body, "fake": options}
        return await super()._answer(request, record)

    def _chat_deltas(
        self, body: dict[str, Any], behaviour: Any, number: int
    ) -> Iterator[tuple[dict[str, Any], bool]]:
        text = self.text
        if text is None or behaviour.tool_calls:
            yield from super()._chat_deltas(body, behaviour, number)
            return
        yield {"role": "assistant", "content": "", "refusal": None}, False
        for piece in _PIECES.findall(text):
            yield {"content": piece}, True


@pytest.fixture(scope="session")
def page_fake() -> Iterator[PageFake]:
    with PageFake() as fake:
        yield fake


@pytest.fixture(autouse=True)
def _fresh_page_fake(request: pytest.FixtureRequest) -> None:
    if "page_fake" in request.fixturenames:
        request.getfixturevalue("page_fake").reset()


@pytest.fixture(scope="session")
def page_relay(page_fake: PageFake, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    """tokenrelay serving the page, relaying to the steerable fake."""
    with start_tokenrelay(
        tmp_path_factory.mktemp("page-relay"),
        config_toml=fake_provider_toml(page_fake.base_url),
        env=NO_LOCAL_MODEL,
    ) as running:
        yield running


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    sync_api.expect.set_options(timeout=WAIT_MS)
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


def _context(browser: Browser, **options: Any) -> BrowserContext:
    # bypass_csp: the page's own Content-Security-Policy would also stop an injected script, so
    # the XSS tests switch it off to prove that the sanitizer alone keeps model output inert;
    # it also lets Playwright evaluate its wait predicates.
    context = browser.new_context(bypass_csp=True, **options)
    context.set_default_timeout(WAIT_MS)
    return context


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    context = _context(browser, viewport=DESKTOP)
    try:
        yield context
    finally:
        context.close()


@pytest.fixture
def phone(browser: Browser) -> Iterator[BrowserContext]:
    """An iPhone-sized window (390 x 844) with touch."""
    context = _context(
        browser, viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True
    )
    try:
        yield context
    finally:
        context.close()


@pytest.fixture
def page(context: BrowserContext, page_relay: Relay) -> Iterator[Page]:
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    assert errors == [], f"the page threw: {errors}"


def open_chat(page: Page, relay: Relay, path: str = "/") -> None:
    """Load the chat page and wait until it has listed models and conversations."""
    page.goto(relay.url + path)
    page.wait_for_selector("body[data-ready]")


def send_prompt(page: Page, text: str) -> None:
    """Type a prompt the way a person does and press Enter."""
    page.locator("#prompt").fill(text)
    page.locator("#prompt").press("Enter")
