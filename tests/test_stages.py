"""The contract between the exchange and policy stages: what a stage sets is what Envoy
is told, refusals become OpenAI-style answers, filters see every event in order."""

from __future__ import annotations

import asyncio

import orjson
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode

from extproc.policy import Policy, Refusal, RequestContext, Stage, StreamBlocked
from extproc.providers.base import StreamEvent
from extproc.usage import Usage
from tests.test_exchange import (
    CHAT,
    CONFIG,
    Run,
    body_msg,
    headers_msg,
    metadata,
    stream_frames,
)


def run_with(*stages: Stage) -> Run:
    run = Run()
    run.ex.policy = Policy(CONFIG, stages=stages)
    return run


def header_sets(mutation) -> dict[str, bytes]:
    return {h.header.key: h.header.raw_value for h in mutation.set_headers}


class Gatekeeper(Stage):
    def on_request_headers(self, ctx: RequestContext) -> None:
        if ctx.headers.get("authorization") != "Bearer good":
            raise Refusal(
                401,
                "Missing or invalid API key.",
                "invalid_api_key",
                kind="auth",
                headers={"www-authenticate": 'Bearer realm="ai-gateway"'},
            )
        ctx.consumer = "team-a"
        ctx.remove_headers.append("authorization")


def test_refusal_at_headers_is_an_openai_error_with_headers():
    run = run_with(Gatekeeper())
    resp = run.send(headers_msg({":method": "POST", ":path": "/v1/chat/completions"}, route="v1"))
    imm = resp.immediate_response
    assert imm.status.code == 401
    assert orjson.loads(imm.body)["error"]["code"] == "invalid_api_key"
    assert header_sets(imm.headers)["www-authenticate"] == b'Bearer realm="ai-gateway"'
    run.ex.close(1.0)
    assert run.metric("ai_gateway_errors_total", {"kind": "auth"}) == 1


def test_consumer_reaches_metadata_metrics_and_header_removal():
    run = run_with(Gatekeeper())
    r1 = run.send(
        headers_msg(
            {":method": "POST", ":path": "/v1/chat/completions", "authorization": "Bearer good"},
            route="v1",
        )
    )
    assert "authorization" in r1.request_headers.response.header_mutation.remove_headers
    r2 = run.send(_body({**CHAT, "stream": True}))
    assert metadata(r2)["consumer"] == "team-a"
    run.respond(stream_frames(2, usage=True))
    assert metadata(run.last)["consumer"] == "team-a"
    assert (
        run.metric(
            "ai_gateway_tokens_total",
            {"model": "gpt-3.5-turbo", "consumer": "team-a", "kind": "completion"},
        )
        == 2
    )


def _body(obj: dict):
    return body_msg(orjson.dumps(obj))


class Aliaser(Stage):
    async def on_request(self, ctx: RequestContext) -> None:
        assert ctx.info is not None
        if ctx.info.model == "my-alias":
            ctx.info.model = ctx.info.body["model"] = "gpt-4o-mini"
            ctx.body_dirty = True
            ctx.upstream_headers["x-ai-gateway-provider"] = "mock"
            ctx.clear_route_cache = True


def test_stage_body_rewrite_and_route_cache_clear():
    run = run_with(Aliaser())
    _, r2 = run.request({**CHAT, "model": "my-alias"})
    common = r2.request_body.response
    assert orjson.loads(common.body_mutation.body)["model"] == "gpt-4o-mini"
    sets = header_sets(common.header_mutation)
    assert sets["x-ai-gateway-provider"] == b"mock"
    assert sets["content-length"] == str(len(common.body_mutation.body)).encode()
    assert common.clear_route_cache
    assert metadata(r2)["model"] == "gpt-4o-mini"


class Limiter(Stage):
    def __init__(self) -> None:
        self.settled: list[tuple[int, bool]] = []

    async def on_request(self, ctx: RequestContext) -> None:
        ctx.response_headers["x-ratelimit-remaining-requests"] = "9"

    def on_complete(self, ctx: RequestContext, usage: Usage, complete: bool):
        async def settle() -> None:
            self.settled.append((usage.completion_tokens, complete))

        return settle()


def test_response_headers_and_settlement_after_the_stream():
    limiter = Limiter()
    run = run_with(limiter)
    run.request({**CHAT, "stream": True})
    run.respond(stream_frames(3, usage=True))
    sets = header_sets(run.response_headers.response_headers.response.header_mutation)
    assert sets["x-ratelimit-remaining-requests"] == b"9"
    assert len(run.ex.after) == 1 and limiter.settled == []
    asyncio.run(run.ex.after[0])
    assert limiter.settled == [(3, True)]


class Shouter(Stage):
    """Upper-cases content; blocks when it sees 'forbidden'."""

    class Filter:
        def __init__(self, ctx: RequestContext) -> None:
            self.ctx = ctx
            self.seen = 0

        oldest_held = None  # passes every frame on

        def process(self, events: list[StreamEvent], end: bool) -> list[StreamEvent]:
            out = []
            for e in events:
                self.seen += 1
                if e.data and b"forbidden" in e.data:
                    raise StreamBlocked("Blocked by guard 'words'.", "content_blocked")
                if e.data and b'"content":"w' in e.data:
                    e = StreamEvent(e.raw, e.out.replace(b'"content":"w', b'"content":"W'), e.data)
                out.append(e)
            return out

    def stream_filter(self, ctx: RequestContext):
        return self.Filter(ctx)


def test_stream_filter_rewrites_events():
    run = run_with(Shouter())
    run.request({**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    client = run.respond(stream_frames(2, usage=True))
    assert b'"content":"W0 "' in client and b'"content":"w0 "' not in client
    assert metadata(run.last)["completion_tokens"] == 2


def test_stream_filter_block_ends_with_error_event_and_done():
    run = run_with(Shouter())
    run.request({**CHAT, "stream": True})
    frames = stream_frames(2, usage=True)
    frames.insert(2, b'data: {"choices":[{"index":0,"delta":{"content":"forbidden"}}]}\n\n')
    client = run.respond(frames)
    assert b"content_blocked" in client and client.endswith(b"data: [DONE]\n\n")
    assert client.count(b"[DONE]") == 1
    assert b"forbidden" not in client
    assert run.metric("ai_gateway_errors_total", {"kind": "guard_blocked"}) == 1
    assert run.metric("ai_gateway_active_streams") == 0


class Redactor(Stage):
    def on_response_headers(self, ctx: RequestContext) -> None:
        ctx.buffer_response = True

    def on_completion(self, ctx: RequestContext, body: bytes) -> bytes | None:
        if b"refuse-me" in body:
            raise Refusal(403, "Blocked by guard 'json'.", "content_blocked", kind="guard")
        return body.replace(b"secret", b"<SECRET>")


def test_buffered_json_answer_can_be_rewritten_or_refused():
    run = run_with(Redactor())
    run.request(CHAT)
    body = orjson.dumps(
        {
            "choices": [{"message": {"content": "a secret"}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 2},
        }
    )
    client = run.respond([body], {"content-type": "application/json"})
    mode = run.response_headers.mode_override.response_body_mode
    assert mode == ProcessingMode.BUFFERED
    assert b"<SECRET>" in client and b"a secret" not in client

    run = run_with(Redactor())
    run.request(CHAT)
    run.send(headers_msg({":status": "200", "content-type": "application/json"}, response=True))
    last = run.send(body_msg(b'{"choices": "refuse-me"}', response=True))
    assert last.immediate_response.status.code == 403
