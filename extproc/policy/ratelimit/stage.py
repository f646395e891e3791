"""The rate-limit stage: which limits a request meets, reserve, answer, settle.

Two-phase token accounting. At request time the expected cost is reserved: the prompt
estimated offline plus `max_tokens` / `max_completion_tokens` (or the configured
default). A request that does not fit is refused before it reaches the provider, so N
concurrent requests can never overspend by more than the error of their reservations
(prompt estimate vs real prompt, output beyond the reserved maximum). When the
exchange ends, the real usage settles each reservation (refund or charge the
difference); a stream cut short is charged for what was streamed (the exchange's
estimate), a failed or refused upstream call for nothing.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from extproc.config import LimitConfig, RateLimitsConfig
from extproc.errors import shown
from extproc.metrics import Metrics
from extproc.policy.ratelimit import gcra
from extproc.policy.ratelimit.gcra import Rate
from extproc.policy.ratelimit.store import Lease, Outcome, Store, StoreBusy, StoreUnavailable
from extproc.policy.stage import Refusal, RequestContext, Stage
from extproc.providers.base import RequestInfo
from extproc.usage import Usage

REQUESTS = "requests"
TOKENS = "tokens"
SCRATCH = "ratelimit"
# A key part that is not short and plain (a client-chosen model name, say) is hashed,
# so keys stay bounded and unambiguous whatever the client sends.
_PLAIN = re.compile(r"[A-Za-z0-9._@:/+=-]{1,96}")
_SCOPE = {"consumer": "consumer", "model": "model", "route": "route", "client_ip": "client"}


def _part(value: str) -> str:
    if not value:
        return "-"
    if _PLAIN.fullmatch(value):
        return value
    return "#" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class _Limit:
    """A configured limit, compiled for the request path."""

    __slots__ = ("base", "config", "models", "prefixes", "requests", "tokens")

    def __init__(self, config: LimitConfig) -> None:
        self.config = config
        self.base = f"{config.name}:{config.window_seconds}"  # a new window, new buckets
        seconds = float(config.window_seconds)
        self.requests = Rate(config.requests, seconds) if config.requests else None
        self.tokens = Rate(config.tokens, seconds) if config.tokens else None
        self.models = frozenset(m for m in config.match.models if not m.endswith("*"))
        self.prefixes = tuple(m[:-1] for m in config.match.models if m.endswith("*"))

    def applies(self, ctx: RequestContext, model: str) -> bool:
        c = self.config
        if c.match.consumers and ctx.consumer not in c.match.consumers:
            return False
        if c.match.routes and ctx.route.name not in c.match.routes:
            return False
        if c.match.models and model not in self.models:
            return any(model.startswith(p) for p in self.prefixes)
        return True

    def values(self, ctx: RequestContext, model: str) -> list[tuple[str, str]]:
        out = []
        for name in self.config.by:
            if name == "consumer":
                out.append((name, ctx.consumer))
            elif name == "model":
                out.append((name, model))
            elif name == "route":
                out.append((name, ctx.route.name))
            else:
                out.append((name, ctx.client_address))
        return out


@dataclass(slots=True)
class _Bucket:
    """One rate one request must pass (a limit with requests and tokens gives two)."""

    limit: _Limit
    kind: str
    key: str
    rate: Rate
    cost: int
    scope: list[tuple[str, str]]


@dataclass(slots=True)
class Reservation:
    """What on_request reserved, for on_complete to settle."""

    buckets: list[_Bucket]
    prompt: int
    output: int
    lease: str | None = None  # a shared store's record of it, so a dead worker's is settled


@dataclass(slots=True)
class _Estimate:
    prompt: int
    output: int
    output_from_request: bool

    def cost(self, count: str) -> int:
        if count == "input":
            return self.prompt
        if count == "output":
            return self.output
        return self.prompt + self.output


def estimate_prompt(info: RequestInfo) -> int:
    return info.prompt_estimate()


def _actual(usage: Usage, count: str) -> int:
    if count == "input":
        return usage.prompt_tokens
    if count == "output":
        return usage.completion_tokens
    return usage.total_tokens or usage.prompt_tokens + usage.completion_tokens


class RateLimitStage(Stage):
    name = "ratelimit"

    def __init__(self, config: RateLimitsConfig, store: Store, metrics: Metrics) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        self.limits = [_Limit(c) for c in config.limits]
        self.fail_open = config.redis is None or config.redis.failure_mode == "open"
        self.retry_interval = config.redis.retry_interval_ms / 1000 if config.redis else 1.0
        self._children: dict[tuple[str, ...], Any] = {}  # bound metric children

    def _count(self, metric: str, *labels: str) -> Any:
        """A bound metric child (`.labels()` costs a lookup and a lock per call)."""
        key = (metric, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = getattr(self.metrics, metric).labels(*labels)
        return child

    # -- request --------------------------------------------------------------------------

    async def on_request(self, ctx: RequestContext) -> None:
        info = ctx.info
        model = info.model if info is not None else ""
        buckets: list[_Bucket] = []
        estimate: _Estimate | None = None
        for limit in self.limits:
            if not limit.applies(ctx, model):
                continue
            scope = limit.values(ctx, model)
            suffix = "|".join(_part(v) for _, v in scope)
            base = limit.base
            if limit.requests is not None:
                buckets.append(
                    _Bucket(limit, REQUESTS, f"{base}:r:{suffix}", limit.requests, 1, scope)
                )
            if limit.tokens is not None:
                if estimate is None:
                    estimate = self._estimate(info)
                cost = estimate.cost(limit.config.count)
                buckets.append(
                    _Bucket(limit, TOKENS, f"{base}:t:{suffix}", limit.tokens, cost, scope)
                )
        if not buckets:
            return
        for bucket in buckets:
            if bucket.cost > bucket.rate.limit:
                raise self._too_large(bucket, estimate)
        leased = [i for i, b in enumerate(buckets) if b.kind == TOKENS]
        lease = None
        if leased:
            assert estimate is not None
            lease = Lease(leased, _progress(ctx, [buckets[i] for i in leased], estimate))
        try:
            outcome = await self.store.acquire(
                [b.key for b in buckets],
                [b.rate for b in buckets],
                [b.cost for b in buckets],
                lease,
            )
        except StoreUnavailable:  # an outage: the configured failure mode applies
            self._store_down(buckets)
            return
        except StoreBusy:  # a healthy store with a full queue: refuse, never admit
            raise self._store_busy(buckets) from None
        self._set_headers(ctx, buckets, outcome)
        count = self._count
        if not outcome.admitted:
            for i in outcome.blocked:
                b = buckets[i]
                count("ratelimit_decisions", b.limit.config.name, b.kind, "limited").inc()
            raise self._limited(buckets, outcome)
        tokens: list[_Bucket] = []
        for b in buckets:
            count("ratelimit_decisions", b.limit.config.name, b.kind, "allowed").inc()
            if b.kind == TOKENS:
                tokens.append(b)
                count("ratelimit_tokens", b.limit.config.name, "reserved").inc(b.cost)
        if tokens:
            assert estimate is not None
            ctx.scratch[SCRATCH] = Reservation(
                tokens, estimate.prompt, estimate.output, outcome.lease
            )

    def _estimate(self, info: RequestInfo | None) -> _Estimate:
        if info is None:
            return _Estimate(0, self.config.default_max_output_tokens, False)
        asked = info.max_output_tokens
        if isinstance(asked, int) and not isinstance(asked, bool) and asked > 0:
            return _Estimate(estimate_prompt(info), asked, True)
        return _Estimate(estimate_prompt(info), self.config.default_max_output_tokens, False)

    def _store_down(self, buckets: list[_Bucket]) -> None:
        outcome = "fail_open" if self.fail_open else "fail_closed"
        for b in buckets:
            self._count("ratelimit_decisions", b.limit.config.name, b.kind, outcome).inc()
        if self.fail_open:
            return  # admitted unchecked; nothing reserved, nothing to settle
        wait = max(1, math.ceil(self.retry_interval))
        raise Refusal(
            503,
            "The gateway cannot check this request's rate limits right now (its limit "
            "store is unreachable), so the request was not sent. Try again shortly.",
            "rate_limit_unavailable",
            kind="ratelimit_unavailable",
            headers={"retry-after": str(wait)},
        )

    def _store_busy(self, buckets: list[_Bucket]) -> Refusal:
        for b in buckets:
            self._count("ratelimit_decisions", b.limit.config.name, b.kind, "busy").inc()
        return Refusal(
            503,
            "The gateway is checking too many requests against its rate limits right now, "
            "so this one was not sent. Try again shortly.",
            "rate_limit_unavailable",
            kind="ratelimit_busy",
            headers={"retry-after": "1"},
        )

    # -- answers --------------------------------------------------------------------------

    def _set_headers(self, ctx: RequestContext, buckets: list[_Bucket], outcome: Outcome) -> None:
        """OpenAI's six headers, from the tightest limit of each kind."""
        now = outcome.now
        best: dict[str, tuple[int, int]] = {}
        for i, b in enumerate(buckets):
            left = gcra.remaining(outcome.tats[i], now, b.rate)
            if b.kind not in best or left < best[b.kind][0]:
                best[b.kind] = (left, i)
        headers = ctx.response_headers
        for kind, (left, i) in best.items():
            headers[f"x-ratelimit-limit-{kind}"] = str(buckets[i].rate.limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(left)
            headers[f"x-ratelimit-reset-{kind}"] = gcra.format_duration(
                gcra.reset_after(outcome.tats[i], now)
            )

    def _limited(self, buckets: list[_Bucket], outcome: Outcome) -> Refusal:
        now = outcome.now
        blocked = outcome.blocked or list(range(len(buckets)))

        def wait_for(i: int) -> float:
            b = buckets[i]
            return gcra.retry_after(outcome.tats[i], now, b.rate, b.cost)

        i = max(blocked, key=wait_for)
        b = buckets[i]
        wait = wait_for(i)
        used = min(b.rate.limit, math.ceil(gcra.used(outcome.tats[i], now, b.rate) - gcra.SLACK))
        message = (
            f"Rate limit '{b.limit.config.name}' reached{_scope_text(b.scope)}: "
            f"{_per(b)}. Used {used}, requested {b.cost}. "
            f"Please try again in {gcra.format_duration(wait)}."
        )
        return Refusal(
            429,
            message,
            "rate_limit_exceeded",
            kind="rate_limited",
            headers={
                "retry-after": str(max(1, math.ceil(wait))),
                "retry-after-ms": str(max(1, math.ceil(wait * 1000))),
            },
        )

    def _too_large(self, b: _Bucket, estimate: _Estimate | None) -> Refusal:
        """A reservation above the whole limit would wait forever: say so, don't retry."""
        self._count("ratelimit_decisions", b.limit.config.name, b.kind, "too_large").inc()
        assert estimate is not None
        count = b.limit.config.count
        parts = []
        if count in ("input", "total"):
            parts.append(f"~{estimate.prompt} prompt")
        if count in ("output", "total"):
            origin = "max_tokens" if estimate.output_from_request else "default max output"
            parts.append(f"{estimate.output} output ({origin})")
        advice = (
            "Lower max_tokens / max_completion_tokens"
            if estimate.output_from_request and count != "input"
            else "Shorten the request"
        )
        return Refusal(
            429,
            f"Request too large for rate limit '{b.limit.config.name}'{_scope_text(b.scope)}: "
            f"it needs up to {b.cost} tokens ({' + '.join(parts)}) but the limit allows "
            f"{_per(b)}, so it can never be admitted. {advice}.",
            "rate_limit_exceeded",
            kind="rate_limited",
            param="max_tokens" if estimate.output_from_request and count != "input" else None,
            # SDKs retry 429s by default; this one would fail the same way every time.
            headers={"x-should-retry": "false"},
        )

    # -- end of exchange ------------------------------------------------------------------

    def on_complete(
        self, ctx: RequestContext, usage: Usage, complete: bool
    ) -> Awaitable[None] | None:
        reservation: Reservation | None = ctx.scratch.pop(SCRATCH, None)
        if reservation is None:
            return None
        keys, rates, deltas = [], [], []
        for b in reservation.buckets:
            actual = _actual(usage, b.limit.config.count)
            self._count("ratelimit_tokens", b.limit.config.name, "settled").inc(actual)
            if actual != b.cost:
                keys.append(b.key)
                rates.append(b.rate)
                deltas.append(actual - b.cost)
        if not keys and reservation.lease is None:
            return None
        return self.store.settle(keys, rates, deltas, reservation.lease)


def _progress(
    ctx: RequestContext, buckets: list[_Bucket], estimate: _Estimate
) -> Callable[[], list[int] | None]:
    """What each leased bucket has used so far, read when the lease is renewed: the
    prompt (reported, else estimated) and the output metered so far (reported, else
    one per content event). None before the answer streams: the estimate stands."""

    def used() -> list[int] | None:
        decoder = ctx.decoder
        if decoder is None:
            return None
        usage = decoder.usage
        prompt = usage.prompt_tokens or estimate.prompt
        output = max(usage.completion_tokens, decoder.content_events)
        counts = {"input": prompt, "output": output, "total": prompt + output}
        return [counts[b.limit.config.count] for b in buckets]

    return used


def _per(b: _Bucket) -> str:
    c = b.limit.config
    what = "requests" if b.kind == REQUESTS else "tokens"
    if b.kind == TOKENS and c.count != "total":
        what = f"{c.count} tokens"
    return f"{b.rate.limit} {what} per {c.window}"


def _scope_text(scope: list[tuple[str, str]]) -> str:
    parts = [
        f"{_SCOPE[name]} {shown(value) if value else 'anonymous'}"
        for name, value in scope
        if len(value) < 97
    ]
    return f" for {', '.join(parts)}" if parts else ""
