"""The chat page in a real browser, against a real tokenrelay relaying to the fake upstream."""

from __future__ import annotations

from typing import Any

import pytest

from conftest import Relay
from fake_upstream import FakeUpstream, expected_text

from .conftest import open_chat, reload_chat, send_prompt

pytest.importorskip("playwright.sync_api", reason="Playwright is not installed")

from playwright.sync_api import BrowserContext, Locator, Page, expect

LAST_ANSWER = ".message-assistant:last-child"

XSS_ANSWER = (
    "Careful: <img src=x onerror=alert(1)> and <script>alert(2)</script> are just text.\n"
    "\n"
    '<img src=x onerror="window.__pwned = true">\n'
    "\n"
    "<script>window.__pwned = true</script>\n"
)

MARKDOWN_ANSWER = """Here is the comparison:

| Protocol | Multiplexing | Transport |
|----------|--------------|-----------|
| HTTP/1.1 | no           | TCP       |
| HTTP/2   | yes          | TCP       |
| HTTP/3   | yes          | QUIC      |

```python
def greet(name: str) -> str:
    return f"Hello, {name}!"
```

- first point
- second point
"""

# Records, in the page, how the last answer's rendered text grows: one entry per render of its
# Markdown (a childList mutation of `.markdown`) while it is streaming, with the timestamp of the
# animation frame it happened in (document.timeline.currentTime is fixed for a whole frame).
_RECORD_RENDERS = """() => {
  window.__renders = [];
  new MutationObserver((records) => {
    for (const record of records) {
      const target = record.target;
      if (record.type !== "childList" || !target.classList?.contains("markdown")) continue;
      const message = target.closest(".message");
      if (message.dataset.status !== "streaming") continue;
      window.__renders.push({
        length: target.textContent.length,
        frame: document.timeline.currentTime,
      });
    }
  }).observe(document.querySelector("#messages"), { childList: true, subtree: true });
}"""


def _ask(page: Page, prompt: str) -> Locator:
    """Send ``prompt``, wait until its answer is complete and return the answer."""
    answers = page.locator(".message-assistant")
    before = answers.count()
    send_prompt(page, prompt)
    # Counted first, so that an earlier answer, already complete, is not taken for this one.
    expect(answers).to_have_count(before + 1)
    answer = page.locator(LAST_ANSWER)
    expect(answer).to_have_attribute("data-status", "complete")
    return answer


def _wait_until_shown(page: Page, text: str) -> None:
    """Wait until the answer being written shows ``text``."""
    page.wait_for_function(
        "(text) => document.querySelector('.message-assistant .markdown')"
        "?.textContent.includes(text)",
        arg=text,
    )


def _answer_text(page: Page, selector: str = LAST_ANSWER) -> str:
    return page.locator(f"{selector} .markdown").inner_text()


