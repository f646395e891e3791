"""Failover: per alias with `targets`, one cluster per set of usable targets (each
target an endpoint: a priority per place in the order, or weights on one priority),
an upstream ext_proc filter that credentials each attempt, and one route per config
route and set, chosen by the sidecar's `x-ai-gateway-failover` header. Envoy makes
the attempts (docs/design.md, "Failover through Envoy")."""

from __future__ import annotations

from typing import Any

from extproc.bootstrap.clusters import _provider_cluster
from extproc.bootstrap.common import (
    _CIRCUIT_BREAKERS,
    _HTTP_PROTOCOL_OPTIONS,
    _TYPE,
    EXTPROC_CLUSTER,
    _authority,
    _duration,
    _socket_address,
)
from extproc.config import Config, RouteConfig
from extproc.failover.plan import (
    FAILOVER_HEADER,
    METADATA_KEY,
    UPSTREAM,
    UPSTREAM_STAGE,
    Target,
    cluster_name,
    failover_aliases,
    masks,
    members,
    route_value,
)
from extproc.headers import INTERNAL_HEADERS
from extproc.netaddr import is_ip_literal
from extproc.providers import FAMILIES
from extproc.translate.registry import PAIRS

_RETRY_PRIORITY = (
    _TYPE + "extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig"
)
_PREVIOUS_HOSTS = _TYPE + "extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"


def _upstream_ext_proc(config: Config) -> dict[str, Any]:
    """Runs once per attempt, after Envoy chose the target's endpoint."""
    return {
        "name": "envoy.filters.http.ext_proc",
        "typed_config": {
            "@type": _TYPE + "extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": {
                "envoy_grpc": {"cluster_name": EXTPROC_CLUSTER},
                "initial_metadata": [{"key": UPSTREAM_STAGE, "value": UPSTREAM}],
            },
            "failure_mode_allow": False,  # an attempt without its credential never goes out
            "message_timeout": _duration(config.envoy.message_timeout_ms),
            "processing_mode": {
                "request_header_mode": "SEND",
                "response_header_mode": "SEND",
                "request_body_mode": "BUFFERED",
                "response_body_mode": "NONE",
                "request_trailer_mode": "SKIP",
                "response_trailer_mode": "SKIP",
            },
            "request_attributes": ["xds.upstream_host_metadata"],
            # x-envoy-attempt-count and x-envoy-original-host stop here (a translated
            # attempt's :path, set in the body phase, needs no extra rule).
            "mutation_rules": {"allow_envoy": True},
        },
    }


def _endpoint(config: Config, target: Target) -> dict[str, Any]:
    provider = config.providers[target.provider]
    metadata: dict[str, Any] = {
        METADATA_KEY: {"alias": target.alias, "target": target.index},
    }
    if provider.tls:
        metadata["envoy.transport_socket_match"] = {"provider": provider.name}
    endpoint: dict[str, Any] = {
        "endpoint": {
            "address": _socket_address(provider.host, provider.port),
            "hostname": _authority(provider),  # auto_host_rewrite: each attempt's Host
        },
        "metadata": {"filter_metadata": metadata},
    }
    if target.weight is not None:
        endpoint["load_balancing_weight"] = target.weight
    return endpoint


def _cluster(config: Config, alias: str, mask: int, targets: tuple[Target, ...]) -> dict[str, Any]:
    chosen = members(mask, targets)
    name = cluster_name(alias, mask)
    if chosen[0].weight is not None:  # a split: one priority, weighted round robin
        groups = [{"priority": 0, "lb_endpoints": [_endpoint(config, t) for t in chosen]}]
    else:  # an order: one priority per place
        groups = [
            {"priority": place, "lb_endpoints": [_endpoint(config, t)]}
            for place, t in enumerate(chosen)
        ]
    providers = [config.providers[t.provider] for t in chosen]
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC" if all(is_ip_literal(p.host) for p in providers) else "STRICT_DNS",
        "connect_timeout": "5s",
        "lb_policy": config.models.failover.balance.upper(),
        "load_assignment": {"cluster_name": name, "endpoints": groups},
        # Never send traffic to a priority the sidecar did not choose because another
        # one looks unhealthy: which targets may be tried is the sidecar's decision.
        "common_lb_config": {"healthy_panic_threshold": {"value": 0}},
        "circuit_breakers": {
            "thresholds": [{**_CIRCUIT_BREAKERS["thresholds"][0], "max_retries": 100000}]
        },
        "typed_extension_protocol_options": {
            _HTTP_PROTOCOL_OPTIONS: {
                "@type": "type.googleapis.com/" + _HTTP_PROTOCOL_OPTIONS,
                "explicit_http_config": {"http_protocol_options": {}},
                "http_filters": [
                    _upstream_ext_proc(config),
                    {
                        "name": "envoy.filters.http.upstream_codec",
                        "typed_config": {
                            "@type": _TYPE
                            + "extensions.filters.http.upstream_codec.v3.UpstreamCodec"
                        },
                    },
                ],
            }
        },
    }
    if cluster["type"] == "STRICT_DNS":
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    tls = {p.name: p for p in providers if p.tls}
    if tls:
        cluster["transport_socket_matches"] = [
            {
                "name": name,
                "match": {"provider": name},
                "transport_socket": _provider_cluster(provider)["transport_socket"],
            }
            for name, provider in tls.items()
        ]
    return cluster


