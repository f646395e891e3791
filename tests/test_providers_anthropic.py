"""Anthropic Messages: typed SSE, usage set from message_start and the cumulative
message_delta, text/tool/thinking deltas, errors as the anthropic SDK sees them."""

from __future__ import annotations

from typing import Any

import anthropic
import httpx2
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from extproc.providers import anthropic as anthropic_format
from extproc.providers.anthropic import AnthropicMessages, AnthropicStream
from extproc.providers.base import TextDelta
from tests.providers_helpers import (
    CARD,
    MASK,
    REPLAY,
    cut,
    cuts,
    mask_cards,
    out_of,
    raw_of,
    replay,
    rewrite_all,
    running_texts,
    usage_tuple,
)


def ev(name: str, data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else orjson.dumps({"type": name, **data}).decode()
    return f"event: {name}\ndata: {payload}\n\n".encode()


def delta(index: int, kind: str, field: str, text: str) -> bytes:
    return ev("content_block_delta", {"index": index, "delta": {"type": kind, field: text}})


TEXT_PIECES = ["Your card ", f"is {CARD}", "."]
JSON_PIECES = ["", '{"city": "Pa', 'ris"}']
THINKING = "The user shares a card."
FRAMES = [
    ev("message_start", {"message": {
        "id": "msg_01AbCdEfGhIjKlMnOpQrSt", "type": "message", "role": "assistant",
        "model": "claude-sonnet-4-5-20250929", "content": [], "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 472, "cache_creation_input_tokens": 16,
                  "cache_read_input_tokens": 128, "output_tokens": 2},
    }}),
    ev("content_block_start", {"index": 0, "content_block": {
        "type": "thinking", "thinking": "", "signature": ""}}),
    ev("ping", '{"type": "ping"}'),
    delta(0, "thinking_delta", "thinking", THINKING),
    delta(0, "signature_delta", "signature", "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl"),
    ev("content_block_stop", {"index": 0}),
    ev("content_block_start", {"index": 1, "content_block": {"type": "text", "text": ""}}),
    *[delta(1, "text_delta", "text", piece) for piece in TEXT_PIECES],
    ev("content_block_stop", {"index": 1}),
    ev("content_block_start", {"index": 2, "content_block": {
        "type": "tool_use", "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "name": "get_weather",
        "input": {}}}),
    *[delta(2, "input_json_delta", "partial_json", piece) for piece in JSON_PIECES],
    ev("content_block_stop", {"index": 2}),
    # The current API repeats the cumulative input and cache counts here: a decoder
    # that added them instead of setting them would count the prompt twice.
    ev("message_delta", {"delta": {"stop_reason": "tool_use", "stop_sequence": None},
                         "usage": {"input_tokens": 472, "cache_creation_input_tokens": 16,
                                   "cache_read_input_tokens": 128, "output_tokens": 89}}),
    ev("message_stop", {}),
]  # fmt: skip
BODY = b"".join(FRAMES)


def decoder() -> AnthropicStream:
    return AnthropicMessages.stream_decoder(hide_usage=False, max_frame_bytes=1 << 16)


@REPLAY
@given(st.data())
def test_any_chunking_meters_and_forwards_bytes_exactly(data):
    dec = decoder()
    events = replay(dec, cut(BODY, data.draw(cuts(BODY))))
    assert raw_of(events) == BODY and out_of(events) == BODY
    # prompt = input + cache writes + cache reads; every count is message_delta's (set).
    assert usage_tuple(dec.usage) == (616, 89, 705, 128, 0, True)
    assert dec.finish_reason == "tool_calls"
    assert dec.content_events == 1 + len(TEXT_PIECES) + 2  # no signature, no empty json
    assert events[-1].is_done and events[-1].name == "message_stop"
    assert running_texts(dec, events) == {
        ("reasoning", 0): THINKING,
        ("content", 1): "".join(TEXT_PIECES),
        ("tool_arguments", 2): "".join(JSON_PIECES),
    }


def test_cumulative_output_is_set_not_added():
    dec = decoder()
    replay(dec, [FRAMES[0], FRAMES[-2], FRAMES[-2]])
    assert usage_tuple(dec.usage) == (616, 89, 705, 128, 0, True)
    # Newer API versions repeat input counts in message_delta (null when unknown).
    dec.feed(
        ev(
            "message_delta",
            {
                "delta": {"stop_reason": "end_turn"},
                "usage": {
                    "input_tokens": 500,
                    "cache_read_input_tokens": None,
                    "output_tokens": 90,
                },
            },
        )
    )
    assert usage_tuple(dec.usage) == (644, 90, 734, 128, 0, True)
    assert dec.finish_reason == "stop"


def test_only_usage_events_are_parsed(monkeypatch):
    calls = []
    real = anthropic_format.loads
    monkeypatch.setattr(anthropic_format, "loads", lambda d: calls.append(d) or real(d))
    replay(decoder(), [BODY])
    assert len(calls) == 2  # message_start and message_delta


def test_texts_and_rewrite_round_trip():
    dec = decoder()
    events = replay(dec, [BODY])
    text_event = events[8]
    assert dec.texts(text_event) == [TextDelta(1, f"is {CARD}")]
    out = dec.rewrite(text_event, [f"is {MASK}"])
    assert out.startswith(b"event: content_block_delta\ndata: ") and out.endswith(b"\n\n")
    assert orjson.loads(out.split(b"data: ", 1)[1]) == {
        "type": "content_block_delta", "index": 1,
        "delta": {"type": "text_delta", "text": f"is {MASK}"},
    }  # fmt: skip
    signature = events[4]
    assert dec.texts(signature) == [] and dec.rewrite(signature, []) is signature.out


