"""Request bodies in OpenAI's shapes, used to validate and to document ``/docs``.

They check only what a gateway must be sure of (the fields it reads and the types OpenAI's API
would reject); every other field is allowed and forwarded byte for byte, so new OpenAI parameters
and provider-specific extras pass through without a release of tokenrelay.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

__all__ = ["ChatMessage", "ChatCompletionRequest", "CompletionRequest", "StreamOptions"]

_Number = StrictInt | StrictFloat


class _OpenAIBody(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_OpenAIBody):
    include_usage: StrictBool | None = None


class ChatMessage(_OpenAIBody):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: StrictStr | list[dict[str, Any]] | None = None
    name: StrictStr | None = None


class _Sampling(_OpenAIBody):
    model: StrictStr = Field(min_length=1, description="Which model answers; see `/v1/models`.")
    stream: StrictBool | None = Field(default=None, description="Answer as Server-Sent Events.")
    stream_options: StreamOptions | None = None
    max_tokens: StrictInt | None = Field(default=None, ge=0)
    temperature: _Number | None = Field(default=None, ge=0, le=2)
    top_p: _Number | None = Field(default=None, ge=0, le=1)
    n: StrictInt | None = Field(default=None, ge=1)
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``; tools, response_format, logprobs... pass through."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=0)


class CompletionRequest(_Sampling):
    """``POST /v1/completions`` (the legacy text completion)."""

    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
