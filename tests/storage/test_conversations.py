"""The conversation store, run against SQLite and PostgreSQL alike."""

from __future__ import annotations

import asyncio
import base64
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from tokenrelay.storage import (
    ConversationNotFound,
    ConversationStore,
    Database,
    InvalidCursor,
    MessageNotFound,
    MessageRole,
    MessageStatus,
)
from tokenrelay.storage.models import Conversation, Message


async def _message_count(db: Database, conversation_id: str) -> int:
    async with db.sessions() as session:
        count = await session.scalar(
            sa.select(sa.func.count()).where(Message.conversation_id == conversation_id)
        )
    return count or 0


async def test_create_then_get_returns_the_same_conversation(store: ConversationStore) -> None:
    created = await store.create_conversation(title="Trip", model="gpt-4o", system="Be brief.")
    assert created.id.startswith("conv_")
    assert created.created_at == created.updated_at
    assert created.created_at.tzinfo is UTC

    fetched = await store.get_conversation(created.id)
    assert (fetched.id, fetched.title, fetched.model, fetched.system) == (
        created.id,
        "Trip",
        "gpt-4o",
        "Be brief.",
    )
    assert fetched.created_at == created.created_at
    assert fetched.messages == ()


async def test_missing_ids_raise_not_found(store: ConversationStore) -> None:
    with pytest.raises(ConversationNotFound):
        await store.get_conversation("conv_missing")
    with pytest.raises(ConversationNotFound):
        await store.rename_conversation("conv_missing", "x")
    with pytest.raises(ConversationNotFound):
        await store.delete_conversation("conv_missing")
    with pytest.raises(ConversationNotFound):
        await store.add_message("conv_missing", "user", "hello?")
    with pytest.raises(MessageNotFound):
        await store.update_message("msg_missing", append="x")
    with pytest.raises(MessageNotFound):
        await store.get_message("msg_missing")
    with pytest.raises(MessageNotFound):
        await store.delete_message("msg_missing")


async def test_rename_changes_title_but_not_list_order(store: ConversationStore) -> None:
    conversation = await store.create_conversation(title="old")
    renamed = await store.rename_conversation(conversation.id, "new")
    assert renamed.title == "new"
    assert renamed.updated_at == conversation.updated_at
    assert (await store.get_conversation(conversation.id)).title == "new"
    assert (await store.rename_conversation(conversation.id, None)).title is None


async def test_messages_come_back_in_the_order_they_were_added(store: ConversationStore) -> None:
    conversation = await store.create_conversation(system="You are terse.")
    added = [
        await store.add_message(conversation.id, role, f"turn {index}")
        for index, role in enumerate(["system", "user", "assistant", "user", "assistant"])
    ]
    messages = (await store.get_conversation(conversation.id)).messages
    assert [message.id for message in messages] == [message.id for message in added]
    assert [message.position for message in messages] == [0, 1, 2, 3, 4]
    assert messages[1].role is MessageRole.USER
    assert all(message.id.startswith("msg_") for message in messages)


async def test_concurrent_adds_get_distinct_positions(store: ConversationStore) -> None:
    conversation = await store.create_conversation()
    await asyncio.gather(
        *(store.add_message(conversation.id, "user", str(index)) for index in range(20))
    )
    messages = (await store.get_conversation(conversation.id)).messages
    assert [message.position for message in messages] == list(range(20))
    assert sorted(message.content for message in messages) == sorted(map(str, range(20)))


async def test_adding_a_message_moves_the_conversation_to_the_top(
    store: ConversationStore,
) -> None:
    older = await store.create_conversation(title="older")
    newer = await store.create_conversation(title="newer")
    assert [c.id for c in (await store.list_conversations()).conversations] == [newer.id, older.id]

    message = await store.add_message(older.id, "user", "bump")
    touched = await store.get_conversation(older.id)
    assert touched.updated_at == message.created_at > older.updated_at
    assert [c.id for c in (await store.list_conversations()).conversations] == [older.id, newer.id]


