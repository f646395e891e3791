"""AWS Bedrock Converse: the binary event stream codec (CRCs, bounds, corruption) and
the ConverseStream decoder, checked against botocore's own parser and boto3."""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import boto3
import orjson
import pytest
from botocore.awsrequest import AWSResponse
from botocore.eventstream import EventStreamBuffer, ParserError
from botocore.exceptions import ClientError, EventStreamError
from hypothesis import given
from hypothesis import strategies as st

from extproc.providers import bedrock as bedrock_format
from extproc.providers.base import RequestError, StreamError, TextDelta
from extproc.providers.bedrock import BedrockConverse, BedrockStream
from extproc.providers.eventstream import (
    CorruptEventStream,
    EventStreamSplitter,
    decode_headers,
    encode_headers,
    message,
)
from extproc.sse import FrameTooLarge
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

PAD = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123"


def ev(kind: str, payload: dict[str, Any]) -> bytes:
    return message(
        [(":event-type", kind), (":content-type", "application/json"), (":message-type", "event")],
        orjson.dumps(payload),
    )


def delta(index: int, inner: dict[str, Any], pad: int) -> bytes:
    return ev("contentBlockDelta", {"contentBlockIndex": index, "delta": inner, "p": PAD[:pad]})


TEXT_PIECES = ["Your card ", f"is {CARD}", "."]
TOOL_PIECES = ['{"city": ', '"Paris"}']
MESSAGES = [
    ev("messageStart", {"p": PAD[:20], "role": "assistant"}),
    delta(0, {"reasoningContent": {"text": "Checking the card."}}, 11),
    delta(0, {"reasoningContent": {"signature": "EqoBCkgIBxABGAIiQ"}}, 5),
    ev("contentBlockStop", {"contentBlockIndex": 0, "p": PAD[:30]}),
    *[delta(1, {"text": piece}, 7 + i) for i, piece in enumerate(TEXT_PIECES)],
    ev("contentBlockStop", {"contentBlockIndex": 1, "p": PAD[:9]}),
    ev("contentBlockStart", {"contentBlockIndex": 2, "p": PAD[:3], "start": {"toolUse": {
        "name": "get_weather", "toolUseId": "tooluse_kZJMlvQmRJ6eAyJE5GIl7Q"}}}),
    *[delta(2, {"toolUse": {"input": piece}}, 12) for piece in TOOL_PIECES],
    ev("contentBlockStop", {"contentBlockIndex": 2, "p": PAD[:40]}),
    ev("messageStop", {"p": PAD[:17], "stopReason": "tool_use"}),
    ev("metadata", {"metrics": {"latencyMs": 1342}, "p": PAD[:2], "usage": {
        "cacheReadInputTokens": 64, "cacheWriteInputTokens": 0, "inputTokens": 412,
        "outputTokens": 57, "totalTokens": 533}}),
]  # fmt: skip
BODY = b"".join(MESSAGES)


def decoder(limit: int = 1 << 16) -> BedrockStream:
    return BedrockConverse.response_decoder(
        "application/vnd.amazon.eventstream", stream=True, hide_usage=False, max_frame_bytes=limit
    )


# ------------------------------------------------------------------ codec


def test_known_vector_empty_message():
    """The protocol's smallest message: 16 bytes, both CRCs fixed."""
    empty = message([], b"")
    assert empty == bytes.fromhex("000000100000000005c248eb7d98c8ff")
    (msg,) = EventStreamSplitter().feed(empty)
    assert msg.headers == {} and msg.payload == b""


def test_headers_of_every_type_round_trip_through_botocore():
    import uuid

    ident = uuid.UUID("12345678-1234-5678-1234-567812345678")
    headers = [(":event-type", "x"), ("flag", True), ("off", False), ("n", -7),
               ("blob", b"\x00\x01"), ("id", ident)]  # fmt: skip
    raw = message(headers, b"{}")
    assert decode_headers(encode_headers(headers)) == dict(headers)
    buffer = EventStreamBuffer()
    buffer.add_data(raw)
    (parsed,) = list(buffer)
    assert parsed.headers[":event-type"] == "x" and parsed.headers["n"] == -7
    assert parsed.headers["blob"] == b"\x00\x01" and parsed.payload == b"{}"
    # Every message of the fixture is valid for botocore too.
    buffer = EventStreamBuffer()
    buffer.add_data(BODY)
    assert [m.headers[":event-type"] for m in buffer] == [
        EventStreamSplitter().feed(m)[0].headers[":event-type"] for m in MESSAGES
    ]


