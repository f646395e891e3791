"""A translated exchange fed the messages Envoy sends, no gRPC or Envoy involved: the
request-body answer (path, credentials, dispatch headers, route cache, the body in the
target's API), the answer in any chunking (the same client bytes as the translator fed
whole, metered with the upstream's usage), a card split across chunks masked in the
OpenAI frames, and an upstream refusal answered in the client's shape."""

from __future__ import annotations

import re

import orjson
from hypothesis import given, settings

from extproc.config import parse_config
from extproc.dev.mock import build_anthropic_stream, build_bedrock_stream
from extproc.dev.mock.bedrock import EVENTSTREAM_CONTENT_TYPE as EVENTSTREAM
from extproc.dev.mock.knobs import MockOptions
from extproc.policy import Shared, build_policy
from extproc.translate import ChatToAnthropic
from extproc.translate.chat_to_bedrock import ChatToBedrock
from tests.providers_helpers import cut, cuts
from tests.test_exchange import Run, apply_body, body_msg, headers_msg, metadata

DOC = {
    "providers": {
        "mock": {"url": "http://127.0.0.1:1", "api_key_env": "MOCK_KEY"},
        "claude": {"url": "https://api.anthropic.com", "format": "anthropic",
                   "api_key_env": "ANTHROPIC_KEY"},
    },
    "routes": [{"name": "v1", "prefix": "/v1/", "provider": "mock"}],
    "models": {"aliases": {"my-claude": {"provider": "claude", "model": "claude-sonnet-4-5"}}},
    "streaming": {"max_frame_bytes": 4096},
}  # fmt: skip
ENV = {"MOCK_KEY": "sk-openai", "ANTHROPIC_KEY": "sk-ant"}
ASK = {"model": "my-claude", "stream": True, "messages": [{"role": "user", "content": "hello"}]}
SSE = {":status": "200", "content-type": "text/event-stream"}


def run_of(doc: dict = DOC) -> Run:
    config = parse_config(doc, "t.yaml")
    run = Run(config)
    run.ex.policy = build_policy(config, Shared(), ENV)
    return run


def post(run: Run, body: dict):
    headers = {
        ":method": "POST",
        ":path": "/v1/chat/completions",
        "content-type": "application/json",
        "authorization": "Bearer client-key",
    }
    run.send(headers_msg(headers, route="v1"))
    return run.send(body_msg(orjson.dumps(body)))


def upstream_stream(text: str | None = None) -> bytes:
    anthropic = ChatToAnthropic().request(ASK, "claude-sonnet-4-5")
    options = MockOptions(text=text) if text else MockOptions()
    return b"".join(build_anthropic_stream(orjson.loads(anthropic.body), options))


def test_request_body_goes_out_in_anthropics_api_with_its_key():
    resp = post(run_of(), ASK)
    common = resp.request_body.response
    assert common.clear_route_cache
    sets = {h.header.key: h.header.raw_value.decode() for h in common.header_mutation.set_headers}
    assert sets[":path"] == "/v1/messages"
    assert sets["x-api-key"] == "sk-ant"
    assert sets["anthropic-version"] == "2023-06-01"
    assert sets["x-ai-gateway-provider"] == "claude"
    assert sets["x-ai-gateway-translated"] == "1"
    assert "authorization" in common.header_mutation.remove_headers
    body = orjson.loads(common.body_mutation.body)
    assert sets["content-length"] == str(len(common.body_mutation.body))
    assert body["model"] == "claude-sonnet-4-5" and body["max_tokens"] == 4096
    assert body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]
    assert metadata(resp)["upstream_format"] == "anthropic_messages"


def test_a_part_anthropic_cannot_take_is_refused_before_anything_goes_out():
    resp = post(run_of(), {**ASK, "n": 3})
    assert resp.immediate_response.status.code == 400
    assert orjson.loads(resp.immediate_response.body)["error"]["param"] == "n"


@settings(max_examples=40, deadline=None)
@given(cuts(upstream_stream()))
def test_any_chunking_gives_the_translators_bytes_and_the_upstreams_usage(points):
    whole = upstream_stream()
    run = run_of()
    post(run, ASK)
    got = run.respond(cut(whole, points), SSE)
    reference = ChatToAnthropic().response(
        ChatToAnthropic().request(ASK, "claude-sonnet-4-5"), created=0
    )
    expected = reference.feed(whole) + reference.finish()
    # `created` is the exchange's wall clock: the rest is byte for byte the same.
    assert re.sub(rb'"created":\d+', b'"created":0', got) == expected
    headers = run.response_headers.response_headers.response.header_mutation
    sets = {h.header.key: h.header.raw_value.decode() for h in headers.set_headers}
    assert sets["content-type"] == "text/event-stream"
    assert run.ex.usage.completion_tokens == reference.decoder.usage.completion_tokens > 0
    assert run.ex.usage.prompt_tokens == reference.decoder.usage.prompt_tokens > 0
    assert (
        run.metric(
            "ai_gateway_translations_total", {"from": "openai_chat", "to": "anthropic_messages"}
        )
        == 1
    )


