"""Budgets in a real valkey (tests/redis_server.py), through the rate-limit store's
client and batcher: concurrent reservations from two replicas never overspend by
more than one reservation's error, a monthly budget resets at the boundary (clock
injected), soft notices fire once per period, and Redis agrees with the local store."""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from extproc.policy.ratelimit.redis import RedisStore
from extproc.policy.ratelimit.store import StoreUnavailable
from extproc.spend.budgets import Budget, Planner, Subject
from extproc.spend.redis_store import RedisBudgetStore
from extproc.spend.store import LocalBudgetStore
from tests.redis_server import RedisServer

ZONE = ZoneInfo("Europe/Paris")
ALICE = Subject(consumer="alice", teams=("research",), model="gpt-4o")


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


def shared(url: str, prefix: str) -> RedisStore:
    return RedisStore(url, key_prefix=prefix, timeout=10.0)


@pytest.fixture(params=["local", "redis"])
async def stores(request, redis_server):
    """(clock, [store, store]): two replicas' stores over one state."""
    clock = Clock(datetime(2026, 3, 31, 23, 59, tzinfo=ZONE).timestamp())
    if request.param == "local":
        store = LocalBudgetStore(clock)
        yield clock, [store, store]
        return
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    replicas = [shared(redis_server.url, prefix) for _ in range(2)]
    yield clock, [RedisBudgetStore(r, clock) for r in replicas]
    for r in replicas:
        await r.close()


async def test_concurrent_reservations_never_overspend_past_one_error(stores):
    clock, (one, two) = stores
    limit = 1_000_000  # $1
    planner = Planner([Budget("cap", "global", limit, period="month")], "Europe/Paris", clock)
    worst = 30_000  # each request reserves its worst case...
    rng = random.Random(12)
    # ...and most cost less, a few more (a prompt estimate that came in low).
    actual = [rng.randint(5_000, 33_000) for _ in range(50)]

    async def exchange(i: int) -> int:
        store = (one, two)[i % 2]
        checks = planner.checks(ALICE)
        outcome = await store.reserve(checks, worst)
        if not outcome.admitted:
            return 0
        for _ in range(rng.randint(0, 5)):
            await asyncio.sleep(0)  # streams end in any order
        await store.settle(checks, actual[i] - worst)
        return actual[i]

    charged = await asyncio.gather(*(exchange(i) for i in range(50)))
    spent = (await one.reserve(planner.checks(ALICE), 0)).spent[0]
    assert spent == sum(charged)  # every settle landed exactly, no float drift
    admitted = [c for c in charged if c]
    assert len(admitted) < 50  # the budget did refuse
    assert spent <= limit + max(a - worst for a in actual)


async def test_monthly_budget_resets_at_the_boundary(stores):
    clock, (store, _) = stores
    planner = Planner([Budget("monthly", "consumer", 500, period="month")], "Europe/Paris", clock)
    assert (await store.reserve(planner.checks(ALICE), 500)).admitted
    assert not (await store.reserve(planner.checks(ALICE), 1)).admitted
    clock.now = datetime(2026, 4, 1, tzinfo=ZONE).timestamp()
    out = await store.reserve(planner.checks(ALICE), 500)
    assert out.admitted and out.spent == [500]


async def test_soft_limit_reported_once_per_period_across_replicas(stores):
    clock, (one, two) = stores
    planner = Planner(
        [Budget("soft", "team", 1_000, period="day", soft_limit=0.5)], "Europe/Paris", clock
    )
    crossed = []
    for i in range(8):
        checks = planner.checks(ALICE)
        store = (one, two)[i % 2]
        crossed += (await store.reserve(checks, 100)).soft_crossed
        crossed += (await store.settle(checks, 10)).soft_crossed
    assert crossed == [0]
    clock.now += 86400
    assert (await one.reserve(planner.checks(ALICE), 600)).soft_crossed == [0]


async def test_redis_and_local_agree_on_a_random_sequence(redis_server):
    clock = Clock(1_800_000_000.0)
    budgets = [
        Budget("w", "consumer", 5_000, window=3600.0, soft_limit=0.9),
        Budget("d", "team", 8_000, period="day"),
    ]
    planner = Planner(budgets, "UTC", clock)
    local = LocalBudgetStore(clock)
    base = shared(redis_server.url, f"t{uuid.uuid4().hex[:8]}:")
    remote = RedisBudgetStore(base, clock)
    rng = random.Random(7)
    refused = crossed = 0
    try:
        for _ in range(300):
            clock.now += rng.choice([0, 1, 30, 200])
            checks = planner.checks(ALICE)
            amount = rng.randint(0, 700)
            a, b = local.reserve_now(checks, amount), await remote.reserve(checks, amount)
            assert (a.admitted, a.spent, a.blocked, a.soft_crossed) == (
                b.admitted,
                b.spent,
                b.blocked,
                b.soft_crossed,
            )
            refused += not a.admitted
            crossed += len(a.soft_crossed)
            if a.admitted:
                delta = rng.randint(-amount, 100)
                a, b = local.settle_now(checks, delta), await remote.settle(checks, delta)
                assert (a.spent, a.soft_crossed) == (b.spent, b.soft_crossed)
        assert refused and crossed  # the sequence did reach the limits
    finally:
        await base.close()


async def test_an_outage_is_store_unavailable_and_settle_never_raises(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    base = RedisStore(server.url, key_prefix="o:", timeout=0.5, retry_interval=60)
    store = RedisBudgetStore(base)
    planner = Planner([Budget("d", "global", 100, period="day")])
    checks = planner.checks(ALICE)
    try:
        assert (await store.reserve(checks, 10)).admitted
        server.kill()
        with pytest.raises(StoreUnavailable):
            await store.reserve(checks, 10)
        out = await store.settle(checks, -10)
        assert not out.admitted
    finally:
        server.stop()
        await base.close()
