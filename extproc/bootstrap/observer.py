"""The observing ext_proc filters (`streaming.meter_off_path: auto`) and, with several
workers, one cluster per worker for them.

Both ext_proc streams of an exchange must reach the worker process that holds the
exchange, and Envoy picks an endpoint per gRPC stream with no hash key. The worker that
took the synchronous stream knows who it is: it starts the exchange token with its
index (`0.` .. `N-1.`, `exchange.offpath.claim`). So with N workers there are N
observing filters, filter `i` reaching only worker `i` (a cluster with that one
endpoint), each wrapped in a matcher that skips it unless the request's token starts
with `i.`: exactly one observer runs, on the right worker, and a request no worker
claimed (not a stream, a translated one, a client's own copy of the header, which the
synchronous filter strips) opens no observing stream at all. One worker has one such
filter, on the sidecar cluster.
"""

from __future__ import annotations

from typing import Any

from extproc.bootstrap.clusters import _load_assignment, _protocol_options
from extproc.bootstrap.common import (
    _CIRCUIT_BREAKERS,
    _TYPE,
    EXTPROC_CLUSTER,
    OBSERVER_FILTER,
    _grpc_target,
)
from extproc.config import Config
from extproc.headers import EXCHANGE_HEADER, OBSERVER_METADATA
from extproc.netaddr import worker_addresses

HTTP2 = {"http2_protocol_options": {}}
_EXT_PROC = _TYPE + "extensions.filters.http.ext_proc.v3.ExternalProcessor"


def observer_names(config: Config) -> list[str]:
    """The observing filters' names, in worker order (one: the plain name)."""
    workers = config.server.workers
    if workers == 1:
        return [OBSERVER_FILTER]
    return [f"{OBSERVER_FILTER}.{index}" for index in range(workers)]


def observer_cluster_name(index: int) -> str:
    return f"{EXTPROC_CLUSTER}_{index}"


def observer_filters(config: Config) -> list[dict[str, Any]]:
    """One filter per worker, on that worker's cluster (one worker: the sidecar cluster,
    whose one endpoint it is)."""
    names = observer_names(config)
    one = len(names) == 1
    return [
        {
            "name": name,
            "typed_config": _only_for_worker(
                index, name, EXTPROC_CLUSTER if one else observer_cluster_name(index)
            ),
        }
        for index, name in enumerate(names)
    ]


def observer_clusters(config: Config) -> list[dict[str, Any]]:
    """With several workers, worker `i` alone as cluster `extproc_<i>`. No health check
    or outlier detection: there is no other endpoint to choose, and the observer's
    failure never fails a response (the exchange then settles as unobserved)."""
    workers = config.server.workers
    if workers == 1:
        return []
    address = config.envoy.sidecar_address or config.server.grpc_listen
    clusters = []
    for index, target in enumerate(worker_addresses(address, workers)):
        name = observer_cluster_name(index)
        clusters.append(
            {
                "name": name,
                "type": "STATIC",
                "connect_timeout": "1s",
                "load_assignment": _load_assignment(name, _grpc_target(target)),
                "typed_extension_protocol_options": _protocol_options(HTTP2),
                "circuit_breakers": _CIRCUIT_BREAKERS,
            }
        )
    return clusters


def _only_for_worker(index: int, name: str, cluster: str) -> dict[str, Any]:
    """The observer of worker `index`, skipped unless the exchange token is that
    worker's. Matched at this filter's request headers, which run after the
    synchronous filter's body answer set the token."""
    token_is_ours = {
        "single_predicate": {
            "input": {
                "name": "exchange_token",
                "typed_config": {
                    "@type": _TYPE + "type.matcher.v3.HttpRequestHeaderMatchInput",
                    "header_name": EXCHANGE_HEADER,
                },
            },
            "value_match": {"prefix": f"{index}."},
        }
    }
    skip = {
        "name": "skip",
        "typed_config": {
            "@type": _TYPE + "extensions.filters.common.matcher.action.v3.SkipFilter",
        },
    }
    return {
        "@type": _TYPE + "extensions.common.matching.v3.ExtensionWithMatcher",
        "xds_matcher": {
            "matcher_list": {
                "matchers": [
                    {"predicate": {"not_matcher": token_is_ours}, "on_match": {"action": skip}}
                ]
            }
        },
        "extension_config": {"name": name, "typed_config": _observer(cluster)},
    }


def _observer(cluster: str) -> dict[str, Any]:
    """A second ext_proc filter, after the first, that sends the request headers (they
    carry the sidecar's exchange token, set by the first filter's body answer) and each
    response chunk without waiting for an answer.

    The sidecar ends this stream at once unless the exchange qualifies; then the first
    filter's response-headers answer turns its own body mode off. Its failure must never
    fail a response: it cannot refuse or change anything anyway. Envoy keeps an observed
    stream open `deferred_close_timeout` after the request ends (5 s by default, which
    exhausts stream limits under load: docs/performance.md measures what a short one
    costs a slow sidecar). Every worker's observer counts under one `stat_prefix`."""
    return {
        "@type": _EXT_PROC,
        "grpc_service": {
            "envoy_grpc": {"cluster_name": cluster},
            "initial_metadata": [{"key": OBSERVER_METADATA, "value": "1"}],
        },
        "observability_mode": True,
        # Its first message needs the token alone: the request's other headers (the
        # first filter has read them) are not copied into it.
        "forward_rules": {"allowed_headers": {"patterns": [{"exact": EXCHANGE_HEADER}]}},
        "stat_prefix": "observer",
        "deferred_close_timeout": "5s",
        "failure_mode_allow": True,
        "processing_mode": {
            "request_header_mode": "SEND",
            "response_header_mode": "SKIP",
            "request_body_mode": "NONE",
            "response_body_mode": "STREAMED",
            "request_trailer_mode": "SKIP",
            "response_trailer_mode": "SKIP",
        },
    }