@pytest.mark.parametrize("where", ["prelude", "headers", "payload", "message_crc"])
def test_a_flipped_bit_anywhere_is_a_stream_error(where):
    raw = bytearray(MESSAGES[4])
    offset = {"prelude": 2, "headers": 14, "payload": len(raw) - 10, "message_crc": len(raw) - 1}
    raw[offset[where]] ^= 0x10
    with pytest.raises(CorruptEventStream):
        EventStreamSplitter().feed(MESSAGES[0] + bytes(raw))
    buffer = EventStreamBuffer()  # botocore agrees the bytes are corrupt
    buffer.add_data(bytes(raw))
    with pytest.raises(ParserError):
        list(buffer)
    assert issubclass(CorruptEventStream, StreamError)


def test_a_bogus_length_with_a_valid_prelude_crc_is_refused_before_buffering():
    prelude = struct.pack(">II", 1 << 30, 0)
    raw = prelude + struct.pack(">I", zlib.crc32(prelude))
    with pytest.raises(FrameTooLarge):
        EventStreamSplitter(max_message_bytes=1 << 20).feed(raw)
    prelude = struct.pack(">II", 20, 100)  # headers longer than the message
    with pytest.raises(CorruptEventStream):
        EventStreamSplitter().feed(prelude + struct.pack(">I", zlib.crc32(prelude)))


def test_a_cut_stream_is_an_error_at_finish():
    splitter = EventStreamSplitter()
    assert splitter.feed(MESSAGES[0][:-3]) == []
    assert splitter.buffered == len(MESSAGES[0]) - 3
    with pytest.raises(CorruptEventStream):
        splitter.finish()


@REPLAY
@given(st.data())
def test_splitter_any_chunking(data):
    splitter = EventStreamSplitter()
    got = []
    for chunk in cut(BODY, data.draw(cuts(BODY))):
        got += splitter.feed(chunk)
    assert [m.raw for m in got] == MESSAGES and splitter.buffered == 0


# ------------------------------------------------------------------ decoder


@REPLAY
@given(st.data())
def test_any_chunking_meters_and_forwards_bytes_exactly(data):
    dec = decoder()
    events = replay(dec, cut(BODY, data.draw(cuts(BODY))))
    assert raw_of(events) == BODY and out_of(events) == BODY
    # prompt = input + cache reads + cache writes.
    assert usage_tuple(dec.usage) == (476, 57, 533, 64, 0, True)
    assert dec.finish_reason == "tool_calls"
    assert dec.content_events == 1 + 1 + len(TEXT_PIECES) + len(TOOL_PIECES)
    assert running_texts(dec, events) == {
        ("reasoning", 0): "Checking the card.",
        ("content", 1): "".join(TEXT_PIECES),
        ("tool_arguments", 2): "".join(TOOL_PIECES),
    }
    assert [e.name for e in events][-2:] == ["messageStop", "metadata"]


def test_only_stop_and_metadata_are_parsed(monkeypatch):
    calls = []
    real = bedrock_format.loads
    monkeypatch.setattr(bedrock_format, "loads", lambda d: calls.append(d) or real(d))
    replay(decoder(), [BODY])
    assert len(calls) == 2


def test_rewrite_re_encodes_with_fresh_crcs_and_the_same_headers():
    dec = decoder()
    events = replay(dec, [BODY])
    event = events[5]
    assert dec.texts(event) == [TextDelta(1, f"is {CARD}")]
    out = dec.rewrite(event, [f"is {MASK}"])
    (msg,) = EventStreamSplitter().feed(out)  # CRCs check out
    assert msg.headers == EventStreamSplitter().feed(event.raw)[0].headers
    assert orjson.loads(msg.payload) == {
        "contentBlockIndex": 1, "delta": {"text": f"is {MASK}"}, "p": PAD[:8]
    }  # fmt: skip


def bedrock_client(body: bytes, status: int = 200, kind: str = bedrock_format.CONTENT_TYPE):
    class Raw:
        def __init__(self, data: bytes) -> None:
            self.data = io.BytesIO(data)

        def stream(self, **_: Any):
            while chunk := self.data.read(13):
                yield chunk

        def read(self, *args: Any) -> bytes:
            return self.data.read(*args)

    def send(request: Any, **_: Any) -> AWSResponse:
        assert request.url.endswith("/model/us.anthropic.claude-test-v1%3A0/converse-stream") or (
            request.url.endswith("/converse")
        )
        return AWSResponse(request.url, status, {"content-type": kind}, Raw(body))

    client = boto3.client(
        "bedrock-runtime",
        region_name="us-east-1",
        endpoint_url="http://provider.test",
        aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key="secret",
    )
    client.meta.events.register("before-send.bedrock-runtime.*", send)
    return client


ARGS = {"modelId": "us.anthropic.claude-test-v1:0",
        "messages": [{"role": "user", "content": [{"text": "hi"}]}]}  # fmt: skip


