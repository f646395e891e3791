"""Gemini / Vertex: the SSE framing (`alt=sse`), the streamed JSON array, usage from
usageMetadata, texts and rewrite, errors as google-genai sees them."""

from __future__ import annotations

import json
from typing import Any

import httpx
import orjson
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types
from hypothesis import given
from hypothesis import strategies as st

from extproc.providers import gemini as gemini_format
from extproc.providers.base import RequestError, TextDelta
from extproc.providers.gemini import Gemini, GeminiArrayStream, GeminiSSEStream, Vertex
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

MODEL = "gemini-2.5-flash"


def usage(candidates: int | None, done: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"promptTokenCount": 9}
    if candidates is not None:
        meta["candidatesTokenCount"] = candidates
    meta["totalTokenCount"] = 9 + (candidates or 0) + (20 if done else 0)
    if done:
        meta["cachedContentTokenCount"] = 4
    meta["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": 9}]
    if done:
        meta["thoughtsTokenCount"] = 20
    return meta


def chunk(parts: list[dict[str, Any]], meta: dict[str, Any], finish: str | None = None):
    candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}}
    if finish:
        candidate["finishReason"] = finish
    candidate["index"] = 0
    return {"candidates": [candidate], "usageMetadata": meta, "modelVersion": MODEL,
            "responseId": "Yx9kZ4WbJ5nmz7IPnLuAgAk"}  # fmt: skip


TEXT_PIECES = ["Your card ", f"is {CARD}", "."]
THOUGHT = "The user mentions a card."
CHUNKS = [
    chunk([{"text": THOUGHT, "thought": True}], usage(None)),
    chunk([{"text": TEXT_PIECES[0]}], usage(2)),
    chunk([{"text": TEXT_PIECES[1]}], usage(8)),
    chunk([{"text": TEXT_PIECES[2]}, {"functionCall": {"name": "get_weather",
                                                       "args": {"city": "Paris"}}}],
          usage(12, done=True), "STOP"),
]  # fmt: skip


def gjson(obj: Any) -> str:
    """Gemini's single-line JSON style: `"key": value` and `,` without a space."""
    return json.dumps(obj, separators=(",", ": "), ensure_ascii=False)


SSE_FRAMES = [f"data: {gjson(c)}\r\n\r\n".encode() for c in CHUNKS]
SSE_BODY = b"".join(SSE_FRAMES)
# Without alt=sse: one pretty-printed array, elements separated by "\n,\r\n".
ARRAY_BODY = (
    "[" + "\n,\r\n".join(json.dumps(c, indent=2, ensure_ascii=False) for c in CHUNKS) + "\n]"
).encode()
EXPECTED_USAGE = (9, 32, 41, 4, 20, True)  # completion = candidates + thoughts
EXPECTED_TEXTS = {("reasoning", 0): THOUGHT, ("content", 0): "".join(TEXT_PIECES)}


def sse() -> GeminiSSEStream:
    return Gemini.response_decoder(
        "text/event-stream", stream=True, hide_usage=False, max_frame_bytes=1 << 16
    )


def array(limit: int = 1 << 16) -> GeminiArrayStream:
    return Gemini.response_decoder(
        "application/json; charset=UTF-8", stream=True, hide_usage=False, max_frame_bytes=limit
    )


@pytest.mark.parametrize("framing", ["sse", "array"])
@REPLAY
@given(data=st.data())
def test_any_chunking_meters_and_forwards_bytes_exactly(framing, data):
    body = SSE_BODY if framing == "sse" else ARRAY_BODY
    dec = sse() if framing == "sse" else array()
    events = replay(dec, cut(body, data.draw(cuts(body))))
    assert raw_of(events) == body and out_of(events) == body
    assert usage_tuple(dec.usage) == EXPECTED_USAGE
    assert dec.finish_reason == "tool_calls"  # STOP after a function call
    assert dec.content_events == len(CHUNKS)
    assert running_texts(dec, events) == EXPECTED_TEXTS
    assert dec.buffered == 0


def test_function_call_arguments_are_one_whole_json_text():
    dec = sse()
    events = replay(dec, [SSE_BODY])
    assert dec.texts(events[-1]) == [
        TextDelta(0, ".", "content"),
        TextDelta(0, '{"city":"Paris"}', "tool_arguments", final=True),
    ]
    out = dec.rewrite(events[-1], [".", '{"city":"[place]"}'])
    payload = orjson.loads(out[6:-4])
    assert payload["candidates"][0]["content"]["parts"][1]["functionCall"]["args"] == {
        "city": "[place]"
    }
    # A mask that breaks the JSON still replaces the arguments, never leaks them.
    out = dec.rewrite(events[-1], [".", '{"city": [pla'])
    assert b"Paris" not in out


def test_usage_is_parsed_once_when_read(monkeypatch):
    calls = []
    real = gemini_format.loads
    monkeypatch.setattr(gemini_format, "loads", lambda d: calls.append(d) or real(d))
    dec = array()
    replay(dec, [ARRAY_BODY])
    assert calls == []
    assert dec.usage.total_tokens == 41 and dec.usage.total_tokens == 41
    assert len(calls) == 1