def test_reply_grows_on_screen_while_it_streams(
    page: Page, page_relay: Relay, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.defaults = {"tokens": 40, "delay": 0.03}
    open_chat(page, page_relay)
    page.evaluate(_RECORD_RENDERS)

    send_prompt(page, "Count for me")
    expect(page.locator("#stop")).to_be_visible()
    expect(page.locator(LAST_ANSWER)).to_have_attribute("data-status", "complete")

    renders: list[dict[str, Any]] = page.evaluate("window.__renders")
    lengths = [render["length"] for render in renders]
    assert len(set(lengths)) >= 5, f"the answer did not grow in steps: {lengths}"
    assert lengths == sorted(lengths), f"the answer shrank while streaming: {lengths}"
    frames = [render["frame"] for render in renders]
    assert len(frames) == len(set(frames)), "the Markdown was rendered twice in one frame"
    assert _answer_text(page) == expected_text(40).strip()
    expect(page.locator("#send")).to_be_visible()
    expect(page.locator("#stop")).to_be_hidden()


def test_stop_ends_the_answer_upstream(
    page: Page, page_relay: Relay, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.defaults = {"tokens": 5000, "delay": 0.05}
    open_chat(page, page_relay)

    send_prompt(page, "Talk for a long time")
    _wait_until_shown(page, "word3")
    page.locator("#stop").click()

    answer = page.locator(LAST_ANSWER)
    expect(answer).to_have_attribute("data-status", "stopped")
    expect(answer.locator(".message-status")).to_have_text("Stopped")
    expect(page.locator("#send")).to_be_visible()
    (upstream,) = fake_upstream.chat_requests()
    assert upstream.wait_for_outcome(timeout=10) == "abandoned"
    shown = _answer_text(page)
    assert shown.startswith("word0 word1 word2 word3")
    assert "word4999" not in shown

    # What was written before the stop is kept, and still marked stopped.
    reload_chat(page)
    expect(answer).to_have_attribute("data-status", "stopped")
    assert _answer_text(page).startswith("word0 word1 word2 word3")


def test_an_answer_keeps_growing_after_a_reload(
    page: Page, page_relay: Relay, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.defaults = {"tokens": 5000, "delay": 0.02}
    open_chat(page, page_relay)
    send_prompt(page, "Keep going while I reload")
    _wait_until_shown(page, "word3")

    # The answer belongs to the server, not to the tab: after a reload the page follows it
    # as the server saves it, and can still stop it.
    reload_chat(page)
    answer = page.locator(LAST_ANSWER)
    expect(answer).to_have_attribute("data-status", "streaming")
    expect(page.locator("#stop")).to_be_visible()
    seen = len(_answer_text(page))
    page.wait_for_function(
        "(seen) => document.querySelector('.message-assistant .markdown').textContent.length"
        " > seen",
        arg=seen,
    )
    page.locator("#stop").click()
    expect(answer).to_have_attribute("data-status", "stopped")
    expect(page.locator("#send")).to_be_visible()
    (upstream,) = fake_upstream.chat_requests()
    assert upstream.wait_for_outcome(timeout=10) == "abandoned"


def test_history_is_there_after_a_reload(
    page: Page, page_relay: Relay, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.defaults = {"tokens": 3}
    open_chat(page, page_relay)
    _ask(page, "First question about history")
    _ask(page, "Second question")
    expect(page.locator(".message-assistant")).to_have_count(2)

    reload_chat(page)
    messages = page.locator(".message")
    expect(messages).to_have_count(4)
    expect(messages.locator(".content")).to_have_text(
        [
            "First question about history",
            "word0 word1 word2",
            "Second question",
            "word0 word1 word2",
        ]
    )
    expect(page.locator("#title")).to_have_text("First question about history")

    # The sidebar reopens it from a new chat.
    page.locator("#new-chat").click()
    expect(page.locator(".message")).to_have_count(0)
    page.locator(".conversation-link", has_text="First question about history").first.click()
    expect(page.locator(".message")).to_have_count(4)


def test_model_output_cannot_run_script(
    page: Page, page_relay: Relay, fake_upstream: FakeUpstream
) -> None:
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    fake_upstream.defaults = {"text": XSS_ANSWER}
    open_chat(page, page_relay)

    answer = _ask(page, "Show me some HTML")

    for check in ("answered", "reloaded"):
        # The payloads are on screen as the text they are...
        expect(answer).to_contain_text("<img src=x onerror=alert(1)>")
        expect(answer).to_contain_text("<script>alert(2)</script>")
        expect(answer).to_contain_text("<script>window.__pwned = true</script>")
        # ...and none of them became an element or ran.
        assert answer.locator("img, script, [onerror]").count() == 0, check
        assert page.locator("[onerror]").count() == 0, check
        assert page.evaluate("window.__pwned === undefined"), check
        assert dialogs == [], check
        reload_chat(page)
        expect(answer).to_have_attribute("data-status", "complete")


def test_markdown_tables_and_code_render(
    context: BrowserContext, page: Page, page_relay: Relay, fake_upstream: FakeUpstream
) -> None:
    context.grant_permissions(["clipboard-read", "clipboard-write"])
    fake_upstream.defaults = {"text": MARKDOWN_ANSWER}
    open_chat(page, page_relay)

    answer = _ask(page, "Compare HTTP versions")

    expect(answer.locator("table th")).to_have_text(["Protocol", "Multiplexing", "Transport"])
    expect(answer.locator("table tbody tr")).to_have_count(3)
    expect(answer.locator("table tbody tr").last.locator("td")).to_have_text(
        ["HTTP/3", "yes", "QUIC"]
    )
    expect(answer.locator("ul li")).to_have_text(["first point", "second point"])
    code = answer.locator(".code-block")
    expect(code.locator(".code-bar span")).to_have_text("python")
    expect(code.locator("pre code")).to_have_text(
        'def greet(name: str) -> str:\n    return f"Hello, {name}!"'
    )

    code.locator("button.copy-code").click()
    expect(code.locator("button.copy-code")).to_have_text("Copied")
    copied = page.evaluate("navigator.clipboard.readText()")
    assert copied.rstrip("\n") == 'def greet(name: str) -> str:\n    return f"Hello, {name}!"'

    answer.locator("button[data-action=copy]").click()
    assert page.evaluate("navigator.clipboard.readText()") == MARKDOWN_ANSWER


def test_regenerate_replaces_the_last_answer(
    page: Page, page_relay: Relay, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.defaults = {"text": "The first answer."}
    open_chat(page, page_relay)
    _ask(page, "Say something")
    expect(page.locator(LAST_ANSWER)).to_contain_text("The first answer.")

    fake_upstream.defaults = {"text": "A better answer."}
    page.locator(f"{LAST_ANSWER} button[data-action=regenerate]").click()
    expect(page.locator(LAST_ANSWER)).to_contain_text("A better answer.")
    expect(page.locator(LAST_ANSWER)).to_have_attribute("data-status", "complete")
    expect(page.locator(".message-assistant")).to_have_count(1)

    reload_chat(page)
    expect(page.locator(".message-assistant .markdown")).to_have_text(["A better answer."])


def test_an_upstream_error_is_shown_on_the_answer(
    page: Page, page_relay: Relay, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.defaults = {"status": 503, "message": "The engine is warming up."}
    open_chat(page, page_relay)
    send_prompt(page, "Hello?")
    answer = page.locator(LAST_ANSWER)
    expect(answer).to_have_attribute("data-status", "error")
    expect(answer.locator(".message-status")).to_contain_text("Error")
    expect(page.locator("#send")).to_be_visible()


def test_shift_enter_adds_a_line_and_enter_sends(
    page: Page, page_relay: Relay, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.defaults = {"tokens": 2}
    open_chat(page, page_relay)
    prompt = page.locator("#prompt")
    prompt.click()
    page.keyboard.type("line one")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("line two")
    expect(page.locator(".message")).to_have_count(0)
    page.keyboard.press("Enter")
    expect(page.locator(".message-user .content")).to_have_text("line one\nline two")
    expect(prompt).to_have_value("")
    expect(page.locator(LAST_ANSWER)).to_have_attribute("data-status", "complete")


def test_phone_width_is_usable(
    phone: BrowserContext, page_relay: Relay, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.defaults = {"text": MARKDOWN_ANSWER}
    page = phone.new_page()
    open_chat(page, page_relay)

    # The conversation list is tucked away; the chat takes the whole width.
    sidebar = page.locator("#sidebar")
    expect(page.locator("#menu")).to_be_visible()
    expect(sidebar).not_to_be_in_viewport()
    answer = _ask(page, "A table on a phone")
    expect(answer.locator("table")).to_be_visible()

    # Nothing is wider than the screen: wide tables and code scroll inside their own boxes.
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    for selector in ("#prompt", "#send", LAST_ANSWER, "#model"):
        box = page.locator(selector).bounding_box()
        assert box is not None, selector
        assert box["x"] >= 0 and box["x"] + box["width"] <= 390, selector

    # The menu opens the list over the chat, and choosing a conversation closes it again.
    page.locator("#menu").click()
    link = page.locator(".conversation-link", has_text="A table on a phone").first
    expect(link).to_be_in_viewport()
    page.locator("#new-chat").click()
    expect(link).not_to_be_in_viewport()
    expect(page.locator(".message")).to_have_count(0)
    page.locator("#menu").click()
    link.click()
    expect(link).not_to_be_in_viewport()
    expect(page.locator(LAST_ANSWER)).to_have_attribute("data-status", "complete")


def test_the_picked_model_answers(
    page: Page, page_relay: Relay, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.defaults = {"tokens": 2}
    open_chat(page, page_relay)
    picker = page.locator("#model")
    expect(picker.locator("option")).to_contain_text(["fake-model", "fake-other"])
    expect(picker).to_have_value("fake-model")  # the first listed is the default

    picker.select_option("fake-other")
    _ask(page, "Which model are you?")
    (upstream,) = fake_upstream.chat_requests()
    assert upstream.json["model"] == "fake-other"

    # Reopening the conversation picks its model again.
    page.locator("#new-chat").click()
    picker.select_option("fake-model")
    page.locator(".conversation-link", has_text="Which model are you?").first.click()
    expect(picker).to_have_value("fake-other")


def test_rename_and_delete_from_the_sidebar(
    page: Page, page_relay: Relay, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.defaults = {"tokens": 2}
    open_chat(page, page_relay)
    _ask(page, "A chat to rename")
    conversation_id = page.locator(".conversation:has([aria-current=page])").get_attribute(
        "data-id"
    )

    item = page.locator(f".conversation[data-id='{conversation_id}']")
    item.locator("button[data-action=rename]").click()
    item.locator(".rename-input").fill("Renamed chat")
    item.locator(".rename-input").press("Enter")
    expect(item.locator(".conversation-link")).to_have_text("Renamed chat")
    expect(page.locator("#title")).to_have_text("Renamed chat")
    reload_chat(page)
    expect(item.locator(".conversation-link")).to_have_text("Renamed chat")

    # Delete asks for a second click, then the chat is gone, here and on the server.
    item.locator("button[data-action=delete]").click()
    expect(item).to_have_count(1)
    item.locator("button[data-action=delete]").click()
    expect(item).to_have_count(0)
    expect(page.locator("#title")).to_have_text("New chat")
    reload_chat(page)
    expect(page.locator(f".conversation[data-id='{conversation_id}']")).to_have_count(0)
