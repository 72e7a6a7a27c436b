"""Conversations with a model: store the question, then answer with the whole history.

Used by the conversation API and by ``tokenrelay chat`` alike. The user's message is stored
before the model is called and the answer is stored as it grows (see ``recorder``), so nothing
a user typed or a model wrote is lost to a dropped connection or a crash. The answer is a
``Generation`` like every streamed answer: its events go to a log that any reader (the page
after a reload, a second tab, another replica) can read and resume, and a conversation is busy
while it answers on every process sharing the state.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import orjson

from tokenrelay.access.keys import OPERATOR, Caller
from tokenrelay.errors import InvalidRequest
from tokenrelay.providers.base import ProviderRequest
from tokenrelay.relay.gateway import Admitted, Gateway
from tokenrelay.relay.generation import Generation
from tokenrelay.relay.recorder import MessageRecorder
from tokenrelay.sse import encode_event
from tokenrelay.storage.conversations import (
    ConversationDetail,
    ConversationStore,
    MessageNotFound,
    MessageRecord,
)
from tokenrelay.storage.models import MessageRole, MessageStatus
from tokenrelay.streams import new_stream_id

__all__ = ["ChatService", "ChatTurn", "trim_history"]

_CHARS_PER_TOKEN = 3  # a cautious estimate: real tokenizers average 3.5-4.5 for English
_MESSAGE_OVERHEAD = 8  # role markers and separators a chat template adds per message


@dataclass(frozen=True, slots=True)
class ChatTurn:
    """A question just stored and the answer being written to it."""

    user_message: MessageRecord | None
    assistant_message: MessageRecord
    generation: Generation
    headers: dict[str, str] = field(default_factory=dict)
    """The caller's rate-limit headers."""

    def preamble(self) -> bytes:
        """The ``event: message`` naming both stored messages, before the model's chunks."""
        return encode_event(
            {
                "user_message": _message_json(self.user_message) if self.user_message else None,
                "assistant_message": _message_json(self.assistant_message),
            },
            event="message",
        )


def estimate_tokens(message: dict[str, Any]) -> int:
    return len(str(message.get("content") or "")) // _CHARS_PER_TOKEN + _MESSAGE_OVERHEAD


def trim_history(
    system: str | None, messages: Sequence[dict[str, Any]], budget: int
) -> list[dict[str, Any]]:
    """The newest messages that fit ``budget`` tokens, oldest first, after the system prompt.

    The last message (the question) is always kept; older ones are dropped oldest first.
    """
    head = [{"role": "system", "content": system}] if system else []
    budget -= sum(estimate_tokens(m) for m in head)
    kept: list[dict[str, Any]] = []
    for message in reversed(messages):
        cost = estimate_tokens(message)
        if kept and cost > budget:
            break
        kept.append(message)
        budget -= cost
    return head + kept[::-1]


