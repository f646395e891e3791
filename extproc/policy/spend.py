"""The spend stage: price every exchange, keep it inside its budgets, write the ledger.

Two-phase, as the token rate limits: before the request goes upstream its worst case
(prompt estimate x the dearest input rate + max output x the dearest output rate) is
reserved in every budget that applies (consumer, each team, route, model, global),
all or none, atomically (the in-process store, or the Redis one sharing the rate
limits' connection). Over budget: 429 (or 402) `budget_exceeded` naming the budget
and when it resets. When the exchange ends the exact cost, from the metered usage,
settles the reservation: a stream cut short pays for what streamed, a refused or
failed upstream call for nothing. The cost goes to the metric, the access log
(`cost_usd`), the ledger (one row per exchange) and, on a JSON answer, a header.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from extproc.config import Config
from extproc.labels import LEARN, LabelValues
from extproc.policy.ratelimit.stage import estimate_prompt
from extproc.policy.ratelimit.store import StoreBusy, StoreUnavailable
from extproc.policy.stage import Refusal, RequestContext, Stage
from extproc.spend.budgets import Check, Outcome, Planner, Subject, refusal, remaining_micros
from extproc.spend.ledger import Row
from extproc.spend.prices import (
    PICO_PER_MICRO,
    Price,
    PriceBook,
    Unpriced,
    cost_of,
    worst_case_of,
)
from extproc.spend.store import BudgetStore, LocalBudgetStore
from extproc.usage import Usage

if TYPE_CHECKING:
    from extproc.metrics import Metrics
    from extproc.policy import Shared
    from extproc.spend.ledger import Ledger
    from extproc.spend.runtime import SpendShared
    from extproc.spend.settings import BudgetsConfig

log = logging.getLogger("extproc.spend")

SCRATCH = "spend"
COST_HEADER = "x-ai-gateway-cost-usd"
REMAINING_HEADER = "x-ai-gateway-budget-remaining-usd"


def usd(micros: int) -> str:
    """Micro-dollars as an exact decimal string: 1234 -> '0.001234'."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), 1_000_000)
    return f"{sign}{whole}.{frac:06d}"


