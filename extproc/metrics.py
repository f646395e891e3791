"""Prometheus metrics. One `Metrics` object per process; label children that the hot
path touches on every message are bound once, since `.labels()` costs a dict lookup
and a lock per call."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300)
_PER_TOKEN = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1)
_MESSAGE = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05)
PHASES = ("request_headers", "request_body", "response_headers", "response_body")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "ai_gateway_requests",
            "Exchanges by route, model and final HTTP status",
            ["route", "model", "status"],
            registry=r,
        )
        self.tokens = Counter(
            "ai_gateway_tokens",
            "Tokens metered, by model, consumer and kind (prompt, completion, cached, reasoning)",
            ["model", "consumer", "kind"],
            registry=r,
        )
        self.usage_estimated = Counter(
            "ai_gateway_usage_estimated",
            "Exchanges whose usage was estimated offline because the provider reported none",
            ["model"],
            registry=r,
        )
        self.ttft = Histogram(
            "ai_gateway_time_to_first_token_seconds",
            "Request headers to first response frame",
            ["route", "model"],
            buckets=_LATENCY,
            registry=r,
        )
        self.tpot = Histogram(
            "ai_gateway_time_per_output_token_seconds",
            "Mean gap between output tokens",
            ["route", "model"],
            buckets=_PER_TOKEN,
            registry=r,
        )
        self.stream_duration = Histogram(
            "ai_gateway_stream_duration_seconds",
            "Request headers to end of response",
            ["route", "model"],
            buckets=_LATENCY,
            registry=r,
        )
        self.active = Gauge(
            "ai_gateway_active_streams",
            "ext_proc exchanges in flight",
            registry=r,
        )
        self.message_time = Histogram(
            "ai_gateway_extproc_message_seconds",
            "Time to handle one ext_proc message",
            ["phase"],
            buckets=_MESSAGE,
            registry=r,
        )
        self.errors = Counter(
            "ai_gateway_errors",
            "Problems by kind (bad_request, upstream_error, "
            "stream_aborted, frame_too_large, decode_error, internal)",
            ["kind"],
            registry=r,
        )
        self.phase_time = {p: self.message_time.labels(p) for p in PHASES}
