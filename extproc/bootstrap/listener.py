"""The client-facing listener: routes per config route, the 404 catch-all, the body
limit, the ext_proc filter and the access log."""

from __future__ import annotations

import json
from typing import Any

from extproc.bootstrap.common import (
    _TYPE,
    BUFFER_FILTER,
    EXTPROC_CLUSTER,
    EXTPROC_FILTER,
    METADATA_KEYS,
    NOT_FOUND_ROUTE,
    _authority,
    _duration,
    _listen_address,
    observer_enabled,
    openai_error,
)
from extproc.bootstrap.failover import failover_routes, has_failover
from extproc.bootstrap.observer import observer_filters, observer_names
from extproc.bootstrap.replies import local_reply_config
from extproc.bootstrap.tracing import tracing
from extproc.config import Config, ProviderConfig, RouteConfig
from extproc.headerlimits import CODEC_HEADERS_COUNT, CODEC_HEADERS_KB
from extproc.headers import (
    INTERNAL_HEADERS,
    METADATA_NAMESPACE,
    PROVIDER_HEADER,
    TRANSLATED_HEADER,
)
from extproc.translate.registry import TARGETS

# Name prefix of the translated dispatch routes (config route names cannot start with "_").
TRANSLATED_ROUTE_PREFIX = "_to_"


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
        "trace_id": "%TRACE_ID%",
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


def translated_providers(config: Config) -> list[str]:
    """Providers a model alias may reach through a translator: an alias names them, a
    translator targets their format, and some route's provider speaks another one."""
    route_formats = {config.providers[route.provider].format for route in config.routes}
    return sorted(
        {
            alias.provider
            for alias in config.models.aliases.values()
            if alias.provider is not None  # `targets`: the failover clusters' own
            and (target := config.providers[alias.provider].format) in TARGETS
            and route_formats - {target}
        }
    )


def _translated_routes(config: Config) -> list[dict[str, Any]]:
    """One route per provider that a model alias reaches through a translator, taken
    when the sidecar sets `x-ai-gateway-provider` and `x-ai-gateway-translated` in the
    request-body phase and clears the route cache. The sidecar has set the whole
    upstream path by then, so the route matches any path and rewrites none (Envoy
    applies a newly matched route's `prefix_rewrite` to the path the sidecar set,
    docs/design.md). They come before every config route, whose prefixes could match
    the new path. Named `_to_<provider>`, which no config route is: a client that sends
    the internal headers itself gets its headers stripped, and the sidecar, unable to
    take that name for a config route, finds the route by the path."""
    entries = []
    for name in translated_providers(config):
        provider = config.providers[name]
        entry = {
            "name": f"{TRANSLATED_ROUTE_PREFIX}{name}",
            "match": {
                "prefix": "/",
                "headers": [
                    {"name": PROVIDER_HEADER, "string_match": {"exact": name}},
                    {"name": TRANSLATED_HEADER, "string_match": {"exact": "1"}},
                ],
            },
            "route": {
                "cluster": provider.cluster,
                "timeout": "0s",
                "host_rewrite_literal": _authority(provider),
            },
            "request_headers_to_remove": list(INTERNAL_HEADERS),
        }
        entries.append(entry)
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
            **{
                name: {
                    "@type": _TYPE + "extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
                    "disabled": True,
                }
                for name in (observer_names(config) if observer_enabled(config) else ())
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
    routes = _translated_routes(config)
    routes += [
        entry
        for route in config.routes
        for entry in (*failover_routes(config, route), *_config_routes(config, route))
    ]
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
            "virtual_hosts": [
                {
                    "name": "ai_gateway",
                    "domains": ["*"],
                    "routes": routes,
                    # An attempt's number reaches the upstream filter (which strips it).
                    **({"include_request_attempt_count": True} if has_failover(config) else {}),
                }
            ],
        },
        "http_filters": [
            _buffer_filter(config),
            _ext_proc_filter(config),
            *(observer_filters(config) if observer_enabled(config) else []),
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": _TYPE + "extensions.filters.http.router.v3.Router"},
            },
        ],
    }
    traced = tracing(config)
    if traced is not None:
        hcm["tracing"] = traced
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
