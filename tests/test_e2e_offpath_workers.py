"""`streaming.meter_off_path: auto` with `server.workers: 2`, through the real Envoy: the
synchronous stream of an exchange and its observing stream reach the same worker (each
worker's tokens name it, and only that worker's observing filter runs), so 20
concurrent streams spread over both workers are metered, limited and logged exactly."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from extproc.bootstrap import render_bootstrap
from extproc.bootstrap.common import EXTPROC_FILTER, OBSERVER_FILTER
from extproc.bootstrap.observer import observer_cluster_name
from extproc.config import parse_config
from tests.conftest import (
    Stack,
    consecutive_free_ports,
    loopback_sections,
    metric,
    wait_for,
)
from tests.redis_server import RedisServer
from tests.test_bootstrap import cluster, endpoint_address, hcm_of, validate
from tests.test_e2e_offpath import (
    OBSERVED,
    POLICY,
    SYNC,
    chat,
    envoy_stat,
    settled,
    tokens,
    usage_of,
)

STREAMS = 20
STARTED = "http.ai_gateway.ext_proc.observer.streams_started"


def write_policy(directory: Path, workers: int, redis_url: str) -> Path:
    """The off-path policy; its token limit counts in Redis (one count for every worker)."""
    directory.mkdir(parents=True, exist_ok=True)
    limits = {**POLICY["rate_limits"], "store": "redis", "redis": {"url": redis_url}}
    policy = {
        # Accounting is under test, not shedding (TEST_SERVER): a busy shared machine's
        # loop lag must not turn a request away (`overloaded`).
        **loopback_sections(
            directory,
            workers=workers,
            grpc_listen=f"127.0.0.1:{consecutive_free_ports(workers)}",
        ),
        **POLICY,
        "rate_limits": limits,
    }
    path = directory / "policy.yaml"
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    directory = tmp_path_factory.mktemp("offpath-two")
    redis = RedisServer(directory / "redis").start()
    try:
        stack = Stack(write_policy(directory, 2, redis.url), directory)
        stack.start()
        try:
            yield stack
        finally:
            stack.stop()
    finally:
        redis.stop()


def test_each_worker_has_its_own_observer_and_cluster(tmp_path):
    """Two workers: two observing filters after the synchronous one, filter `i` reaching
    only worker `i` and skipped unless the exchange token starts with `i.`; valid for
    the real Envoy."""
    config = parse_config(
        {
            "server": {"workers": 2, "grpc_listen": "0.0.0.0:50051"},
            "providers": {"mock": {"url": "http://127.0.0.1:9000"}},
            "routes": [{"name": "v1", "prefix": "/v1/", "provider": "mock"}],
            "streaming": {"meter_off_path": "auto"},
        }
    )
    boot = render_bootstrap(config)
    chain = hcm_of(boot)["http_filters"]
    names = [f["name"] for f in chain]
    first = names.index(EXTPROC_FILTER)
    assert names[first + 1 : first + 3] == [f"{OBSERVER_FILTER}.0", f"{OBSERVER_FILTER}.1"]
    for index in (0, 1):
        wrapped = chain[first + 1 + index]["typed_config"]
        (matcher,) = wrapped["xds_matcher"]["matcher_list"]["matchers"]
        predicate = matcher["predicate"]["not_matcher"]["single_predicate"]
        assert predicate["input"]["typed_config"]["header_name"] == "x-ai-gateway-exchange"
        assert predicate["value_match"] == {"prefix": f"{index}."}
        assert matcher["on_match"]["action"]["typed_config"]["@type"].endswith(".SkipFilter")
        observer = wrapped["extension_config"]["typed_config"]
        assert observer["observability_mode"] is True
        # Its first message carries the token alone, no other request header.
        allowed = observer["forward_rules"]["allowed_headers"]["patterns"]
        assert allowed == [{"exact": "x-ai-gateway-exchange"}]
        target = observer["grpc_service"]["envoy_grpc"]["cluster_name"]
        assert target == observer_cluster_name(index)
        address = endpoint_address(cluster(boot, target))["socket_address"]
        assert address == {"address": "127.0.0.1", "port_value": 50051 + index}
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(boot))
    validate(path)


def test_twenty_concurrent_streams_over_two_workers_meter_exactly(two):
    """Every stream goes off path (3 synchronous messages each), exactly one observing
    stream opens per request, both workers take streams, and the tokens, the token
    limit, the sidecar's log lines and the access log are exact for every request."""
    sync_before, observed_before = envoy_stat(two, SYNC), envoy_stat(two, OBSERVED)
    started_before = envoy_stat(two, STARTED)
    prompt_before, completion_before = tokens(two, "prompt"), tokens(two, "completion")
    settled_before = settled(two)
    workers_before = [metric(two, "ai_gateway_worker_streams_total", worker=w) for w in "01"]
    asks = [chat(usage=True, tokens=10 + n) for n in range(STREAMS)]
    for _, headers in asks:
        headers["x-mock-delay-ms"] = "5"  # long enough for all 20 to be open at once

    def post(ask: tuple[dict, dict]) -> httpx.Response:
        body, headers = ask
        return httpx.post(f"{two.base_url}/meter", json=body, headers=headers, timeout=60)

    with ThreadPoolExecutor(STREAMS) as pool:
        replies = list(pool.map(post, asks))
    used = []
    for n, reply in enumerate(replies):
        assert reply.status_code == 200, reply.text
        assert reply.content.rstrip().endswith(b"data: [DONE]")
        usage = usage_of(reply.content)
        assert usage is not None and usage["completion_tokens"] == 10 + n
        used.append(usage)
    want_completion = sum(u["completion_tokens"] for u in used)
    assert wait_for(lambda: tokens(two, "completion") - completion_before == want_completion)
    assert tokens(two, "prompt") - prompt_before == sum(u["prompt_tokens"] for u in used)
    want_total = sum(u["total_tokens"] for u in used)
    assert wait_for(lambda: settled(two) - settled_before == want_total)
    assert envoy_stat(two, SYNC) - sync_before == 3 * STREAMS
    assert envoy_stat(two, STARTED) - started_before == STREAMS  # one observer each
    assert envoy_stat(two, OBSERVED) - observed_before >= 2 * STREAMS
    taken = [
        metric(two, "ai_gateway_worker_streams_total", worker=w) - before
        for w, before in zip("01", workers_before, strict=True)
    ]
    assert sum(taken) == STREAMS and all(taken), taken  # both workers took streams
    assert metric(two, "ai_gateway_errors_total", kind="off_path_unobserved") == 0
    log = two.log("sidecar")
    for (_, headers), usage in zip(asks, used, strict=True):
        rid = headers["x-request-id"]
        (line,) = [ln for ln in log.splitlines() if rid in ln and "exchange route" in ln]
        assert f"completion={usage['completion_tokens']} " in line
        assert "estimated=False" in line
    wanted = {headers["x-request-id"] for _, headers in asks}

    def logged() -> dict[str, dict] | None:
        entries = [json.loads(ln) for ln in (two.workdir / "access.log").read_text().splitlines()]
        ours = {e["request_id"]: e for e in entries if e["request_id"] in wanted}
        return ours if len(ours) == STREAMS else None

    entries = wait_for(logged)
    for entry in entries.values():
        assert entry["status"] == 200 and entry["route"] == "meter"
        assert entry["model"] == "gpt-4o-mini" and entry["route_name"] == "meter"
        assert entry["completion_tokens"] is None  # off path: the sidecar's line has them


def test_a_request_no_worker_claims_opens_no_observer(two):
    """An answer that is not a stream gets no token, so every observer is skipped, even
    when the client sends a token of its own: the synchronous filter strips it."""
    before = envoy_stat(two, STARTED)
    body, headers = chat(usage=False)
    body["stream"] = False
    reply = httpx.post(f"{two.base_url}/meter", json=body, headers=headers, timeout=30)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 24
    headers["x-ai-gateway-exchange"] = "0.forged"
    reply = httpx.post(f"{two.base_url}/meter", json=body, headers=headers, timeout=30)
    assert reply.status_code == 200
    assert envoy_stat(two, STARTED) == before
    body, headers = chat(usage=True)  # a stream: its token names a worker
    reply = httpx.post(f"{two.base_url}/meter", json=body, headers=headers, timeout=30)
    assert reply.status_code == 200
    assert envoy_stat(two, STARTED) == before + 1
