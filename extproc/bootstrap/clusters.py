"""Upstream clusters: the sidecar (HTTP/2 gRPC, health checks, one endpoint per
worker) and one per provider (TLS with SNI for https)."""

from __future__ import annotations

from typing import Any

from extproc.bootstrap.common import (
    _CIRCUIT_BREAKERS,
    _HTTP_PROTOCOL_OPTIONS,
    _TYPE,
    EXTPROC_CLUSTER,
    _grpc_target,
    _socket_address,
    system_ca_bundle,
)
from extproc.config import Config, ProviderConfig
from extproc.netaddr import is_ip_literal, worker_addresses


def _protocol_options(http: dict[str, Any]) -> dict[str, Any]:
    return {
        _HTTP_PROTOCOL_OPTIONS: {
            "@type": "type.googleapis.com/" + _HTTP_PROTOCOL_OPTIONS,
            "explicit_http_config": http,
        }
    }


def _load_assignment(name: str, *addresses: dict[str, Any]) -> dict[str, Any]:
    return {
        "cluster_name": name,
        "endpoints": [
            {"lb_endpoints": [{"endpoint": {"address": address}} for address in addresses]}
        ],
    }


def _sidecar_target(text: str) -> dict[str, Any]:
    """`envoy.sidecar_address`: an IP as `_grpc_target`, or a DNS name as is."""
    host, _, port = text.rpartition(":")
    if host.startswith("[") or is_ip_literal(host):
        return _grpc_target(text)
    return _socket_address(host, int(port))


def _extproc_cluster(config: Config) -> dict[str, Any]:
    """The sidecar's workers, one endpoint each (Envoy opens one HTTP/2 connection per
    worker thread per endpoint, so one endpoint would pin every stream to one process).

    LEAST_REQUEST: streams last from milliseconds to minutes, so counting open streams
    spreads better than taking turns. A DNS `envoy.sidecar_address` (a headless
    Service) makes the cluster STRICT_DNS: every address it resolves to, on every
    worker port, is an endpoint.
    """
    workers = config.server.workers
    if config.envoy.sidecar_address is not None:
        addresses = worker_addresses(config.envoy.sidecar_address, workers)
        targets = [_sidecar_target(a) for a in addresses]
        dns = not is_ip_literal(config.envoy.sidecar_address.rpartition(":")[0].strip("[]"))
    else:
        addresses = worker_addresses(config.server.grpc_listen, workers)
        targets = [_grpc_target(a) for a in addresses]
        dns = False
    cluster: dict[str, Any] = {"name": EXTPROC_CLUSTER, "type": "STATIC"}
    if dns:
        cluster["type"] = "STRICT_DNS"
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    return {
        **cluster,
        "connect_timeout": "1s",
        "lb_policy": "LEAST_REQUEST",
        "load_assignment": _load_assignment(EXTPROC_CLUSTER, *targets),
        "typed_extension_protocol_options": _protocol_options({"http2_protocol_options": {}}),
        "circuit_breakers": _CIRCUIT_BREAKERS,
        # Passive: a worker that refuses connections is taken out for a while (a
        # crashed worker while the supervisor restarts it: measured, 7 streams failed
        # closed instead of ~300 without). At most half the endpoints are ejected, so
        # a bad moment cannot empty the cluster.
        "outlier_detection": {
            "consecutive_5xx": 5,
            "consecutive_gateway_failure": 2,  # a refused connection counts as one
            "enforcing_consecutive_gateway_failure": 100,  # Envoy's default 0 only counts
            "interval": "2s",
            "base_ejection_time": "5s",
            "max_ejection_percent": 50,
        },
        # grpc.health.v1 (overall server status, service ""). A worker that shuts down
        # says NOT_SERVING and stops getting new streams. With every endpoint unhealthy
        # the cluster is in panic mode, so traffic is still tried; the check gives
        # readiness in /clusters and stats. no_traffic_interval keeps a sidecar that
        # starts after Envoy from waiting 60 s to be seen healthy.
        "health_checks": [
            {
                "timeout": "1s",
                "interval": "5s",
                "no_traffic_interval": "5s",
                # A worker seen unhealthy (not yet started, restarting) is checked
                # again soon: while half the endpoints have not passed, the cluster is
                # in panic mode and outlier ejection cannot steer around a dead one.
                "unhealthy_interval": "1s",
                "unhealthy_threshold": 2,
                "healthy_threshold": 1,
                "grpc_health_check": {},
            }
        ],
    }


def _provider_cluster(provider: ProviderConfig) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": provider.cluster,
        "connect_timeout": "5s",
    }
    if is_ip_literal(provider.host):
        cluster["type"] = "STATIC"
    else:
        # LOGICAL_DNS: one connection target per lookup, as Envoy advises for large
        # web APIs behind many rotating addresses; IPv4 first, where IPv6 is often
        # unroutable (containers, CI).
        cluster["type"] = "LOGICAL_DNS"
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    cluster["load_assignment"] = _load_assignment(
        provider.cluster, _socket_address(provider.host, provider.port)
    )
    cluster["circuit_breakers"] = _CIRCUIT_BREAKERS
    # HTTP/1.1 upstream: what every provider speaks, and SSE-friendly.
    cluster["typed_extension_protocol_options"] = _protocol_options({"http_protocol_options": {}})
    if provider.tls:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": _TYPE + "extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": provider.host,
                "common_tls_context": {
                    "validation_context": {
                        "trusted_ca": {"filename": provider.ca_file or system_ca_bundle()},
                        "match_typed_subject_alt_names": [
                            {
                                "san_type": "IP_ADDRESS" if is_ip_literal(provider.host) else "DNS",
                                "matcher": {"exact": provider.host},
                            }
                        ],
                    }
                },
            },
        }
    return cluster
