"""Traces and access logs through the real Envoy, exported to a real OTLP/gRPC collector
(tests/otlp_receiver.py): Envoy's span and the sidecar's child span share one trace,
the span's figures are the mock provider's, guard findings are events without the
matched text, content is exported only when asked for and only masked, a collector
that is down costs no stream an error; every access-log line names who, what and why.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import orjson
import pytest

from extproc.dev.devstack import Stack
from tests.conftest import metric, mock_exchange, sse_payloads, start_stack, wait_for
from tests.otlp_receiver import OtlpReceiver, Span

KEY = "my-secret-key"  # the dev policy's consumer my-app
LIMITED_KEY = "limited-key"  # consumer `limited`: one request a minute
SECRET = "project falcon"  # masked by a guard, in both directions
GUARDS = {
    "rules": [
        {"name": "no-fruit", "action": "reject", "keywords": ["forbidden fruit"]},
        {"name": "codename", "action": "mask", "keywords": [SECRET]},
    ]
}
CONSUMERS = {
    "my-app": {"keys": [{"name": "dev", "value": KEY}], "models": ["gpt-4o-mini"]},
    "limited": {"keys": [{"name": "dev", "value": LIMITED_KEY}]},
}
LIMITS = {
    "limits": [
        {
            "name": "one",
            "requests": 1,
            "window": "1m",
            "by": "consumer",
            "match": {"consumers": ["limited"]},
        },
    ]
}
SIDECAR_SPAN = "chat gpt-4o-mini"


def _stack(base: Path, name: str, endpoint: str, **telemetry: object) -> Stack:
    return start_stack(
        base / name,
        guards=GUARDS,
        consumers=CONSUMERS,
        rate_limits=LIMITS,
        telemetry={"endpoint": endpoint, **telemetry},
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Two stacks, one after the other (two Envoys starting at once may share a base
    id): `plain` (content capture off, the default) and `capture` (on), each with its
    own collector."""
    base = tmp_path_factory.mktemp("telemetry")
    plain_rx, capture_rx = OtlpReceiver().start(), OtlpReceiver().start()
    stacks: list[Stack] = []
    try:
        stacks.append(_stack(base, "plain", plain_rx.endpoint))
        stacks.append(_stack(base, "capture", capture_rx.endpoint, capture_content=True))
        yield {"plain": stacks[0], "capture": stacks[1], "plain_rx": plain_rx, "rx": capture_rx}
    finally:
        for stack in stacks:
            stack.stop()
        plain_rx.stop()
        capture_rx.stop()


def _sidecar_span(receiver: OtlpReceiver, request_id: str) -> Span:
    def found() -> Span | None:
        for span in receiver.spans:
            if span.attributes.get("ai_gateway.request_id") == request_id:
                return span
        return None

    span = wait_for(found, timeout=20)
    assert span is not None, [s.name for s in receiver.spans]
    return span


