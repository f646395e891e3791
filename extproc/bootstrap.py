"""Policy config -> Envoy v3 static bootstrap (checked against Envoy 1.40).

The bootstrap is rendered from the same file the sidecar reads, so route names,
limits and addresses cannot drift apart. Rendering is pure: no file system or network
access, except that an https provider without `ca_file` needs the system CA bundle's
path.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

import yaml

from extproc.config import Config, ProviderConfig, RouteConfig
from extproc.errors import SIDECAR_DETAILS_PREFIX
from extproc.headerlimits import CODEC_HEADERS_COUNT, CODEC_HEADERS_KB
from extproc.headers import INTERNAL_HEADERS, PROVIDER_HEADER
from extproc.netaddr import split_host_port, unix_socket_path, worker_addresses

# Namespace the sidecar writes dynamic metadata into; Envoy drops any other.
METADATA_NAMESPACE = "ai_gateway"
# Keys the sidecar sets in METADATA_NAMESPACE; each becomes an access log field.
METADATA_KEYS = (
    "model",
    "route",
    "consumer",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "usage_estimated",
)
EXTPROC_CLUSTER = "extproc"
EXTPROC_FILTER = "envoy.filters.http.ext_proc"
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


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


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


def _status_filter(status: int) -> dict[str, Any]:
    return {
        "status_code_filter": {
            "comparison": {
                "op": "EQ",
                "value": {
                    "default_value": status,
                    "runtime_key": f"ai_gateway.local_reply.{status}",
                },
            }
        }
    }


def _cel(expression: str) -> dict[str, Any]:
    """An access-log filter on Envoy's attributes, e.g. the reply's reason."""
    return {
        "extension_filter": {
            "name": "envoy.access_loggers.extension_filters.cel",
            "typed_config": {
                "@type": _TYPE + "extensions.access_loggers.filters.cel.v3.ExpressionFilter",
                "expression": expression,
            },
        }
    }


def _mapper(
    status: int,
    message: str,
    type_: str,
    code: str,
    *,
    flagged_only: bool = False,
    when: str | None = None,
) -> dict[str, Any]:
    status_filter = _status_filter(status)
    if flagged_only:  # an empty flag list matches any flag set
        status_filter = {"and_filter": {"filters": [status_filter, {"response_flag_filter": {}}]}}
    elif when:  # a CEL condition, e.g. on Envoy's reason for the reply
        status_filter = {"and_filter": {"filters": [status_filter, _cel(when)]}}
    return {
        "filter": status_filter,
        "body_format_override": {
            "json_format": openai_error(message, type_, code),
            "content_type": "application/json",
        },
    }


def local_reply_config(config: Config) -> dict[str, Any]:
    """OpenAI-style JSON for Envoy's own error replies, by status.

    Deliberately no top-level `body_format`: it would rewrite every local reply,
    including the sidecar's immediate responses, which already carry their JSON.
    `%RESPONSE_CODE_DETAILS%` names Envoy's reason (e.g. `ext_proc_error_gRPC_error_14`).
    """
    limit = config.envoy.max_request_bytes
    return {
        "mappers": [
            _mapper(
                400,
                "The request path percent-encodes a slash or backslash; send the path unencoded.",
                "invalid_request_error",
                "invalid_path",
                when="response.code_details == 'path_normalization_failed'",
            ),
            _mapper(
                413,
                f"Request body too large: this gateway accepts at most {limit} bytes.",
                "invalid_request_error",
                "request_too_large",
                # Not the sidecar's own 413 (a guard's scan budget), which says why.
                when=f"!response.code_details.startsWith('{SIDECAR_DETAILS_PREFIX}')",
            ),
            _mapper(
                500,
                "The gateway could not check this request, so it was not sent upstream "
                "(%RESPONSE_CODE_DETAILS%).",
                "server_error",
                "gateway_error",
            ),
            _mapper(
                502,
                "The upstream provider failed (%RESPONSE_CODE_DETAILS%).",
                "server_error",
                "upstream_error",
                flagged_only=True,
            ),
            _mapper(
                503,
                "The upstream provider is unavailable (%RESPONSE_CODE_DETAILS%).",
                "server_error",
                "upstream_unavailable",
                flagged_only=True,  # the sidecar's own 503 (limits store down) stays
            ),
            _mapper(
                504,
                "The gateway timed out (%RESPONSE_CODE_DETAILS%).",
                "server_error",
                "gateway_timeout",
            ),
        ]
    }


def _access_log(config: Config) -> list[dict[str, Any]]:
    fields: dict[str, Any] = {
        "start_time": "%START_TIME%",
        "method": "%REQ(:METHOD)%",
        # Never the query: it may carry a client's key (?key=, ?api_key=), and a request
        # refused before the sidecar strips it would log it whole.
        "path": "%PATH(NQ:ORIG_OR_PATH)%",
        "status": "%RESPONSE_CODE%",
        "response_code_details": "%RESPONSE_CODE_DETAILS%",
        "response_flags": "%RESPONSE_FLAGS%",
        "duration_ms": "%DURATION%",
        "bytes_received": "%BYTES_RECEIVED%",
        "bytes_sent": "%BYTES_SENT%",
        "upstream_cluster": "%UPSTREAM_CLUSTER%",
        "upstream_host": "%UPSTREAM_HOST%",
        "route_name": "%ROUTE_NAME%",
        "request_id": "%REQ(X-REQUEST-ID)%",
        "user_agent": "%REQ(USER-AGENT)%",
    }
    for key in METADATA_KEYS:
        fields[key] = f"%DYNAMIC_METADATA({METADATA_NAMESPACE}:{key})%"
    return [
        {
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": _TYPE + "extensions.access_loggers.file.v3.FileAccessLog",
                "path": config.envoy.access_log,
                "log_format": {"json_format": fields},
            },
        }
    ]


def _route(route: RouteConfig, provider: ProviderConfig) -> dict[str, Any]:
    # "/v1/" is a plain prefix; "/openai" matches itself and below, not "/openaix".
    match_kind = "prefix" if route.prefix.endswith("/") else "path_separated_prefix"
    action: dict[str, Any] = {
        "cluster": provider.cluster,
        "timeout": "0s",  # an LLM stream may run for minutes; the default 15 s cuts it
    }
    if route.rewrite is not None:
        action["prefix_rewrite"] = route.rewrite
    # The provider's own name, never the client's Host (TLS virtual hosting needs it).
    action["host_rewrite_literal"] = _authority(provider)
    return {"name": route.name, "match": {match_kind: route.prefix}, "route": action}


def _dispatch_providers(config: Config, route: RouteConfig) -> list[ProviderConfig]:
    """Other providers a request on `route` may be sent to: those of the same wire
    format (a body is never translated between API shapes)."""
    own = config.providers[route.provider]
    return [p for p in config.providers.values() if p.name != own.name and p.format == own.format]


def _config_routes(config: Config, route: RouteConfig) -> list[dict[str, Any]]:
    """One config route as Envoy routes: first one per other provider, taken when the
    sidecar sets `x-ai-gateway-provider` (a model alias served elsewhere) and clears
    the route cache, then the route's own provider. All keep the config route's name.
    The sidecar's internal headers never go upstream."""
    entries = []
    for provider in _dispatch_providers(config, route):
        entry = _route(route, provider)
        entry["match"]["headers"] = [
            {"name": PROVIDER_HEADER, "string_match": {"exact": provider.name}}
        ]
        entries.append(entry)
    entries.append(_route(route, config.providers[route.provider]))
    for entry in entries:
        entry["request_headers_to_remove"] = list(INTERNAL_HEADERS)
    return entries