@settings(max_examples=30, deadline=None)
@given(cuts(upstream_stream("pay with 4111 1111 1111 1111 today")))
def test_a_card_split_anywhere_arrives_masked_in_openai_chunks(points):
    doc = {**DOC, "guards": {"rules": [{"name": "cards", "detectors": ["credit_card"]}]}}
    run = run_of(doc)
    post(run, ASK)
    got = run.respond(cut(upstream_stream("pay with 4111 1111 1111 1111 today"), points), SSE)
    text = ""
    for frame in got.split(b"\n\n"):
        if frame.startswith(b"data: {"):
            obj = orjson.loads(frame[6:])
            assert obj["object"] == "chat.completion.chunk"
            text += "".join(c["delta"].get("content") or "" for c in obj["choices"])
    assert text == "pay with <CREDIT_CARD> today"
    assert got.endswith(b"data: [DONE]\n\n")


def test_an_upstream_refusal_is_answered_in_openais_shape():
    run = run_of()
    post(run, ASK)
    headers = {":status": "529", "content-type": "application/json", "request-id": "req_1"}
    r = run.send(headers_msg(headers, response=True))
    assert r.response_headers.response.header_mutation is not None
    body = b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}'
    answer = run.send(body_msg(body, response=True))
    immediate = answer.immediate_response
    assert immediate.status.code == 503
    error = orjson.loads(immediate.body)["error"]
    assert (error["code"], error["message"]) == ("overloaded_error", "Overloaded")
    sent = {h.header.key for h in immediate.headers.set_headers}
    assert "request-id" not in sent
    assert metadata(answer)["reason"] == "upstream_error"


def test_a_whole_answer_is_translated_and_metered_from_the_upstreams_document():
    run = run_of()
    post(run, {**ASK, "stream": False})
    message = {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
        "content": [{"type": "text", "text": "Hi there."}], "stop_reason": "end_turn",
        "usage": {"input_tokens": 9, "output_tokens": 3},
    }  # fmt: skip
    run.send(headers_msg({":status": "200", "content-type": "application/json"}, response=True))
    raw = orjson.dumps(message)
    answer = orjson.loads(apply_body(run.send(body_msg(raw, response=True)), raw))
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["content"] == "Hi there."
    assert (run.ex.usage.prompt_tokens, run.ex.usage.completion_tokens) == (9, 3)
    assert run.ex.finish_reason == "stop"


def test_an_upstream_that_stops_early_ends_the_openai_stream_with_an_error_frame():
    whole = upstream_stream()
    run = run_of()
    post(run, ASK)
    half = whole[: whole.index(b"event: message_delta")]  # no stop reason, no message_stop
    got = run.respond([half[:40], half[40:]], SSE)
    frames = [f for f in got.split(b"\n\n") if f]
    assert frames[-1] == b"data: [DONE]"
    error = orjson.loads(frames[-2][6:])["error"]
    assert error["code"] == "upstream_truncated"
    assert run.ex.error_kind == "upstream_truncated"
    assert run.ex.usage.prompt_tokens > 0  # metered as far as the upstream said


def test_an_upstream_error_event_mid_stream_is_an_openai_error_frame():
    whole = upstream_stream()
    cut_at = whole.index(b"event: content_block_delta")
    error = (
        b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error",'
        b'"message":"Overloaded"}}\n\n'
    )
    run = run_of()
    post(run, ASK)
    got = run.respond([whole[:cut_at], error], SSE)
    frames = [f for f in got.split(b"\n\n") if f]
    assert frames[-1] == b"data: [DONE]"
    assert orjson.loads(frames[-2][6:])["error"] == {
        "message": "Overloaded",
        "type": "server_error",
        "code": "overloaded_error",
    }


def test_a_bedrock_stream_is_complete_at_its_metadata_event():
    """ConverseStream's last event is `metadata` (the usage): the translated stream's
    `[DONE]` goes with it and the openai SDK may hang up there, before Envoy's end of
    stream, so that chunk's answer must carry the access-log figures."""
    doc = {
        **DOC,
        "providers": {
            **DOC["providers"],
            "nova": {
                "url": "https://bedrock-runtime.us-east-1.amazonaws.com",
                "format": "bedrock",
                "api_key_env": "ANTHROPIC_KEY",
            },
        },
        "models": {"aliases": {"my-nova": {"provider": "nova", "model": "amazon.nova-lite-v1:0"}}},
    }
    run = run_of(doc)
    ask = {**ASK, "model": "my-nova"}
    post(run, ask)
    converse = ChatToBedrock().request(orjson.loads(orjson.dumps(ask)), "amazon.nova-lite-v1:0")
    frames = build_bedrock_stream(orjson.loads(converse.body), "amazon.nova-lite-v1:0")
    run.send(headers_msg({":status": "200", "content-type": EVENTSTREAM}, response=True))
    answers = [run.send(body_msg(f, end=False, response=True)) for f in frames]
    assert b"[DONE]" in apply_body(answers[-1], frames[-1])
    figures = metadata(answers[-1])  # no end of stream came
    assert figures["usage_estimated"] is False
    assert figures["prompt_tokens"] == run.ex.usage.prompt_tokens > 0
    assert figures["completion_tokens"] == run.ex.usage.completion_tokens > 0
    assert all(not a.HasField("dynamic_metadata") for a in answers[:-1])
    run.ex.close(2.0)  # the hang-up
    assert run.metric("ai_gateway_errors_total", {"kind": "stream_aborted"}) == 0
