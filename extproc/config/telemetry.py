"""`telemetry:`: OpenTelemetry traces of every exchange, by the sidecar and by Envoy."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import SplitResult

from pydantic import Field, Strict

from extproc.config.base import Section, fail, section
from extproc.config.types import Bool, Int, Str, checked, choice, url

PROTOCOLS = ("grpc", "http")
_collector_url = url(("http", "https"), "an http:// or https:// URL")


def collector_url(value: Any) -> str:
    """The collector's base URL; OTLP/HTTP gets `/v1/traces` appended, so no path."""
    parts: SplitResult = _collector_url(value)
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise fail("expected scheme://host[:port] only (the OTLP paths are added)")
    return value


def _attributes(value: Any) -> Any:
    if not isinstance(value, dict):
        raise fail("expected a mapping of attribute name -> string")
    for key, item in value.items():
        if not isinstance(key, str) or not isinstance(item, str | int | float | bool):
            raise fail(f"attribute {key!r}: expected a string, number or boolean value")
    return {key: str(item) for key, item in value.items()}


@section
class TelemetryConfig(Section):
    """OpenTelemetry traces ([observability.md](observability.md#traces)): off unless
    `endpoint` is set. Envoy traces each request to the same collector and the sidecar
    adds one span per exchange, a child of Envoy's, with the GenAI attributes."""

    empty_ok = True

    endpoint: checked(collector_url, str | None) = None
    """The OTLP collector, `http://host:port` (4317 for gRPC, 4318 for HTTP as usual);
    unset: no traces at all."""
    protocol: choice(PROTOCOLS, "protocol") = "grpc"
    """How spans are exported: OTLP over `grpc` or `http` (protobuf), by both the sidecar
    and Envoy."""
    sampling_ratio: Annotated[float, Strict(False), Field(ge=0.0, le=1.0)] = 1.0
    """The share of requests traced (Envoy decides; the sidecar follows a parent's
    decision and samples with this ratio when there is none)."""
    service_name: Str = "ai-gateway"
    """`service.name` of the sidecar's spans (Envoy's are `<this>-envoy`)."""
    resource_attributes: checked(_attributes, dict[str, str]) = Field(default_factory=dict)
    """Extra resource attributes of every span, e.g. `deployment.environment: prod`."""
    capture_content: Bool = False
    """Add prompts and completions to the spans (`gen_ai.input.messages`,
    `gen_ai.output.messages`), as the guards left them (masked); off: no content is
    exported, ever."""
    max_queue_size: Int(1, 1_000_000) = 2048
    """Spans waiting for export; when the collector is slow or down, spans beyond it are
    dropped (counted in `ai_gateway_trace_spans_dropped_total`), never a stream slowed."""
