"""Browser fixtures: the system's headless Chromium driving the real page on a real tokenrelay.

Chromium comes from Debian (``apt-get install chromium``), never from ``playwright install``:
Playwright only drives the browser at ``CHROMIUM``. Without it (or without Playwright) these
tests skip, which ``CI=true`` turns into a failure.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from conftest import Relay, relay_to
from fake_upstream import FakeUpstream
from tcp_proxy import DroppingProxy

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Page

__all__ = [
    "CHROMIUM",
    "CHROMIUM_ARGS",
    "OTHER_SITES",
    "DroppingProxy",
    "open_chat",
    "reload_chat",
    "send_prompt",
]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
OTHER_SITES = ("evil.example", "friend.example")
"""Names Chromium resolves to 127.0.0.1, for pages on other sites (and DNS rebinding)."""
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--host-resolver-rules=" + ", ".join(f"MAP {name} 127.0.0.1" for name in OTHER_SITES),
]
DESKTOP = {"width": 1280, "height": 860}
WAIT_MS = 15_000
"""How long a Playwright wait may take before the test fails (ms)."""


@pytest.fixture(scope="session")
def page_relay(
    fake_upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Relay]:
    """tokenrelay serving the page, relaying to the shared fake upstream.

    A server of the page tests' own rather than the shared ``relay``: the page lists every
    conversation in the server's database, so the page tests start from an empty one. The page
    cannot send the fake's per-request options; tests set ``fake_upstream.defaults`` instead.
    """
    with relay_to(fake_upstream, tmp_path_factory.mktemp("page-relay")) as running:
        yield running


@pytest.fixture
def dropping_proxy(page_relay: Relay) -> Iterator[DroppingProxy]:
    """A ``DroppingProxy`` to the page tests' tokenrelay; load the page from its ``url``."""
    proxy = DroppingProxy(page_relay.url)
    try:
        yield proxy
    finally:
        proxy.close()


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


@contextmanager
def _context(browser: Browser, **options: Any) -> Iterator[BrowserContext]:
    # bypass_csp: the page's own Content-Security-Policy would also stop an injected script, so
    # the XSS tests switch it off to prove that the sanitizer alone keeps model output inert;
    # it also lets Playwright evaluate its wait predicates.
    context = browser.new_context(bypass_csp=True, **options)
    try:
        context.set_default_timeout(WAIT_MS)
        yield context
    finally:
        context.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    # en-US: the pages format numbers for the reader's locale; the tests read them back.
    with _context(browser, viewport=DESKTOP, locale="en-US") as context:
        yield context


@pytest.fixture
def phone(browser: Browser) -> Iterator[BrowserContext]:
    """An iPhone-sized window (390 x 844) with touch."""
    viewport = {"width": 390, "height": 844}
    with _context(browser, viewport=viewport, is_mobile=True, has_touch=True) as context:
        yield context


@pytest.fixture
def page(context: BrowserContext) -> Iterator[Page]:
    """A tab that fails the test if the page throws; load it from any server's ``url``."""
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    assert errors == [], f"the page threw: {errors}"


def open_chat(page: Page, relay: Relay | DroppingProxy, path: str = "/") -> None:
    """Load the chat page and wait until it has listed models and conversations."""
    page.goto(relay.url + path)
    page.wait_for_selector("body[data-ready]")


def reload_chat(page: Page) -> None:
    """Reload the chat page and wait until it is ready again."""
    page.reload()
    page.wait_for_selector("body[data-ready]")


def send_prompt(page: Page, text: str) -> None:
    """Type a prompt the way a person does and press Enter."""
    page.locator("#prompt").fill(text)
    page.locator("#prompt").press("Enter")