def _stream(stack: Stack, text: str, request_id: str, content: str = "Say hi") -> bytes:
    response = httpx.post(
        f"{stack.base_url}/v1/chat/completions",
        headers={
            "authorization": f"Bearer {KEY}",
            "x-request-id": request_id,
            "x-mock-request-id": request_id,
            "x-mock-text": text,
        },
        json={
            "model": "gpt-4o-mini",
            "stream": True,
            "messages": [{"role": "user", "content": content}],
        },
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return response.content


def _access_line(stack: Stack, request_id: str) -> dict | None:
    log = stack.workdir / "access.log"

    def line() -> dict | None:
        lines = log.read_text().splitlines() if log.exists() else []
        found = [orjson.loads(x) for x in lines if request_id in x]
        return found[-1] if found else None

    return wait_for(line, timeout=20)


def test_a_stream_gives_envoys_span_and_the_sidecars_child_with_the_mocks_usage(world):
    stack, receiver = world["plain"], world["plain_rx"]
    rid = uuid.uuid4().hex
    body = _stream(stack, "Hello there, friend.", rid)
    assert sse_payloads(body)[-1] == b"[DONE]"
    span = _sidecar_span(receiver, rid)
    assert span.name == SIDECAR_SPAN
    # The mock's own figures, from the usage chunk it sent (the client did not ask).
    sent = base64.b64decode(mock_exchange(stack, rid)["sent_b64"])
    (usage,) = [
        orjson.loads(p)["usage"]
        for p in sse_payloads(sent)
        if p != b"[DONE]" and orjson.loads(p).get("usage")
    ]
    attrs = span.attributes
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.model"] == "gpt-4o-mini"
    assert attrs["gen_ai.provider.name"] == "openai"
    assert attrs["gen_ai.request.stream"] is True
    assert attrs["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert attrs["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert attrs["gen_ai.response.finish_reasons"] == ["stop"]
    first = orjson.loads(sse_payloads(sent)[0])  # the answer's own id and model
    assert attrs["gen_ai.response.id"] == first["id"]
    assert attrs["gen_ai.response.model"] == first["model"]
    assert attrs["ai_gateway.consumer"] == "my-app"
    assert attrs["ai_gateway.route"] == "v1"
    assert "gen_ai.first_token" in [name for name, _ in span.events]
    # Envoy's span is in the same trace, an ancestor of the sidecar's.
    envoy = wait_for(
        lambda: [
            s for s in receiver.spans if s.trace_id == span.trace_id and s.span_id != span.span_id
        ],
        timeout=20,
    )
    assert envoy, "no span of Envoy's in the sidecar's trace"
    assert span.parent_span_id in {s.span_id for s in envoy}
    assert any(s.resource.get("service.name") == "ai-gateway-envoy" for s in envoy)
    # Content capture is off by default: no prompt, no answer.
    assert not [k for k in attrs if k.startswith("gen_ai.input") or k.startswith("gen_ai.output")]
    # The access log carries Envoy's trace id, which is the sidecar's.
    line = _access_line(stack, rid)
    assert line and line["trace_id"] == span.trace_id


def test_a_blocked_stream_shows_the_guardrail_event_without_the_text(world):
    stack, receiver = world["plain"], world["plain_rx"]
    rid = uuid.uuid4().hex
    body = _stream(stack, "Here is the forbidden fruit you asked for.", rid)
    assert b"forbidden fruit" not in body
    span = _sidecar_span(receiver, rid)
    events = [attrs for name, attrs in span.events if name == "apply_guardrail"]
    assert {
        "ai_gateway.guard.name": "no-fruit",
        "ai_gateway.guard.phase": "response",
        "ai_gateway.guard.type": "KEYWORD",
        "ai_gateway.guard.action": "reject",
    } in events
    assert span.status_code == "STATUS_CODE_ERROR"
    assert span.attributes["ai_gateway.error.kind"] == "guard_blocked"
    assert b"forbidden" not in span.raw.SerializeToString()


def test_captured_content_is_masked(world):
    stack, receiver = world["capture"], world["rx"]
    rid = uuid.uuid4().hex
    body = _stream(stack, f"The {SECRET} plan is ready.", rid, content=f"What is {SECRET}?")
    assert SECRET.encode() not in body
    span = _sidecar_span(receiver, rid)
    prompt = span.attributes["gen_ai.input.messages"]
    answer = span.attributes["gen_ai.output.messages"]
    assert "What is" in prompt and "plan is ready" in answer
    assert SECRET not in prompt and SECRET not in answer
    assert "<KEYWORD>" in prompt and "<KEYWORD>" in answer
    assert SECRET.encode() not in span.raw.SerializeToString()
    actions = {
        (a["ai_gateway.guard.phase"], a["ai_gateway.guard.action"])
        for name, a in span.events
        if name == "apply_guardrail"
    }
    assert {("request", "mask"), ("response", "mask")} <= actions


def test_access_log_lines_for_refusals_carry_who_what_and_why(world):
    stack = world["plain"]
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    cases = [
        (401, {}, body, None),
        (403, {"authorization": f"Bearer {KEY}"}, {**body, "model": "gpt-3.5-turbo"}, "my-app"),
        (429, {"authorization": f"Bearer {LIMITED_KEY}"}, body, "limited"),
    ]
    # `limited` may make one request a minute: spend it.
    first = httpx.post(
        f"{stack.base_url}/v1/chat/completions",
        headers={"authorization": f"Bearer {LIMITED_KEY}"},
        json=body,
        timeout=30,
    )
    assert first.status_code == 200
    for status, headers, sent, consumer in cases:
        rid = uuid.uuid4().hex
        r = httpx.post(
            f"{stack.base_url}/v1/chat/completions",
            headers={**headers, "x-request-id": rid},
            json=sent,
            timeout=30,
        )
        assert r.status_code == status, r.text
        line = _access_line(stack, rid)
        assert line is not None, status
        assert line["status"] == status
        assert line["route"] == "v1" and line["request_id"] == rid
        assert line["refused"] and line["reason"], line
        if consumer is not None:
            assert line["consumer"] == consumer
            assert line["model"] == sent["model"]


def test_access_log_of_a_client_hang_up_carries_the_tokens_so_far(world):
    stack = world["plain"]
    rid = uuid.uuid4().hex
    headers = {
        "authorization": f"Bearer {KEY}",
        "x-request-id": rid,
        "x-mock-delay-ms": "20",
        "x-mock-text": " ".join(["word"] * 400),
    }
    request = {
        "model": "gpt-4o-mini",
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
    }
    with (
        httpx.Client(base_url=stack.base_url, timeout=30) as client,
        client.stream("POST", "/v1/chat/completions", headers=headers, json=request) as r,
    ):
        assert r.status_code == 200
        seen = b""
        for chunk in r.iter_bytes():
            seen += chunk
            if seen.count(b"data: ") >= 100:
                break  # hang up mid-stream
    assert wait_for(lambda: metric(stack, "ai_gateway_errors_total", kind="stream_aborted") >= 1)
    line = _access_line(stack, rid)
    assert line is not None
    assert line["route"] == "v1" and line["consumer"] == "my-app"
    assert line["model"] == "gpt-4o-mini"
    assert int(line["completion_tokens"]) >= 32  # figures reported while it streamed
    assert int(line["prompt_tokens"]) > 0


def test_access_log_of_an_openai_sdk_stream_carries_the_figures(world):
    stack = world["plain"]
    rid = uuid.uuid4().hex
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=KEY, max_retries=0)
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "Say hi"}],
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"x-request-id": rid},
        )
    )
    usage = chunks[-1].usage
    assert usage is not None
    line = _access_line(stack, rid)
    assert line is not None
    assert line["status"] == 200 and line["consumer"] == "my-app" and line["route"] == "v1"
    assert line["completion_tokens"] == usage.completion_tokens
    assert line["prompt_tokens"] == usage.prompt_tokens
    assert line["finish_reason"] == "stop"
    assert line["trace_id"] and line["trace_id"] != "-"


def test_sidecar_log_lines_carry_the_request_and_trace_ids(world):
    stack, receiver = world["plain"], world["plain_rx"]
    rid = uuid.uuid4().hex
    _stream(stack, "Hello.", rid)
    span = _sidecar_span(receiver, rid)
    lines = wait_for(
        lambda: [x for x in stack.log("sidecar").splitlines() if f"request_id={rid}" in x]
    )
    assert lines and all(f"trace_id={span.trace_id}" in x for x in lines)


def test_a_collector_that_is_down_costs_no_stream_an_error(world):
    """Last: it stops the capture stack's collector."""
    stack, receiver = world["capture"], world["rx"]
    receiver.stop()
    for _ in range(3):
        rid = uuid.uuid4().hex
        body = _stream(stack, "Still here.", rid)
        assert sse_payloads(body)[-1] == b"[DONE]"
        assert b"error" not in body
    assert wait_for(
        lambda: metric(stack, "ai_gateway_trace_spans_dropped_total", reason="export_failed") >= 1,
        timeout=60,
    )