async def test_pages_walk_newest_first_without_gaps_or_repeats(store: ConversationStore) -> None:
    created = [await store.create_conversation(title=str(index)) for index in range(7)]
    seen: list[str] = []
    sizes: list[int] = []
    cursor = None
    while True:
        page = await store.list_conversations(limit=3, after=cursor)
        seen += [conversation.id for conversation in page.conversations]
        sizes.append(len(page.conversations))
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert sizes == [3, 3, 1]
    assert seen == [conversation.id for conversation in reversed(created)]


async def test_a_full_last_page_has_no_next_cursor(store: ConversationStore) -> None:
    for _ in range(4):
        await store.create_conversation()
    first = await store.list_conversations(limit=2)
    second = await store.list_conversations(limit=2, after=first.next_cursor)
    assert len(second.conversations) == 2
    assert second.next_cursor is None
    assert (await store.list_conversations(limit=5)).next_cursor is None


async def test_pages_break_timestamp_ties_by_id(db: Database, store: ConversationStore) -> None:
    ids = {(await store.create_conversation()).id for _ in range(5)}
    same_instant = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
    async with db.sessions.begin() as session:
        await session.execute(sa.update(Conversation).values(updated_at=same_instant))

    seen: list[str] = []
    cursor = None
    for _ in range(3):
        page = await store.list_conversations(limit=2, after=cursor)
        seen += [conversation.id for conversation in page.conversations]
        cursor = page.next_cursor
    assert cursor is None
    assert seen == sorted(ids, reverse=True)


async def test_a_conversation_moving_up_mid_listing_is_not_repeated(
    store: ConversationStore,
) -> None:
    first, second, third, fourth = [await store.create_conversation() for _ in range(4)]
    page_one = await store.list_conversations(limit=2)
    assert [c.id for c in page_one.conversations] == [fourth.id, third.id]

    await store.add_message(first.id, "user", "I'm back")  # now newest, above the cursor
    page_two = await store.list_conversations(limit=2, after=page_one.next_cursor)
    assert [c.id for c in page_two.conversations] == [second.id]
    assert page_two.next_cursor is None


@pytest.mark.parametrize("cursor", ["not a cursor!", "bm9wZQ", "MjAyNS0wMS0wMVQwMDowMDowMHxjb252"])
async def test_malformed_cursor_is_rejected(store: ConversationStore, cursor: str) -> None:
    # "bm9wZQ" is base64 for "nope"; the last one holds a timestamp without a time zone.
    with pytest.raises(InvalidCursor):
        await store.list_conversations(after=cursor)


async def test_delete_removes_the_conversation_and_its_messages(
    db: Database, store: ConversationStore
) -> None:
    doomed = await store.create_conversation()
    kept = await store.create_conversation()
    doomed_message = await store.add_message(doomed.id, "user", "bye")
    await store.add_message(doomed.id, "assistant", "bye!")
    await store.add_message(kept.id, "user", "still here")

    await store.delete_conversation(doomed.id)

    assert await _message_count(db, doomed.id) == 0
    assert await _message_count(db, kept.id) == 1
    with pytest.raises(ConversationNotFound):
        await store.get_conversation(doomed.id)
    with pytest.raises(MessageNotFound):
        await store.get_message(doomed_message.id)
    assert [c.id for c in (await store.list_conversations()).conversations] == [kept.id]


async def test_deleting_the_last_answer_lets_a_new_one_take_its_place(
    store: ConversationStore,
) -> None:
    conversation = await store.create_conversation()
    question = await store.add_message(conversation.id, "user", "again?")
    first_try = await store.add_message(conversation.id, "assistant", "no")
    await store.delete_message(first_try.id)
    second_try = await store.add_message(conversation.id, "assistant", "yes")

    messages = (await store.get_conversation(conversation.id)).messages
    assert [m.id for m in messages] == [question.id, second_try.id]
    with pytest.raises(MessageNotFound):
        await store.delete_message(first_try.id)


