"""Request and token rate limits (GCRA), in process or shared through Redis.

`build` turns the `rate_limits:` section into the stage. The store lives in `Shared`,
so counters and the Redis connection pool survive policy reloads; a reload that
changes the Redis address, credentials or timeouts gets a new store.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from extproc.config import Config, RedisConfig
from extproc.metrics import Metrics
from extproc.policy.ratelimit.local import LocalStore
from extproc.policy.ratelimit.stage import RateLimitStage
from extproc.policy.ratelimit.store import Store

if TYPE_CHECKING:
    from extproc.policy import Shared
    from extproc.policy.ratelimit.redis import RedisStore

__all__ = ["RateLimitRedis", "RateLimitStage", "build"]

log = logging.getLogger("extproc.ratelimit")


def build(config: Config, shared: Shared, environ: Mapping[str, str]) -> RateLimitStage | None:
    section = config.rate_limits
    if section is None or not section.limits:
        return None
    metrics = shared.metrics
    store: Store
    if section.store == "redis":
        assert section.redis is not None
        store = _redis_store(section.redis, shared, environ, metrics)
    else:
        if shared.ratelimit_local is None:
            shared.ratelimit_local = LocalStore()
        store = shared.ratelimit_local
    return RateLimitStage(section, store, metrics)


def _password(redis: RedisConfig, environ: Mapping[str, str]) -> str | None:
    if redis.password_env:
        value = environ.get(redis.password_env)
        if not value:
            log.warning("rate_limits.redis.password_env: %s is not set", redis.password_env)
        return value or None
    if redis.password_file:
        try:
            return Path(redis.password_file).read_text().strip() or None
        except OSError as exc:
            log.warning("rate_limits.redis.password_file: cannot read: %s", exc.strerror)
    return None


class RateLimitRedis:
    """The Redis store as `Shared` keeps it: one slot per process, holding the store of
    the current policy (a reload with the same address, credentials and timeouts keeps
    it, counters and pool included; another one replaces it).

    `readiness_check` is found by the worker's readiness probe: it pings Redis once a
    second (which also notices a recovery when no request comes by) and reports the
    worker not ready while Redis is unreachable, under `failure_mode: closed` only.
    The same tick keeps the reservation leases (`RedisStore.maintain`): it renews this
    worker's, and settles those of a worker that died. A store replaced by a reload
    keeps being maintained while reservations of its streams are open.
    """

    def __init__(self) -> None:
        self.identity = ""
        self.store: RedisStore | None = None
        self.retired: list[RedisStore] = []
        self.fail_closed = False

    async def readiness_check(self) -> str | None:
        store = self.store
        if store is None:
            return None
        reason = await store.ping()
        self.retired = [old for old in self.retired if old.open_leases]
        for each in (store, *self.retired):
            await each.maintain()
        return reason if self.fail_closed else None


def _redis_store(
    redis: RedisConfig, shared: Shared, environ: Mapping[str, str], metrics: Metrics
) -> Store:
    from extproc.policy.ratelimit.redis import RedisStore  # redis-py only when configured

    password = _password(redis, environ)
    fingerprint = hashlib.sha256((password or "").encode()).hexdigest()[:16]
    identity = (
        f"{redis.url}|{redis.username}|{fingerprint}|{redis.key_prefix}"
        f"|{redis.timeout_ms}|{redis.retry_interval_ms}|{redis.max_connections}"
        f"|{redis.max_pending}|{redis.lease_seconds}"
    )
    if shared.ratelimit_redis is None:
        shared.ratelimit_redis = RateLimitRedis()
    slot = shared.ratelimit_redis
    if slot.store is None or slot.identity != identity:
        # Streams still running under the old policy keep (and settle through) the old
        # store; it is closed when they and it are gone.
        if slot.store is not None:
            slot.retired.append(slot.store)
        slot.store = RedisStore(
            redis.url,
            username=redis.username,
            password=password,
            key_prefix=redis.key_prefix,
            timeout=redis.timeout_ms / 1000,
            retry_interval=redis.retry_interval_ms / 1000,
            max_connections=redis.max_connections,
            max_pending=redis.max_pending,
            metrics=metrics,
            lease_seconds=redis.lease_seconds,
        )
        slot.identity = identity
    slot.fail_closed = redis.failure_mode == "closed"
    return slot.store