def micros_of(picos: int) -> int:
    """Pico-dollars -> micro-dollars, half up (the unit of budgets and the ledger)."""
    return (picos + PICO_PER_MICRO // 2) // PICO_PER_MICRO


@dataclass(slots=True)
class _Spend:
    """What on_request learnt, for on_complete to settle and record."""

    price: Price | None
    teams: tuple[str, ...]
    priced: tuple[str, str] = ("", "")  # the (provider, model) `price` is for
    checks: list[Check] = field(default_factory=list)
    reserved: int = 0  # micro-dollars
    refused: str = ""  # why this stage refused the request
    finish_reason: str = ""  # a JSON answer's, read in on_completion


class SpendStage(Stage):
    name = "spend"

    def __init__(
        self,
        config: Config,
        book: PriceBook,
        planner: Planner | None,
        store: BudgetStore | None,
        runtime: SpendShared,
        metrics: Metrics,
        ledger: Ledger | None,
        fail_open: bool = True,
        retry_interval: float = 1.0,
    ) -> None:
        self.book = book
        self.planner = planner
        self.store = store
        self.runtime = runtime
        self.metrics = metrics
        self.ledger = ledger
        self.fail_open = fail_open
        self.retry_interval = retry_interval
        self.budgets: BudgetsConfig | None = config.budgets
        self.status = config.budgets.over_budget_status if config.budgets else 429
        self.default_output = config.budgets.default_max_output_tokens if config.budgets else 0
        self.consumer_teams = {n: c.teams for n, c in config.consumers.items()}
        jwt = config.auth.jwt
        self.team_claim = jwt.team_claim if jwt is not None else None
        teams = {t for c in config.consumers.values() for t in c.teams}
        if config.budgets is not None:
            teams.update(
                b.match for b in config.budgets.items.values() if b.scope == "team" and b.match
            )
        self.team_label = LabelValues(
            frozenset({"none", *teams}), open=self.team_claim is not None, learn=LEARN
        )
        self.provider_label = LabelValues(frozenset(config.providers), open=False, learn=0)
        self.formats = {name: p.format for name, p in config.providers.items()}
        from extproc.labels import MetricLabels

        self.labels = MetricLabels.of(config)
        for o in book.overrides:  # a priced model is a known label too
            self.labels.model.known |= {o.model}

    # -- request --------------------------------------------------------------------------

    async def on_request(self, ctx: RequestContext) -> None:
        info = ctx.info
        if info is None or not info.model:
            return
        if not info.stream:
            ctx.buffer_response = True  # the exact cost goes in a header of the answer
        teams = self._teams(ctx)
        try:
            price = self._price(ctx, info.model)
        except Refusal:  # the ledger still records the refusal
            ctx.scratch[SCRATCH] = _Spend(None, teams, refused="model_not_priced")
            raise
        spend = ctx.scratch[SCRATCH] = _Spend(price, teams, (ctx.provider.name, info.model))
        if self.planner is None or self.store is None:
            return
        subject = Subject(ctx.consumer, teams, ctx.route.name, info.model)
        checks = self.planner.checks(subject)
        if not checks:
            return
        asked = info.max_output_tokens
        output = asked if isinstance(asked, int) and asked > 0 else self.default_output
        assert price is not None  # an unpriced model under `refuse` raised already
        prompt = estimate_prompt(info)
        worst_picos = max(
            worst_case_of(prompt, output, p) for p in (price, *self._alternatives(ctx))
        )
        worst = -(-worst_picos // PICO_PER_MICRO)
        try:
            outcome = await self.store.reserve(checks, worst)
        except StoreUnavailable:
            self._count(checks, "fail_open" if self.fail_open else "fail_closed")
            if self.fail_open:
                return  # admitted unchecked: nothing reserved, nothing to settle
            raise Refusal(
                503,
                "The gateway cannot check this request's spend budgets right now (their "
                "store is unreachable), so the request was not sent. Try again shortly.",
                "budget_unavailable",
                kind="budget_unavailable",
                headers={"retry-after": str(max(1, math.ceil(self.retry_interval)))},
            ) from None
        except StoreBusy:
            self._count(checks, "busy")
            raise Refusal(
                503,
                "The gateway is checking too many requests against its budgets right now, "
                "so this one was not sent. Try again shortly.",
                "budget_unavailable",
                kind="budget_unavailable",
                headers={"retry-after": "1"},
            ) from None
        left = remaining_micros(checks, outcome.spent)
        if left is not None:
            ctx.response_headers[REMAINING_HEADER] = usd(left)
        if not outcome.admitted:
            over = refusal(checks, outcome)
            assert over is not None
            for i in outcome.blocked:
                self.metrics.budget_decisions.labels(checks[i].budget.name, "exceeded").inc()
            spend.refused = "budget_exceeded"
            wait = max(1, math.ceil(over.resets_at - time.time()))
            never = worst > over.limit_micros  # it would not fit an empty budget either
            advice = (
                f"more than the whole budget: lower max_tokens. {over.message()}."
                if never
                else f"more than is left: {over.message()}."
            )
            # SDKs retry a 429 by default; before the reset it would fail the same way.
            raise Refusal(
                self.status,
                f"This request could cost up to ${usd(worst)}, {advice}",
                "budget_exceeded",
                kind="budget_exceeded",
                param="max_tokens" if never else None,
                headers={"retry-after": str(wait), "x-should-retry": "false"},
            )
        self._count(checks, "allowed")
        spend.checks, spend.reserved = checks, worst
        self._soft(checks, outcome)

    def _teams(self, ctx: RequestContext) -> tuple[str, ...]:
        if self.team_claim is not None and self.team_claim in ctx.claims:
            claimed = ctx.claims[self.team_claim]
            if isinstance(claimed, str):
                return (claimed,) if claimed else ()
            if isinstance(claimed, list):
                return tuple(dict.fromkeys(t for t in claimed[:16] if isinstance(t, str) and t))
            return ()
        return self.consumer_teams.get(ctx.consumer, ())

    def _price(self, ctx: RequestContext, model: str) -> Price | None:
        """The model's price (counted once per exchange by status); refuses under
        `unpriced: refuse`."""
        try:
            found, status, _ = self.book.price(ctx.provider.name, model, ctx.provider.format)
        except Unpriced:
            found, status = None, "unpriced"
        label = "override" if found is not None and found.source == "override" else status
        self.metrics.price_lookups.labels(label).inc()
        if found is None:
            raise Refusal(
                400,
                f"The gateway has no price for model '{model[:96]}', and its policy "
                "refuses models it cannot price.",
                "model_not_priced",
                kind="unpriced",
                param="model",
            )
        return found

    def _alternatives(self, ctx: RequestContext) -> list[Price]:
        """Prices of the failover targets that may answer instead (an unpriced one is
        charged as the first target: see `_answered_price`)."""
        found = []
        for provider, model in ctx.alternatives:
            try:
                price, _, _ = self.book.price(provider, model, self.formats.get(provider, ""))
            except Unpriced:
                continue
            found.append(price)
        return found

    def _answered_price(self, ctx: RequestContext, spend: _Spend, model: str) -> Price | None:
        """The price of the target that answered: failover may have replaced the provider
        and model priced at the request. One with no price is charged as the reserved one
        (never zero: that would let a failover spend unbudgeted)."""
        if spend.price is None or (ctx.provider.name, model) == spend.priced:
            return spend.price
        try:
            price, _, _ = self.book.price(ctx.provider.name, model, ctx.provider.format)
        except Unpriced:
            return spend.price
        return price

    def _count(self, checks: list[Check], outcome: str) -> None:
        for c in checks:
            self.metrics.budget_decisions.labels(c.budget.name, outcome).inc()

    def _soft(self, checks: list[Check], outcome: Outcome) -> None:
        """Soft limits crossed now (the store reports each once per period)."""
        for i in outcome.soft_crossed:
            c = checks[i]
            self.metrics.budget_soft_limit.labels(c.budget.name).inc()
            log.warning(
                "budget %r for %r passed its soft limit (%.0f%%): $%s of $%s",
                c.budget.name,
                c.subject,
                (c.budget.soft_limit or 0) * 100,
                usd(outcome.spent[i]),
                usd(c.limit),
            )
            hook = self.budgets.soft_limit_webhook if self.budgets else None
            if hook is not None:
                self.runtime.notify(
                    hook.url,
                    hook.timeout_ms / 1000,
                    {
                        "event": "budget_soft_limit",
                        "budget": c.budget.name,
                        "scope": c.budget.scope,
                        "subject": c.subject,
                        "soft_limit": c.budget.soft_limit,
                        "limit_usd": usd(c.limit),
                        "spent_usd": usd(outcome.spent[i]),
                        "resets_at": int(c.resets_at),
                    },
                )

    # -- answer ---------------------------------------------------------------------------

    def on_completion(self, ctx: RequestContext, body: bytes) -> bytes | None:
        spend = ctx.scratch.get(SCRATCH)
        if spend is not None:
            spend.finish_reason = ctx.format.completion_finish_reason(body) or ""
        return None

    # -- end of exchange ------------------------------------------------------------------

    def on_complete(
        self, ctx: RequestContext, usage: Usage, complete: bool
    ) -> Awaitable[None] | None:
        spend: _Spend | None = ctx.scratch.pop(SCRATCH, None)
        if spend is None:
            return None
        model = ctx.info.model if ctx.info is not None else ""
        price = self._answered_price(ctx, spend, model)
        exact = micros_of(cost_of(usage, price)) if price is not None else 0
        consumer = ctx.consumer
        team = spend.teams[0] if spend.teams else ""
        ok = 0 < ctx.status < 400
        if exact:
            labels = self.labels
            self.metrics.cost.labels(
                labels.consumer(consumer or "anonymous"),
                self.team_label(team or "none"),
                labels.model(model or "unknown", learn=ok),
                self.provider_label(ctx.provider.name),
            ).inc(exact / 1e6)
        ctx.metadata["cost_usd"] = usd(exact)
        ctx.completion_headers[COST_HEADER] = usd(exact)
        if self.ledger is not None:
            self.ledger.record(self._row(ctx, spend, usage, complete, exact, model, team))
        if not spend.checks:
            return None
        delta = exact - spend.reserved
        store = self.store
        if isinstance(store, LocalBudgetStore):  # nothing awaits: settle now
            self._soft(spend.checks, store.settle_now(spend.checks, delta))
            return None
        assert store is not None
        return self._settle(store, spend.checks, delta)

    async def _settle(self, store: BudgetStore, checks: list[Check], delta: int) -> None:
        self._soft(checks, await store.settle(checks, delta))

    def _row(
        self,
        ctx: RequestContext,
        spend: _Spend,
        usage: Usage,
        complete: bool,
        exact: int,
        model: str,
        team: str,
    ) -> Row:
        if spend.refused:
            status, reason = "refused", spend.refused
        elif ctx.status == 0:
            status, reason = "refused", "refused"  # a later stage refused it
        elif ctx.status >= 400:
            status, reason = "error", f"upstream_{ctx.status}"
        elif not complete:
            status, reason = "aborted", "stream_aborted"
        else:
            decoder = ctx.decoder
            finish = decoder.finish_reason if decoder is not None else spend.finish_reason
            status, reason = "completed", finish or ""
        request_id = ctx.headers.get("x-request-id", "")[:128] or uuid.uuid4().hex
        return Row(
            request_id=request_id,
            ts_ms=int(time.time() * 1000),
            consumer=consumer_of(ctx),
            team=team,
            route=ctx.route.name,
            provider=ctx.provider.name,
            model=model[:256],
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            cached_tokens=usage.cached_tokens,
            cache_write_tokens=usage.cache_write_tokens,
            reasoning_tokens=usage.reasoning_tokens,
            cost_micros=exact,
            status=status,
            reason=reason[:64],
        )


def consumer_of(ctx: RequestContext) -> str:
    return ctx.consumer[:256]


# -- building ---------------------------------------------------------------------------


def build(config: Config, shared: Shared, environ: Mapping[str, str]) -> SpendStage | None:
    """The stage when any of prices, budgets, ledger is set; None otherwise."""
    if not config.spend:
        return None
    from extproc.spend.runtime import SpendShared
    from extproc.spend.settings import PricesConfig

    if shared.spend is None:
        shared.spend = SpendShared(shared.metrics, shared.worker)
    runtime = shared.spend
    if runtime.http is None:
        runtime.http = lambda: _session(shared)
    book = (config.prices or PricesConfig()).book()
    ledger = runtime.ledger_for(config.ledger) if config.ledger is not None else None
    budgets = config.budgets
    planner = store = None
    fail_open, retry = True, 1.0
    if budgets is not None and budgets.items:
        planner = Planner([b.budget() for b in budgets.items.values()], budgets.timezone)
        if budgets.store == "redis":
            from extproc.spend.redis_store import RedisBudgetStore

            slot = shared.ratelimit_redis
            assert slot is not None and slot.store is not None  # the config checks say so
            store = RedisBudgetStore(slot.store, planner.clock)
            redis = config.rate_limits.redis if config.rate_limits else None
            if redis is not None:
                fail_open = redis.failure_mode == "open"
                retry = redis.retry_interval_ms / 1000
        else:
            if runtime.local is None:
                runtime.local = LocalBudgetStore()
            store = runtime.local
            runtime.planner = planner
    return SpendStage(
        config,
        book,
        planner,
        store,
        runtime,
        shared.metrics,
        ledger,
        fail_open=fail_open,
        retry_interval=retry,
    )


def _session(shared: Shared) -> Any:
    """The guards' webhook HTTP session (one pool per process), made on first use."""
    from extproc.policy.guards.webhook import _new_session

    if shared.guards_http is None:
        shared.guards_http = _new_session()
    return shared.guards_http
