"""`telemetry.capture_content` on a translated stream (OpenAI client, Anthropic
upstream): the answer's text is captured as the client got it, in any chunking, with
the response guards' masks, never the upstream's unmasked words."""

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


@pytest.fixture(scope="module")
def capture() -> Iterator[dict]:
    """The config with content capture on, its spans going to a real collector."""
    with OtlpReceiver() as receiver:
        yield {**DOC, "telemetry": {"endpoint": receiver.endpoint, "capture_content": True}}


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
    run = run_of(capture)
    post(run, ASK)
    got = run.respond(cut(upstream_stream(TEXT), points), SSE)
    captured = "".join(run.ex.ctx.scratch[CAPTURED])
    assert captured == client_text(got) == TEXT


@settings(max_examples=25, deadline=None)
@given(cuts(upstream_stream(TEXT)))
def test_a_translated_stream_is_captured_with_the_guards_masks(capture, points):
    guards = {"rules": [{"name": "cards", "detectors": ["credit_card"]}]}
    run = run_of({**capture, "guards": guards})
    post(run, ASK)
    got = run.respond(cut(upstream_stream(TEXT), points), SSE)
    captured = "".join(run.ex.ctx.scratch[CAPTURED])
    assert captured == client_text(got) == "The plan is ready, with <CREDIT_CARD> on file."
    assert "4111" not in captured


def test_capture_off_keeps_nothing():
    run = run_of()
    post(run, ASK)
    run.respond([upstream_stream(TEXT)], SSE)
    assert CAPTURED not in run.ex.ctx.scratch
