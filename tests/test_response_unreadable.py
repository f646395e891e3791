"""Answers the gateway cannot read, in process. It asks for identity; gzip and deflate
it inflates (bounded per chunk); any other coding, and a success in a content type the
format does not read, is refused before the client gets a byte: a body the gateway
cannot read would pass its guards and meter unread."""

from __future__ import annotations

import zlib

import orjson
import pytest

from extproc.exchange.unreadable import INFLATE_RATIO
from tests.test_exchange import CHAT, Run, apply_body, body_msg, headers_msg, stream_frames

SSE = {":status": "200", "content-type": "text/event-stream"}


def gzip_pieces(frames: list[bytes]) -> list[bytes]:
    """One sync-flushed gzip piece per frame, as a provider that compresses streams."""
    comp = zlib.compressobj(wbits=31)
    pieces = [comp.compress(f) + comp.flush(zlib.Z_SYNC_FLUSH) for f in frames]
    pieces[-1] += comp.flush()
    return pieces


def immediate(resp) -> tuple[int, bytes]:
    assert resp.WhichOneof("response") == "immediate_response", resp
    return resp.immediate_response.status.code, resp.immediate_response.body


@pytest.mark.parametrize("coding", ["br", "zstd", "compress", "gzip, br", "gzip, gzip", "x-y"])
def test_a_coding_the_gateway_cannot_read_is_a_502_before_any_byte(coding):
    run = Run()
    run.request({**CHAT, "stream": True})
    answer = run.send(headers_msg({**SSE, "content-encoding": coding}, response=True))
    status, body = immediate(answer)
    assert status == 502
    assert b'"code":"decode_error"' in body and b'"type":"server_error"' in body
    assert run.metric("ai_gateway_errors_total", {"kind": "decode_error"}) == 1
    # Settled once, as an exchange the provider answered: the prompt is charged.
    assert run.ex.closed
    assert run.ex.usage.prompt_tokens > 0 and run.ex.usage.estimated


