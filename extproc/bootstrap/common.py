"""Names and small helpers every part of the bootstrap shares."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

from extproc.config import Config, ProviderConfig
from extproc.netaddr import is_ip_literal, split_host_port, unix_socket_path

# Keys the sidecar sets in METADATA_NAMESPACE; each becomes an access log field.
METADATA_KEYS = (
    "model",
    "route",
    "consumer",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "usage_estimated",
    "cost_usd",
    "finish_reason",
    "refused",
    "reason",
    "provider",  # translated exchanges: the provider that answered, and its API
    "upstream_format",
    "alias",  # failover: the alias asked for, the target that answered, attempts made
    "target",
    "attempts",
)
EXTPROC_CLUSTER = "extproc"
EXTPROC_FILTER = "envoy.filters.http.ext_proc"
# The second ext_proc filter (`streaming.meter_off_path: auto`), in observability mode
# (with several workers, one per worker: `<name>.<index>`, `bootstrap.observer`).
OBSERVER_FILTER = "ai_gateway.ext_proc_observer"
BUFFER_FILTER = "envoy.filters.http.buffer"
# Route name of the catch-all 404; config route names cannot start with "_".
NOT_FOUND_ROUTE = "_not_found"
# Envoy-generated errors we turn into OpenAI-style JSON. The sidecar's own immediate
# responses (400/401/403/404/429/502) are local replies too and must pass untouched,
# so only statuses the sidecar never sends are mapped, plus 502 when Envoy set a
# response flag (UPE, UC, ...), which an immediate response never has.
MAPPED_STATUSES = (413, 500, 502, 503, 504)

# Where distributions keep the system CA bundle (Debian/Ubuntu/Alpine, RHEL/Fedora,
# openSUSE, macOS/BSD). Envoy has no "system trust store" option on Linux.
SYSTEM_CA_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
)

_TYPE = "type.googleapis.com/envoy."
_HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
# One gRPC stream per in-flight exchange, and LLM streams last minutes: Envoy's
# default of 1024 concurrent requests per cluster would cap the gateway.
_CIRCUIT_BREAKERS = {
    "thresholds": [
        {
            "priority": "DEFAULT",
            "max_connections": 100000,
            "max_pending_requests": 100000,
            "max_requests": 100000,
            "max_retries": 3,
        }
    ]
}


class BootstrapError(ValueError):
    """The config is valid but cannot be rendered on this machine (e.g. no CA bundle)."""


def observer_enabled(config: Config) -> bool:
    """`streaming.meter_off_path: auto` takes effect: the observing filters are rendered.

    Both ext_proc streams of an exchange must reach the same sidecar process (the
    exchange lives in its memory): each worker's tokens name it, and each worker has
    its own observer (`bootstrap.observer`). A DNS `envoy.sidecar_address` (a headless
    Service) may resolve to several pods behind one worker port, so not with one."""
    if config.streaming.meter_off_path != "auto":
        return False
    address = config.envoy.sidecar_address
    return address is None or is_ip_literal(address.rpartition(":")[0].strip("[]"))


def _duration(ms: int) -> str:
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms / 1000:.3f}s"


def _socket_address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _listen_address(text: str) -> dict[str, Any]:
    return _socket_address(*split_host_port(text))


def _grpc_target(text: str) -> dict[str, Any]:
    """Where Envoy connects to the sidecar: a pipe, or host:port with any-address
    binds (0.0.0.0, ::) turned into loopback, since the sidecar runs beside Envoy."""
    path = unix_socket_path(text)
    if path is not None:
        return {"pipe": {"path": path}}
    host, port = split_host_port(text)
    ip = ipaddress.ip_address(host)
    if ip.is_unspecified:
        host = "::1" if ip.version == 6 else "127.0.0.1"
    return _socket_address(host, port)


def _authority(provider: ProviderConfig) -> str:
    """Host header for the provider: host, plus the port when it is not the default."""
    host = f"[{provider.host}]" if ":" in provider.host else provider.host
    default = 443 if provider.tls else 80
    return host if provider.port == default else f"{host}:{provider.port}"


def openai_error(message: str, type_: str, code: str) -> dict[str, Any]:
    """The error object OpenAI clients parse (`error.message`, `.type`, `.code`)."""
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def system_ca_bundle() -> str:
    for candidate in SYSTEM_CA_BUNDLES:
        if Path(candidate).is_file():
            return candidate
    raise BootstrapError(
        "no system CA bundle found (looked in "
        + ", ".join(SYSTEM_CA_BUNDLES)
        + "); set ca_file on the https provider"
    )