async def test_deleting_a_middle_message_keeps_the_order(store: ConversationStore) -> None:
    conversation = await store.create_conversation()
    first, middle, last = [
        await store.add_message(conversation.id, "user", text) for text in ("a", "b", "c")
    ]
    await store.delete_message(middle.id)
    after = await store.add_message(conversation.id, "user", "d")

    messages = (await store.get_conversation(conversation.id)).messages
    assert [m.id for m in messages] == [first.id, last.id, after.id]


async def test_streaming_answer_is_appended_then_completed(store: ConversationStore) -> None:
    conversation = await store.create_conversation()
    answer = await store.add_message(
        conversation.id, MessageRole.ASSISTANT, status=MessageStatus.STREAMING, model="local"
    )
    assert (answer.content, answer.status) == ("", MessageStatus.STREAMING)

    await store.update_message(answer.id, append="Hello")
    await store.update_message(answer.id, append=", world")
    done = await store.update_message(
        answer.id, status="complete", prompt_tokens=12, completion_tokens=3
    )
    assert done.content == "Hello, world"
    assert done.status is MessageStatus.COMPLETE
    assert (done.prompt_tokens, done.completion_tokens, done.model) == (12, 3, "local")
    assert done.updated_at > answer.updated_at
    assert await store.get_message(answer.id) == done


async def test_failed_answer_keeps_its_text_and_error(store: ConversationStore) -> None:
    conversation = await store.create_conversation()
    answer = await store.add_message(conversation.id, "assistant", "partial", status="streaming")
    failed = await store.update_message(answer.id, status="error", error="upstream timed out")
    assert (failed.content, failed.status, failed.error) == (
        "partial",
        MessageStatus.ERROR,
        "upstream timed out",
    )
    replaced = await store.update_message(answer.id, content="rewritten", status="stopped")
    assert (replaced.content, replaced.status) == ("rewritten", MessageStatus.STOPPED)


async def test_interrupting_changes_only_an_answer_still_streaming(
    store: ConversationStore,
) -> None:
    conversation = await store.create_conversation()
    orphan = await store.add_message(conversation.id, "assistant", "half", status="streaming")
    ended = await store.add_message(conversation.id, "assistant", "all", status="stopped")

    assert await store.interrupt_answer(orphan.id) is True
    assert await store.interrupt_answer(orphan.id) is False
    assert await store.interrupt_answer(ended.id) is False
    interrupted = await store.get_message(orphan.id)
    assert (interrupted.content, interrupted.status) == ("half", MessageStatus.INTERRUPTED)
    assert (await store.get_message(ended.id)).status is MessageStatus.STOPPED


async def test_update_refuses_content_and_append_together(store: ConversationStore) -> None:
    conversation = await store.create_conversation()
    message = await store.add_message(conversation.id, "assistant", "x")
    with pytest.raises(ValueError, match="not both"):
        await store.update_message(message.id, content="a", append="b")


async def test_unknown_role_or_status_is_rejected(store: ConversationStore) -> None:
    conversation = await store.create_conversation()
    with pytest.raises(ValueError):
        await store.add_message(conversation.id, "tool", "x")
    message = await store.add_message(conversation.id, "user", "x")
    with pytest.raises(ValueError):
        await store.update_message(message.id, status="finished")


# Accents, CJK (with a full-width comma), right-to-left Arabic, an emoji ZWJ sequence with a skin
# tone, a combining accent, astral-plane letters (4 bytes in UTF-8), invisible and control chars.
UNICODE = (
    "héllo wörld · 你好\uff0c世界 · مرحبا بالعالم · 👩🏽\u200d💻🚀 · e\u0301"
    " · \U0001d518\U0001d52b\U0001d526 · \u200b\t\n\r"
)


