"""Traces: every use of the OpenTelemetry API is here.

One span per exchange, built once at its end from what the exchange already recorded
(the per-chunk path makes no OTel call). It continues Envoy's trace (W3C `traceparent`
of the ext_proc call, else of the request), is named `{gen_ai.operation.name}
{gen_ai.request.model}` and carries the GenAI semantic-convention attributes (v1.41)
plus the gateway's own (`ai_gateway.*`). Export runs on the SDK's batch thread with a
bounded queue: a slow or absent collector drops spans (counted), never delays a stream.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from extproc.config.telemetry import TelemetryConfig
from extproc.metrics import Metrics
from extproc.policy.capture import CAPTURED, MAX_CONTENT_CHARS

if TYPE_CHECKING:
    from extproc.exchange.core import Exchange

log = logging.getLogger("extproc.telemetry")
_PROPAGATOR = TraceContextTextMapPropagator()
EXPORT_TIMEOUT_S = 5.0
# gen_ai.provider.name by a provider's wire format (semantic conventions' well-known values).
PROVIDER_NAMES = {
    "openai": "openai",
    "azure": "azure.ai.openai",
    "anthropic": "anthropic",
    "gemini": "gcp.gemini",
    "vertex": "gcp.vertex_ai",
    "bedrock": "aws.bedrock",
}
# Gemini's own operation is generate_content; every other API we inspect is a chat.
_GENERATE_CONTENT = ("gemini", "vertex")


class _Counted(SpanExporter):
    """The real exporter, counting what it took and what failed (for the drop metric)."""

    def __init__(self, inner: SpanExporter, dropped: Any) -> None:
        self.inner = inner
        self.taken = 0
        self._failed = dropped.labels("export_failed")

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.taken += len(spans)
        try:
            result = self.inner.export(spans)
        except Exception:  # an exporter bug must not kill the batch thread
            result = SpanExportResult.FAILURE
        if result is not SpanExportResult.SUCCESS:
            self._failed.inc(len(spans))
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class _Bounded(SpanProcessor):
    """The SDK's batch processor; a span arriving at a full queue is counted (the SDK's
    queue then drops its oldest span)."""

    def __init__(self, exporter: _Counted, max_queue: int, dropped: Any) -> None:
        self.exporter = exporter
        self.max_queue = max_queue
        self.ended = 0
        self._full = dropped.labels("queue_full")
        self.inner = BatchSpanProcessor(
            exporter,
            max_queue_size=max_queue,
            max_export_batch_size=min(512, max_queue),
            export_timeout_millis=EXPORT_TIMEOUT_S * 1000,
        )

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        self.inner.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        if self.ended - self.exporter.taken >= self.max_queue:
            self._full.inc()
        self.ended += 1
        self.inner.on_end(span)

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


def _exporter(config: TelemetryConfig) -> SpanExporter:
    endpoint = (config.endpoint or "").rstrip("/")
    if config.protocol == "http":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=endpoint + "/v1/traces", timeout=EXPORT_TIMEOUT_S)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
        OTLPSpanExporter as GrpcExporter,
    )

    return GrpcExporter(
        endpoint=endpoint,
        insecure=endpoint.startswith("http://"),
        timeout=EXPORT_TIMEOUT_S,
    )


class Tracing:
    """One process's tracer: its provider, sampler and bounded export."""

    def __init__(
        self, config: TelemetryConfig, metrics: Metrics, exporter: SpanExporter | None = None
    ) -> None:
        self.config = config
        resource = Resource.create(
            {"service.name": config.service_name, **config.resource_attributes}
        )
        self.provider = TracerProvider(
            resource=resource, sampler=ParentBased(TraceIdRatioBased(config.sampling_ratio))
        )
        counted = _Counted(exporter or _exporter(config), metrics.trace_spans_dropped)
        self.processor = _Bounded(counted, config.max_queue_size, metrics.trace_spans_dropped)
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer("extproc")

    def close(self) -> None:
        """Export what is queued (bounded by the export timeout) and stop the thread."""
        self.provider.shutdown()

    def record(self, ex: Exchange, now: float) -> None:
        """The exchange's span, from what it recorded; never raises into the exchange."""
        try:
            self._record(ex, now)
        except Exception:
            log.exception("could not record the exchange's span")

    def _record(self, ex: Exchange, now: float) -> None:
        if ex.traceparent.endswith("-00"):  # the parent was not sampled: neither is this
            return
        parent = _PROPAGATOR.extract({"traceparent": ex.traceparent}) if ex.traceparent else None
        ctx = ex.ctx
        info = ctx.info if ctx is not None else None
        operation = "chat"
        if ctx is not None and ctx.provider.format in _GENERATE_CONTENT:
            operation = "generate_content"
        model = ex.model or (info.model if info else "")
        end_ns = time.time_ns()
        start_ns = end_ns - int((now - ex.started) * 1e9)
        span = self.tracer.start_span(
            f"{operation} {model}".strip(),
            context=parent,
            kind=SpanKind.CLIENT,
            start_time=start_ns,
        )
        if not span.is_recording():  # sampled out: nothing more to build
            span.end(end_ns)
            return
        span.set_attributes(self._attributes(ex, operation, model))
        if ex.first_frame_at:
            span.add_event(
                "gen_ai.first_token",
                timestamp=start_ns + int((ex.first_frame_at - ex.started) * 1e9),
            )
        if ctx is not None:
            for phase, guard, kind, action in ctx.findings:
                span.add_event(
                    "apply_guardrail",
                    {
                        "ai_gateway.guard.name": guard,
                        "ai_gateway.guard.phase": phase,
                        "ai_gateway.guard.type": kind,
                        "ai_gateway.guard.action": action,
                    },
                )
            if self.config.capture_content:
                self._content(span, ex)
        if ex.error_kind or ex.status >= 400:
            span.set_status(Status(StatusCode.ERROR, ex.error_kind or str(ex.status)))
            span.set_attribute("error.type", ex.error_kind or str(ex.status))
        span.end(end_ns)

    @staticmethod
    def _attributes(ex: Exchange, operation: str, model: str) -> dict[str, Any]:
        ctx = ex.ctx
        usage = ex.usage
        out: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            "ai_gateway.route": ex.route_name,
        }
        if ex.request_id:
            out["ai_gateway.request_id"] = ex.request_id
        if ex.status:
            out["http.response.status_code"] = ex.status
        if model:
            out["gen_ai.request.model"] = model
        if ctx is None:
            return out
        out["gen_ai.provider.name"] = PROVIDER_NAMES.get(ctx.provider.format, ctx.provider.format)
        out["ai_gateway.provider"] = ctx.provider.name
        out["ai_gateway.consumer"] = ctx.consumer or "anonymous"
        if ctx.info is not None:
            out["gen_ai.request.stream"] = ctx.info.stream
            if ctx.info.max_output_tokens is not None:
                out["gen_ai.request.max_tokens"] = ctx.info.max_output_tokens
        if ex.flow.metered and ex.answered and 0 < ex.status < 400:
            out["gen_ai.usage.input_tokens"] = usage.prompt_tokens
            out["gen_ai.usage.output_tokens"] = usage.completion_tokens
            out["gen_ai.usage.cache_read.input_tokens"] = usage.cached_tokens
            out["gen_ai.usage.reasoning.output_tokens"] = usage.reasoning_tokens
            out["ai_gateway.usage.estimated"] = usage.estimated
            if ex.finish_reason:
                out["gen_ai.response.finish_reasons"] = [ex.finish_reason]
        if ex.response_id:
            out["gen_ai.response.id"] = ex.response_id
        if ex.response_model:
            out["gen_ai.response.model"] = ex.response_model
        if ex.refused:
            out["ai_gateway.refused"] = ex.refused
        if ex.error_kind:
            out["ai_gateway.error.kind"] = ex.error_kind
        if ex.upstream_closed:
            out["ai_gateway.upstream_closed"] = True
        for key, item in ctx.metadata.items():  # auth method, guard counts, ...
            if isinstance(item, str | int | float | bool):
                out[f"ai_gateway.{key}"] = item
        for name, item in ctx.response_headers.items():  # the limits' decisions
            if name.startswith("x-ratelimit-"):
                out[f"ai_gateway.ratelimit.{name[12:].replace('-', '_')}"] = item
        return out

    @staticmethod
    def _content(span: Any, ex: Exchange) -> None:
        """Opt-in: what went upstream and what the client got, both after the guards
        (the request's texts as they masked them; the answer as it left)."""
        ctx = ex.ctx
        assert ctx is not None
        if ctx.info is not None and ctx.info.prompt_texts:
            span.set_attribute("gen_ai.input.messages", _bounded("\n".join(ctx.info.prompt_texts)))
        captured = ctx.scratch.get(CAPTURED)
        if captured is None and ex.json:  # a whole JSON answer, as it was sent on
            captured = [d.text for d in ctx.format.completion_texts(bytes(ex.json))]
        if captured:
            span.set_attribute("gen_ai.output.messages", _bounded("".join(captured)))


def _bounded(text: str) -> str:
    return text if len(text) <= MAX_CONTENT_CHARS else text[:MAX_CONTENT_CHARS] + "…"


def tracing_for(config: TelemetryConfig, metrics: Metrics, held: Tracing | None) -> Tracing | None:
    """The process's `Tracing` for a (re)loaded policy: the one held while its settings
    are the same, a new one when they changed (the old one is closed), None when off."""
    if held is not None and held.config == config:
        return held
    if held is not None:  # its last export may wait on the collector: not on the loop
        threading.Thread(target=held.close, name="extproc-tracing-close", daemon=True).start()
    if config.endpoint is None:
        return None
    log.info(
        "tracing to %s (OTLP/%s, sampling %.3g)",
        config.endpoint,
        config.protocol,
        config.sampling_ratio,
    )
    return Tracing(config, metrics)
