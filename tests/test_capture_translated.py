"""`telemetry.capture_content` on a translated stream (OpenAI client, Anthropic
upstream): the answer's text is captured as the client got it, in any chunking, with
the response guards' masks, never the upstream's unmasked words, and reaches the
exchange's span at a real OTLP collector."""

from __future__ import annotations

from collections.abc import Iterator

import orjson
import pytest
from hypothesis import given, settings

from extproc.policy.capture import CAPTURED
from tests.otlp_receiver import OtlpReceiver
from tests.providers_helpers import cut, cuts
from tests.test_exchange_translated import ASK, DOC, SSE, post, run_of, upstream_stream

TEXT = "The plan is ready, with 4111 1111 1111 1111 on file."
MASKED = "The plan is ready, with <CREDIT_CARD> on file."
GUARDS = {"rules": [{"name": "cards", "detectors": ["credit_card"]}]}


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as collector:
        yield collector


@pytest.fixture(scope="module")
def capture(receiver: OtlpReceiver) -> dict:
    """The config with content capture on, its spans going to the collector."""
    return {**DOC, "telemetry": {"endpoint": receiver.endpoint, "capture_content": True}}


def translated(doc: dict, points: list[int]) -> tuple[bytes, list[str]]:
    """The client's bytes and the captured texts; the span exported before it returns."""
    run = run_of(doc)
    try:
        post(run, ASK)
        got = run.respond(cut(upstream_stream(TEXT), points), SSE)
        return got, run.ex.ctx.scratch[CAPTURED]
    finally:
        run.ex.policy.tracing.close()


def client_text(got: bytes) -> str:
    """The content the OpenAI client reads from the translated chunks."""
    text = ""
    for frame in got.split(b"\n\n"):
        if frame.startswith(b"data: {"):
            obj = orjson.loads(frame[6:])
            text += "".join(c["delta"].get("content") or "" for c in obj.get("choices", []))
    return text


@settings(max_examples=25, deadline=None)
@given(cuts(upstream_stream(TEXT)))
def test_a_translated_stream_is_captured_as_the_client_got_it(capture, points):
    got, captured = translated(capture, points)
    assert "".join(captured) == client_text(got) == TEXT


@settings(max_examples=25, deadline=None)
@given(cuts(upstream_stream(TEXT)))
def test_a_translated_stream_is_captured_with_the_guards_masks(capture, points):
    got, captured = translated({**capture, "guards": GUARDS}, points)
    assert "".join(captured) == client_text(got) == MASKED
    assert "4111" not in "".join(captured)


def test_the_span_carries_the_masked_translated_answer(capture, receiver):
    receiver.clear()
    translated({**capture, "guards": GUARDS}, [])
    spans = receiver.wait_for(1)
    answers = [s.attributes.get("gen_ai.output.messages", "") for s in spans]
    assert any(MASKED in answer for answer in answers), answers
    assert not any("4111" in answer for answer in answers)


def test_capture_off_keeps_nothing():
    run = run_of()
    post(run, ASK)
    run.respond([upstream_stream(TEXT)], SSE)
    assert CAPTURED not in run.ex.ctx.scratch and run.ex.policy.tracing is None
