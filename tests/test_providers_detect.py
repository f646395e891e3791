"""Choosing the format (provider, then path) and the decoder (content type), and the
one interface every format implements."""

from __future__ import annotations

import pytest

from extproc.config import WIRE_FORMATS
from extproc.providers import (
    FAMILIES,
    AnthropicMessages,
    AzureOpenAIChat,
    AzureOpenAIResponses,
    BedrockConverse,
    Gemini,
    OpenAIChat,
    OpenAIResponses,
    Vertex,
    decoder_label,
    detect_format,
    format_for,
    response_decoder,
)

GEMINI_SSE = "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
VERTEX = (
    "/v1/projects/p/locations/us-central1/publishers/google/models/gemini-2.0-flash-001"
    ":streamGenerateContent"
)
ALL = [OpenAIChat, OpenAIResponses, AzureOpenAIChat, AzureOpenAIResponses, AnthropicMessages,
       Gemini, Vertex, BedrockConverse]  # fmt: skip


def test_every_config_format_has_a_family():
    assert set(FAMILIES) == set(WIRE_FORMATS)
    assert format_for("openai") is OpenAIChat


@pytest.mark.parametrize(
    ("provider", "path", "expected"),
    [
        ("openai", "/v1/chat/completions", OpenAIChat),
        ("openai", "/v1/responses", OpenAIResponses),
        ("openai", "/v1/embeddings", None),
        ("openai", "/v1/models", None),
        ("azure", "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
         AzureOpenAIChat),
        ("azure", "/openai/v1/responses", AzureOpenAIResponses),
        ("anthropic", "/v1/messages", AnthropicMessages),
        ("anthropic", "/v1/messages/count_tokens", None),
        ("gemini", GEMINI_SSE, Gemini),
        ("gemini", "/v1beta/models/gemini-2.5-flash:generateContent", Gemini),
        ("gemini", "/v1beta/models/gemini-2.5-flash:embedContent", None),
        ("vertex", VERTEX, Vertex),
        ("bedrock", "/model/us.amazon.nova-lite-v1%3A0/converse-stream", BedrockConverse),
        ("bedrock", "/model/m/invoke", None),
        # Providers that also speak another API are read by path.
        ("gemini", "/v1beta/openai/chat/completions", OpenAIChat),
        ("anthropic", "/v1/chat/completions", OpenAIChat),
        ("openai", "/v1/messages", AnthropicMessages),  # vLLM, Ollama serve it too
        ("unknown", "/v1/chat/completions", OpenAIChat),
    ],
)  # fmt: skip
def test_detect_format(provider, path, expected):
    assert detect_format(provider, path) is expected


@pytest.mark.parametrize(
    ("fmt", "content_type", "stream", "label"),
    [
        (OpenAIChat, "text/event-stream; charset=utf-8", True, "openai_chat_sse"),
        (AzureOpenAIChat, "text/event-stream", True, "openai_chat_sse"),
        (OpenAIChat, "application/json", False, "openai_chat_json"),
        (OpenAIResponses, "text/event-stream", True, "openai_responses_sse"),
        (AnthropicMessages, "text/event-stream", True, "anthropic_sse"),
        (AnthropicMessages, "application/json", False, "anthropic_messages_json"),
        (Gemini, "text/event-stream", True, "gemini_sse"),
        (Gemini, "application/json; charset=UTF-8", True, "gemini_json_stream"),
        (Gemini, "application/json; charset=UTF-8", False, "gemini_json"),
        (Vertex, "application/json", True, "gemini_json_stream"),
        (BedrockConverse, "application/vnd.amazon.eventstream", True, "bedrock_eventstream"),
        (BedrockConverse, "application/json", False, "bedrock_converse_json"),
        (OpenAIChat, None, True, "openai_chat_json"),
    ],
)
def test_response_decoder_by_content_type(fmt, content_type, stream, label):
    decoder = response_decoder(
        fmt, content_type, stream=stream, hide_usage=False, max_frame_bytes=1 << 16
    )
    assert decoder_label(fmt, decoder) == label


WIRE_FORMAT_API = ("name", "credential_headers", "handles", "parse_request",
                   "replace_request_texts", "ensure_usage", "error_body", "client_credential",
                   "upstream_auth", "stream_decoder", "response_decoder", "completion_usage",
                   "completion_finish_reason", "completion_texts",
                   "rewrite_completion")  # fmt: skip
DECODER_API = ("name", "usage", "finish_reason", "content_events", "buffered", "feed", "finish",
               "texts", "rewrite", "error_event")  # fmt: skip


@pytest.mark.parametrize("fmt", ALL, ids=lambda f: f.name)
def test_every_format_implements_the_whole_interface(fmt):
    assert all(hasattr(fmt, attr) for attr in WIRE_FORMAT_API)
    decoder = fmt.stream_decoder(hide_usage=False, max_frame_bytes=1024)
    assert all(hasattr(decoder, attr) for attr in DECODER_API)
    assert decoder.usage.reported is False and decoder.finish_reason is None
    assert decoder.feed(b"") == [] and decoder.buffered == 0
    assert isinstance(decoder.error_event("stop", "blocked"), bytes)
    for status in (400, 401, 403, 404, 413, 429, 500, 503):
        body = fmt.error_body(status, "msg", "code")
        assert b"msg" in body
    assert fmt.upstream_auth("k") and fmt.credential_headers