def _not_found_route(config: Config) -> dict[str, Any]:
    served = ", ".join(route.prefix for route in config.routes)
    body = openai_error(
        f"Unknown path; this gateway serves {served}.", "invalid_request_error", "unknown_url"
    )
    return {
        "name": NOT_FOUND_ROUTE,
        "match": {"prefix": "/"},
        "direct_response": {
            "status": 404,
            "body": {"inline_string": json.dumps(body, separators=(",", ":"))},
        },
        "response_headers_to_add": [
            {
                "header": {"key": "content-type", "value": "application/json"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
        ],
        # Nothing to police on a 404: no sidecar round trip, no body upload to wait for.
        "typed_per_filter_config": {
            BUFFER_FILTER: {
                "@type": _TYPE + "extensions.filters.http.buffer.v3.BufferPerRoute",
                "disabled": True,
            },
            EXTPROC_FILTER: {
                "@type": _TYPE + "extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
                "disabled": True,
            },
        },
    }


def _buffer_filter(config: Config) -> dict[str, Any]:
    """The request body limit, for every protocol.

    `per_connection_buffer_limit_bytes` alone gives 413 only on HTTP/1: over HTTP/2,
    Envoy 1.40 buffered a 3 MB body for ext_proc despite a 1 KiB limit and sent it all
    to the sidecar. This filter enforces the limit on both, and it must come *before*
    ext_proc: placed after, the 413 still happens but the sidecar has already been sent
    the whole oversized body.
    """
    return {
        "name": BUFFER_FILTER,
        "typed_config": {
            "@type": _TYPE + "extensions.filters.http.buffer.v3.Buffer",
            "max_request_bytes": config.envoy.max_request_bytes,
        },
    }


def _ext_proc_filter(config: Config) -> dict[str, Any]:
    return {
        "name": EXTPROC_FILTER,
        "typed_config": {
            "@type": _TYPE + "extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": {"envoy_grpc": {"cluster_name": EXTPROC_CLUSTER}},
            "failure_mode_allow": config.envoy.failure_mode_allow,
            "message_timeout": _duration(config.envoy.message_timeout_ms),
            "allow_mode_override": True,
            "processing_mode": {
                "request_header_mode": "SEND",
                "response_header_mode": "SEND",
                "request_body_mode": "BUFFERED",
                "response_body_mode": "STREAMED",
                "request_trailer_mode": "SKIP",
                "response_trailer_mode": "SKIP",
            },
            # Sent with the request headers: which config route matched.
            "request_attributes": ["xds.route_name", "source.address"],
            "metadata_options": {"receiving_namespaces": {"untyped": [METADATA_NAMESPACE]}},
        },
    }


def _listener(config: Config) -> dict[str, Any]:
    routes = [entry for route in config.routes for entry in _config_routes(config, route)]
    routes.append(_not_found_route(config))
    hcm = {
        "@type": _TYPE + "extensions.filters.network.http_connection_manager.v3"
        ".HttpConnectionManager",
        "stat_prefix": "ai_gateway",
        "codec_type": "AUTO",
        # Envoy is the edge: take the client address from the connection and strip
        # x-envoy-* headers that external clients send.
        "use_remote_address": True,
        # Keep a caller's x-request-id and always return one, so a client can quote the
        # id that its access log line carries.
        "preserve_external_request_id": True,
        "always_set_request_id_in_response": True,
        # Match routes on the normalized path, so /v1/../x cannot dodge a prefix.
        "normalize_path": True,
        "merge_slashes": True,
        # `%2F` / `%5C` would give a decoding provider another path than the one
        # routed and inspected: refuse them (400) rather than guess.
        "path_with_escaped_slashes_action": "REJECT_REQUEST",
        # Generous, not zero: a reasoning model may think for minutes before the
        # first byte, but a stream silent for 15 minutes is dead.
        "stream_idle_timeout": "900s",
        # Twice the limits the sidecar enforces with a JSON 431 (headerlimits.py):
        # Envoy's own codec refusal reaches a client as an empty reply or a reset.
        "max_request_headers_kb": CODEC_HEADERS_KB,
        "common_http_protocol_options": {"max_headers_count": CODEC_HEADERS_COUNT},
        "access_log": _access_log(config),
        "local_reply_config": local_reply_config(config),
        "route_config": {
            "name": "ai_gateway",
            "virtual_hosts": [{"name": "ai_gateway", "domains": ["*"], "routes": routes}],
        },
        "http_filters": [
            _buffer_filter(config),
            _ext_proc_filter(config),
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": _TYPE + "extensions.filters.http.router.v3.Router"},
            },
        ],
    }
    return {
        "name": "ai_gateway",
        "address": _listen_address(config.envoy.listen),
        # The HTTP/1 read buffer; the body limit itself is the buffer filter's.
        "per_connection_buffer_limit_bytes": config.envoy.max_request_bytes,
        "filter_chains": [
            {
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                ]
            }
        ],
    }


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
    if host.startswith("[") or _is_ip(host):
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
        dns = not _is_ip(config.envoy.sidecar_address.rpartition(":")[0].strip("[]"))
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
    if _is_ip(provider.host):
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
                                "san_type": "IP_ADDRESS" if _is_ip(provider.host) else "DNS",
                                "matcher": {"exact": provider.host},
                            }
                        ],
                    }
                },
            },
        }
    return cluster