@pytest.mark.parametrize("framing", ["sse", "array"])
def test_masking_rewrites_in_the_same_shape(framing):
    body = SSE_BODY if framing == "sse" else ARRAY_BODY
    dec = sse() if framing == "sse" else array()
    events = replay(dec, [body])
    masked = rewrite_all(dec, events, mask_cards)
    assert CARD.encode() not in masked
    check = sse() if framing == "sse" else array()
    after = replay(check, [masked])
    assert running_texts(check, after)[("content", 0)] == f"Your card is {MASK}."
    assert usage_tuple(check.usage) == EXPECTED_USAGE
    if framing == "array":
        elements = json.loads(masked)
        assert [e["usageMetadata"] for e in elements] == [c["usageMetadata"] for c in CHUNKS]
        assert masked.count(b"\n,\r\n") == len(CHUNKS) - 1  # separators untouched
        assert b'\n  "candidates": [\n' in masked  # pretty elements stay pretty
    else:
        assert masked.count(b"\r\n\r\n") == len(CHUNKS)
        assert masked.replace(after[2].raw, b"") == SSE_BODY.replace(SSE_FRAMES[2], b"")


def sdk_client(body: bytes, kind: str = "text/event-stream", status: int = 200) -> genai.Client:
    def handler(request: httpx.Request) -> httpx.Response:
        assert Gemini.client_credential(request.headers, str(request.url)) == "AIza-test"
        return httpx.Response(status, headers={"content-type": kind}, content=body)

    return genai.Client(
        api_key="AIza-test",
        http_options=genai_types.HttpOptions(
            base_url="http://provider.test",
            httpx_client=httpx.Client(transport=httpx.MockTransport(handler)),
        ),
    )


def test_masked_sse_stream_reads_in_google_genai():
    dec = sse()
    masked = rewrite_all(dec, replay(dec, [SSE_BODY]), mask_cards)
    chunks = list(sdk_client(masked).models.generate_content_stream(model=MODEL, contents="x"))
    text = "".join(p.text for c in chunks for p in c.candidates[0].content.parts
                   if p.text and not p.thought)  # fmt: skip
    assert text == f"Your card is {MASK}."
    assert chunks[-1].usage_metadata.thoughts_token_count == 20


def test_sse_error_event_raises_in_google_genai():
    dec = sse()
    events = replay(dec, [b"".join(SSE_FRAMES[:2])])
    body = b"".join(e.out for e in events) + dec.error_event("blocked by policy", "blocked")
    assert body.endswith(b"\r\n\r\n")  # the stream's own line ending
    seen = []
    with pytest.raises(genai_errors.ServerError, match="blocked by policy") as info:
        for c in sdk_client(body).models.generate_content_stream(model=MODEL, contents="x"):
            seen.append(c.text)
    assert seen == [None, "Your card "]  # the thought-only chunk has no answer text
    assert info.value.details["error"]["details"][0]["reason"] == "blocked"


@pytest.mark.parametrize("upto", [0, 1, 2, 3, 4])
def test_array_error_event_keeps_the_array_valid_json(upto):
    """Cut after `upto` pieces (filler or element): what the client has plus the error
    event parses as one JSON array ending with the error."""
    dec = array()
    events = replay(dec, [ARRAY_BODY])
    kept = events[:upto]
    fresh = array()
    replay_events = fresh.feed(b"".join(e.raw for e in kept))
    assert b"".join(e.raw for e in replay_events) == b"".join(e.raw for e in kept)
    client = b"".join(e.out for e in kept) + fresh.error_event("stopped", "blocked")
    parsed = json.loads(client)
    assert parsed[-1]["error"]["message"] == "stopped"
    assert parsed[-1]["error"]["status"] == "INTERNAL"


def test_array_error_event_before_an_element():
    dec = array()
    events = replay(dec, [ARRAY_BODY])
    element = next(i for i, e in enumerate(events) if e.data is not None and i > 2)
    client = b"".join(e.out for e in events[:element])
    client += dec.error_event("stopped", "blocked", before=events[element])
    assert json.loads(client)[-1]["error"]["message"] == "stopped"
    assert dec.error_event("late", "x") == b""  # the array is closed already


def test_array_error_event_before_anything():
    dec = array()
    assert json.loads(dec.error_event("nope", "x")) == [
        {"error": {"code": 500, "message": "nope", "status": "INTERNAL", "details": [
            {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "x",
             "domain": "ai-gateway"}]}}
    ]  # fmt: skip


# ------------------------------------------------------------------ requests

REQUEST = {
    "systemInstruction": {"parts": [{"text": "Be terse."}]},
    "contents": [
        {"role": "user", "parts": [{"text": f"card {CARD}"}, {"inlineData": {
            "mimeType": "image/png", "data": "iVBORw0K"}}]},
        {"role": "model", "parts": [{"functionCall": {"name": "f", "args": {"n": CARD}}}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "f",
                                                          "response": {"ok": True}}}]},
    ],
    "generationConfig": {"maxOutputTokens": 256, "temperature": 0.2},
}  # fmt: skip