def sdk_client(body: bytes, status: int = 200) -> anthropic.Anthropic:
    def handler(request: httpx2.Request) -> httpx2.Response:
        # Older SDKs send x-api-key, newer ones a bearer token: both are read.
        assert AnthropicMessages.client_credential(request.headers) == "sk-ant-test"
        kind = "text/event-stream" if status == 200 else "application/json"
        return httpx2.Response(status, headers={"content-type": kind}, content=body)

    return anthropic.Anthropic(
        api_key="sk-ant-test",
        base_url="http://provider.test",
        http_client=httpx2.Client(transport=httpx2.MockTransport(handler)),
        max_retries=0,
    )


ARGS = {"model": "claude-test-model", "max_tokens": 1024,
        "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip


def test_masked_stream_is_what_the_sdk_accumulates():
    dec = decoder()
    events = replay(dec, [BODY])
    masked = rewrite_all(dec, events, mask_cards)
    assert CARD.encode() not in masked
    with sdk_client(masked).messages.stream(**ARGS) as stream:
        final = stream.get_final_message()
    assert final.content[1].text == f"Your card is {MASK}."
    assert final.content[2].input == {"city": "Paris"}
    assert final.content[0].thinking == THINKING
    assert final.usage.output_tokens == 89


def test_error_event_raises_in_the_sdk():
    dec = decoder()
    events = replay(dec, [b"".join(FRAMES[:9])])
    body = b"".join(e.out for e in events) + dec.error_event("blocked by policy", "blocked")
    seen = []
    with pytest.raises(anthropic.APIStatusError) as info:
        for event in sdk_client(body).messages.create(**ARGS, stream=True):
            seen.append(event.type)
    assert info.value.body == {
        "type": "error", "error": {"type": "api_error", "message": "blocked by policy"}
    }  # fmt: skip
    assert "content_block_delta" in seen
    overloaded = dec.error_event("busy", "overloaded_error")
    assert b'"type":"overloaded_error"' in overloaded


def test_error_body_maps_status_to_sdk_exceptions():
    body = AnthropicMessages.error_body(429, "slow down", "rate_limited")
    assert orjson.loads(body) == {
        "type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}
    }  # fmt: skip
    with pytest.raises(anthropic.RateLimitError, match="slow down"):
        sdk_client(body, 429).messages.create(**ARGS)


# ------------------------------------------------------------------ requests

REQUEST = {
    "model": "claude-test-model", "max_tokens": 512, "stream": True,
    "system": [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}],
    "messages": [
        {"role": "user", "content": f"My card is {CARD}"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "secret", "signature": "sig"},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"card": CARD}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "valid"},
            {"type": "tool_result", "tool_use_id": "toolu_2",
             "content": [{"type": "text", "text": "nested"}]},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "x"}},
        ]},
    ],
}  # fmt: skip


def test_request_texts_order_and_masking():
    info = AnthropicMessages.parse_request(orjson.dumps(REQUEST))
    assert info.model == "claude-test-model" and info.stream and info.max_output_tokens == 512
    assert info.prompt_texts == [
        "You are terse.", f"My card is {CARD}", "Checking.", f'{{"card":"{CARD}"}}',
        "valid", "nested",
    ]  # fmt: skip
    body = AnthropicMessages.replace_request_texts(info, [mask_cards(t) for t in info.prompt_texts])
    assert CARD.encode() not in body
    sent = orjson.loads(body)
    assert sent["messages"][1]["content"][2]["input"] == {"card": MASK}
    assert sent["messages"][1]["content"][0] == {
        "type": "thinking", "thinking": "secret", "signature": "sig"
    }  # fmt: skip
    assert sent["system"][0]["cache_control"] == {"type": "ephemeral"}
    string_system = AnthropicMessages.parse_request(orjson.dumps({**REQUEST, "system": "Hi."}))
    assert string_system.prompt_texts[0] == "Hi."
    assert AnthropicMessages.ensure_usage(info) is None


def test_credentials_and_paths():
    assert AnthropicMessages.client_credential({"x-api-key": "sk-ant-1"}) == "sk-ant-1"
    assert AnthropicMessages.client_credential({"authorization": "Bearer t"}) == "t"
    assert AnthropicMessages.upstream_auth("k") == [("x-api-key", "k")]
    assert AnthropicMessages.handles("/v1/messages")
    assert not AnthropicMessages.handles("/v1/messages/count_tokens")


def test_whole_message_texts_usage_finish():
    body = orjson.dumps({
        "id": "msg_01", "type": "message", "role": "assistant", "model": "claude-test-model",
        "content": [{"type": "text", "text": f"Card {CARD}"},
                    {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": CARD}}],
        "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": 10, "cache_creation_input_tokens": 5,
                  "cache_read_input_tokens": 0, "output_tokens": 7},
    })  # fmt: skip
    assert usage_tuple(AnthropicMessages.completion_usage(body)) == (15, 7, 22, 0, 0, True)
    assert AnthropicMessages.completion_finish_reason(body) == "stop"
    texts = AnthropicMessages.completion_texts(body)
    assert [(t.kind, t.final) for t in texts] == [("content", True), ("tool_arguments", True)]
    new = AnthropicMessages.rewrite_completion(body, [mask_cards(t.text) for t in texts])
    assert orjson.loads(new)["content"][1]["input"] == {"a": MASK}