def failover_clusters(config: Config) -> list[dict[str, Any]]:
    out = []
    for alias, targets in failover_aliases(config).items():
        out += [_cluster(config, alias, mask, targets) for mask in masks(len(targets))]
    return out


def has_failover(config: Config) -> bool:
    return bool(failover_aliases(config))


def failover_providers(config: Config) -> set[str]:
    """Providers some alias target names (their own clusters are not needed for it)."""
    return {t.provider for targets in failover_aliases(config).values() for t in targets}


def servable(config: Config, route: RouteConfig, targets: tuple[Target, ...]) -> bool:
    """A route serves an alias when each target speaks the route's format or a
    translator takes one of the route's client APIs to the target's format."""
    own = config.providers[route.provider].format
    apis = [fmt.name for fmt in FAMILIES[own]]
    return all(
        (fmt := config.providers[t.provider].format) == own
        or any((api, fmt) in PAIRS for api in apis)
        for t in targets
    )


def _retry_policy(config: Config, tries: int) -> dict[str, Any]:
    """`tries`: the targets in the set; each gets one attempt (past the last priority,
    previous_priorities starts over, so more retries would try a target twice)."""
    failover = config.models.failover
    return {
        "retry_on": "5xx,reset,connect-failure,retriable-status-codes",
        "retriable_status_codes": list(failover.retry_statuses),
        "num_retries": tries - 1,
        "per_try_timeout": _duration(failover.first_byte_timeout_ms),
        # The next attempt goes to another target: the next priority (an order) or
        # another endpoint (a split), never straight back.
        "retry_priority": {
            "name": "envoy.retry_priorities.previous_priorities",
            "typed_config": {"@type": _RETRY_PRIORITY, "update_frequency": 1},
        },
        "retry_host_predicate": [
            {
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": {"@type": _PREVIOUS_HOSTS},
            }
        ],
        "host_selection_retry_max_attempts": 8,
        # Another provider is not the one that was busy: no back-off worth waiting.
        "retry_back_off": {"base_interval": "0.001s", "max_interval": "0.005s"},
    }


def failover_routes(config: Config, route: RouteConfig) -> list[dict[str, Any]]:
    """The Envoy routes of one config route for every alias set it may serve."""
    entries: list[dict[str, Any]] = []
    match_kind = "prefix" if route.prefix.endswith("/") else "path_separated_prefix"
    for alias, targets in failover_aliases(config).items():
        if not servable(config, route, targets):
            continue
        for mask in masks(len(targets)):
            action: dict[str, Any] = {
                "cluster": cluster_name(alias, mask),
                "timeout": "0s",
                "auto_host_rewrite": True,
                "retry_policy": _retry_policy(config, bin(mask).count("1")),
            }
            if route.rewrite is not None:
                action["prefix_rewrite"] = route.rewrite
            value = f"{route.name}/{route_value(alias, mask)}"
            entries.append(
                {
                    "name": route.name,
                    "match": {
                        match_kind: route.prefix,
                        "headers": [{"name": FAILOVER_HEADER, "string_match": {"exact": value}}],
                    },
                    "route": action,
                    "request_headers_to_remove": [*INTERNAL_HEADERS, FAILOVER_HEADER],
                }
            )
    return entries