async def test_unicode_survives_a_round_trip(store: ConversationStore) -> None:
    conversation = await store.create_conversation(title=UNICODE, system=UNICODE, model="ü")
    message = await store.add_message(conversation.id, "user", UNICODE)
    answer = await store.add_message(conversation.id, "assistant", status="streaming")
    for piece in UNICODE:  # one code point at a time, as tokens may split a grapheme
        await store.update_message(answer.id, append=piece)

    fetched = await store.get_conversation(conversation.id)
    assert (fetched.title, fetched.system, fetched.model) == (UNICODE, UNICODE, "ü")
    assert [m.content for m in fetched.messages] == [UNICODE, UNICODE]
    assert fetched.messages[0].id == message.id


async def test_long_answer_updated_many_times_is_exact(store: ConversationStore) -> None:
    conversation = await store.create_conversation()
    answer = await store.add_message(conversation.id, "assistant", status="streaming")
    chunks = [f"[{index:04d}] token text ✓ 语 " * 4 for index in range(1000)]
    for chunk in chunks:
        await store.update_message(answer.id, append=chunk)
    expected = "".join(chunks)
    assert len(expected) == 88_000
    assert (await store.get_message(answer.id)).content == expected

    # Replacing the whole text each time (as a client re-sending its buffer would) also holds.
    text = ""
    for chunk in chunks[:200]:
        text += chunk
        await store.update_message(answer.id, content=text)
    done = await store.update_message(answer.id, status="complete")
    assert done.content == text
    assert done.status is MessageStatus.COMPLETE


UNSTORABLE = "a\x00b\ud800c\udfffd"
"""Text neither backend can keep as is: NUL (PostgreSQL refuses it) and lone surrogates (no
driver can encode them)."""
STORED = "a\ufffdb\ufffdc\ufffdd"


async def test_unstorable_characters_are_kept_as_replacement_characters(
    store: ConversationStore,
) -> None:
    conversation = await store.create_conversation(title=UNSTORABLE, system=UNSTORABLE)
    question = await store.add_message(conversation.id, "user", UNSTORABLE)
    answer = await store.add_message(conversation.id, "assistant", status="streaming")
    await store.update_message(answer.id, append="ok ")
    await store.update_message(answer.id, append=UNSTORABLE, error=UNSTORABLE, status="error")

    fetched = await store.get_conversation(conversation.id)
    assert (fetched.title, fetched.system) == (STORED, STORED)
    assert (await store.get_message(question.id)).content == STORED
    stored = await store.get_message(answer.id)
    assert (stored.content, stored.error, stored.status) == (f"ok {STORED}", STORED, "error")
    renamed = await store.rename_conversation(conversation.id, UNSTORABLE)
    assert renamed.title == STORED


@pytest.mark.parametrize("bad_id", ["conv_\x00", "\x00", "msg_\ud800"])
async def test_ids_no_row_can_have_are_simply_not_found(
    store: ConversationStore, bad_id: str
) -> None:
    with pytest.raises(ConversationNotFound):
        await store.get_conversation(bad_id)
    with pytest.raises(ConversationNotFound):
        await store.rename_conversation(bad_id, "x")
    with pytest.raises(ConversationNotFound):
        await store.add_message(bad_id, "user", "x")
    with pytest.raises(ConversationNotFound):
        await store.delete_conversation(bad_id)
    with pytest.raises(MessageNotFound):
        await store.update_message(bad_id, append="x")
    with pytest.raises(MessageNotFound):
        await store.get_message(bad_id)


@pytest.mark.parametrize(
    "key", ["2024-01-01T00:00:00+00:00|conv_\x00", "0001-01-01T00:00:00+05:00|conv_x"]
)
async def test_cursor_that_decodes_to_nonsense_is_rejected_or_empty(
    store: ConversationStore, key: str
) -> None:
    await store.create_conversation()
    cursor = base64.urlsafe_b64encode(key.encode("utf-8")).decode().rstrip("=")
    try:
        page = await store.list_conversations(after=cursor)
    except InvalidCursor:
        return
    assert page.next_cursor is None
