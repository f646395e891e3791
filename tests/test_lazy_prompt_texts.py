"""`RequestInfo.prompt_texts` is walked on first use: the same texts (and estimate) as
the walk at parse time gave, and a metering-only exchange never walks at all."""

from __future__ import annotations

import orjson
import pytest

from extproc.providers import (
    AnthropicMessages,
    BedrockConverse,
    Gemini,
    OpenAIChat,
    OpenAIResponses,
)
from extproc.providers._common import JSONWireFormat
from extproc.usage import estimate_prompt_tokens
from tests.test_exchange import CHAT, Run, metadata, stream_frames

SCHEMA = {"type": "object", "properties": {"n": {"type": "string", "description": "a card"}}}
BODIES: list[tuple[type[JSONWireFormat], str, dict]] = [
    (
        OpenAIChat,
        "/v1/chat/completions",
        {
            "model": "m",
            "stream": True,
            "user": "u-1",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {
                    "role": "user",
                    "name": "ann",
                    "content": [
                        {"type": "text", "text": "card 4111 1111 1111 1111"},
                        {"type": "image_url", "image_url": {"url": "https://x.test/?q=1"}},
                    ],
                },
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c",
                            "type": "function",
                            "function": {"name": "f", "arguments": '{"a":1}'},
                        },
                    ],
                },
                {"role": "tool", "tool_call_id": "c", "content": "42"},
            ],
            "tools": [
                {
                    "type": "function",
                    "function": {"name": "f", "description": "looks up", "parameters": SCHEMA},
                }
            ],
        },
    ),
    (
        AnthropicMessages,
        "/v1/messages",
        {
            "model": "claude",
            "max_tokens": 10,
            "system": [{"type": "text", "text": "Be terse."}],
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "hi"},
                        {
                            "type": "document",
                            "title": "t",
                            "source": {"type": "url", "url": "https://x.test/d"},
                        },
                    ],
                },
                {
                    "role": "assistant",
                    "content": [
                        {"type": "tool_use", "id": "t1", "name": "f", "input": {"n": "1"}},
                    ],
                },
            ],
            "tools": [{"name": "f", "description": "d", "input_schema": SCHEMA}],
            "metadata": {"user_id": "u"},
        },
    ),
    (
        Gemini,
        "/v1beta/models/gemini-2.0-flash:generateContent",
        {
            "systemInstruction": {"parts": [{"text": "Be terse."}]},
            "contents": [
                {"role": "user", "parts": [{"text": "card 4111"}]},
                {"role": "model", "parts": [{"functionCall": {"name": "f", "args": {"n": 1}}}]},
            ],
            "tools": [
                {"functionDeclarations": [{"name": "f", "description": "d", "parameters": SCHEMA}]}
            ],
        },
    ),
    (
        BedrockConverse,
        "/model/anthropic.claude-3/converse",
        {
            "system": [{"text": "Be terse."}],
            "messages": [{"role": "user", "content": [{"text": "hello"}]}],
            "toolConfig": {
                "tools": [
                    {"toolSpec": {"name": "f", "description": "d", "inputSchema": {"json": SCHEMA}}}
                ]
            },
        },
    ),
    (
        OpenAIResponses,
        "/v1/responses",
        {
            "model": "m",
            "instructions": "Be kind.",
            "input": [{"role": "user", "content": [{"type": "input_text", "text": "pay"}]}],
            "tools": [{"type": "function", "name": "f", "description": "d", "parameters": SCHEMA}],
            "user": "u",
        },
    ),
]


def eager(fmt: type[JSONWireFormat], body: dict) -> list[str]:
    """The walk as parsing ran it before: every slot of a fresh parse, read at once."""
    return [slot.get() for slot in fmt._prompt_slots(body)]


@pytest.mark.parametrize(("fmt", "path", "body"), BODIES, ids=lambda v: getattr(v, "name", ""))
def test_lazy_texts_are_the_eager_walks_and_give_its_estimate(fmt, path, body):
    raw = orjson.dumps(body)
    info = fmt.parse_request(raw, path)
    assert info._texts is None  # not walked by the parse
    expected = eager(fmt, orjson.loads(raw))
    assert len(expected) >= 4  # the bodies reach content, extras and JSON slots
    # What the request phase may change before a stage reads the texts: the model
    # (aliases, failover), the failover stash, the usage switch.
    info.body["model"] = "other"
    info.body["x-ai-gateway"] = {"api": fmt.name, "path": path}
    fmt.ensure_usage(info)
    texts = info.prompt_texts
    assert texts == expected
    assert info.prompt_texts is texts  # walked once, kept
    assert info.prompt_estimate() == estimate_prompt_tokens(expected)


def test_masking_before_any_read_still_replaces_every_text():
    info = OpenAIChat.parse_request(orjson.dumps(BODIES[0][2]), "/v1/chat/completions")
    masked = [t.upper() for t in info.prompt_texts]
    body = OpenAIChat.replace_request_texts(info, masked)
    assert info.prompt_texts == masked
    assert eager(OpenAIChat, orjson.loads(body)) == masked


def test_a_metering_exchange_with_reported_usage_never_walks_the_prompt(monkeypatch):
    walks: list[dict] = []
    walk = JSONWireFormat._read_prompt_texts.__func__

    def counting(cls, body):
        walks.append(body)
        return walk(cls, body)

    monkeypatch.setattr(JSONWireFormat, "_read_prompt_texts", classmethod(counting))
    run = Run()
    run.request({**CHAT, "stream": True})
    run.respond(stream_frames(4, usage=True))
    assert metadata(run.last)["usage_estimated"] is False
    assert walks == []

    # No usage reported: settlement estimates, and the walk runs once for it.
    run = Run()
    run.request({**CHAT, "stream": True})
    run.respond(stream_frames(4, usage=False))
    md = metadata(run.last)
    assert md["usage_estimated"] is True
    assert md["prompt_tokens"] == estimate_prompt_tokens(["hello there"])
    assert len(walks) == 1