@pytest.mark.parametrize("coding", ["identity", "gzip, identity", "GZip", " x-gzip "])
def test_identity_and_gzip_spelt_any_way_are_read(coding):
    run = Run()
    run.request({**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    frames = stream_frames(3, usage=True)
    chunks = frames if coding == "identity" else gzip_pieces(frames)
    client = run.respond(chunks, {"content-encoding": coding})
    assert client == b"".join(frames)
    assert run.metric("ai_gateway_errors_total", {"kind": "decode_error"}) == 0


def test_a_gzip_bomb_ends_the_stream_without_inflating_it():
    """200 MB of one letter in ~200 KB of gzip: the answer to that chunk is the error
    event, and no answer carries more than the per-chunk bound."""
    run = Run()
    run.request({**CHAT, "stream": True})
    comp = zlib.compressobj(wbits=31)
    head = comp.compress(stream_frames(1, usage=True)[0]) + comp.flush(zlib.Z_SYNC_FLUSH)
    bomb = comp.compress(b"data: " + b"A" * (200 << 20)) + comp.flush()
    run.send(headers_msg({**SSE, "content-encoding": "gzip"}, response=True))
    first = apply_body(run.send(body_msg(head, end=False, response=True)), head)
    assert first.startswith(b"data: {")
    answer = run.send(body_msg(bomb, end=True, response=True))
    sent = apply_body(answer, bomb)
    assert len(sent) <= INFLATE_RATIO * len(bomb)
    assert b'"code":"decode_error"' in sent and b"inflates past" in sent
    assert run.metric("ai_gateway_errors_total", {"kind": "decode_error"}) == 1


def test_a_stream_that_compresses_well_is_not_taken_for_a_bomb():
    """Sixty-four frames in one chunk, deflated as well as zlib can: SSE compresses far
    less than the bound."""
    run = Run()
    run.request({**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    frames = stream_frames(64, usage=True)
    whole = b"".join(frames)
    packed = zlib.compress(whole, 9, wbits=31)
    assert len(whole) / len(packed) < INFLATE_RATIO
    assert run.respond([packed], {"content-encoding": "gzip"}) == whole


@pytest.mark.parametrize("coding", ["br", "gzip, br"])
def test_a_translated_answer_in_a_coding_the_gateway_cannot_read_is_a_502(coding):
    """The OpenAI client asked for an alias served in Anthropic's API: the answer
    cannot be translated unread, so it is refused at its headers, in the client's API."""
    from tests.test_exchange_translated import ASK, SSE, post, run_of

    run = run_of()
    post(run, ASK)
    answer = run.send(headers_msg({**SSE, "content-encoding": coding}, response=True))
    status, body = immediate(answer)
    assert status == 502
    assert b'"code":"decode_error"' in body and b'"type":"server_error"' in body
    assert run.metric("ai_gateway_errors_total", {"kind": "decode_error"}) == 1


def test_a_translated_gzip_answer_is_read():
    from tests.test_exchange_translated import ASK, SSE, post, run_of, upstream_stream

    run = run_of()
    post(run, ASK)
    run.send(headers_msg({**SSE, "content-encoding": "gzip"}, response=True))
    packed = zlib.compress(upstream_stream("hello from claude"), 9, wbits=31)
    client = apply_body(run.send(body_msg(packed, end=True, response=True)), packed)
    deltas = [
        orjson.loads(line[6:])["choices"][0]["delta"].get("content") or ""
        for line in client.split(b"\n\n")
        if line.startswith(b"data: {")
    ]
    assert "".join(deltas) == "hello from claude"


@pytest.mark.parametrize("content_type", ["text/plain", "", "application/octet-stream"])
def test_a_stream_in_a_content_type_the_format_does_not_read_is_a_502(content_type):
    """SSE labelled text/plain (or nothing) is read by the client's SDK all the same:
    passed on, it would be metered 0 completion tokens and read by no guard."""
    run = Run()
    run.request({**CHAT, "stream": True})
    answer = run.send(headers_msg({**SSE, "content-type": content_type}, response=True))
    status, body = immediate(answer)
    assert status == 502
    assert b'"code":"decode_error"' in body
    assert (content_type or "none").encode() in body
    assert run.metric("ai_gateway_errors_total", {"kind": "decode_error"}) == 1


def test_a_redirect_is_passed_on_as_it_came():
    run = Run()
    run.request({**CHAT, "stream": True})
    headers = {":status": "307", "location": "https://elsewhere.example/v1/chat/completions"}
    answer = run.send(headers_msg({**headers, "content-type": "text/html"}, response=True))
    assert answer.WhichOneof("response") == "response_headers"
    assert run.metric("ai_gateway_errors_total", {"kind": "decode_error"}) == 0


# -- labels the client's SDK does not read by: a response guard must read what it reads

CARD = "4111 1111 1111 1111"


def guarded_run(**streaming) -> Run:
    from extproc.config import parse_config
    from extproc.policy import Shared, build_policy

    doc = {
        "providers": {"mock": {"url": "http://127.0.0.1:1"}},
        "routes": [{"name": "v1", "prefix": "/v1/", "provider": "mock"}],
        "streaming": {"max_frame_bytes": 4096, **streaming},
        "guards": {"rules": [{"name": "pii", "detectors": ["credit_card"]}]},
    }
    config = parse_config(doc, "t.yaml")
    run = Run(config)
    run.ex.policy = build_policy(config, Shared(), {})
    return run


def content_frame(text: str) -> bytes:
    choice = {"index": 0, "delta": {"content": text}, "finish_reason": None}
    body = {"id": "c1", "object": "chat.completion.chunk", "model": "m", "choices": [choice]}
    return b"data: " + orjson.dumps(body) + b"\n\n"


def completion(text: str) -> bytes:
    return orjson.dumps({
        "id": "x", "object": "chat.completion", "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 4, "completion_tokens": 7, "total_tokens": 11},
    })  # fmt: skip


@pytest.mark.parametrize("label", ["application/json", "application/json; charset=utf-8"])
def test_a_stream_under_a_json_label_is_read_as_the_stream_the_sdk_reads(label):
    """The OpenAI SDKs read a stream by the request's `stream` flag, not the label."""
    run = guarded_run()
    run.request({**CHAT, "stream": True})
    frames = [content_frame("card: "), content_frame(CARD), b"data: [DONE]\n\n"]
    client = run.respond(frames, {"content-type": label})
    assert CARD.encode() not in client and b"<CREDIT_CARD>" in client
    assert client.endswith(b"data: [DONE]\n\n")
    assert run.ex.usage.completion_tokens > 0


def test_a_stream_request_answered_with_a_whole_json_document_is_read_as_one():
    run = guarded_run()
    run.request({**CHAT, "stream": True})
    whole = completion("card " + CARD)
    client = run.respond([whole[:40], whole[40:]], {"content-type": "application/json"})
    assert CARD.encode() not in client and b"<CREDIT_CARD>" in client
    assert (run.ex.usage.prompt_tokens, run.ex.usage.completion_tokens) == (4, 7)


def test_an_answer_under_a_json_label_that_is_not_json_is_a_502_when_a_guard_must_read_it():
    run = guarded_run()
    run.request(CHAT)
    sse = content_frame("card: ") + content_frame(CARD) + b"data: [DONE]\n\n"
    run.send(headers_msg({":status": "200", "content-type": "application/json"}, response=True))
    status, body = immediate(run.send(body_msg(sse, end=True, response=True)))
    assert status == 502 and CARD.encode() not in body
    assert b'"code":"decode_error"' in body


def test_a_whole_answer_too_large_for_the_guard_to_read_is_a_502():
    """Over `streaming.max_json_response_bytes` the answer is not kept; with a response
    guard it used to pass on unread (a card in it unmasked)."""
    run = guarded_run(max_json_response_bytes=1000)
    run.request(CHAT)
    whole = completion("x" * 1500 + " card " + CARD)
    run.send(headers_msg({":status": "200", "content-type": "application/json"}, response=True))
    status, body = immediate(run.send(body_msg(whole, end=True, response=True)))
    assert status == 502 and CARD.encode() not in body
    assert b'"code":"guard_budget_exceeded"' in body
    assert run.metric("ai_gateway_errors_total", {"kind": "guard_budget_exceeded"}) == 1


def test_without_a_response_guard_a_large_answer_passes_and_is_estimated():
    run = Run()
    run.request(CHAT)
    whole = completion("y" * 9000)
    client = run.respond([whole], {"content-type": "application/json"})
    assert client == whole


def test_a_providers_copies_of_the_gateways_own_headers_are_removed():
    """Cost, budget and guard headers come from the gateway alone."""
    run = Run()
    run.request({**CHAT, "stream": True})
    spoofed = {"x-ai-gateway-cost-usd": "0", "x-ai-gateway-guard": "none", "x-other": "kept"}
    answer = run.send(headers_msg({**SSE, **spoofed}, response=True))
    removed = answer.response_headers.response.header_mutation.remove_headers
    assert set(removed) >= {"x-ai-gateway-cost-usd", "x-ai-gateway-guard"}
    assert "x-other" not in removed