def test_request_model_and_stream_from_the_path():
    body = orjson.dumps(REQUEST)
    info = Gemini.parse_request(body, f"/v1beta/models/{MODEL}:streamGenerateContent?alt=sse")
    assert (info.model, info.stream, info.max_output_tokens) == (MODEL, True, 256)
    info = Gemini.parse_request(body, f"/v1beta/models/{MODEL}:generateContent")
    assert not info.stream
    vertex = (
        "/v1/projects/demo-project/locations/us-central1/publishers/google/models/"
        "gemini-2.0-flash-001:streamGenerateContent"
    )
    assert Vertex.handles(vertex)
    assert Vertex.parse_request(body, vertex).model == "gemini-2.0-flash-001"
    assert not Gemini.handles(f"/v1beta/models/{MODEL}:countTokens")
    with pytest.raises(RequestError, match="contents"):
        Gemini.parse_request(b'{"generationConfig": {}}', f"/v1beta/models/{MODEL}:generateContent")
    with pytest.raises(RequestError, match="model"):
        Gemini.parse_request(body, "/v1beta/generate")


def test_request_texts_order_and_masking():
    info = Gemini.parse_request(orjson.dumps(REQUEST), f"/v1beta/models/{MODEL}:generateContent")
    assert info.prompt_texts == ["Be terse.", f"card {CARD}", f'{{"n":"{CARD}"}}', '{"ok":true}']
    body = Gemini.replace_request_texts(info, [mask_cards(t) for t in info.prompt_texts])
    assert CARD.encode() not in body
    sent = orjson.loads(body)
    assert sent["contents"][1]["parts"][0]["functionCall"]["args"] == {"n": MASK}
    assert sent["contents"][0]["parts"][1]["inlineData"]["data"] == "iVBORw0K"
    snake = {"system_instruction": {"parts": [{"text": "s"}]}, "contents": []}
    assert Gemini.parse_request(orjson.dumps(snake), f"/v1/models/{MODEL}:generateContent"
                                ).prompt_texts == ["s"]  # fmt: skip


def test_credentials():
    assert Gemini.client_credential({"x-goog-api-key": "AIza1"}) == "AIza1"
    assert Gemini.client_credential({}, f"/v1beta/models/{MODEL}:generateContent?key=AIza2") == (
        "AIza2"
    )
    assert Gemini.upstream_auth("k") == [("x-goog-api-key", "k")]
    assert Vertex.client_credential({"authorization": "Bearer ya29.t"}) == "ya29.t"
    assert Vertex.upstream_auth("ya29.t") == [("authorization", "Bearer ya29.t")]


def test_whole_answer_and_collected_array():
    body = json.dumps(CHUNKS[-1], indent=2).encode()
    assert usage_tuple(Gemini.completion_usage(body)) == EXPECTED_USAGE
    assert Gemini.completion_finish_reason(body) == "tool_calls"
    texts = Gemini.completion_texts(body)
    assert [t.text for t in texts] == [".", '{"city":"Paris"}'] and all(t.final for t in texts)
    new = Gemini.rewrite_completion(body, [".", '{"city":"X"}'])
    assert new.startswith(b'{\n  "candidates"')
    # A streamed array kept whole (JSON mode) meters the same.
    assert usage_tuple(Gemini.completion_usage(ARRAY_BODY)) == EXPECTED_USAGE
    assert "".join(t.text for t in Gemini.completion_texts(ARRAY_BODY) if t.kind == "content") == (
        "".join(TEXT_PIECES)
    )
    assert (
        Gemini.response_decoder(
            "application/json", stream=False, hide_usage=False, max_frame_bytes=1
        )
        is None
    )


def test_error_body_in_google_shape_raises_typed_sdk_errors():
    body = Gemini.error_body(429, "Quota exceeded", "rate_limited")
    assert json.loads(body)["error"]["status"] == "RESOURCE_EXHAUSTED"
    with pytest.raises(genai_errors.ClientError, match="Quota exceeded") as info:
        sdk_client(body, "application/json", 429).models.generate_content(model=MODEL, contents="x")
    assert info.value.code == 429


def test_blocked_prompt_finishes_as_content_filter():
    dec = sse()
    dec.feed(f"data: {gjson({'promptFeedback': {'blockReason': 'SAFETY'}})}\r\n\r\n".encode())
    assert dec.finish_reason == "content_filter"


@pytest.mark.parametrize("at", [1, 2, 30, 300, 301, 302, 700])
def test_array_error_event_when_the_current_chunk_is_dropped(at):
    """The exchange replaces the chunk being processed: `before` its first event keeps
    what the client already has plus the error a valid JSON array."""
    dec = array()
    first = dec.feed(ARRAY_BODY[:at])
    second = dec.feed(ARRAY_BODY[at : at + 150])
    client = b"".join(e.out for e in first)
    client += dec.error_event("stopped", "blocked", before=second[0] if second else None)
    assert json.loads(client)[-1]["error"]["message"] == "stopped"
