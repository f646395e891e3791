"""The exchange state machine fed with the messages Envoy sends, no gRPC involved."""

from __future__ import annotations

import asyncio
import gzip
import itertools
import zlib

import orjson
import pytest
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    HttpBody,
    HttpHeaders,
    ProcessingRequest,
    ProcessingResponse,
)
from google.protobuf.struct_pb2 import Struct

from extproc.config import Config, ProviderConfig, RouteConfig, StreamingConfig
from extproc.exchange import Exchange
from extproc.metrics import Metrics
from extproc.policy import Policy

CONFIG = Config(
    path="test.yaml",
    providers={"mock": ProviderConfig(name="mock", url="http://127.0.0.1:1")},
    routes=(
        RouteConfig(
            name="openai", prefix="/openai", provider="mock", rewrite="/v1/chat/completions"
        ),
        RouteConfig(name="v1", prefix="/v1/", provider="mock"),
    ),
    streaming=StreamingConfig(max_frame_bytes=4096),
)


def headers_msg(
    pairs: dict[str, str], *, response: bool = False, route: str | None = None, end: bool = False
) -> ProcessingRequest:
    hm = HeaderMap(headers=[HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()])
    req = ProcessingRequest()
    target = req.response_headers if response else req.request_headers
    target.CopyFrom(HttpHeaders(headers=hm, end_of_stream=end))
    if route is not None:
        attrs = Struct()
        attrs.update({"xds.route_name": route})
        req.attributes["envoy.filters.http.ext_proc"].CopyFrom(attrs)
    return req


def body_msg(body: bytes, end: bool = True, *, response: bool = False) -> ProcessingRequest:
    req = ProcessingRequest()
    (req.response_body if response else req.request_body).CopyFrom(
        HttpBody(body=body, end_of_stream=end)
    )
    return req


def chunk(data: dict | str) -> bytes:
    payload = data if isinstance(data, str) else orjson.dumps(data).decode()
    return f"data: {payload}\n\n".encode()


def stream_frames(n: int = 3, *, usage: bool) -> list[bytes]:
    base = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    frames = []
    extra = {"usage": None} if usage else {}
    frames.append(
        chunk(
            {
                **base,
                "choices": [
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": ""},
                        "finish_reason": None,
                    }
                ],
                **extra,
            }
        )
    )
    for i in range(n):
        frames.append(
            chunk(
                {
                    **base,
                    "choices": [
                        {"index": 0, "delta": {"content": f"w{i} "}, "finish_reason": None}
                    ],
                    **extra,
                }
            )
        )
    frames.append(
        chunk({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], **extra})
    )
    if usage:
        frames.append(
            chunk(
                {
                    **base,
                    "choices": [],
                    "usage": {
                        "prompt_tokens": 11,
                        "completion_tokens": n,
                        "total_tokens": 11 + n,
                        "prompt_tokens_details": {"cached_tokens": 2},
                        "completion_tokens_details": {"reasoning_tokens": 1},
                    },
                }
            )
        )
    frames.append(b"data: [DONE]\n\n")
    return frames


class Run:
    """Drives one exchange and returns what the client would receive."""

    def __init__(self, config: Config = CONFIG) -> None:
        self.metrics = Metrics()
        self.ex = Exchange(Policy(config), self.metrics, now=0.0)
        self.t = 0.0

    def send(self, req: ProcessingRequest) -> ProcessingResponse:
        self.t += 0.01
        if req.WhichOneof("request") == "request_body":
            return asyncio.run(self.ex.on_request_body(req.request_body.body, self.t))
        return self.ex.handle(req, self.t)

    def request(self, body: dict | bytes, path: str = "/v1/chat/completions", route: str = "v1"):
        r1 = self.send(
            headers_msg(
                {":method": "POST", ":path": path, "content-type": "application/json"}, route=route
            )
        )
        raw = body if isinstance(body, bytes) else orjson.dumps(body)
        r2 = self.send(body_msg(raw))
        return r1, r2

    def respond(self, chunks: list[bytes], headers: dict[str, str] | None = None) -> bytes:
        hdrs = {":status": "200", "content-type": "text/event-stream; charset=utf-8"}
        hdrs.update(headers or {})
        self.response_headers = self.send(headers_msg(hdrs, response=True))
        client = b""
        for i, c in enumerate(chunks):
            resp = self.send(body_msg(c, end=i == len(chunks) - 1, response=True))
            self.last = resp
            client += apply_body(resp, c)
        return client

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.metrics.registry.get_sample_value(name, labels or {}) or 0.0


