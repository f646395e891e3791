"""The router-level half of failover: for a request to an alias with `targets`, drop
the targets that must be skipped (circuit open, provider quota used up), send the
request to the Envoy route of the remaining set, and once an answer comes, learn which
target gave it (the upstream filter's response header): charge it, refund the others,
and answer one OpenAI-style 503 naming the alias when every target failed."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from extproc.config import Config
from extproc.errors import shown
from extproc.failover.plan import (
    FAILOVER_HEADER,
    STASH_KEY,
    TARGET_HEADER,
    Circuits,
    Target,
    failover_aliases,
    route_value,
)
from extproc.metrics import Metrics
from extproc.policy import credentials
from extproc.policy.ratelimit.gcra import Rate
from extproc.policy.stage import Refusal, RequestContext, Stage
from extproc.providers import FAMILIES
from extproc.translate import registry
from extproc.usage import Usage

if TYPE_CHECKING:
    from extproc.policy import Shared
    from extproc.policy.ratelimit.store import Store

log = logging.getLogger("extproc.failover")
ALIAS_SCRATCH = "failover_alias"  # set by the model stage: the alias asked for


@dataclass(slots=True)
class Quota:
    """A provider's own limit: keys and rates of its request and token buckets."""

    keys: list[str]
    rates: list[Rate]

    def costs(self, requests: float, tokens: float) -> list[float]:
        return [requests if k.endswith(":requests") else tokens for k in self.keys]


@dataclass(slots=True)
class Choice:
    """What one request may try, and what it holds."""

    alias: str
    targets: tuple[Target, ...]  # in the order (or the split) Envoy will try them
    held: dict[int, Quota] = field(default_factory=dict)  # target index -> reservation
    answered: Target | None = None
    attempts: int = 0


def quotas_of(config: Config) -> dict[str, Quota]:
    out = {}
    for name, provider in config.providers.items():
        limits = provider.limits
        if limits is None:
            continue
        keys, rates = [], []
        for unit, amount in (("requests", limits.requests), ("tokens", limits.tokens)):
            if amount:
                keys.append(f"provider:{name}:{limits.window_seconds}:{unit}")
                rates.append(Rate(amount, float(limits.window_seconds)))
        out[name] = Quota(keys, rates)
    return out


