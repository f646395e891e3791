"""Client API <-> upstream API translation, request whole and response chunk by chunk
(sans-I/O; `registry` says which pairs an alias may cross, `exchange/translated.py`
runs them: docs/translation.md).

One module per pair: `chat_to_anthropic` (OpenAI chat client, Anthropic upstream),
`messages_to_chat` (Anthropic Messages client, OpenAI chat upstream), `chat_to_gemini`,
`chat_to_bedrock` (OpenAI chat client, Gemini / Bedrock Converse upstream).
The contract is in `base`; `openai_out` writes OpenAI chunks for every `* -> OpenAI`
pair; `openai_from_anthropic` and `anthropic_from_openai` hold the response halves of
the two Anthropic pairs.
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
from extproc.translate.chat_to_bedrock import BedrockToOpenAI, ChatToBedrock
from extproc.translate.chat_to_gemini import ChatToGemini, GeminiToOpenAI
from extproc.translate.messages_to_chat import ChatToMessages, MessagesToChat

__all__ = [
    "AnthropicToOpenAI",
    "BedrockToOpenAI",
    "ChatToAnthropic",
    "ChatToBedrock",
    "ChatToGemini",
    "ChatToMessages",
    "GeminiToOpenAI",
    "MessagesToChat",
    "RequestTranslator",
    "ResponseTranslator",
    "TranslatedError",
    "UpstreamRequest",
    "client_status",
]
