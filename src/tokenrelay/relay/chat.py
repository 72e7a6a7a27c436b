"""Conversations with a model: store the question, then answer with the whole history.

Used by the conversation API and by ``tokenrelay chat`` alike. The user's message is stored
before the model is called and the answer is stored as it grows (see ``generation``), so nothing
a user typed or a model wrote is lost to a dropped connection or a crash.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import orjson

from tokenrelay.errors import InvalidRequest
from tokenrelay.providers.base import ProviderRequest
from tokenrelay.providers.registry import ProviderRegistry
from tokenrelay.relay.generation import Generation, Generations
from tokenrelay.sse import encode_event
from tokenrelay.storage.conversations import (
    ConversationDetail,
    ConversationStore,
    MessageNotFound,
    MessageRecord,
)
from tokenrelay.storage.models import MessageRole, MessageStatus

__all__ = ["ChatService", "ChatTurn", "trim_history"]

_CHARS_PER_TOKEN = 3  # a cautious estimate: real tokenizers average 3.5-4.5 for English
_MESSAGE_OVERHEAD = 8  # role markers and separators a chat template adds per message


@dataclass(frozen=True, slots=True)
class ChatTurn:
    """A question just stored and the answer being written to it."""

    user_message: MessageRecord | None
    assistant_message: MessageRecord
    generation: Generation

    async def events(self) -> AsyncGenerator[bytes, None]:
        """SSE bytes: an ``event: message`` naming both messages, then the model's chunks."""
        yield encode_event(
            {
                "user_message": _message_json(self.user_message) if self.user_message else None,
                "assistant_message": _message_json(self.assistant_message),
            },
            event="message",
        )
        async for chunk in self.generation.events():
            yield chunk


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
    """Starts answers in conversations and keeps track of the running ones."""

    def __init__(
        self,
        store: ConversationStore,
        registry: ProviderRegistry,
        *,
        flush_interval: float = 1.0,
        answer_reserve: int = 512,
    ) -> None:
        self.store = store
        self.registry = registry
        self.generations = Generations()
        self._claims: dict[str, _Claim] = {}
        self._flush_interval = flush_interval
        self._answer_reserve = answer_reserve

    async def send(self, conversation_id: str, content: str, model: str | None = None) -> ChatTurn:
        """Store ``content`` as the user's next message and start the answer."""
        with self._claim(conversation_id) as claim:
            conversation = await self.store.get_conversation(conversation_id)
            model = await self._model_for(conversation, model)
            user_message = await self.store.add_message(conversation_id, MessageRole.USER, content)
            if conversation.title is None and not conversation.messages:
                await self.store.rename_conversation(conversation_id, _title_from(content))
            history = [*_history(conversation.messages), {"role": "user", "content": content}]
            return await self._answer(claim, conversation, history, model, user_message)

    async def regenerate(self, conversation_id: str, model: str | None = None) -> ChatTurn:
        """Answer the last user message again, replacing the answer after it."""
        with self._claim(conversation_id) as claim:
            conversation = await self.store.get_conversation(conversation_id)
            model = await self._model_for(conversation, model)
            messages = list(conversation.messages)
            replaced = []
            while messages and messages[-1].role == MessageRole.ASSISTANT:
                replaced.append(messages.pop().id)
            if not messages or messages[-1].role != MessageRole.USER:
                raise InvalidRequest("There is no question to answer again in this conversation.")
            return await self._answer(
                claim, conversation, _history(messages), model, None, replaced
            )

    async def stop(self, conversation_id: str) -> bool:
        """Stop the answer being written, if any, and wait until it is saved as ``stopped``.

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
        return await self.generations.stop(conversation_id)

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

    async def aclose(self) -> None:
        await self.generations.aclose()

    async def _model_for(self, conversation: ConversationDetail, model: str | None) -> str:
        model = model or conversation.model or await self.registry.default_model()
        self.registry.resolve(model)  # an unknown model is refused before anything is stored
        return model

    @contextmanager
    def _claim(self, conversation_id: str) -> Iterator[_Claim]:
        """Hold the conversation from the first await until its answer has started.

        Checked and taken without awaiting, so two requests arriving together cannot both start
        an answer; the running ``Generation`` then marks the conversation busy as long as it runs.
        """
        if conversation_id in self._claims or self.generations.get(conversation_id) is not None:
            raise InvalidRequest(
                "This conversation is still answering; stop it or wait for it to finish.",
                code="conversation_busy",
            )
        claim = self._claims[conversation_id] = _Claim()
        try:
            yield claim
        finally:
            claim.settled.set()  # if no answer was started, a waiting Stop finds nothing to stop
            del self._claims[conversation_id]

    async def _answer(
        self,
        claim: _Claim,
        conversation: ConversationDetail,
        history: list[dict[str, Any]],
        model: str,
        user_message: MessageRecord | None,
        replaced: Sequence[str] = (),
    ) -> ChatTurn:
        """Start the answer; ``replaced`` answers are deleted once the provider accepted.

        The ``Generation`` is registered before the provider is asked, so Stop and DELETE reach
        it while the upstream has not answered yet (or the local model's queue holds it). A
        refusal before the first byte is raised here, as an HTTP error for the route.
        """
        provider = self.registry.resolve(model)
        budget = provider.context_window(model) - self._answer_reserve
        body = {
            "model": model,
            "messages": trim_history(conversation.system, history, budget),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        request = ProviderRequest("chat/completions", model, body, orjson.dumps(body))
        answer = await self.store.add_message(
            conversation.id, MessageRole.ASSISTANT, status=MessageStatus.STREAMING, model=model
        )
        generation = Generation(
            self.store,
            answer.id,
            partial(provider.open_stream, request),
            flush_interval=self._flush_interval,
        )
        self.generations.start(conversation.id, generation)
        claim.generation = generation
        if claim.stop:  # a Stop came while the question was being stored
            generation.cancel()
        claim.settled.set()
        if await generation.opened():
            for message_id in replaced:
                # Gone already if the conversation was deleted meanwhile.
                with suppress(MessageNotFound):
                    await self.store.delete_message(message_id)
        return ChatTurn(user_message, answer, generation)


@dataclass(slots=True)
class _Claim:
    """A conversation whose question is being stored; a Stop arriving meanwhile is kept here."""

    stop: bool = False
    generation: Generation | None = None
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
    }
