"""Envoy's own tracing (`telemetry:`): the OpenTelemetry tracer in the connection
manager, exporting OTLP (gRPC or HTTP, as the sidecar does) to the same collector
through a cluster of its own. Envoy samples at `sampling_ratio`; its ext_proc call
carries the trace to the sidecar, whose span continues it."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from extproc.bootstrap.clusters import _load_assignment, _protocol_options
from extproc.bootstrap.common import _TYPE, _socket_address, system_ca_bundle
from extproc.config import Config
from extproc.netaddr import is_ip_literal

OTLP_CLUSTER = "ai_gateway_otlp"
EXPORT_TIMEOUT = "2s"


def _target(config: Config) -> tuple[str, int, bool]:
    assert config.telemetry.endpoint is not None
    parts = urlsplit(config.telemetry.endpoint)
    tls = parts.scheme == "https"
    default = 4317 if config.telemetry.protocol == "grpc" else 4318
    return parts.hostname or "", parts.port or default, tls


def tracing(config: Config) -> dict[str, Any] | None:
    """The connection manager's `tracing`, or None when telemetry is off."""
    telemetry = config.telemetry
    if telemetry.endpoint is None:
        return None
    tracer: dict[str, Any] = {
        "@type": _TYPE + "config.trace.v3.OpenTelemetryConfig",
        "service_name": f"{telemetry.service_name}-envoy",
    }
    if telemetry.protocol == "grpc":
        tracer["grpc_service"] = {
            "envoy_grpc": {"cluster_name": OTLP_CLUSTER},
            "timeout": EXPORT_TIMEOUT,
        }
    else:
        host, port, tls = _target(config)
        scheme = "https" if tls else "http"
        tracer["http_service"] = {
            "http_uri": {
                "uri": f"{scheme}://{host}:{port}/v1/traces",
                "cluster": OTLP_CLUSTER,
                "timeout": EXPORT_TIMEOUT,
            }
        }
    return {
        "random_sampling": {"value": telemetry.sampling_ratio * 100},
        "spawn_upstream_span": False,
        "provider": {"name": "envoy.tracers.opentelemetry", "typed_config": tracer},
    }


def otlp_cluster(config: Config) -> dict[str, Any] | None:
    """The collector as a cluster (HTTP/2 for gRPC), or None when telemetry is off."""
    if config.telemetry.endpoint is None:
        return None
    host, port, tls = _target(config)
    cluster: dict[str, Any] = {"name": OTLP_CLUSTER, "connect_timeout": "2s"}
    if is_ip_literal(host):
        cluster["type"] = "STATIC"
    else:
        cluster["type"] = "STRICT_DNS"
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    cluster["load_assignment"] = _load_assignment(OTLP_CLUSTER, _socket_address(host, port))
    if config.telemetry.protocol == "grpc":
        cluster["typed_extension_protocol_options"] = _protocol_options(
            {"http2_protocol_options": {}}
        )
    if tls:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": _TYPE + "extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": host,
                "common_tls_context": {
                    "validation_context": {"trusted_ca": {"filename": system_ca_bundle()}}
                },
            },
        }
    return cluster