class FailoverStage(Stage):
    name = "failover"

    def __init__(
        self,
        config: Config,
        circuits: Circuits,
        store: Store,
        metrics: Metrics,
        keys: Mapping[str, str],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.aliases = failover_aliases(config)
        self.retry_statuses = frozenset(config.models.failover.retry_statuses)
        self.circuits = circuits
        self.store = store
        self.quotas = quotas_of(config)
        self.metrics = metrics
        self.keys = keys  # provider credentials, for the upstream filter
        # (client API, provider) -> translator, for targets in another API
        self.translators = registry.build(config.providers, config.streaming.max_frame_bytes)
        self.clock = clock

    async def on_request(self, ctx: RequestContext) -> None:
        alias = ctx.scratch.get(ALIAS_SCRATCH)
        if alias is None:
            return
        if ctx.info is not None and STASH_KEY in ctx.info.body:
            # The upstream attempt takes its path and source API from this key: a
            # client's copy would send the request, with the provider's credential,
            # to a path (or through a translation) the policy never checked.
            raise Refusal(
                400,
                f"The body key '{STASH_KEY}' is reserved for the gateway; remove it.",
                "invalid_request",
                kind="bad_request",
                param=STASH_KEY,
            )
        now = self.clock()
        counter = self.metrics.failover_attempts
        choice = Choice(alias, ())
        usable = []
        for target in self.aliases[alias]:
            if not self.circuits.usable(target, now):
                counter.labels(alias, target.label, "skipped_circuit").inc()
                continue
            quota = self.quotas.get(target.provider)
            if quota is not None:
                outcome = await self.store.acquire(quota.keys, quota.rates, quota.costs(1, 1))
                if not outcome.admitted:
                    counter.labels(alias, target.label, "skipped_quota").inc()
                    continue
                choice.held[target.index] = quota
            usable.append(target)
        if not usable:
            raise _exhausted(alias, "every target is skipped for now (failing, or over quota)")
        choice.targets = tuple(usable)
        ctx.scratch[self.name] = choice
        mask = sum(1 << t.index for t in usable)
        ctx.upstream_headers[FAILOVER_HEADER] = f"{ctx.route.name}/{route_value(alias, mask)}"
        ctx.clear_route_cache = True
        ctx.response_remove.append(TARGET_HEADER)
        ctx.metadata["alias"] = alias
        first = usable[0]
        info = ctx.info
        if info is not None and any(
            ctx.format not in FAMILIES[self.config.providers[t.provider].format] for t in usable
        ):
            # A target in another API: its attempt translates, and must know from what.
            info.body[STASH_KEY] = {"api": ctx.format.name, "path": credentials.wire_path(ctx)}
            ctx.body_dirty = True
        # Stages after this one (limits, spend) see the provider and model tried first;
        # the answer's target replaces both (on_response_headers).
        ctx.provider = self.config.providers[first.provider]
        ctx.alternatives = tuple((t.provider, t.model) for t in usable[1:])
        if ctx.info is not None and ctx.info.body.get("model") != first.model:
            ctx.info.model = first.model  # each attempt sets its own; this one names it
            ctx.info.body["model"] = first.model
            ctx.body_dirty = True

    def on_response_headers(self, ctx: RequestContext) -> None:
        choice: Choice | None = ctx.scratch.get(self.name)
        if choice is None:
            return
        index, _, attempts = ctx.upstream_response.get(TARGET_HEADER, "").partition(";")
        answered = next((t for t in choice.targets if str(t.index) == index), None)
        choice.answered = answered
        choice.attempts = int(attempts) if attempts.isdigit() else 0
        now = self.clock()
        failed = ctx.status in self.retry_statuses or ctx.status >= 500 or answered is None
        if answered is None and ctx.status < 400:
            # An answer that no attempt filter marked: Envoy has no route for this
            # target set (a policy reloaded with new targets, the bootstrap not).
            log.error(
                "failover: alias %s answered without an attempt filter; render Envoy's "
                "bootstrap again (`extproc envoy-config`) after changing targets",
                shown(choice.alias),
            )
        self._learn(choice, answered, failed, now)
        if answered is not None:
            ctx.metadata["target"] = answered.label
            ctx.metadata["attempts"] = choice.attempts
            provider = ctx.provider = self.config.providers[answered.provider]
            if ctx.info is not None:
                ctx.info.model = answered.model  # metered and logged as what answered
            if not failed and ctx.format not in FAMILIES[provider.format]:
                # Another API answered: the exchange reads it through the translator.
                translator = self.translators.get((ctx.format.name, provider.name))
                ctx.answered_by = (translator, answered.model) if translator else None
        if failed:
            choice.answered = None  # nothing to charge: every reservation is refunded
            tried = choice.attempts or len(choice.targets)
            raise _exhausted(choice.alias, f"{tried} attempt(s) failed, the last with {ctx.status}")

    def _learn(self, choice: Choice, answered: Target | None, failed: bool, now: float) -> None:
        """Circuit state from what the answer shows: in an order, every target before
        the one that answered failed; in a split, only when each target had its try."""
        circuits = self.circuits
        if answered is None:
            for target in choice.targets:
                circuits.record(target, False, now)
            return
        circuits.record(answered, not failed, now)
        before: tuple[Target, ...] = ()
        if answered.weight is None:
            before = choice.targets[: choice.targets.index(answered)]
        elif choice.attempts == len(choice.targets):
            before = tuple(t for t in choice.targets if t is not answered)
        for target in before:
            if circuits.record(target, False, now):
                log.warning(
                    "failover: skipping %s of alias %s for %ds (consecutive failures)",
                    target.label,
                    shown(choice.alias),
                    circuits.skip_seconds,
                )

    def on_complete(
        self, ctx: RequestContext, usage: Usage, complete: bool
    ) -> Awaitable[None] | None:
        """The target that answered is charged (its tokens); every other reservation
        is refunded."""
        choice: Choice | None = ctx.scratch.get(self.name)
        if choice is None or not choice.held:
            return None
        pending = []
        for index, quota in choice.held.items():
            if choice.answered is not None and choice.answered.index == index:
                deltas = quota.costs(0, max(usage.total_tokens - 1, 0))
            else:
                deltas = quota.costs(-1, -1)
            if any(deltas):
                done = self.store.settle(quota.keys, quota.rates, deltas)
                if done is not None:
                    pending.append(done)
        return _all(pending) if pending else None


async def _all(pending: list[Awaitable[None]]) -> None:
    for each in pending:
        await each


def _exhausted(alias: str, why: str) -> Refusal:
    return Refusal(
        503,
        f"The model '{shown(alias)}' is unavailable: {why}. Retry later.",
        "model_unavailable",
        kind="failover_exhausted",
    )


def circuits_of(config: Config, shared: Shared) -> Circuits:
    """The process's circuit state (it outlives reloads); settings follow the policy."""
    failover = config.models.failover
    circuits: Circuits | None = shared.failover
    if circuits is None:
        circuits = shared.failover = Circuits(failover.failures_to_skip, failover.skip_seconds)
    circuits.failures_to_skip = failover.failures_to_skip
    circuits.skip_seconds = failover.skip_seconds
    return circuits


def _store(config: Config, shared: Shared, environ: Mapping[str, str]) -> Store:
    """The rate-limit store: Redis when `rate_limits.store: redis`, else this process's."""
    section = config.rate_limits
    if section is not None and section.store == "redis" and section.redis is not None:
        from extproc.policy.ratelimit import _redis_store

        return _redis_store(section.redis, shared, environ, shared.metrics)
    from extproc.policy.ratelimit.local import LocalStore

    if shared.ratelimit_local is None:
        shared.ratelimit_local = LocalStore()
    return shared.ratelimit_local


def build(config: Config, shared: Shared, environ: Mapping[str, str]) -> FailoverStage | None:
    if not failover_aliases(config):
        return None
    return FailoverStage(
        config,
        circuits_of(config, shared),
        _store(config, shared, environ),
        shared.metrics,
        credentials.provider_keys(config, environ),
    )
