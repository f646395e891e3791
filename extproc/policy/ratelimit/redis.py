"""The Redis store: one limit shared by every sidecar replica.

Each operation is ONE Lua script, run atomically by the server, so no replica ever
reads a counter, decides, and writes back while another does the same (the race that
lets concurrent requests overspend). The scripts take the time from the Redis server
(`TIME`), not from each replica, so replicas with skewed clocks still agree. A key
lives only until its bucket is full again (`PX`), so idle keys vanish by themselves.

Calls are pipelined (`batch.py`): a burst queues (bounded by `max_pending`) and shares
`max_connections` connections, so a busy pool is never mistaken for an outage. A full
queue raises `StoreBusy`, which the stage refuses (503), whatever the failure mode.

When Redis cannot be reached the store raises `StoreUnavailable` (the stage applies
the configured fail-open or fail-closed mode), logs the outage once, counts every
failed call, and then skips Redis for `retry_interval` so an outage costs no latency
per request; the first call after that tries again, and redis-py reconnects by itself,
so the sidecar recovers without a restart.

A Redis restarted without persistence forgets every bucket, so every limit admits a
full burst again (a 30/h limit let 40-50 through in the hour after a 10 s outage): run
it with `appendonly yes` (`appendfsync everysec`). The acquire script also keeps a
generation key (no TTL, so `volatile-*` eviction never takes it); when it comes back
different the store was restarted empty or flushed, which is logged once per change
and counted in `ai_gateway_ratelimit_store_restarts_total`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from extproc.metrics import Metrics
from extproc.policy.ratelimit.batch import ScriptBatcher
from extproc.policy.ratelimit.gcra import SLACK, Rate
from extproc.policy.ratelimit.scripts import ACQUIRE_LUA, RENEW_LUA, SETTLE_LUA, SWEEP_LUA
from extproc.policy.ratelimit.store import Lease, Outcome, StoreBusy, StoreUnavailable

log = logging.getLogger("extproc.ratelimit")
GENERATION_KEY = "generation"  # after the prefix; bucket keys always hold ":r:" or ":t:"
OWNERS_KEY = "leases"  # the set of lease hashes, one per store instance (worker)


def redacted(url: str) -> str:
    """scheme://host:port/db for logs: never a credential."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"unix:{parts.path}"
    host = parts.hostname or "localhost"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