def test_masked_stream_reads_in_boto3():
    dec = decoder()
    masked = rewrite_all(dec, replay(dec, [BODY]), mask_cards)
    assert CARD.encode() not in masked
    events = list(bedrock_client(masked).converse_stream(**ARGS)["stream"])
    text = "".join(
        e["contentBlockDelta"]["delta"].get("text", "") for e in events if "contentBlockDelta" in e
    )
    assert text == f"Your card is {MASK}."
    assert events[-1]["metadata"]["usage"]["totalTokens"] == 533


def test_error_event_raises_event_stream_error_in_boto3():
    dec = decoder()
    events = replay(dec, [b"".join(MESSAGES[:6])])
    body = b"".join(e.out for e in events) + dec.error_event("blocked by policy", "blocked")
    seen = []
    with pytest.raises(EventStreamError, match="blocked by policy") as info:
        for event in bedrock_client(body).converse_stream(**ARGS)["stream"]:
            seen.append(next(iter(event)))
    assert info.value.response["Error"]["Code"] == "internalServerException"
    assert seen.count("contentBlockDelta") == 4
    check = decoder()
    replay(check, [body])
    assert check.finish_reason == "error"


def test_error_body_raises_typed_client_error():
    body = BedrockConverse.error_body(429, "Too many requests", "rate_limited")
    with pytest.raises(ClientError) as info:
        bedrock_client(body, 429, "application/json").converse_stream(**ARGS)
    assert info.value.response["Error"]["Code"] == "ThrottlingException"
    assert info.value.response["Error"]["Message"] == "Too many requests"


# ------------------------------------------------------------------ requests

REQUEST = {
    "system": [{"text": "Be terse."}, {"cachePoint": {"type": "default"}}],
    "messages": [
        {"role": "user", "content": [{"text": f"card {CARD}"},
                                     {"image": {"format": "png", "source": {"bytes": "iVBO"}}}]},
        {"role": "assistant", "content": [
            {"reasoningContent": {"reasoningText": {"text": "secret", "signature": "s"}}},
            {"toolUse": {"toolUseId": "t1", "name": "f", "input": {"n": CARD}}}]},
        {"role": "user", "content": [{"toolResult": {"toolUseId": "t1", "content": [
            {"text": "ok"}, {"json": {"valid": True}}]}}]},
    ],
    "inferenceConfig": {"maxTokens": 300},
}  # fmt: skip


def test_request_model_stream_texts_and_masking():
    path = "/model/us.anthropic.claude-test-v1%3A0/converse-stream"
    info = BedrockConverse.parse_request(orjson.dumps(REQUEST), path)
    assert (info.model, info.stream, info.max_output_tokens) == (
        "us.anthropic.claude-test-v1:0", True, 300,
    )  # fmt: skip
    assert info.prompt_texts == ["Be terse.", f"card {CARD}", f'{{"n":"{CARD}"}}', "ok",
                                 '{"valid":true}']  # fmt: skip
    body = BedrockConverse.replace_request_texts(info, [mask_cards(t) for t in info.prompt_texts])
    assert CARD.encode() not in body
    sent = orjson.loads(body)
    assert sent["messages"][1]["content"][0]["reasoningContent"]["reasoningText"]["text"] == (
        "secret"
    )
    assert not BedrockConverse.parse_request(orjson.dumps(REQUEST), "/model/m/converse").stream
    assert BedrockConverse.handles(path) and BedrockConverse.handles("/model/m/converse")
    assert not BedrockConverse.handles("/model/m/invoke-with-response-stream")
    with pytest.raises(RequestError):
        BedrockConverse.parse_request(orjson.dumps(REQUEST), "/converse")
    assert BedrockConverse.client_credential({"authorization": "Bearer ABSK-key"}) == "ABSK-key"
    assert BedrockConverse.client_credential({"authorization": "AWS4-HMAC-SHA256 x"}) is None


def test_whole_converse_answer():
    body = orjson.dumps({
        "output": {"message": {"role": "assistant", "content": [
            {"text": f"Card {CARD}"}, {"toolUse": {"toolUseId": "t", "name": "f",
                                                   "input": {"c": CARD}}}]}},
        "stopReason": "end_turn",
        "usage": {"inputTokens": 10, "outputTokens": 5, "totalTokens": 15},
        "metrics": {"latencyMs": 100},
    })  # fmt: skip
    assert usage_tuple(BedrockConverse.completion_usage(body)) == (10, 5, 15, 0, 0, True)
    assert BedrockConverse.completion_finish_reason(body) == "stop"
    texts = BedrockConverse.completion_texts(body)
    new = BedrockConverse.rewrite_completion(body, [mask_cards(t.text) for t in texts])
    assert CARD.encode() not in new
    assert orjson.loads(new)["output"]["message"]["content"][1]["toolUse"]["input"] == {"c": MASK}
