"""The Responses API (``/v1/responses``) answered by any chat-completions model.

``request`` validates a request and translates it to chat completions; ``history`` turns items
(new input, or stored ones for ``previous_response_id``) into chat messages; ``events`` turns the
chat answer back into Responses events and Response objects. Storage is
``tokenrelay.storage.responses``.
"""

from tokenrelay.responses.events import (
    ResponseStream,
    response_error,
    response_from_completion,
    response_from_record,
    response_object,
    usage_from_chat,
)
from tokenrelay.responses.history import ToolName, chain_items, chat_messages
from tokenrelay.responses.request import (
    ChatTranslation,
    ResponsesRequest,
    normalize_input,
    parse_request,
    translate,
)

__all__ = [
    "ChatTranslation",
    "ResponseStream",
    "ResponsesRequest",
    "ToolName",
    "chain_items",
    "chat_messages",
    "normalize_input",
    "parse_request",
    "response_error",
    "response_from_completion",
    "response_from_record",
    "response_object",
    "translate",
    "usage_from_chat",
]
