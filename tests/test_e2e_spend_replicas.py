"""Spend across replicas, end to end: two gateways (Envoy + sidecar each) whose budgets
live in one real Redis (the rate limits' connection) and whose ledgers write to one
real PostgreSQL. 50 concurrent streams never spend past a budget by more than one
reservation's error; a sidecar killed with -9 mid-load loses and doubles no row of a
completed exchange; PostgreSQL stopped for ~10 s while the gateways serve: rows are
spooled, replayed, and the totals are exact."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import httpx
import orjson
import psycopg
import pytest
import redis as redis_py

from tests.conftest import Stack, metric, wait_for
from tests.postgres_server import PostgresServer
from tests.redis_server import RedisServer
from tests.spend_helpers import MODEL, hand_price, write_policy

LIMIT = 20_000  # micro-dollars: $0.02 on route conc
MAX_TOKENS = 40
ROUTES = [
    {"name": "conc", "prefix": "/conc", "provider": "mock", "rewrite": "/v1/chat/completions"},
    {"name": "v1", "prefix": "/v1/", "provider": "mock"},
]
PG_DOWN_MAX_S = 60.0  # how long postgres stays down at most, waiting for a failed write


def body() -> dict:
    return {
        "model": MODEL,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": MAX_TOKENS,
        "messages": [{"role": "user", "content": "Count slowly to thirty, please."}],
    }


def usage_of(content: bytes) -> dict:
    for line in content.split(b"\n"):
        if line.startswith(b"data: {") and b'"usage":{' in line:
            return orjson.loads(line[6:])["usage"]
    raise AssertionError(f"no usage chunk in {content[-300:]!r}")


def ledger_rows(url: str, ids: list[str] | None = None) -> list[dict]:
    try:
        with psycopg.connect(url, connect_timeout=2) as db, db.cursor() as cur:
            cur.execute("SELECT request_id, route, status, cost_micros FROM spend_ledger")
            rows = [dict(zip(("request_id", "route", "status", "cost_micros"), r, strict=True))
                    for r in cur.fetchall()]  # fmt: skip
    except psycopg.Error:
        return []
    if ids is not None:
        wanted = set(ids)
        rows = [r for r in rows if r["request_id"] in wanted]
    return rows


async def fire(urls: list[str], ids: list[str], headers: dict[str, str]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(ids) + 10, max_keepalive_connections=len(ids) + 10)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        return await asyncio.gather(
            *(
                client.post(
                    urls[i % len(urls)], json=body(), headers={**headers, "x-request-id": rid}
                )
                for i, rid in enumerate(ids)
            )
        )


def ids(n: int) -> list[str]:
    return [uuid.uuid4().hex for _ in range(n)]


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def postgres():
    server = PostgresServer().start()
    yield server
    server.destroy()


def policy(directory: Path, redis_url: str | None, pg_url: str, **ledger: object) -> Path:
    sections: dict = {
        "routes": ROUTES,
        "ledger": {
            "url": pg_url,
            "journal_dir": str(directory / "journal"),
            "flush_interval_ms": 50,
            "retry_interval_ms": 200,
            **ledger,
        },
    }
    if redis_url is not None:
        sections["rate_limits"] = {
            "store": "redis",
            "redis": {"url": redis_url, "timeout_ms": 5000, "failure_mode": "closed"},
            "limits": [{"name": "wide", "requests": 1_000_000, "window": "1d"}],
        }
        sections["budgets"] = {
            "store": "redis",
            "items": {
                "conc-day": {
                    "scope": "route",
                    "match": "conc",
                    "limit_usd": str(LIMIT / 1e6),
                    "period": "day",
                }
            },
        }
    return write_policy(directory, **sections)


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, redis, postgres):
    stacks = []
    for name in ("a", "b"):
        directory = tmp_path_factory.mktemp(f"replica-{name}")
        stack = Stack(policy(directory, redis.url, postgres.url), directory)
        stack.start()
        stacks.append(stack)
    yield stacks
    for stack in stacks:
        stack.stop()


def cost_total(stacks: list[Stack]) -> int:
    return round(sum(metric(s, "ai_gateway_cost_usd_total") for s in stacks) * 1e6)


async def test_50_streams_over_two_sidecars_never_overspend_one_budget(replicas, redis, postgres):
    before = cost_total(replicas)
    sent = ids(50)
    replies = await fire(
        [f"{s.base_url}/conc" for s in replicas],
        sent,
        {"x-mock-tokens": "30", "x-mock-delay-ms": "10", "x-mock-reasoning-tokens": "3"},
    )
    admitted = [(rid, r) for rid, r in zip(sent, replies, strict=True) if r.status_code == 200]
    refused = [r for r in replies if r.status_code == 429]
    assert len(admitted) + len(refused) == 50
    assert refused and all(r.json()["error"]["code"] == "budget_exceeded" for r in refused)
    assert all(r.content.rstrip().endswith(b"data: [DONE]") for _, r in admitted)
    costs = {rid: hand_price(usage_of(r.content)) for rid, r in admitted}
    # Settled spend never passes the budget (each worst case is above its exact cost,
    # so one reservation's error is nothing here) ...
    assert sum(costs.values()) <= LIMIT
    # ... and the budget did not starve them: its last refusals leave less than one
    # worst case unspent.
    assert len(admitted) >= 5
    # Both gateways refused some: one budget, not one each.
    for i in range(2):
        assert 429 in [r.status_code for r in replies[i::2]]
    # Redis holds the settled figure: every reservation refunded to its exact cost.
    client = redis_py.Redis.from_url(redis.url)
    [key] = client.keys("*spend:b:conc-day:*")

    def settled() -> bool:
        return sum(int(v) for f, v in client.hgetall(key).items() if f != b"soft") == sum(
            costs.values()
        )

    assert wait_for(settled)
    # The ledger (both replicas, one table), the metric and the hand price agree.
    rows = wait_for(
        lambda: (found := ledger_rows(postgres.url, sent)) and len(found) == 50 and found
    )
    assert rows, "not every exchange has its ledger row"
    assert {r["request_id"]: r["cost_micros"] for r in rows if r["status"] == "completed"} == costs
    assert {r["status"] for r in rows if r["request_id"] not in costs} == {"refused"}
    assert wait_for(lambda: cost_total(replicas) - before == sum(costs.values()))


def test_kill_9_mid_load_then_restart_loses_and_doubles_no_completed_row(tmp_path, postgres):
    """The ledger's writer waits a minute between batches here, so every row of the
    completed exchanges is only in the killed sidecar's journal: the restart must
    replay it, once."""
    stack = Stack(
        policy(tmp_path, None, postgres.url, flush_interval_ms=60_000, batch_size=10_000),
        tmp_path,
    )
    stack.start()
    try:
        done = ids(12)
        quick = asyncio.run(fire([f"{stack.base_url}/v1/chat/completions"], done, {}))
        assert all(r.content.rstrip().endswith(b"data: [DONE]") for r in quick)
        costs = {rid: hand_price(usage_of(r.content)) for rid, r in zip(done, quick, strict=True)}
        assert ledger_rows(postgres.url, done) == []  # still in the journal only

        async def load() -> list[httpx.Response | BaseException]:
            slow = ids(10)
            task = asyncio.ensure_future(
                fire(
                    [f"{stack.base_url}/v1/chat/completions"],
                    slow,
                    {"x-mock-tokens": "200", "x-mock-delay-ms": "20"},
                )
            )
            await asyncio.to_thread(
                wait_for, lambda: metric(stack, "ai_gateway_active_streams") >= 10
            )
            stack.procs["sidecar"].kill()  # kill -9, streams in flight
            stack.procs["sidecar"].wait()
            return await asyncio.gather(task, return_exceptions=True)

        [cut] = asyncio.run(load())
        assert all(
            isinstance(r, BaseException) or not r.content.rstrip().endswith(b"[DONE]")
            for r in (cut if isinstance(cut, list) else [cut])
        )
        stack.start_sidecar()
        stack.wait_sidecar(time.monotonic() + 30)
        rows = wait_for(
            lambda: (found := ledger_rows(postgres.url, done)) and len(found) == 12 and found
        )
        assert rows, "rows of completed exchanges were lost"
        assert sorted(r["request_id"] for r in rows) == sorted(done)  # each exactly once
        assert {r["request_id"]: r["cost_micros"] for r in rows} == costs
        assert metric(stack, "ai_gateway_ledger_rows_total", outcome="replayed") >= 12
    finally:
        stack.stop()


def test_postgres_stopped_while_serving_is_spooled_then_replayed_exactly(replicas, postgres):
    urls = [f"{s.base_url}/v1/chat/completions" for s in replicas]
    postgres.stop(immediate=True)
    down_at = time.monotonic()
    sent: list[str] = []
    costs: dict[str, int] = {}
    try:
        # Served all along: the ledger is off the request path. Until the replicas
        # have seen their writes fail (not for a fixed time): the rows so far are spooled.
        while True:
            batch = ids(4)
            replies = asyncio.run(fire(urls, batch, {"x-mock-tokens": "5"}))
            assert all(r.status_code == 200 for r in replies)
            costs.update(
                (rid, hand_price(usage_of(r.content)))
                for rid, r in zip(batch, replies, strict=True)
            )
            sent += batch
            failures = sum(metric(s, "ai_gateway_ledger_write_failures_total") for s in replicas)
            if failures > 0 or time.monotonic() - down_at > PG_DOWN_MAX_S:
                break
            time.sleep(0.5)
        assert failures > 0
    finally:
        postgres.start()
    rows = wait_for(
        lambda: (found := ledger_rows(postgres.url, sent)) and len(found) == len(sent) and found,
        timeout=60,
    )
    assert rows, "spooled rows were not replayed"
    assert sorted(r["request_id"] for r in rows) == sorted(sent)
    assert sum(r["cost_micros"] for r in rows) == sum(costs.values())
    assert sum(metric(s, "ai_gateway_ledger_rows_total", outcome="replayed") for s in replicas) > 0
    assert sum(metric(s, "ai_gateway_ledger_rows_total", outcome="lost") for s in replicas) == 0
