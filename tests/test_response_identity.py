"""The answer's own id and model, read once from its first chunk for the trace."""

from __future__ import annotations

import orjson
import pytest

from extproc.providers._json import response_identity


@pytest.mark.parametrize(
    ("first", "expected"),
    [
        (  # OpenAI chat: the top-level id comes before a tool call's
            b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","model":"gpt-4o-mini",'
            b'"choices":[{"delta":{"tool_calls":[{"id":"call_9","function":{}}]}}]}\n\n',
            ("chatcmpl-1", "gpt-4o-mini"),
        ),
        (  # Anthropic message_start
            b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1",'
            b'"type":"message","role":"assistant","model":"claude-sonnet-4-5"}}\n\n',
            ("msg_1", "claude-sonnet-4-5"),
        ),
        (  # Gemini, spaced JSON, names after the candidates
            b'data: {"candidates": [{"content": {"parts": [{"text": "hi"}]}}], '
            b'"modelVersion": "gemini-2.5-flash", "responseId": "r-1"}\r\n\r\n',
            ("r-1", "gemini-2.5-flash"),
        ),
        (b"\x00\x00\x01\x0bbinary eventstream", (None, None)),  # Bedrock names neither
    ],
)
def test_id_and_model_of_each_format(first: bytes, expected: tuple) -> None:
    assert response_identity(first) == expected


def test_a_text_that_spells_an_id_is_never_read_as_one() -> None:
    text = 'she wrote "id":"forged" and "model":"forged"'
    frame = b"data: " + orjson.dumps({"choices": [{"delta": {"content": text}}]}) + b"\n\n"
    assert response_identity(frame) == (None, None)