def apply_body(resp: ProcessingResponse, original: bytes) -> bytes:
    assert resp.WhichOneof("response") == "response_body"
    mutation = resp.response_body.response.body_mutation
    kind = mutation.WhichOneof("mutation")
    if kind == "body":
        return mutation.body
    if kind == "clear_body":
        return b""
    return original


def metadata(resp: ProcessingResponse) -> dict:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(resp.dynamic_metadata)["ai_gateway"]


CHAT = {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "hello there"}]}


def test_stream_without_usage_request_gets_usage_upstream_and_not_downstream():
    run = Run()
    _, body_resp = run.request({**CHAT, "stream": True})
    upstream = orjson.loads(body_resp.request_body.response.body_mutation.body)
    assert upstream["stream_options"] == {"include_usage": True}
    frames = stream_frames(3, usage=True)
    client = run.respond(frames)
    # Only the usage-only chunk is dropped; the others keep their `"usage":null`.
    assert client == b"".join(frames[:-2] + frames[-1:])
    md = metadata(run.last)
    assert md["prompt_tokens"] == 11 and md["completion_tokens"] == 3
    assert md["cached_tokens"] == 2 and md["reasoning_tokens"] == 1
    assert md["usage_estimated"] is False
    assert (
        run.metric(
            "ai_gateway_tokens_total",
            {"model": "gpt-3.5-turbo", "consumer": "anonymous", "kind": "prompt"},
        )
        == 11
    )
    assert run.metric("ai_gateway_active_streams") == 0


def test_client_that_asked_for_usage_gets_stream_untouched():
    run = Run()
    _, body_resp = run.request({**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    assert not body_resp.request_body.response.HasField("body_mutation")
    frames = stream_frames(4, usage=True)
    responses_untouched = []
    client = b""
    run.send(headers_msg({":status": "200", "content-type": "text/event-stream"}, response=True))
    for i, f in enumerate(frames):
        resp = run.send(body_msg(f, end=i == len(frames) - 1, response=True))
        responses_untouched.append(not resp.response_body.response.HasField("body_mutation"))
        client += apply_body(resp, f)
    assert client == b"".join(frames)
    assert all(responses_untouched), "whole untouched frames must not be rewritten"
    assert metadata(resp)["completion_tokens"] == 4


@pytest.mark.parametrize("cuts", [[1], [7, 8, 9], [30, 31, 200], list(range(1, 400, 3))])
def test_any_chunking_gives_same_client_bytes(cuts):
    run = Run()
    run.request({**CHAT, "stream": True})
    frames = stream_frames(5, usage=True)
    body = b"".join(frames)
    points = [0, *[c for c in cuts if c < len(body)], len(body)]
    chunks = [body[a:b] for a, b in itertools.pairwise(points)]
    assert run.respond(chunks) == b"".join(frames[:-2] + frames[-1:])
    assert metadata(run.last)["completion_tokens"] == 5


def test_provider_without_usage_is_estimated_and_marked():
    run = Run()
    run.request({**CHAT, "stream": True})
    client = run.respond(stream_frames(6, usage=False))
    assert client == b"".join(stream_frames(6, usage=False))
    md = metadata(run.last)
    assert md["usage_estimated"] is True
    assert md["completion_tokens"] == 6
    assert md["prompt_tokens"] > 0
    assert run.metric("ai_gateway_usage_estimated_total", {"model": "gpt-3.5-turbo"}) == 1


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", "invalid_json"),
        (b"\xff\xfe\x00garbage", "invalid_encoding"),
        (b"", "missing_body"),
        (b"[1, 2]", "invalid_type"),
        (
            orjson.dumps({"messages": [{"role": "user", "content": "x"}]}),
            "missing_required_parameter",
        ),
        (orjson.dumps({"model": "m"}), "missing_required_parameter"),
        (orjson.dumps({"model": "m", "messages": []}), "empty_array"),
        (orjson.dumps({"model": "m", "messages": [], "stream": "yes"}), "empty_array"),
        (
            orjson.dumps(
                {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}
            ),
            "invalid_type",
        ),
    ],
)
def test_bad_requests_get_400_openai_error(body, code):
    run = Run()
    _, resp = run.request(body)
    imm = resp.immediate_response
    assert imm.status.code == 400
    err = orjson.loads(imm.body)["error"]
    assert err["code"] == code and err["type"] == "invalid_request_error" and err["message"]
    assert any(h.header.key == "content-type" for h in imm.headers.set_headers)
    run.ex.close(1.0)
    assert (
        run.metric(
            "ai_gateway_requests_total", {"route": "v1", "model": "unknown", "status": "400"}
        )
        == 1
    )
    assert run.metric("ai_gateway_active_streams") == 0


