"""Wire formats. Everything above this package (auth, guards, limits, metrics) talks to
the neutral interface in `base`, never to a provider's shapes.

Which format reads an exchange is decided in three steps:

1. the route's provider (config `format`) names a family of formats;
2. the upstream path picks the member that serves it (OpenAI chat vs Responses), or,
   when the family has none, any format whose API path it is (Gemini, Anthropic and
   Bedrock also serve OpenAI's `/chat/completions`); no match means pass through;
3. the response content type picks the decoder (`response_decoder`): SSE, a streamed
   JSON array, a binary event stream, or None for one JSON document.
"""

from __future__ import annotations

from extproc.providers.anthropic import AnthropicMessages
from extproc.providers.base import (
    RequestError,
    RequestInfo,
    ResponseDecoder,
    StreamError,
    StreamEvent,
    TextDelta,
    ToolCallStart,
    WireFormat,
)
from extproc.providers.bedrock import BedrockConverse
from extproc.providers.gemini import Gemini, Vertex
from extproc.providers.openai_chat import AzureOpenAIChat, OpenAIChat
from extproc.providers.openai_responses import AzureOpenAIResponses, OpenAIResponses

__all__ = [
    "FAMILIES",
    "AnthropicMessages",
    "AzureOpenAIChat",
    "AzureOpenAIResponses",
    "BedrockConverse",
    "Gemini",
    "OpenAIChat",
    "OpenAIResponses",
    "RequestError",
    "RequestInfo",
    "ResponseDecoder",
    "StreamError",
    "StreamEvent",
    "TextDelta",
    "ToolCallStart",
    "Vertex",
    "WireFormat",
    "decoder_label",
    "detect_format",
    "format_for",
    "response_decoder",
]

# Config `format` -> the formats a provider of that kind serves, most common first.
FAMILIES: dict[str, tuple[type[WireFormat], ...]] = {
    "openai": (OpenAIChat, OpenAIResponses),
    "azure": (AzureOpenAIChat, AzureOpenAIResponses),
    "anthropic": (AnthropicMessages,),
    "gemini": (Gemini,),
    "vertex": (Vertex,),
    "bedrock": (BedrockConverse,),
}
# Formats recognised by path alone, for providers that also speak another API.
_BY_PATH: tuple[type[WireFormat], ...] = (
    OpenAIChat,
    OpenAIResponses,
    AnthropicMessages,
    Gemini,
    BedrockConverse,
)


def detect_format(provider_format: str, upstream_path: str) -> type[WireFormat] | None:
    """The format that reads requests to `upstream_path` (path with query, after the
    route's rewrite) on a provider of `provider_format`; None: not an API we inspect.

    The request's content type is deliberately not consulted: a client could label a
    JSON body `text/plain` to slip past the guards while the provider still reads it.
    """
    family = FAMILIES.get(provider_format, ())
    for fmt in family:
        if fmt.handles(upstream_path):
            return fmt
    for fmt in _BY_PATH:
        if fmt not in family and fmt.handles(upstream_path):
            return fmt
    return None


def response_decoder(
    fmt: type[WireFormat],
    content_type: str | None,
    *,
    stream: bool,
    hide_usage: bool,
    max_frame_bytes: int,
) -> ResponseDecoder | None:
    """The incremental decoder for this response, or None when the body is one JSON
    document (meter it with `fmt.completion_usage`) or not something `fmt` reads.

    `stream` is `RequestInfo.stream`: Gemini streams a JSON array under the same
    `application/json` type as a plain answer.
    """
    return fmt.response_decoder(
        (content_type or "").strip(),
        stream=stream,
        hide_usage=hide_usage,
        max_frame_bytes=max_frame_bytes,
    )


def decoder_label(fmt: type[WireFormat], decoder: ResponseDecoder | None) -> str:
    """Which decoder ran, for a metrics label: e.g. `anthropic_sse`,
    `gemini_json_stream`, `bedrock_eventstream`, or `<format>_json` for whole bodies."""
    return decoder.name if decoder is not None else f"{fmt.name}_json"


def format_for(name: str) -> type[WireFormat]:
    """The main format of a config `format` (kept for callers that do not detect)."""
    return FAMILIES[name][0]
