"""The chat page picks an answer up again after a dropped connection or a reload, exactly.

Every answer is a numbered event log on the server; the page remembers the last event id it
showed and reads ``GET /api/streams/{id}?last_event_id=...`` after a drop, or the whole log after
a reload, instead of polling the stored conversation.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Callable

import pytest

from conftest import Relay
from fake_upstream import FakeUpstream, expected_text

from .conftest import DroppingProxy, open_chat, reload_chat, send_prompt

pytest.importorskip("playwright.sync_api", reason="Playwright is not installed")

from playwright.sync_api import Page, Request, Route, expect

LAST_ANSWER = ".message-assistant:last-child"

# Records, in the page, every text the last answer showed while it streamed.
_RECORD_RENDERS = """() => {
  window.__shown = [];
  new MutationObserver(() => {
    const answer = document.querySelector(".message-assistant:last-child");
    if (answer?.dataset.status !== "streaming") return;
    const text = answer.querySelector(".markdown").textContent;
    if (window.__shown.at(-1) !== text) window.__shown.push(text);
  }).observe(document.querySelector("#messages"), { childList: true, subtree: true });
}"""


def _wait_until_shown(page: Page, text: str) -> None:
    page.wait_for_function(
        "(text) => document.querySelector('.message-assistant:last-child .markdown')"
        "?.textContent.includes(text)",
        arg=text,
    )


def _wait_until_stored(page: Page, conversation_url: str) -> str:
    """Wait until the server has saved some of the answer being written; return that text."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        (*_, answer) = page.request.get(conversation_url).json()["messages"]
        if answer["content"]:
            return str(answer["content"])
        page.wait_for_timeout(50)  # a poll interval, not a synchronisation
    raise AssertionError("the answer was never saved while it streamed")


def _answer_text(page: Page) -> str:
    return page.locator(f"{LAST_ANSWER} .markdown").inner_text()


def _record_requests(page: Page) -> list[str]:
    """The paths (and queries) of the page's API requests, as they are made."""
    seen: list[str] = []

    def record(request: Request) -> None:
        path = request.url.split("://", 1)[1].split("/", 1)[1]
        if path.startswith("api/"):
            seen.append(f"{request.method} /{path}")

    page.on("request", record)
    return seen


def _streams_read(requests: list[str]) -> list[str]:
    return [r for r in requests if r.startswith("GET /api/streams/")]


