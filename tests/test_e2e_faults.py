"""Accounting under faults, through the real Envoy, the supervisor and Redis (issue 17
item 3): a worker killed with `kill -9` while it holds open streams leaves their
reservations leased in Redis; once the lease runs out the other worker (or the one
restarted in its place) settles every one of them and counts them."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import redis

from tests.conftest import metric, wait_for
from tests.redis_server import RedisServer
from tests.test_e2e_running import open_streams, start, worker_pids

PREFIX = "faults:"


def outstanding(client: redis.Redis) -> int:
    """Leased reservations not settled yet, every worker's."""
    return sum(client.hlen(owner) for owner in client.smembers(PREFIX + "leases"))


def test_kill_9_of_a_worker_with_open_streams_settles_its_reservations(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    client = redis.Redis.from_url(server.url)
    try:
        limits = {
            "store": "redis",
            "redis": {"url": server.url, "timeout_ms": 5000, "key_prefix": PREFIX},
            "limits": [{"name": "tok", "tokens": 10_000_000, "window": "1d", "by": "consumer"}],
        }
        limits["redis"]["lease_seconds"] = 2
        (tmp_path / "stack").mkdir()
        stack, _ = start(tmp_path / "stack", workers=2, rate_limits=limits)
        try:
            streams = {w: metric(stack, "ai_gateway_worker_streams_total", worker=w) for w in "01"}
            results, _, killed, join = open_streams(stack, count=8, tokens=150, delay_ms=40)
            taken = {
                w: metric(stack, "ai_gateway_worker_streams_total", worker=w) - streams[w]
                for w in "01"
            }
            assert taken["1"] > 0, taken  # worker 1 holds some of the open streams
            assert outstanding(client) == 8
            os.kill(worker_pids(stack)[1], signal.SIGKILL)
            killed.set()
            join()
            cut = [r for r in results if r.error or not r.body.endswith(b"data: [DONE]\n\n")]
            assert len(cut) == taken["1"], [r.error for r in results]

            def swept() -> float:
                return metric(stack, "ai_gateway_ratelimit_leases_expired_total")

            assert wait_for(lambda: swept() == len(cut) and not outstanding(client), timeout=30)
            assert "reservations a dead worker left" in stack.log("sidecar")
        finally:
            stack.stop()
    finally:
        client.close()
        server.stop()
