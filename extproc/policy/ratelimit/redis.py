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

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from extproc.metrics import Metrics
from extproc.policy.ratelimit.batch import ScriptBatcher
from extproc.policy.ratelimit.gcra import SLACK, Rate
from extproc.policy.ratelimit.store import Outcome, StoreBusy, StoreUnavailable

log = logging.getLogger("extproc.ratelimit")
GENERATION_KEY = "generation"  # after the prefix; bucket keys always hold ":r:" or ":t:"

# Times are milliseconds as doubles (the Redis clock is ~1.7e12 ms: precise to ~0.25
# microseconds). Numbers go back as strings: Redis truncates Lua numbers to integers.
# Keep the arithmetic identical to gcra.acquire/fits (SLACK included).
# Both scripts start the same: the caller's clock when it sends one, else Redis's.
_NOW_LUA = """
local now = tonumber(ARGV[1])
if now == nil then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end
"""
ACQUIRE_LUA = (
    _NOW_LUA
    + """local slack = tonumber(ARGV[2])
-- The last key is the store's generation: written once, never expiring. Gone means
-- Redis restarted without persistence or was flushed, and every bucket is full again.
local n = #KEYS - 1
local gen = redis.call('GET', KEYS[n + 1])
if not gen then
  local t = redis.call('TIME')
  gen = t[1] .. '.' .. t[2]
  redis.call('SET', KEYS[n + 1], gen)
end
local tats, ok, blocked = {}, 1, {}
for i = 1, n do
  local b = 3 * i
  local interval, window, cost = tonumber(ARGV[b]), tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2])
  local tat = tonumber(redis.call('GET', KEYS[i])) or now
  tats[i] = tat
  if tat < now then tat = now end
  if tat + cost * interval - now > window + slack * interval then
    ok = 0
    blocked[#blocked + 1] = tostring(i - 1)
  end
end
local out = {ok, string.format('%.6f', now), gen}
for i = 1, n do
  local tat = tats[i]
  if ok == 1 then
    local b = 3 * i
    if tat < now then tat = now end
    tat = tat + tonumber(ARGV[b + 2]) * tonumber(ARGV[b])
    if tat > now then
      redis.call('SET', KEYS[i], string.format('%.6f', tat),
                 'PX', string.format('%d', math.ceil(tat - now) + 1000))
    end
  end
  out[#out + 1] = string.format('%.6f', tat)
end
out[#out + 1] = table.concat(blocked, ',')
return out
"""
)

# Settle: move each bucket by delta units (refund < 0, charge > 0), never above full.
SETTLE_LUA = (
    _NOW_LUA
    + """for i = 1, #KEYS do
  local b = 2 * i
  local interval, delta = tonumber(ARGV[b]), tonumber(ARGV[b + 1])
  local tat = tonumber(redis.call('GET', KEYS[i])) or now
  if tat < now then tat = now end
  tat = tat + delta * interval
  if tat > now then
    redis.call('SET', KEYS[i], string.format('%.6f', tat),
               'PX', string.format('%d', math.ceil(tat - now) + 1000))
  else
    redis.call('DEL', KEYS[i])
  end
end
return 1
"""
)


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
    ) -> None:
        """`clock` (seconds) replaces the Redis server's clock: for tests only."""
        self.where = redacted(url)
        self._prefix = key_prefix
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
        self._batch = ScriptBatcher(self.client, max_connections, max_pending)
        if metrics is not None:
            metrics.ratelimit_store_up.labels(self.name).set(1)

    @property
    def up(self) -> bool:
        return not self._down_since

    def _now_arg(self) -> str:
        return "" if self._clock is None else f"{self._clock() * 1000:.6f}"

    async def acquire(
        self, keys: Sequence[str], rates: Sequence[Rate], costs: Sequence[float]
    ) -> Outcome:
        self._check_breaker("acquire")
        args: list[str | float] = [self._now_arg(), SLACK]
        for rate, cost in zip(rates, costs, strict=True):
            args += (rate.interval * 1000, rate.window * 1000, cost)
        n = len(keys)
        keys = [*(self._prefix + k for k in keys), self._prefix + GENERATION_KEY]
        try:
            pending = self._batch.submit(self._acquire.script, self._acquire.sha, keys, args)
        except StoreBusy:
            self._count_error("acquire_busy")
            raise
        try:
            reply = await pending
        except (RedisError, OSError) as exc:
            raise self._failed("acquire", exc) from None
        self._recovered()
        self._check_generation(reply[2])
        now = float(reply[1]) / 1000
        tats = [float(t) / 1000 for t in reply[3 : 3 + n]]
        blocked = [int(i) for i in reply[-1].split(b",") if i]
        return Outcome(bool(reply[0]), now, tats, blocked)

    def settle(
        self, keys: Sequence[str], rates: Sequence[Rate], deltas: Sequence[float]
    ) -> Awaitable[None]:
        args: list[str | float] = [self._now_arg()]
        for rate, delta in zip(rates, deltas, strict=True):
            args += (rate.interval * 1000, delta)
        return self._run_settle([self._prefix + k for k in keys], args)

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