class ChatService:
    """Starts answers in conversations, and stops them wherever they run."""

    def __init__(
        self,
        store: ConversationStore,
        gateway: Gateway,
        *,
        grace: float = 15.0,
        flush_interval: float = 1.0,
        answer_reserve: int = 512,
    ) -> None:
        self.store = store
        self.gateway = gateway
        self.registry = gateway.registry
        self.generations = gateway.generations
        self._claims: dict[str, _Claim] = {}
        self._running: dict[str, Generation] = {}  # conversation id -> its answer, here
        self._grace = grace
        self._flush_interval = flush_interval
        self._answer_reserve = answer_reserve

    async def send(
        self,
        conversation_id: str,
        content: str,
        model: str | None = None,
        caller: Caller = OPERATOR,
    ) -> ChatTurn:
        """Store ``content`` as the user's next message and start the answer.

        The call is admitted (the key's model and limits) before anything is stored: a refused
        question leaves no trace in the conversation.
        """
        async with self._claim(conversation_id) as claim:
            conversation = await self._settled(conversation_id)
            model = await self._model_for(conversation, model, caller)
            history = [*_history(conversation.messages), {"role": "user", "content": content}]
            admitted = await self._admit(caller, conversation, history, model)
            user_message = await self.store.add_message(conversation_id, MessageRole.USER, content)
            if conversation.title is None and not conversation.messages:
                await self.store.rename_conversation(conversation_id, _title_from(content))
            return await self._answer(claim, conversation, admitted, user_message)

    async def regenerate(
        self, conversation_id: str, model: str | None = None, caller: Caller = OPERATOR
    ) -> ChatTurn:
        """Answer the last user message again, replacing the answer after it."""
        async with self._claim(conversation_id) as claim:
            conversation = await self._settled(conversation_id)
            model = await self._model_for(conversation, model, caller)
            messages = list(conversation.messages)
            replaced = []
            while messages and messages[-1].role == MessageRole.ASSISTANT:
                replaced.append(messages.pop().id)
            if not messages or messages[-1].role != MessageRole.USER:
                raise InvalidRequest("There is no question to answer again in this conversation.")
            admitted = await self._admit(caller, conversation, _history(messages), model)
            return await self._answer(claim, conversation, admitted, None, replaced)

    async def stop(self, conversation_id: str, *, wait: float | None = None) -> bool:
        """Stop the answer being written, if any, and wait (``wait`` s at most, by default a
        little longer than a lease) until it is saved as ``stopped``; on another process, the
        cancel is published to it, and if that process has died the answer is saved as
        ``interrupted`` once its lease has run out.

        A question still being stored has its answer stopped as soon as that answer exists, so
        a Stop works from the moment the user sent the question.
        """
        claim = self._claims.get(conversation_id)
        if claim is not None:
            claim.stop = True
            await claim.settled.wait()
            if claim.generation is not None:
                await claim.generation.stop()
                return True
        generation = self._running.get(conversation_id)
        if generation is not None:
            await generation.stop()
            return True
        answer = await self.store.streaming_answer(conversation_id)
        if answer is None or answer.stream_id is None:
            return False
        await self.generations.cancel(answer.stream_id)
        if wait is None:
            wait = self.generations.lease_seconds + 5
        with suppress(TimeoutError):
            async with asyncio.timeout(wait):
                if await self.generations.wait_ended(answer.stream_id):
                    # The replica writing it died: say so, as one restarting would.
                    await self.store.interrupt_answer(answer.id)
        return True

    async def delete(self, conversation_id: str) -> None:
        """Delete a conversation and its messages, stopping its answer first.

        Stopped again afterwards: an answer whose question was being stored while the rows
        were deleted must not run on for a conversation that is gone.
        """
        await self.stop(conversation_id)
        try:
            await self.store.delete_conversation(conversation_id)
        finally:
            await self.stop(conversation_id)

    async def _settled(self, conversation_id: str) -> ConversationDetail:
        """The conversation, held by this request: an answer still ``streaming`` in it has no
        writer (every answer holds the conversation while it runs), so the replica writing it
        died; it is marked ``interrupted`` first, as a restarting replica would."""
        conversation = await self.store.get_conversation(conversation_id)
        for message in conversation.messages:
            if message.status == MessageStatus.STREAMING:
                await self.store.interrupt_answer(message.id)
        return conversation

    async def _model_for(
        self, conversation: ConversationDetail, model: str | None, caller: Caller
    ) -> str:
        model = model or conversation.model or await self.registry.default_model()
        # An unknown model (or one the key may not use) is refused before anything is stored.
        self.gateway.provider_for(caller, model)
        return model

    async def _admit(
        self,
        caller: Caller,
        conversation: ConversationDetail,
        history: list[dict[str, Any]],
        model: str,
    ) -> Admitted:
        """The call answering ``history``, within the model's context window, admitted."""
        provider = self.gateway.provider_for(caller, model)
        budget = provider.context_window(model) - self._answer_reserve
        body = {
            "model": model,
            "messages": trim_history(conversation.system, history, budget),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        request = ProviderRequest("chat/completions", model, body, orjson.dumps(body))
        return await self.gateway.admit(caller, "conversations", request)

    @asynccontextmanager
    async def _claim(self, conversation_id: str) -> AsyncIterator[_Claim]:
        """Hold the conversation from the first await until its answer has ended.

        Checked and taken here without awaiting first, so two requests arriving together at
        one process cannot both start an answer; then the shared key ``busy:<id>`` is taken, so
        neither can two processes. The answer's ``Generation`` holds that key while it runs.
        """
        running = self._running.get(conversation_id)
        # An answer that has finished (its log about to end) no longer holds the conversation.
        if conversation_id in self._claims or (running is not None and not running.finished):
            raise _busy()
        claim = self._claims[conversation_id] = _Claim()
        key = f"busy:{conversation_id}"
        try:
            claim.token = await self.generations.hold(key)
            if claim.token is None:
                raise _busy()
            yield claim
        finally:
            claim.settled.set()  # if no answer was started, a waiting Stop finds nothing to stop
            del self._claims[conversation_id]
            if claim.token is not None and claim.generation is None:
                await self.generations.release(key, claim.token)

    async def _answer(
        self,
        claim: _Claim,
        conversation: ConversationDetail,
        admitted: Admitted,
        user_message: MessageRecord | None,
        replaced: Sequence[str] = (),
    ) -> ChatTurn:
        """Start the answer; ``replaced`` answers are deleted once the provider accepted.

        The ``Generation`` is registered before the provider is asked, so Stop and DELETE reach
        it while the upstream has not answered yet (or the local model's queue holds it). A
        refusal before the first byte is raised here, as an HTTP error for the route.
        """
        model = admitted.request.model
        stream_id = new_stream_id()
        assert claim.token is not None
        async with self.generations.lease(stream_id):  # owned before it is stored as running
            answer = await self.store.add_message(
                conversation.id,
                MessageRole.ASSISTANT,
                status=MessageStatus.STREAMING,
                model=model,
                stream_id=stream_id,
            )
            generation = await self.gateway.stream(
                admitted,
                grace=self._grace,
                recorder=MessageRecorder(
                    self.store, answer.id, flush_interval=self._flush_interval
                ),
                leased=True,
                stream_id=stream_id,
                holding=[(f"busy:{conversation.id}", claim.token)],
            )
        self._running[conversation.id] = claim.generation = generation
        generation.task.add_done_callback(lambda _: self._ended(conversation.id, generation))
        if claim.stop:  # a Stop came while the question was being stored
            generation.cancel()
        claim.settled.set()
        if await generation.opened():
            for message_id in replaced:
                # Gone already if the conversation was deleted meanwhile.
                with suppress(MessageNotFound):
                    await self.store.delete_message(message_id)
        return ChatTurn(user_message, answer, generation, admitted.headers)

    def _ended(self, conversation_id: str, generation: Generation) -> None:
        if self._running.get(conversation_id) is generation:
            del self._running[conversation_id]


def _busy() -> InvalidRequest:
    return InvalidRequest(
        "This conversation is still answering; stop it or wait for it to finish.",
        code="conversation_busy",
    )


@dataclass(slots=True)
class _Claim:
    """A conversation whose question is being stored; a Stop arriving meanwhile is kept here."""

    stop: bool = False
    generation: Generation | None = None
    token: str | None = None  # holding the shared ``busy:<id>`` key
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the answer is started (``generation``), or once it will not be."""


def _history(messages: Sequence[MessageRecord]) -> list[dict[str, Any]]:
    """What the model should see of earlier turns: every message with text, in order."""
    return [
        {"role": str(m.role), "content": m.content}
        for m in messages
        if m.content and m.role in (MessageRole.USER, MessageRole.ASSISTANT)
    ]


def _title_from(question: str, length: int = 60) -> str:
    """A first question, on one line and cut at a word, names an untitled conversation."""
    line = " ".join(question.split())
    if len(line) <= length:
        return line
    return line[:length].rsplit(" ", 1)[0] + "…"


def _message_json(message: MessageRecord) -> dict[str, Any]:
    return {
        "id": message.id,
        "role": str(message.role),
        "content": message.content,
        "status": str(message.status),
        "model": message.model,
        "created_at": message.created_at.isoformat(),
        # The answer's event log, to resume after a drop (``GET /api/streams/{stream_id}``).
        "stream_id": message.stream_id,
    }
