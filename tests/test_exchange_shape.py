"""The shape the exchange keeps: Envoy's vocabulary in one module, one dispatch, the
pass-through null object, one error family, typed `Shared` fields, and a per-chunk
answer that allocates nothing for an untouched chunk."""

from __future__ import annotations

import ast
import asyncio
import inspect
from pathlib import Path

import pytest
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode

from extproc import envoy_wire
from extproc.config import parse_config
from extproc.errors import GatewayError, RequestError, StreamError
from extproc.exchange import Exchange
from extproc.metrics import Metrics
from extproc.policy import Policy, Refusal, Shared, StreamBlocked, build_policy
from extproc.sse import FrameTooLarge, SSEFramer
from tests.test_exchange import CHAT, Run, body_msg, headers_msg, stream_frames

EXTPROC = Path(__file__).resolve().parent.parent / "extproc"


def _envoy_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
    return [n for n in names if n == "envoy" or n.startswith(("envoy.", "google.protobuf"))]


def test_only_envoy_wire_builds_envoy_protobufs():
    importers = {
        str(path.relative_to(EXTPROC)): _envoy_imports(path)
        for path in EXTPROC.rglob("*.py")
        if "_gen" not in path.parts and _envoy_imports(path)
    }
    # The gRPC server (extproc.h2grpc) parses each message with envoy_wire's parser.
    assert set(importers) == {"envoy_wire.py"}


def test_metadata_goes_to_the_namespace_the_bootstrap_lets_through():
    from extproc.bootstrap import METADATA_NAMESPACE  # re-exported from extproc.headers

    assert envoy_wire.METADATA_NAMESPACE == METADATA_NAMESPACE


def test_no_exchange_module_outgrows_the_budget():
    for path in [EXTPROC / "envoy_wire.py", *(EXTPROC / "exchange").glob("*.py")]:
        assert len(path.read_text().splitlines()) <= 500, path.name


def test_an_untouched_chunk_is_answered_with_the_shared_constant():
    """The hot path allocates no answer: the same preconstructed message every time."""
    run = Run()
    run.request({**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    run.send(headers_msg({":status": "200", "content-type": "text/event-stream"}, response=True))
    frames = stream_frames(3, usage=True)
    answers = [run.send(body_msg(f, end=False, response=True)) for f in frames]
    assert all(answer is envoy_wire.CONTINUE_BODY for answer in answers[:-1])
    # `data: [DONE]` completes the answer: its chunk carries the final metadata (a copy).
    assert answers[-1] is not envoy_wire.CONTINUE_BODY
    assert answers[-1].HasField("dynamic_metadata")
    last = run.send(body_msg(b"", end=True, response=True))
    assert last is not envoy_wire.CONTINUE_BODY  # a copy carries the final metadata
    assert not envoy_wire.CONTINUE_BODY.HasField("dynamic_metadata")  # left untouched


def test_one_dispatch_only_the_request_body_is_awaited():
    run = Run()
    ex = run.ex
    first = ex.on("request_headers", _route_headers(), 0.0)
    assert isinstance(first, envoy_wire.Response)
    pending = ex.on("request_body", body_msg(b'{"model": "m", "messages": []}'), 0.0)
    assert inspect.isawaitable(pending)
    assert isinstance(asyncio.run(pending), envoy_wire.Response)
    for kind in ("request_trailers", "response_trailers"):
        answer = ex.on(kind, envoy_wire.Request(), 0.0)
        assert answer.WhichOneof("response") == kind


def _route_headers(path: str = "/v1/chat/completions"):
    return headers_msg({":method": "POST", ":path": path}, route="v1")


def test_pass_through_is_a_null_object_for_every_later_phase():
    """An unlisted route path: the flow is the null object and answers each phase with
    a plain continue, without metering the exchange."""
    ex = Exchange(Policy(parse_config(_passthrough_policy())), Metrics(), 0.0)
    first = ex.handle(headers_msg({":method": "GET", ":path": "/v1/models"}, route="v1"), 0.0)
    assert first.mode_override.response_body_mode == ProcessingMode.NONE
    assert ex.flow.metered is False
    body = asyncio.run(ex.on_request_body(b"ignored", 0.0))
    assert body == envoy_wire.continue_request_body()
    headers = ex.handle(headers_msg({":status": "200"}, response=True), 0.0)
    assert headers.mode_override.response_body_mode == ProcessingMode.NONE
    chunk = ex.handle(body_msg(b"raw bytes", end=False, response=True), 0.0)
    assert chunk is envoy_wire.CONTINUE_BODY
    ex.close(0.0)
    assert ex.usage.prompt_tokens == 0 and not ex.usage.estimated


def _passthrough_policy() -> dict:
    return {
        "providers": {"mock": {"url": "http://127.0.0.1:1"}},
        "routes": [
            {
                "name": "v1",
                "prefix": "/v1/",
                "provider": "mock",
                "passthrough_paths": ["/v1/models"],
            }
        ],
    }


@pytest.mark.parametrize(
    ("error", "status", "kind"),
    [
        (
            Refusal(429, "slow down", "rate_limit_exceeded", kind="rate_limited"),
            429,
            "rate_limited",
        ),
        (RequestError("no model", "missing_required_parameter", "model"), 400, "bad_request"),
        (RequestError("too big", "too_large", status=413), 413, "bad_request"),
        (StreamError("bad crc"), 502, "malformed_stream"),
        (FrameTooLarge("frame over the limit"), 502, "frame_too_large"),
        (StreamBlocked("blocked", "content_blocked"), 400, "guard_blocked"),
    ],
)
def test_every_error_carries_its_status_hint_and_kind(error, status, kind):
    assert isinstance(error, GatewayError)
    assert (error.status, error.kind) == (status, kind)
    assert error.message == str(error)


def test_frame_too_large_is_caught_as_a_stream_error():
    framer = SSEFramer(max_frame_bytes=8)
    with pytest.raises(StreamError) as caught:
        framer.feed(b"data: " + b"x" * 64)
    assert caught.value.kind == "frame_too_large"


def test_a_request_error_becomes_the_refusal_it_hints_at():
    refusal = Refusal.of(RequestError("no model", "missing_required_parameter", "model"))
    assert (refusal.status, refusal.code, refusal.kind, refusal.param) == (
        400,
        "missing_required_parameter",
        "bad_request",
        "model",
    )
    same = Refusal(403, "no", "forbidden")
    assert Refusal.of(same) is same


def test_stages_count_into_the_registry_shared_holds():
    """No string key can miss: the worker's Metrics is the one field every stage reads."""
    metrics = Metrics()
    shared = Shared(metrics)
    config = parse_config(
        {
            **_passthrough_policy(),
            "guards": {"rules": [{"name": "keys", "detectors": ["api_key"]}]},
            "rate_limits": {"limits": [{"name": "l", "requests": 5, "window": "1m"}]},
        }
    )
    policy = build_policy(config, shared, {})
    counted = {
        type(stage).__name__: stage.metrics for stage in policy.stages if hasattr(stage, "metrics")
    }
    assert set(counted) == {"GuardStage", "RateLimitStage"}
    assert all(m is metrics for m in counted.values())
    again = build_policy(config, shared, {})  # a reload keeps the same local store
    assert again.stages[-1].store is policy.stages[-1].store is shared.ratelimit_local
    assert shared.ratelimit_local in shared.values() and metrics in shared.values()
    assert not hasattr(shared, "get")