def test_non_chat_path_passes_through_and_skips_bodies():
    run = Run()
    resp = run.send(headers_msg({":method": "GET", ":path": "/v1/models"}, route="v1", end=True))
    assert resp.mode_override.response_body_mode == ProcessingMode.NONE
    run.send(headers_msg({":status": "200", "content-type": "application/json"}, response=True))
    run.ex.close(1.0)
    assert (
        run.metric(
            "ai_gateway_requests_total", {"route": "v1", "model": "unknown", "status": "200"}
        )
        == 1
    )


def test_gloo_style_route_is_recognised_as_chat_via_rewrite():
    run = Run()
    r1, r2 = run.request({**CHAT, "stream": True}, path="/openai", route="openai")
    assert not r1.HasField("mode_override")
    assert r2.request_body.response.body_mutation.body  # include_usage added


def test_route_found_by_prefix_when_envoy_sends_no_route_name():
    run = Run()
    r1 = run.send(headers_msg({":method": "POST", ":path": "/openai"}))
    assert run.ex.route_name == "openai"
    assert not r1.HasField("mode_override")


def test_non_streaming_json_usage_is_metered():
    run = Run()
    run.request(CHAT)
    body = orjson.dumps(
        {
            "id": "x",
            "object": "chat.completion",
            "choices": [],
            "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12},
        }
    )
    client = run.respond([body[:10], body[10:]], {"content-type": "application/json"})
    assert client == body
    md = metadata(run.last)
    assert md["prompt_tokens"] == 7 and md["completion_tokens"] == 5 and md["total_tokens"] == 12


def test_hidden_usage_frame_aligned_chunks_get_no_body_mutation():
    """With usage injected, each frame-aligned chunk that is not the usage-only one is
    answered "continue" without a body mutation; only the usage chunk's is cleared."""
    run = Run()
    run.request({**CHAT, "stream": True})
    frames = stream_frames(4, usage=True)
    run.send(headers_msg({":status": "200", "content-type": "text/event-stream"}, response=True))
    chunks = [frames[0] + frames[1], *frames[2:-2], frames[-2], frames[-1]]
    kinds = []
    for i, c in enumerate(chunks):
        resp = run.send(body_msg(c, end=i == len(chunks) - 1, response=True))
        mutation = resp.response_body.response.body_mutation
        kinds.append(mutation.WhichOneof("mutation"))
    usage_at = len(chunks) - 2
    assert kinds[usage_at] in ("body", "clear_body")
    assert kinds[:usage_at] + kinds[usage_at + 1 :] == [None] * (len(chunks) - 1)
    assert metadata(resp)["completion_tokens"] == 4


