"""Client API <-> upstream API translation, request whole and response chunk by chunk
(sans-I/O; not wired into the exchange yet: docs/translation.md).

One module per pair: `chat_to_anthropic` (OpenAI chat client, Anthropic upstream),
`messages_to_chat` (Anthropic Messages client, OpenAI chat upstream).
The contract is in `base`; `openai_out` writes OpenAI chunks for every `* -> OpenAI`
pair.
"""

from __future__ import annotations

from extproc.translate.base import (
    RequestTranslator,
    ResponseTranslator,
    TranslatedError,
    UpstreamRequest,
    client_status,
)
from extproc.translate.chat_to_anthropic import AnthropicToOpenAI, ChatToAnthropic
from extproc.translate.messages_to_chat import ChatToMessages, MessagesToChat

__all__ = [
    "AnthropicToOpenAI",
    "ChatToAnthropic",
    "ChatToMessages",
    "MessagesToChat",
    "RequestTranslator",
    "ResponseTranslator",
    "TranslatedError",
    "UpstreamRequest",
    "client_status",
]