def test_a_dropped_connection_resumes_where_it_stopped(
    page: Page, dropping_proxy: DroppingProxy, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.defaults = {"tokens": 80, "delay": 0.03}
    open_chat(page, dropping_proxy)
    requests = _record_requests(page)
    send_prompt(page, "Keep talking while the network drops")
    _wait_until_shown(page, "word5 ")

    # The network goes away mid-answer: the page says it is reconnecting, keeps what it showed...
    dropping_proxy.drop()
    answer = page.locator(LAST_ANSWER)
    expect(answer).to_have_attribute("data-reconnecting", "true")
    expect(answer.locator(".message-status")).to_have_text("Reconnecting…")
    expect(answer).to_have_attribute("data-status", "streaming")
    assert _answer_text(page).startswith("word0 word1 word2 word3 word4 word5")

    # ...and when it is back, goes on from the last event it showed, live.
    dropping_proxy.restore()
    expect(answer).to_have_attribute("data-status", "complete")
    expect(answer).not_to_have_attribute("data-reconnecting", "true")
    expect(answer.locator(".message-status")).to_be_hidden()
    assert _answer_text(page) == expected_text(80).strip()

    resumed = _streams_read(requests)
    assert resumed, requests
    for read in resumed:
        assert re.fullmatch(r"GET /api/streams/(st_\w+)\?last_event_id=\1%3A\d+", read), read
    (upstream,) = fake_upstream.chat_requests()
    assert upstream.wait_for_outcome(timeout=10) == "completed"  # never cut, never asked twice


def _cut_at(route: Route, marker: bytes) -> None:
    """Answer ``route`` with the server's response cut in the middle of ``marker``'s event,
    as a proxy that drops the connection would leave it: no ``[DONE]``, half an event."""
    response = route.fetch()
    body = response.body()
    cut = body.index(marker) + len(marker) // 2
    route.fulfill(response=response, body=body[:cut])


def test_a_cut_stream_is_joined_without_gap_or_duplicate(
    page: Page, page_relay: Relay, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.defaults = {"tokens": 40}
    open_chat(page, page_relay)
    requests = _record_requests(page)
    # The answer's own response is cut inside word7's event, and the first resume inside
    # word20's: the page must resume twice, from the last whole event each time.
    page.route("**/api/conversations/*/messages", lambda route: _cut_at(route, b"word7"))
    cuts: list[Callable[[Route], None]] = [lambda route: _cut_at(route, b"word20")]
    page.route(
        "**/api/streams/*",
        lambda route: cuts.pop()(route) if cuts else route.continue_(),
    )

    send_prompt(page, "Answer through a bad proxy")
    answer = page.locator(LAST_ANSWER)
    expect(answer).to_have_attribute("data-status", "complete")
    assert _answer_text(page) == expected_text(40).strip()

    first, second = _streams_read(requests)
    stream = re.fullmatch(r"GET /api/streams/(st_\w+)\?last_event_id=\1%3A(\d+)", first)
    again = re.fullmatch(r"GET /api/streams/(st_\w+)\?last_event_id=\1%3A(\d+)", second)
    assert stream and again, requests
    assert int(again[2]) > int(stream[2])


def test_a_reload_picks_the_answer_up_from_its_log(
    page: Page, page_relay: Relay, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.defaults = {"tokens": 120, "delay": 0.03}
    open_chat(page, page_relay)
    send_prompt(page, "Keep going while I reload")
    _wait_until_shown(page, "word5 ")

    requests = _record_requests(page)
    reload_chat(page)
    page.evaluate(_RECORD_RENDERS)
    answer = page.locator(LAST_ANSWER)
    expect(answer).to_have_attribute("data-status", "streaming")
    expect(page.locator("#stop")).to_be_visible()
    expect(answer).to_have_attribute("data-status", "complete")
    assert _answer_text(page) == expected_text(120).strip()
    expect(page.locator("#send")).to_be_visible()

    # Read from the log's start (the stored copy lags behind), then live: the answer grew on
    # screen in many steps, never losing text, not once a second as a poll would show it.
    (read,) = _streams_read(requests)
    assert re.fullmatch(r"GET /api/streams/st_\w+", read), read
    shown: list[str] = page.evaluate("window.__shown")
    assert len(shown) >= 10, f"the answer did not stream after the reload: {len(shown)} steps"
    for before, after in itertools.pairwise(shown):
        assert after.startswith(before.rstrip()), (before, after)


def test_the_page_no_longer_polls_while_an_answer_streams(
    page: Page, page_relay: Relay, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.defaults = {"tokens": 150, "delay": 0.03}
    open_chat(page, page_relay)
    send_prompt(page, "A long answer to watch")
    _wait_until_shown(page, "word3 ")
    conversation_id = page.locator(".conversation:has([aria-current=page])").get_attribute(
        "data-id"
    )

    requests = _record_requests(page)
    reload_chat(page)
    answer = page.locator(LAST_ANSWER)
    expect(answer).to_have_attribute("data-status", "complete")
    assert _answer_text(page) == expected_text(150).strip()

    # One look at the conversation when it opened (a poll would have looked every second for
    # the seconds the answer still took), and one read of its stream.
    looks = [r for r in requests if r == f"GET /api/conversations/{conversation_id}"]
    assert len(looks) == 1, requests
    assert len(_streams_read(requests)) == 1, requests


def test_a_stream_that_is_gone_falls_back_to_the_stored_answer(
    page: Page, page_relay: Relay, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.defaults = {"tokens": 5000, "delay": 0.02}
    open_chat(page, page_relay)
    send_prompt(page, "Talk while the server forgets")
    _wait_until_shown(page, "word5 ")
    conversation_id = page.locator(".conversation:has([aria-current=page])").get_attribute(
        "data-id"
    )
    stored = _wait_until_stored(page, f"{page_relay.url}/api/conversations/{conversation_id}")

    # As after a server restart without Redis: the answer's log no longer exists.
    page.route(
        "**/api/streams/*",
        lambda route: route.fulfill(
            status=404,
            json={
                "error": {
                    "message": "No such stream.",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "stream_not_found",
                }
            },
        ),
    )
    reload_chat(page)
    answer = page.locator(LAST_ANSWER)
    # Stored as still streaming, with nothing left to follow: shown cut off, not busy.
    expect(answer).to_have_attribute("data-status", "interrupted")
    expect(page.locator("#send")).to_be_visible()
    expect(page.locator("#stop")).to_be_hidden()
    shown = _answer_text(page)
    assert shown.startswith(stored.strip()), "the stored copy was not shown"
    assert expected_text(5000).startswith(shown)

    # The answer is still the server's to stop.
    stopped = page.request.post(
        f"{page_relay.url}/api/conversations/{conversation_id}/stop",
        headers={"Origin": page_relay.url},
    )
    assert stopped.ok, stopped.text()


def test_an_answer_stopped_elsewhere_shows_as_stopped(
    page: Page, page_relay: Relay, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.defaults = {"tokens": 5000, "delay": 0.02}
    open_chat(page, page_relay)
    send_prompt(page, "Talk until another tab stops you")
    _wait_until_shown(page, "word5 ")
    conversation_id = page.locator(".conversation:has([aria-current=page])").get_attribute(
        "data-id"
    )

    # Another tab (or a script) presses Stop: the log just ends, and the page asks the server
    # once how the answer was saved, instead of calling a cut answer complete.
    stopped = page.request.post(
        f"{page_relay.url}/api/conversations/{conversation_id}/stop",
        headers={"Origin": page_relay.url},
    )
    assert stopped.json() == {"stopped": True}
    answer = page.locator(LAST_ANSWER)
    expect(answer).to_have_attribute("data-status", "stopped")
    expect(page.locator("#send")).to_be_visible()
    assert expected_text(5000).startswith(_answer_text(page))