def test_gzip_from_provider_is_decoded_for_client_and_meter():
    run = Run()
    run.request({**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    frames = stream_frames(3, usage=True)
    comp = zlib.compressobj(wbits=31)
    chunks = [comp.compress(f) + comp.flush(zlib.Z_SYNC_FLUSH) for f in frames]
    chunks[-1] += comp.flush()
    client = run.respond(chunks, {"content-encoding": "gzip"})
    removed = run.response_headers.response_headers.response.header_mutation.remove_headers
    assert "content-encoding" in removed
    assert client == b"".join(frames)
    assert metadata(run.last)["completion_tokens"] == 3


def test_corrupt_gzip_ends_stream_with_error_event():
    run = Run()
    run.request({**CHAT, "stream": True})
    good = gzip.compress(b"".join(stream_frames(2, usage=True)))
    client = run.respond([good[:20], b"\x00garbage" * 4, good[40:]], {"content-encoding": "gzip"})
    assert b'"code":"decode_error"' in client
    assert client.endswith(b"data: [DONE]\n\n")
    assert run.metric("ai_gateway_errors_total", {"kind": "decode_error"}) == 1


def test_frame_too_large_ends_stream_cleanly_then_clears():
    run = Run()
    run.request({**CHAT, "stream": True})
    first = stream_frames(1, usage=True)[0]
    huge = b"data: {" + b"x" * 5000
    client = run.respond([first, huge, b"more", b"}\n\n"])
    assert client.startswith(first)
    assert b"frame_too_large" in client and client.endswith(b"data: [DONE]\n\n")
    assert client.count(b"[DONE]") == 1
    assert run.metric("ai_gateway_active_streams") == 0


def test_client_hangup_mid_stream_is_charged_for_what_streamed():
    run = Run()
    run.request({**CHAT, "stream": True})
    frames = stream_frames(8, usage=True)
    run.send(headers_msg({":status": "200", "content-type": "text/event-stream"}, response=True))
    for f in frames[:5]:
        run.send(body_msg(f, end=False, response=True))
    run.ex.close(1.0)
    assert run.ex.usage.estimated and run.ex.usage.completion_tokens == 4
    assert run.metric("ai_gateway_errors_total", {"kind": "stream_aborted"}) == 1
    assert run.metric("ai_gateway_active_streams") == 0


def test_provider_error_status_passes_through_and_is_counted():
    run = Run()
    run.request({**CHAT, "stream": True})
    resp = run.send(
        headers_msg({":status": "429", "content-type": "application/json"}, response=True)
    )
    assert resp.mode_override.response_body_mode == ProcessingMode.NONE
    run.ex.close(1.0)
    assert (
        run.metric(
            "ai_gateway_requests_total", {"route": "v1", "model": "gpt-3.5-turbo", "status": "429"}
        )
        == 1
    )
    assert run.metric("ai_gateway_errors_total", {"kind": "upstream_error"}) == 1


@pytest.mark.parametrize("seed", range(6))
def test_whole_frame_fast_path_and_frame_path_agree(seed):
    """Whole frames take the counting fast path, split ones the per-frame path: the
    client bytes and every metered figure must not depend on which ran."""
    import random

    rng = random.Random(seed)
    frames = stream_frames(7, usage=False)
    body = b"".join(frames)
    cuts = sorted(rng.sample(range(1, len(body)), 6))
    points = [0, *cuts, len(body)]
    split = [body[a:b] for a, b in itertools.pairwise(points)]
    results = []
    for chunks in (frames, [body], split):
        run = Run()
        run.request({**CHAT, "stream": True})
        client = run.respond(chunks)
        md = metadata(run.last)
        results.append((client, md["completion_tokens"], md["finish_reason"]))
    assert results[0] == results[1] == results[2]
    assert results[0][1] == 7 and results[0][2] == "stop"


@pytest.mark.parametrize("fast", [True, False], ids=["whole-frames", "split-frames"])
def test_hangup_right_after_done_is_complete_and_its_chunk_carries_the_figures(fast):
    """The `openai` SDK closes its connection right after `data: [DONE]`, so Envoy's
    end of stream may never come: the end marker (with the usage before it) completes
    the exchange, and the answer to its chunk carries the access-log figures."""
    run = Run()
    run.request({**CHAT, "stream": True})
    run.send(headers_msg({":status": "200", "content-type": "text/event-stream"}, response=True))
    frames = stream_frames(5, usage=True)
    if not fast:  # split inside frames: the per-event path
        joined = b"".join(frames)
        frames = [joined[i : i + 7] for i in range(0, len(joined), 7)]
    answers = [run.send(body_msg(f, end=False, response=True)) for f in frames]
    figures = metadata(answers[-1])
    assert figures["completion_tokens"] == 5 and figures["prompt_tokens"] == 11
    assert figures["usage_estimated"] is False
    assert all(not a.HasField("dynamic_metadata") for a in answers[:-1])
    run.ex.close(2.0)  # the hang-up
    assert run.metric("ai_gateway_errors_total", {"kind": "stream_aborted"}) == 0
    assert run.metric("ai_gateway_active_streams") == 0
    tokens = {"consumer": "anonymous", "kind": "completion"}
    assert (
        run.metric("ai_gateway_tokens_total", {"model": "other", **tokens})
        + run.metric("ai_gateway_tokens_total", {"model": "gpt-3.5-turbo", **tokens})
        == 5
    )


@pytest.mark.parametrize("marker", [True, False], ids=["with-done", "truncated"])
def test_a_stream_the_provider_ends_without_its_end_marker_is_counted(marker):
    """Envoy cannot append to the client's body once the provider ended it; the
    gateway counts the truncated answer (`upstream_truncated`) and lets it pass."""
    run = Run()
    run.request({**CHAT, "stream": True})
    frames = stream_frames(4, usage=True)
    client = run.respond(frames if marker else frames[:-2])
    truncated = run.metric("ai_gateway_errors_total", {"kind": "upstream_truncated"})
    assert truncated == (0 if marker else 1)
    assert client.endswith(b"data: [DONE]\n\n") == marker


def test_the_end_of_the_shutdown_grace_ends_a_stream_with_the_error_event():
    """`end_for_shutdown`: the next chunk becomes the format's error event + [DONE],
    the one after closes the provider's stream (an ImmediateResponse reset)."""
    run = Run()
    run.request({**CHAT, "stream": True})
    run.send(headers_msg({":status": "200", "content-type": "text/event-stream"}, response=True))
    frames = stream_frames(6, usage=True)
    client = b"".join(
        apply_body(run.send(body_msg(f, end=False, response=True)), f) for f in frames[:2]
    )
    assert run.ex.end_for_shutdown(1.0) is True
    assert run.ex.end_for_shutdown(1.0) is False  # once
    ended = run.send(body_msg(frames[2], end=False, response=True))
    client += apply_body(ended, frames[2])
    payloads = [p for p in client.split(b"\n") if p.startswith(b"data: ")]
    assert payloads[-1] == b"data: [DONE]"
    assert orjson.loads(payloads[-2][6:])["error"]["code"] == "gateway_shutdown"
    closed = run.send(body_msg(frames[3], end=False, response=True))
    assert closed.WhichOneof("response") == "immediate_response"
    assert run.metric("ai_gateway_errors_total", {"kind": "shutdown_ended"}) == 1
    assert run.metric("ai_gateway_errors_total", {"kind": "stream_aborted"}) == 0
    assert run.metric("ai_gateway_active_streams") == 0
