"""A burst against a Redis-backed limit while Redis is healthy (issue 16, item 3).

A busy connection pool used to be taken for an outage, so a burst failed open: 1,000
requests at once, 410 admitted against a limit of 100. These drive the stage on a real
valkey with a pool of two connections and the default 200 ms timeout: an outage
(fail_mode) and back-pressure (never admits) are different answers.
"""

from __future__ import annotations

import asyncio

import pytest

from extproc.config import parse_config
from extproc.metrics import Metrics
from extproc.policy import Refusal, Shared
from extproc.policy.ratelimit import build
from extproc.policy.ratelimit.gcra import Rate
from extproc.policy.ratelimit.redis import RedisStore
from extproc.policy.ratelimit.store import StoreBusy
from tests.redis_server import RedisServer
from tests.test_ratelimit import context, document, fresh_prefix


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


def burst_stage(url: str, **redis: object):
    section = {
        "store": "redis",
        # A wide timeout: a loaded machine must not turn these into outage tests.
        "redis": {
            "url": url,
            "failure_mode": "open",
            "key_prefix": fresh_prefix(),
            "timeout_ms": 10_000,
            **redis,
        },
        "limits": [{"name": "hourly", "requests": 100, "window": "1h", "by": "consumer"}],
    }
    shared = Shared()
    config = parse_config(document(section))
    stage = build(config, shared, {})
    assert stage is not None
    return stage, config, shared.metrics


async def run_burst(stage, config, n: int) -> list[object]:
    async def one() -> object:
        try:
            await stage.on_request(context(config, consumer="alice"))
        except Refusal as refusal:
            return refusal
        return "admitted"

    return await asyncio.gather(*(one() for _ in range(n)))


def decisions(metrics: Metrics, outcome: str) -> float:
    labels = {"limit": "hourly", "kind": "requests", "outcome": outcome}
    return metrics.registry.get_sample_value("ai_gateway_ratelimit_decisions_total", labels) or 0


async def test_a_burst_over_a_small_pool_admits_exactly_the_limit(redis_server):
    """1,000 at once, 2 connections, fail_mode open: exactly 100 in, 900 told 429."""
    stage, config, metrics = burst_stage(redis_server.url, max_connections=2)
    try:
        results = await run_burst(stage, config, 1000)
        assert results.count("admitted") == 100
        refused = [r for r in results if isinstance(r, Refusal)]
        assert len(refused) == 900 and {r.status for r in refused} == {429}
        assert decisions(metrics, "fail_open") == 0
        assert stage.store.up
    finally:
        await stage.store.close()


async def test_a_full_queue_refuses_and_never_fails_open(redis_server):
    """More checks waiting than `max_pending`: the rest get a 503, even with fail_mode
    open, and the store is not marked down (it is healthy, only busy)."""
    stage, config, metrics = burst_stage(redis_server.url, max_connections=1, max_pending=40)
    try:
        results = await run_burst(stage, config, 300)
        busy = [r for r in results if isinstance(r, Refusal) and r.status == 503]
        assert busy, "the queue bound never refused anything"
        assert {r.code for r in busy} == {"rate_limit_unavailable"}
        assert {r.headers["retry-after"] for r in busy} == {"1"}
        assert results.count("admitted") <= 100
        assert results.count("admitted") + len(busy) + sum(
            isinstance(r, Refusal) and r.status == 429 for r in results
        ) == len(results)
        assert decisions(metrics, "busy") == len(busy)
        assert decisions(metrics, "fail_open") == 0
        assert stage.store.up
        # Once the burst has drained, the same store answers again.
        await stage.on_request(context(config, consumer="bob"))
    finally:
        await stage.store.close()


async def test_store_busy_is_not_an_outage(redis_server):
    """The store-level distinction the stage relies on: StoreBusy, not StoreUnavailable."""
    store = RedisStore(
        redis_server.url, key_prefix=fresh_prefix(), max_connections=1, max_pending=3
    )
    rate = Rate(1000, 3600)
    try:
        results = await asyncio.gather(
            *(store.acquire(["k"], [rate], [1]) for _ in range(10)), return_exceptions=True
        )
        assert sum(isinstance(r, StoreBusy) for r in results) == 7
        assert sum(getattr(r, "admitted", False) for r in results) == 3
        assert store.up
    finally:
        await store.close()


async def test_a_flushed_script_cache_is_reloaded_inside_the_pipeline(redis_server):
    store = RedisStore(redis_server.url, key_prefix=fresh_prefix(), max_connections=2)
    rate = Rate(5, 3600)
    try:
        assert (await store.acquire(["k"], [rate], [1])).admitted
        await store.client.script_flush()
        outcomes = await asyncio.gather(*(store.acquire(["k"], [rate], [1]) for _ in range(10)))
        assert sum(o.admitted for o in outcomes) == 4  # 5 in all, the first included
        assert store.up
    finally:
        await store.close()
