"""The policy snapshot every exchange runs under: config, resolved secrets, stages.

A new `Policy` is built on every (re)load and swapped whole; an exchange keeps the one
it started with, so streams in flight finish under their own rules. What must outlive
a reload (rate-limit counters, JWKS caches, connections) lives in `Shared`, which is
made once per process.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from extproc.config import Config
from extproc.labels import MetricLabels
from extproc.metrics import Metrics
from extproc.policy.stage import (
    QuietFilter,
    Refusal,
    RequestContext,
    Stage,
    StreamBlocked,
    StreamFilter,
    is_quiet_filter,
)

__all__ = [
    "Policy",
    "QuietFilter",
    "Refusal",
    "RequestContext",
    "Shared",
    "Stage",
    "StreamBlocked",
    "StreamFilter",
    "build_policy",
    "is_quiet_filter",
    "stage_builders",
]

if TYPE_CHECKING:
    import aiohttp

    from extproc._gen.guard_pb2_grpc import GuardServiceStub
    from extproc.cloudauth import CloudAuth, Refresher
    from extproc.failover.plan import Circuits
    from extproc.policy.jwks import JwksCache
    from extproc.policy.ratelimit import RateLimitRedis
    from extproc.policy.ratelimit.local import LocalStore
    from extproc.spend.runtime import SpendShared
    from extproc.telemetry import Tracing

log = logging.getLogger("extproc.policy")


class Shared:
    """Process-wide objects that survive policy reloads, one typed field per kind.

    A stage reads the field it needs and fills it on first use. There are no string
    keys: a missing or misspelt one used to make a second object silently (a second
    `Metrics` nobody scrapes). The worker passes its own `Metrics`, so every stage
    counts into the registry it serves; made alone (tests, benchmarks), it has its own.
    """

    def __init__(self, metrics: Metrics | None = None, worker: int = 0) -> None:
        self.metrics = metrics if metrics is not None else Metrics()
        self.worker = worker  # this process's index among the supervisor's workers
        self.ratelimit_local: LocalStore | None = None  # rate_limits.store: local
        self.ratelimit_redis: RateLimitRedis | None = None  # the Redis store's slot
        self.guards_http: aiohttp.ClientSession | None = None  # HTTP guard webhooks
        self.guards_grpc: dict[tuple[bool, str], GuardServiceStub] = {}  # by (TLS, target)
        self.jwks: dict[tuple[str | None, str | None, str | None], JwksCache] = {}  # by source
        self.tracing: Tracing | None = None  # telemetry: the process's span export
        self.spend: SpendShared | None = None  # spend: ledger writer, local budgets
        self.cloud_auth: dict[tuple, Refresher] = {}  # providers' auth: tokens, AWS keys
        self.failover: Circuits | None = None  # alias targets' circuit state

    def values(self) -> list[Any]:
        """Everything held (the readiness probe looks for `readiness_check` on each)."""
        single = (
            self.metrics,
            self.spend,  # before the HTTP session its soft-limit calls use
            self.ratelimit_local,
            self.ratelimit_redis,
            self.guards_http,
            self.tracing,
        )
        held = [item for item in single if item is not None]
        return [*held, *self.guards_grpc.values(), *self.jwks.values(), *self.cloud_auth.values()]

    async def start(self) -> None:
        """Before the worker serves: what must run first (the spend ledger's journal
        replay, budgets rebuilt from the ledger)."""
        if self.spend is not None:
            await self.spend.start()

    async def aclose(self) -> None:
        """At shutdown: close what holds connections (HTTP sessions, gRPC channels,
        Redis pools), each whichever way it offers."""
        for item in self.values():
            for name in ("aclose", "close"):
                close = getattr(item, name, None)
                if close is None:
                    continue
                try:
                    result = close()
                    if inspect.isawaitable(result):
                        await result
                except Exception as exc:  # one broken close must not stop the others
                    log.warning("closing %s failed: %r", type(item).__name__, exc)
                break


@dataclass(frozen=True, slots=True)
class Policy:
    config: Config
    stages: tuple[Stage, ...] = ()
    labels: MetricLabels = None  # type: ignore[assignment]  # made from config when None
    tracing: Tracing | None = None  # telemetry: on; the exchange records its span there
    cloud: CloudAuth | None = None  # providers' `auth:`: signs or authorizes upstream

    def __post_init__(self) -> None:
        if self.labels is None:
            object.__setattr__(self, "labels", MetricLabels.of(self.config))


# Each builder turns the config into a stage (or None when its section is absent).
StageBuilder = Callable[[Config, Shared, Mapping[str, str]], Stage | None]


def stage_builders() -> list[StageBuilder]:
    """In the order stages run: who is calling (auth), what they may use (models), what
    they send and get (guards), how much (limits, then spend), what the trace may show (capture,
    after the guards). One line per stage module."""
    # Lazy: stage modules import this package.
    from extproc.failover import stage as failover
    from extproc.policy import auth, capture, guards, models, ratelimit, spend

    return [
        auth.build,
        models.build,
        failover.build,
        guards.build,
        ratelimit.build,
        spend.build,
        capture.build,
    ]


def build_policy(
    config: Config, shared: Shared | None = None, environ: Mapping[str, str] | None = None
) -> Policy:
    env = os.environ if environ is None else environ
    shared = shared or Shared()
    stages = tuple(
        stage for build in stage_builders() if (stage := build(config, shared, env)) is not None
    )
    if config.telemetry.endpoint is not None or shared.tracing is not None:
        from extproc.telemetry import tracing_for  # the OTel SDK loads only when used

        shared.tracing = tracing_for(config.telemetry, shared.metrics, shared.tracing)
    cloud = None
    if shared.cloud_auth or any(p.auth is not None for p in config.providers.values()):
        from extproc import cloudauth  # botocore and the token SDKs load only when used

        cloud = cloudauth.build(config, shared, env)
    return Policy(config=config, stages=stages, tracing=shared.tracing, cloud=cloud)
