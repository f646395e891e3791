"""A real OTLP/gRPC trace collector for tests: what an exporter sends, it keeps.

Built from the `opentelemetry-proto` package's generated `TraceService` stubs, served
by grpcio on a free loopback port, so any OTLP exporter (the SDK's, a sidecar's, an
Envoy tracer's) talks to it as to a real collector. Every exported span is decoded
into a small `Span` (hex ids, plain-Python attributes, its resource and scope) and
kept with the metadata of the call that carried it; `wait_for` blocks until enough
spans arrived (a batch processor exports later) without any timed assertion.
`fail_next` makes the next exports fail with a gRPC status, to test what an exporter
and its caller do when the collector refuses.

    with OtlpReceiver() as receiver:
        exporter = OTLPSpanExporter(endpoint=receiver.endpoint, insecure=True)
        ...
        (span,) = receiver.wait_for(1)
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc import (
    TraceServiceServicer,
    add_TraceServiceServicer_to_server,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1 import trace_pb2


def value(any_value: AnyValue) -> Any:
    """An OTLP attribute value as plain Python (lists and dicts for arrays and kvlists)."""
    which = any_value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [value(v) for v in any_value.array_value.values]
    if which == "kvlist_value":
        return attributes(any_value.kvlist_value.values)
    return getattr(any_value, which)


def attributes(pairs: Iterable[KeyValue]) -> dict[str, Any]:
    return {pair.key: value(pair.value) for pair in pairs}


@dataclass(frozen=True, slots=True)
class Span:
    """One received span, decoded; `raw` keeps the protobuf for anything else."""

    name: str
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_span_id: str  # "" for a root span
    kind: str  # SPAN_KIND_SERVER, SPAN_KIND_CLIENT, ...
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    status_code: str  # STATUS_CODE_UNSET, STATUS_CODE_OK, STATUS_CODE_ERROR
    status_message: str
    events: list[tuple[str, dict[str, Any]]]
    resource: dict[str, Any]
    scope: str
    metadata: dict[str, str]  # of the Export call (exporter headers, user-agent)
    raw: trace_pb2.Span = field(repr=False, compare=False)


def decode(request: ExportTraceServiceRequest, metadata: dict[str, str]) -> list[Span]:
    spans = []
    for resource_spans in request.resource_spans:
        resource = attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    Span(
                        name=span.name,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        kind=trace_pb2.Span.SpanKind.Name(span.kind),
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        attributes=attributes(span.attributes),
                        status_code=trace_pb2.Status.StatusCode.Name(span.status.code),
                        status_message=span.status.message,
                        events=[(e.name, attributes(e.attributes)) for e in span.events],
                        resource=resource,
                        scope=scope_spans.scope.name,
                        metadata=metadata,
                        raw=span,
                    )
                )
    return spans


class _Service(TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self.receiver = receiver

    def Export(  # the gRPC method's name
        self, request: ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> ExportTraceServiceResponse:
        failure = self.receiver._take_failure()
        if failure is not None:
            context.abort(failure, "refused by the test receiver")
        metadata = {key: v for key, v in context.invocation_metadata() if isinstance(v, str)}
        self.receiver._add(decode(request, metadata))
        return ExportTraceServiceResponse()


class OtlpReceiver:
    """An OTLP/gRPC trace collector on 127.0.0.1 (a free port unless one is given)."""

    def __init__(self, port: int = 0) -> None:
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        add_TraceServiceServicer_to_server(_Service(self), self._server)
        self.port = self._server.add_insecure_port(f"127.0.0.1:{port}")
        self._spans: list[Span] = []
        self._failures: list[grpc.StatusCode] = []
        self._changed = threading.Condition()
        self.exports = 0  # Export calls answered OK
        self.refused = 0  # Export calls failed on purpose (fail_next)

    @property
    def endpoint(self) -> str:
        """What an OTLP/gRPC exporter's `endpoint` (or OTEL_EXPORTER_OTLP_ENDPOINT) takes."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def spans(self) -> list[Span]:
        with self._changed:
            return list(self._spans)

    def start(self) -> OtlpReceiver:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=None).wait()

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Span]:
        """At least `count` spans (all received so far), or as many as came in `timeout`:
        the caller asserts on what it got, so a missing span fails with the list shown."""
        with self._changed:
            self._changed.wait_for(lambda: len(self._spans) >= count, timeout)
            return list(self._spans)

    def by_name(self, name: str) -> list[Span]:
        return [s for s in self.spans if s.name == name]

    def clear(self) -> None:
        with self._changed:
            self._spans.clear()

    def fail_next(
        self, times: int = 1, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    ) -> None:
        """Refuse the next `times` Export calls with `code` (their spans are dropped)."""
        with self._changed:
            self._failures.extend([code] * times)

    def _take_failure(self) -> grpc.StatusCode | None:
        with self._changed:
            if not self._failures:
                return None
            self.refused += 1
            return self._failures.pop(0)

    def _add(self, spans: list[Span]) -> None:
        with self._changed:
            self._spans.extend(spans)
            self.exports += 1
            self._changed.notify_all()
