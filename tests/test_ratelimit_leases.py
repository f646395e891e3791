"""Reservation leases on a real Redis (issue 17 item 3): a worker that dies with
reservations open cannot hold the budget forever; another settles them from the usage
the dead one had recorded, or at their reservation (counted as estimated); a caller
that goes away while its acquire is in flight leaves nothing reserved."""

from __future__ import annotations

import asyncio
import random

import pytest
import redis.asyncio

from extproc.metrics import Metrics
from extproc.policy.ratelimit.gcra import Rate
from extproc.policy.ratelimit.redis import RedisStore
from extproc.policy.ratelimit.store import Lease
from tests.redis_server import RedisServer

RATE = Rate(1000, 3600.0)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


def stores(url: str, n: int, **kwargs) -> list[RedisStore]:
    prefix = f"lease{random.getrandbits(32)}:"
    return [RedisStore(url, key_prefix=prefix, timeout=10.0, **kwargs) for _ in range(n)]


async def used(store: RedisStore, key: str) -> float:
    """Units of RATE taken in `key` now (0 when the bucket is full)."""
    outcome = await store.acquire([key], [RATE], [0])
    return max(0.0, (outcome.tats[0] - outcome.now) / RATE.interval)


async def die(store: RedisStore) -> None:
    """kill -9 as Redis sees it: the lease is no longer renewed and runs out."""
    await store.client.delete(store._lease_key + ":alive")
    await store.close()


@pytest.mark.parametrize("recorded", [False, True], ids=["estimate", "metered"])
async def test_a_dead_workers_reservation_is_settled_by_the_next(redis_server, recorded):
    metrics = Metrics()
    dead, alive = stores(redis_server.url, 2, metrics=metrics)
    try:
        progress = [30] if recorded else None
        outcome = await dead.acquire(["k"], [RATE], [100], Lease([0], lambda: progress))
        assert outcome.admitted and outcome.lease is not None
        assert await alive.outstanding() == 1
        await dead.maintain()  # the renewal records the progress (30 of 100)
        await alive.maintain()  # the owner is alive: nothing swept
        assert await alive.outstanding() == 1
        await die(dead)
        await alive.maintain()
        assert await alive.outstanding() == 0
        taken = await used(alive, "k")
        assert taken == pytest.approx(30 if recorded else 100, abs=0.5)
        kind = "metered" if recorded else "estimated"
        sample = metrics.registry.get_sample_value(
            "ai_gateway_ratelimit_leases_expired_total", {"store": "redis", "settled": kind}
        )
        assert sample == 1
    finally:
        await alive.close()


async def test_a_settle_after_the_sweep_does_not_count_twice(redis_server):
    """A worker that only looked dead (its lease lapsed) settles late: the sweep
    already settled the reservation, so the late settle changes nothing."""
    slow, other = stores(redis_server.url, 2)
    try:
        outcome = await slow.acquire(["k"], [RATE], [100], Lease([0], lambda: [40]))
        await slow.maintain()
        await slow.client.delete(slow._lease_key + ":alive")
        await other.maintain()  # settles at 40 used
        await slow.settle(["k"], [RATE], [10 - 100], outcome.lease)  # 10 really used
        assert await used(other, "k") == pytest.approx(40, abs=0.5)
        assert await other.outstanding() == 0
    finally:
        await slow.close()
        await other.close()


async def test_settling_ends_the_lease(redis_server):
    (store,) = stores(redis_server.url, 1)
    try:
        outcome = await store.acquire(["k"], [RATE], [100], Lease([0], lambda: None))
        assert await store.outstanding() == 1 and store.open_leases == 1
        await store.settle(["k"], [RATE], [-80], outcome.lease)
        assert await store.outstanding() == 0 and store.open_leases == 0
        assert await used(store, "k") == pytest.approx(20, abs=0.5)
    finally:
        await store.close()


async def test_an_acquire_whose_caller_went_away_reserves_nothing(redis_server):
    (store,) = stores(redis_server.url, 1)
    try:
        admin = redis.asyncio.Redis.from_url(redis_server.url)
        await admin.execute_command("CLIENT", "PAUSE", 10_000, "WRITE")  # scripts wait
        try:
            task = asyncio.ensure_future(
                store.acquire(["k"], [RATE], [100], Lease([0], lambda: None))
            )
            while not store._batch._senders or store._batch.pending:
                await asyncio.sleep(0)  # sent: the script will run, whatever happens now
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            await admin.execute_command("CLIENT", "UNPAUSE")
            await admin.aclose()
        for _ in range(200):  # the reply, then the refund, each one round trip
            if not store._orphans and await store.outstanding() == 0:
                break
            await asyncio.sleep(0.01)
        assert await store.outstanding() == 0
        assert await used(store, "k") == 0
    finally:
        await store.close()
