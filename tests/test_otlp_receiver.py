"""tests/otlp_receiver.py against the real OTLP/gRPC exporter of opentelemetry-sdk: the
spans an application exports arrive whole (ids, parentage, kind, attributes of every
type, events, status, resource, the exporter's headers), through the batch processor a
server would use; a refusing receiver makes the exporter report failure."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExportResult,
)
from opentelemetry.trace import SpanKind, Status, StatusCode

from tests.otlp_receiver import OtlpReceiver


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


def exporter(receiver: OtlpReceiver, **options) -> OTLPSpanExporter:
    return OTLPSpanExporter(endpoint=receiver.endpoint, insecure=True, **options)


def test_sdk_exporter_delivers_spans_through_a_batch_processor(receiver: OtlpReceiver) -> None:
    provider = TracerProvider(resource=Resource.create({"service.name": "ai-gateway-test"}))
    provider.add_span_processor(
        BatchSpanProcessor(exporter(receiver, headers={"x-tenant": "team-a"}))
    )
    tracer = provider.get_tracer("extproc.test", "1.0")
    with tracer.start_as_current_span("exchange", kind=SpanKind.SERVER) as parent:
        parent.set_attribute("gen_ai.request.model", "gpt-4o")
        parent.set_attribute("gen_ai.usage.output_tokens", 42)
        parent.set_attribute("ai_gateway.guard_masked", True)
        parent.set_attribute("ai_gateway.ttft_seconds", 0.25)
        parent.set_attribute("ai_gateway.guards", ["pii", "secrets"])
        with tracer.start_as_current_span("ratelimit", kind=SpanKind.CLIENT) as child:
            child.add_event("limited", {"limit": "per-consumer"})
            child.set_status(Status(StatusCode.ERROR, "over the limit"))
    provider.shutdown()  # flushes the batch

    spans = receiver.wait_for(2)
    assert sorted(s.name for s in spans) == ["exchange", "ratelimit"]
    (root,) = receiver.by_name("exchange")
    (inner,) = receiver.by_name("ratelimit")
    context = parent.get_span_context()
    assert root.trace_id == format(context.trace_id, "032x")
    assert root.span_id == format(context.span_id, "016x")
    assert root.parent_span_id == ""
    assert inner.trace_id == root.trace_id and inner.parent_span_id == root.span_id
    assert (root.kind, inner.kind) == ("SPAN_KIND_SERVER", "SPAN_KIND_CLIENT")
    assert root.attributes == {
        "gen_ai.request.model": "gpt-4o",
        "gen_ai.usage.output_tokens": 42,
        "ai_gateway.guard_masked": True,
        "ai_gateway.ttft_seconds": 0.25,
        "ai_gateway.guards": ["pii", "secrets"],
    }
    assert inner.events == [("limited", {"limit": "per-consumer"})]
    assert (inner.status_code, inner.status_message) == ("STATUS_CODE_ERROR", "over the limit")
    assert root.start_ns <= inner.start_ns <= inner.end_ns <= root.end_ns
    assert root.resource["service.name"] == "ai-gateway-test"
    assert root.scope == "extproc.test"
    assert root.metadata["x-tenant"] == "team-a"
    assert receiver.exports >= 1


def test_each_export_is_kept_and_clear_forgets(receiver: OtlpReceiver) -> None:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter(receiver)))
    tracer = provider.get_tracer("t")
    for name in ("one", "two", "three"):
        with tracer.start_as_current_span(name):
            pass
    assert [s.name for s in receiver.wait_for(3)] == ["one", "two", "three"]
    assert receiver.exports == 3  # the simple processor exports span by span
    receiver.clear()
    assert receiver.spans == []
    provider.shutdown()


def test_a_refusing_receiver_fails_the_export_and_keeps_nothing(receiver: OtlpReceiver) -> None:
    """INVALID_ARGUMENT is not retried: the exporter reports FAILURE at once."""
    provider = TracerProvider()
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("dropped") as span:
        pass
    receiver.fail_next(1, grpc.StatusCode.INVALID_ARGUMENT)
    sink = exporter(receiver)
    assert sink.export([span]) is SpanExportResult.FAILURE
    assert receiver.refused == 1 and receiver.spans == []
    assert sink.export([span]) is SpanExportResult.SUCCESS  # the next one goes through
    assert [s.name for s in receiver.spans] == ["dropped"]
    sink.shutdown()
    provider.shutdown()