def render_bootstrap(config: Config) -> dict[str, Any]:
    """The Envoy bootstrap for `config` as plain data (dump it as YAML or JSON)."""
    used = dict.fromkeys(
        name
        for route in config.routes
        for name in (route.provider, *(p.name for p in _dispatch_providers(config, route)))
    )
    clusters = [_extproc_cluster(config)]
    clusters += [_provider_cluster(config.providers[name]) for name in used]
    return {
        "node": {"id": "ai-gateway", "cluster": "ai-gateway"},
        "admin": {"address": _listen_address(config.envoy.admin)},
        "static_resources": {"listeners": [_listener(config)], "clusters": clusters},
        # An explicit cap on client connections (Envoy warns at start without one).
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": _TYPE + "extensions.resource_monitors."
                        "downstream_connections.v3.DownstreamConnectionsConfig",
                        "max_active_downstream_connections": 50000,
                    },
                }
            ]
        },
    }


def bootstrap_yaml(config: Config, source: str | None = None) -> str:
    """The bootstrap as readable YAML (keys in rendering order) with a header naming
    the policy file it came from; `source` overrides config.path in that header."""
    source = source or config.path
    header = (
        f"# Envoy bootstrap generated by `extproc envoy-config {source}`.\n"
        f"# Do not edit: change {source} and render again.\n"
    )
    body = yaml.safe_dump(
        render_bootstrap(config), sort_keys=False, default_flow_style=False, width=100
    )
    return header + body
