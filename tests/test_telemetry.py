"""Telemetry parts without a stack: the `telemetry:` section's contract, Envoy's tracer
in the rendered bootstrap (validated by the real envoy binary), the bounded export
(drops counted, never a caller blocked), the log lines' ids and JSON format."""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import orjson
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from extproc import logcontext
from extproc.bootstrap import render_bootstrap
from extproc.bootstrap.tracing import OTLP_CLUSTER
from extproc.config import ConfigError, parse_config
from extproc.config.telemetry import TelemetryConfig
from extproc.metrics import Metrics
from extproc.telemetry import Tracing
from tests.test_bootstrap import cluster, hcm_of, render_to, validate

BASE = {
    "providers": {"mock": {"url": "http://127.0.0.1:9000"}},
    "routes": [{"name": "v1", "prefix": "/v1/", "provider": "mock"}],
}


def problems(telemetry: object) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as caught:
        parse_config({**BASE, "telemetry": telemetry})
    return caught.value.problems


def test_telemetry_is_off_by_default_and_renders_no_tracer() -> None:
    config = parse_config(BASE)
    assert config.telemetry.endpoint is None and not config.telemetry.capture_content
    bootstrap = render_bootstrap(config)
    assert "tracing" not in hcm_of(bootstrap)
    names = [c["name"] for c in bootstrap["static_resources"]["clusters"]]
    assert OTLP_CLUSTER not in names


def test_bad_telemetry_settings_are_named() -> None:
    found = dict(
        problems(
            {
                "endpoint": "ftp://collector:4317",
                "protocol": "thrift",
                "sampling_ratio": 1.5,
                "capture_contents": True,
                "resource_attributes": {"team": ["a", "list"]},
            }
        )
    )
    assert "telemetry.endpoint" in found
    assert "telemetry.protocol" in found
    assert "telemetry.sampling_ratio" in found
    assert "telemetry.resource_attributes" in found
    assert "did you mean 'capture_content'" in found["telemetry.capture_contents"]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_envoys_tracer_exports_to_the_collector_and_validates(
    tmp_path: Path, protocol: str
) -> None:
    config = parse_config(
        {
            **BASE,
            "telemetry": {
                "endpoint": "http://127.0.0.1:4317",
                "protocol": protocol,
                "sampling_ratio": 0.1,
            },
        }
    )
    bootstrap = render_bootstrap(config)
    tracing = hcm_of(bootstrap)["tracing"]
    assert tracing["random_sampling"] == {"value": pytest.approx(10.0)}
    tracer = tracing["provider"]["typed_config"]
    assert tracer["service_name"] == "ai-gateway-envoy"
    otlp = cluster(bootstrap, OTLP_CLUSTER)
    assert otlp["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] == {
        "socket_address": {"address": "127.0.0.1", "port_value": 4317}
    }
    if protocol == "grpc":
        assert tracer["grpc_service"]["envoy_grpc"]["cluster_name"] == OTLP_CLUSTER
    else:
        assert tracer["http_service"]["http_uri"]["uri"] == "http://127.0.0.1:4317/v1/traces"
    validate(render_to(tmp_path, config))


def test_a_dns_collector_over_tls_validates(tmp_path: Path) -> None:
    config = parse_config({**BASE, "telemetry": {"endpoint": "https://otel.example.com"}})
    otlp = cluster(render_bootstrap(config), OTLP_CLUSTER)
    assert otlp["type"] == "STRICT_DNS" and otlp["transport_socket"]
    validate(render_to(tmp_path, config))


class Stuck(SpanExporter):
    """A collector that never answers until released: the batch thread waits in it."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.entered.set()
        self.release.wait()
        return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        self.release.set()


def test_a_stuck_collector_drops_spans_counted_and_never_blocks_the_caller() -> None:
    metrics = Metrics()
    stuck = Stuck()
    config = TelemetryConfig(endpoint="http://127.0.0.1:1", max_queue_size=4)
    tracing = Tracing(config, metrics, exporter=stuck)
    dropped = metrics.trace_spans_dropped
    try:
        for _ in range(4):  # a full batch wakes the export thread, which then hangs
            tracing.tracer.start_span("first").end()
        assert stuck.entered.wait(30)
        for _ in range(10):  # 4 fit in the queue, 6 do not; none of these calls waits
            tracing.tracer.start_span("more").end()
        assert dropped.labels("queue_full")._value.get() == 6
    finally:
        stuck.release.set()
        tracing.close()
    assert dropped.labels("export_failed")._value.get() >= 1


def test_log_lines_carry_the_exchanges_ids_as_text_and_as_json() -> None:
    for fmt in ("text", "json"):
        out = io.StringIO()
        handler = logging.StreamHandler(out)
        handler.addFilter(logcontext.ExchangeFilter())
        handler.setFormatter(
            logcontext.JsonFormatter()
            if fmt == "json"
            else logging.Formatter(logcontext.TEXT_FORMAT)
        )
        logger = logging.getLogger(f"test.logcontext.{fmt}")
        logger.addHandler(handler)
        logger.propagate = False
        logger.setLevel(logging.INFO)
        token = logcontext.EXCHANGE.set(("req-1", "ab" * 16))
        try:
            logger.info("exchange %s", "done")
        finally:
            logcontext.EXCHANGE.reset(token)
        logger.info("outside")
        first, second = out.getvalue().splitlines()
        if fmt == "json":
            line = orjson.loads(first)
            assert line["message"] == "exchange done"
            assert line["request_id"] == "req-1" and line["trace_id"] == "ab" * 16
            assert "request_id" not in orjson.loads(second)
        else:
            assert first.endswith(f"exchange done request_id=req-1 trace_id={'ab' * 16}")
            assert second.endswith("outside")


def test_a_clients_request_id_cannot_forge_log_fields() -> None:
    logcontext.set_exchange("x trace_id=forged\nnext", "")
    request_id, _ = logcontext.EXCHANGE.get()
    assert "\n" not in request_id
    assert request_id.startswith("'")  # quoted: a reader sees one value, not two fields


def test_trace_id_of_reads_w3c_traceparent_only() -> None:
    good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert logcontext.trace_id_of(good) == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert logcontext.trace_id_of("00-" + "0" * 32 + "-00f067aa0ba902b7-01") == ""
    assert logcontext.trace_id_of("garbage") == ""
    assert logcontext.trace_id_of("00-" + "zz" * 16 + "-00f067aa0ba902b7-01") == ""


def test_a_reload_keeps_the_exporter_unless_telemetry_changed() -> None:
    from extproc.policy import Shared, build_policy

    shared = Shared(Metrics())
    on = {**BASE, "telemetry": {"endpoint": "http://127.0.0.1:4317"}}
    first = build_policy(parse_config(on), shared)
    again = build_policy(parse_config(on), shared)
    assert first.tracing is not None and again.tracing is first.tracing
    changed = build_policy(
        parse_config(
            {**on, "telemetry": {"endpoint": "http://127.0.0.1:4317", "sampling_ratio": 0.5}}
        ),
        shared,
    )
    assert changed.tracing is not None and changed.tracing is not first.tracing
    off = build_policy(parse_config(BASE), shared)
    assert off.tracing is None and shared.tracing is None


def test_the_sidecar_exports_over_the_configured_protocol() -> None:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http

    for protocol, kind in (("grpc", Grpc), ("http", Http)):
        config = TelemetryConfig(endpoint="http://127.0.0.1:4318", protocol=protocol)
        tracing = Tracing(config, Metrics())
        try:
            assert isinstance(tracing.processor.exporter.inner, kind)
        finally:
            tracing.close()