class RedisStore:
    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        key_prefix: str = "",
        timeout: float = 0.2,
        retry_interval: float = 1.0,
        max_connections: int = 64,
        max_pending: int = 10_000,
        metrics: Metrics | None = None,
        clock: Callable[[], float] | None = None,
        lease_seconds: float = 30.0,
    ) -> None:
        """`clock` (seconds) replaces the Redis server's clock: for tests only."""
        self.where = redacted(url)
        self._prefix = key_prefix
        # Leases: this store's open reservations, in one hash that lives while `maintain`
        # renews it (see `maintain`).
        self._lease_ms = max(1, round(lease_seconds * 1000))
        self._lease_key = f"{key_prefix}lease:{uuid.uuid4().hex}"
        self._owners_key = key_prefix + OWNERS_KEY
        self._leases: dict[str, _Open] = {}
        self._lease_ids = itertools.count(1)
        self._renewed = 0.0
        self._orphans: set[asyncio.Future] = set()
        self._retry_interval = retry_interval
        self._clock = clock
        self._down_since = 0.0
        self._down_until = 0.0
        self._metrics = metrics
        self._generation: bytes | None = None  # the last one seen; None before the first
        # Scripts go through the batcher, which never holds more than max_connections
        # connections; one more stays free for readiness pings. One immediate retry: a
        # pooled connection that died with a Redis restart fails once and the retry
        # reconnects. Nothing more: the request is waiting.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections + 1,
            timeout=timeout,
            username=username,
            password=password,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1),
            health_check_interval=0,
        )
        self.client = aioredis.Redis(connection_pool=pool)
        self._acquire = self.client.register_script(ACQUIRE_LUA)
        self._settle = self.client.register_script(SETTLE_LUA)
        self._sweep = self.client.register_script(SWEEP_LUA)
        self._renew = self.client.register_script(RENEW_LUA)
        self._batch = ScriptBatcher(self.client, max_connections, max_pending)
        if metrics is not None:
            metrics.ratelimit_store_up.labels(self.name).set(1)

    @property
    def up(self) -> bool:
        return not self._down_since

    def _now_arg(self) -> str:
        return "" if self._clock is None else f"{self._clock() * 1000:.6f}"

    async def acquire(
        self,
        keys: Sequence[str],
        rates: Sequence[Rate],
        costs: Sequence[float],
        lease: Lease | None = None,
    ) -> Outcome:
        self._check_breaker("acquire")
        args: list[str | float] = [self._now_arg(), SLACK]
        for rate, cost in zip(rates, costs, strict=True):
            args += (rate.interval * 1000, rate.window * 1000, cost)
        n = len(keys)
        full = [self._prefix + k for k in keys]
        script_keys = [*full, self._prefix + GENERATION_KEY]
        field = None
        leased: _Open | None = None
        if lease is not None and lease.buckets:
            field = str(next(self._lease_ids))
            leased = _Open(
                [full[i] for i in lease.buckets],
                [rates[i] for i in lease.buckets],
                [costs[i] for i in lease.buckets],
                lease.progress,
            )
            script_keys += (self._lease_key, self._owners_key)
            args += (field, leased.record(None), self._lease_ms)
        try:
            pending = self._batch.submit(self._acquire.script, self._acquire.sha, script_keys, args)
        except StoreBusy:
            self._count_error("acquire_busy")
            raise
        try:
            # Shielded: a caller that goes away (the client hung up) must not leave a
            # reservation the script may already have made; `_orphaned` undoes it.
            reply = await asyncio.shield(pending)
        except asyncio.CancelledError:
            self._orphans.add(pending)  # until its reply, then its refund, are in
            pending.add_done_callback(self._orphans.discard)
            pending.add_done_callback(lambda done: self._orphaned(done, full, rates, costs, field))
            raise
        except (RedisError, OSError) as exc:
            raise self._failed("acquire", exc) from None
        self._recovered()
        self._check_generation(reply[2])
        now = float(reply[1]) / 1000
        tats = [float(t) / 1000 for t in reply[3 : 3 + n]]
        blocked = [int(i) for i in reply[-1].split(b",") if i]
        admitted = bool(reply[0])
        if admitted and field is not None and leased is not None:
            self._leases[field] = leased
        return Outcome(admitted, now, tats, blocked, lease=field if admitted else None)

    def _orphaned(
        self,
        done: asyncio.Future,
        keys: list[str],
        rates: Sequence[Rate],
        costs: Sequence[float],
        field: str | None,
    ) -> None:
        """The caller of an acquire went away: refund what the script reserved."""
        if done.cancelled() or done.exception() is not None or not done.result()[0]:
            return
        args: list[str | float] = [self._now_arg()]
        for rate, cost in zip(rates, costs, strict=True):
            args += (rate.interval * 1000, -cost)
        if field is not None:
            keys = [*keys, self._lease_key]
            args.append(field)
        task = asyncio.ensure_future(self._run_settle(keys, args))
        self._orphans.add(task)
        task.add_done_callback(self._orphans.discard)

    def settle(
        self,
        keys: Sequence[str],
        rates: Sequence[Rate],
        deltas: Sequence[float],
        lease: str | None = None,
    ) -> Awaitable[None]:
        args: list[str | float] = [self._now_arg()]
        for rate, delta in zip(rates, deltas, strict=True):
            args += (rate.interval * 1000, delta)
        script_keys = [self._prefix + k for k in keys]
        if lease is not None:
            self._leases.pop(lease, None)
            script_keys.append(self._lease_key)
            args.append(lease)
        return self._run_settle(script_keys, args)

    @property
    def open_leases(self) -> int:
        """Reservations of this store not settled yet."""
        return len(self._leases)

    async def outstanding(self) -> int:
        """Leased reservations in Redis not settled yet, every owner's (for operators
        and tests: after a fault, every one must be settled once its lease expires)."""
        owners = await self.client.smembers(self._owners_key)
        return sum([await self.client.hlen(owner) for owner in owners])

    async def maintain(self) -> None:
        """Once a second (the worker's readiness tick): every third of a lease, renew
        this store's lease with the progress of its open reservations; then settle
        what owners whose lease expired left (a worker killed with streams open).
        Never raises: an unreachable store is the breaker's business."""
        now = time.monotonic()
        try:
            if now - self._renewed >= self._lease_ms / 3000:
                args: list[str | float] = [self._lease_ms]
                for field, leased in self._leases.items():
                    args += (field, leased.record(leased.progress()))
                script = self._renew
                await self._batch.submit(
                    script.script, script.sha, [self._lease_key], args, bounded=False
                )
                self._renewed = now
            script = self._sweep
            metered, estimated = await self._batch.submit(
                script.script, script.sha, [self._owners_key], [], bounded=False
            )
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            log.debug("lease upkeep failed: %s", exc)  # an outage: the breaker tells
            return
        except RedisError as exc:  # the server refused a script: say so
            log.warning("rate-limit store %s: lease upkeep failed: %s", self.where, exc)
            return
        if metered or estimated:
            log.warning(
                "rate-limit store %s: settled %d reservations a dead worker left "
                "(%d from its metered usage, %d at their estimate)",
                self.where,
                metered + estimated,
                metered,
                estimated,
            )
            if self._metrics is not None:
                expired = self._metrics.ratelimit_leases_expired
                expired.labels(self.name, "metered").inc(metered)
                expired.labels(self.name, "estimated").inc(estimated)

    async def _run_settle(self, keys: list[str], args: list[str | float]) -> None:
        try:
            self._check_breaker("settle")
            script = self._settle
            await self._batch.submit(script.script, script.sha, keys, args, bounded=False)
        except StoreUnavailable:
            return  # counted and logged by the breaker
        except (RedisError, OSError) as exc:
            self._failed("settle", exc)
            return
        self._recovered()

    @property
    def key_prefix(self) -> str:
        return self._prefix

    async def run_script(
        self,
        script: str,
        sha: str,
        keys: Sequence[str],
        args: Sequence[str | float],
        *,
        op: str,
        bounded: bool = True,
    ) -> object:
        """One more script through this store's batcher and breaker, for other state
        kept in the same Redis (the spend budgets): one client, one pool, one outage
        view. Raises StoreUnavailable or StoreBusy as `acquire` does."""
        self._check_breaker(op)
        try:
            pending = self._batch.submit(script, sha, keys, args, bounded=bounded)
        except StoreBusy:
            self._count_error(f"{op}_busy")
            raise
        try:
            reply = await pending
        except (RedisError, OSError) as exc:
            raise self._failed(op, exc) from None
        self._recovered()
        return reply

    async def ping(self) -> str | None:
        """None when Redis answers a PING, else why not (for readiness; it also notices
        a recovery when no request comes by)."""
        try:
            await self.client.ping()
        except (RedisError, OSError) as exc:
            self._failed("ping", exc)
            return f"rate-limit store {self.where} unreachable"
        self._recovered()
        return None

    async def close(self) -> None:
        if self._orphans:
            await asyncio.wait(set(self._orphans), timeout=1.0)
        await self._batch.close()
        await self.client.aclose()
        await self.client.connection_pool.disconnect()

    def _check_generation(self, generation: bytes) -> None:
        previous, self._generation = self._generation, generation
        if previous is None or previous == generation:
            return
        log.error(
            "rate-limit store %s lost its state (restarted without persistence, or "
            "flushed): every limit starts again from full; run Redis with appendonly yes",
            self.where,
        )
        if self._metrics is not None:
            self._metrics.ratelimit_store_restarts.labels(self.name).inc()

    # -- outage bookkeeping -------------------------------------------------------------

    def _check_breaker(self, op: str) -> None:
        if self._down_since and time.monotonic() < self._down_until:
            self._count_error(f"{op}_skipped")
            raise StoreUnavailable(f"rate-limit store {self.where} is down")

    def _failed(self, op: str, exc: BaseException) -> StoreUnavailable:
        now = time.monotonic()
        self._count_error(op)
        reason = f"{type(exc).__name__}: {exc}"
        if not self._down_since:
            self._down_since = now
            log.error(
                "rate-limit store %s unreachable (%s); retrying every %.1fs",
                self.where,
                reason,
                self._retry_interval,
            )
            if self._metrics is not None:
                self._metrics.ratelimit_store_up.labels(self.name).set(0)
        else:
            log.debug("rate-limit store %s still unreachable: %s", self.where, reason)
        self._down_until = now + self._retry_interval
        return StoreUnavailable(reason)

    def _recovered(self) -> None:
        if self._down_since:
            log.warning(
                "rate-limit store %s reachable again after %.1fs",
                self.where,
                time.monotonic() - self._down_since,
            )
            self._down_since = 0.0
            self._down_until = 0.0
            if self._metrics is not None:
                self._metrics.ratelimit_store_up.labels(self.name).set(1)

    def _count_error(self, op: str) -> None:
        if self._metrics is not None:
            self._metrics.ratelimit_store_errors.labels(self.name, op).inc()


@dataclass(slots=True)
class _Open:
    """A reservation this store leased: its buckets, and where its progress comes from."""

    keys: list[str]
    rates: list[Rate]
    costs: list[float]
    progress: Callable[[], list[int] | None]

    def record(self, used: list[int] | None) -> str:
        """One line per bucket: key, interval (ms), reserved, used so far ('' unknown)."""
        return "\n".join(
            f"{key}\t{rate.interval * 1000!r}\t{cost!r}\t{'' if used is None else used[i]}"
            for i, (key, rate, cost) in enumerate(
                zip(self.keys, self.rates, self.costs, strict=True)
            )
        )
