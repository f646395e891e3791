"""Policy sections `prices:`, `budgets:` and `ledger:`, as config sections.

Declared with the config package's `section` (frozen, slotted pydantic dataclasses,
unknown keys refused with "did you mean", every problem of a file reported with its
key path), so the document includes them as they are (extproc/config/document.py); the spend stage
(extproc/policy/spend.py) reads them. Each converts to the sans-I/O objects it
configures (`PricesConfig.book()`, `BudgetConfig.budget()`).
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, TypeAdapter, ValidationError

from extproc.config.base import (
    LOADING,
    ConfigError,
    Loc,
    Section,
    describe,
    fail,
    key_of,
    problems_of,
    section,
)
from extproc.config.types import Bool, Int, Optional, OptStr, Str, checked, choice, entries, name
from extproc.spend.budgets import PERIODS, Budget, parse_duration
from extproc.spend.prices import Override, Price, PriceBook, Rates

if TYPE_CHECKING:
    from extproc.config.document import Config

SCOPES = ("consumer", "team", "route", "model", "global")
UNPRICED = "refuse, zero or estimate-from: <model>"


def check_usd(value: Any) -> Decimal:
    """A dollar amount as written: a number (or a numeric string), >= 0, at most six
    decimals (a rate is kept exactly in pico-dollars per token)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise fail(f"expected an amount in USD, got {describe(value)}")
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        raise fail(f"expected an amount in USD, got {describe(value)}") from None
    if not amount.is_finite() or amount < 0:
        raise fail(f"expected an amount >= 0, got {value}")
    if amount != amount.quantize(Decimal("0.000001")):
        raise fail(f"at most 6 decimals, got {value}")
    return amount


Usd = checked(check_usd, Decimal, ge=0, decimal_places=6)
OptUsd = Optional(Usd, "an amount in USD")


def check_unpriced(value: Any) -> str:
    text = value if isinstance(value, str) else ""
    if text in ("refuse", "zero"):
        return text
    if text.startswith("estimate-from:") and text.split(":", 1)[1].strip():
        return text
    raise fail(f"expected {UNPRICED}, got {describe(value)}")


def check_zone(value: Any) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise fail(f"unknown IANA time zone {describe(value)} (e.g. Europe/Paris)") from None
    return value


def check_window(value: Any) -> str:
    try:
        parse_duration(value if isinstance(value, str) else "")
    except ValueError as exc:
        raise fail(
            str(exc)
            if isinstance(value, str)
            else f"expected a duration like '7d', got {describe(value)}"
        ) from None
    return value


def check_ledger_url(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith(
        ("sqlite:///", "postgresql://", "postgres://")
    ):
        raise fail("expected sqlite:///PATH or postgresql://...")
    return value


@section
class TierConfig(Section):
    """Rates for every token once the prompt is above `above_prompt_tokens`."""

    above_prompt_tokens: Int(0)
    input: Usd
    output: Usd
    cached_input: OptUsd = None
    cache_write: OptUsd = None
    reasoning: OptUsd = None


@section
class PriceConfig(Section):
    """$ per 1M tokens for one model; `provider` left out means any provider."""

    model: Str
    provider: OptStr = None
    input: Usd
    output: Usd
    cached_input: OptUsd = None
    """Default: the input rate."""
    cache_write: OptUsd = None
    """Default: the input rate."""
    reasoning: OptUsd = None
    """Default: the output rate."""
    tiers: Annotated[tuple[TierConfig, ...], Field(max_length=16)] = ()

    @classmethod
    def checks(cls, raw: dict[str, Any], refused: set[Any]) -> list[tuple[Loc, str]]:
        tiers = raw.get("tiers")
        if "tiers" in refused or not isinstance(tiers, list):
            return []
        starts = [t.get("above_prompt_tokens") for t in tiers if isinstance(t, dict)]
        if starts != sorted(set(starts), key=lambda s: s if isinstance(s, int) else -1):
            return [(("tiers",), "above_prompt_tokens must be distinct and ascending")]
        return []

    def override(self) -> Override:
        def rates(s: PriceConfig | TierConfig) -> Rates:
            return Rates.per_million(s.input, s.output, s.cached_input, s.cache_write, s.reasoning)

        tiers = tuple((t.above_prompt_tokens, rates(t)) for t in self.tiers)
        return Override(self.model, Price(rates(self), tiers, "override"), self.provider)


@section
class PricesConfig(Section):
    """`prices:`: the bundled genai-prices catalog plus per-model overrides."""

    empty_ok = True

    catalog: Bool = True
    """false: only the models listed here have a price."""
    unpriced: checked(check_unpriced) = "zero"
    """A model with no price: `refuse`, `zero`, or `estimate-from: <model>`."""
    models: Annotated[tuple[PriceConfig, ...], Field(max_length=10_000)] = ()

    def book(self) -> PriceBook:
        return PriceBook(
            overrides=[m.override() for m in self.models],
            unpriced=self.unpriced,
            catalog=self.catalog,
        )


@section
class BudgetConfig(Section):
    """One budget: `limit_usd` per calendar `period` or rolling `window`."""

    derived = ("name",)

    name: Str
    scope: choice(SCOPES, "scope")
    match: OptStr = None
    """Only this consumer/team/route/model; left out: each one has its own budget."""
    limit_usd: Usd
    period: Optional(choice(PERIODS, "period"), "day or month") = None
    window: Optional(checked(check_window), "a duration like '7d'") = None
    soft_limit: Optional(Annotated[float, Field(gt=0, lt=1)], "a fraction like 0.8") = None
    """Fraction of the limit whose crossing is reported once per period."""

    @classmethod
    def checks(cls, raw: dict[str, Any], refused: set[Any]) -> list[tuple[Loc, str]]:
        found: list[tuple[Loc, str]] = []
        if ("period" in raw) == ("window" in raw):
            found.append(((), "set exactly one of period (day, month) or window (e.g. 7d)"))
        if raw.get("scope") == "global" and "match" in raw:
            found.append((("match",), "a global budget matches everything: remove match"))
        if "limit_usd" not in refused and raw.get("limit_usd") in (0, "0"):
            found.append((("limit_usd",), "a zero budget admits nothing; expected > 0"))
        return found

    def budget(self) -> Budget:
        return Budget(
            name=self.name,
            scope=self.scope,
            match=self.match,
            limit_micros=int(self.limit_usd * 1_000_000),
            period=self.period,
            window=parse_duration(self.window) if self.window else None,
            soft_limit=self.soft_limit,
        )


def check_webhook_url(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith(("http://", "https://")):
        raise fail(f"expected an http:// or https:// URL, got {describe(value)}")
    return value


@section
class SoftLimitWebhookConfig(Section):
    """Where a soft-limit crossing is POSTed (JSON), once per period, off the request path."""

    url: checked(check_webhook_url)
    timeout_ms: Int(1, 60_000) = 2000
    """The call is abandoned (and counted) after this; no request ever waits on it."""


@section
class BudgetsConfig(Section):
    """`budgets:`: budgets by name, the calendar's time zone, where counters live."""

    timezone: checked(check_zone) = "UTC"
    """IANA zone of the calendar periods: a monthly budget resets on the 1st there."""
    store: choice(("local", "redis"), "store") = "local"
    """`redis` shares the rate-limit Redis (rate_limits.redis)."""
    over_budget_status: Literal[429, 402] = 429
    """429 (as a rate limit) or 402 Payment Required."""
    default_max_output_tokens: Int(1) = 4096
    """Output tokens reserved (at the model's output price) for a request that names no
    `max_tokens`."""
    soft_limit_webhook: Optional(SoftLimitWebhookConfig, "a mapping") = None
    items: Annotated[
        dict[str, BudgetConfig],
        entries("a mapping of budget name -> settings", BudgetConfig, name),
    ] = Field(default_factory=dict)


@section
class LedgerConfig(Section):
    """`ledger:`: where rows go, batching, and the journal that doubles as the spool."""

    empty_ok = True

    url: checked(check_ledger_url) = "sqlite:///data/ledger.sqlite3"
    batch_size: Int(1, 10_000) = 500
    flush_interval_ms: Int(1, 60_000) = 1000
    retry_interval_ms: Int(10, 600_000) = 2000
    queue_limit: Int(1, 10_000_000) = 100_000
    journal_dir: Str = "data/ledger-journal"
    spool_max_bytes: Int(1 << 16) = 256 << 20
    pool_size: Int(1, 64) = 4


def validate(model: Any, data: Any, where: str = "<policy>", key: str = "") -> Any:
    """Validate one section as the loader does (the file's error contract); raise
    ConfigError with `key.path: reason` problems. For tests and `check-config` until
    the document includes these sections."""
    try:
        return TypeAdapter(model).validate_python(data, context={LOADING: True})
    except ValidationError as exc:
        prefix: Loc = (key,) if key else ()
        raise ConfigError(
            where, [(key_of(prefix + loc), reason) for loc, reason in problems_of(exc)]
        ) from None


def budget_workers(config: Config, workers: int) -> list[tuple[str, str]]:
    """The in-process budget store counts per process: N workers would spend N x."""
    budgets = config.budgets
    if budgets is None or budgets.store != "local" or workers <= 1:
        return []
    return [
        (
            "budgets.store",
            f"the in-process store counts in each process, so {workers} workers could "
            f"spend {workers}x every budget; use store: redis or run one worker",
        )
    ]


def check_spend(config: Config) -> list[tuple[str, str]]:
    """Checks of the whole valid policy: the Redis a budget store shares exists, the
    unpriced stand-in has a price, a model budget names a model there is."""
    problems: list[tuple[str, str]] = []
    budgets = config.budgets
    if budgets is not None and budgets.store == "redis":
        limits = config.rate_limits
        if limits is None or limits.redis is None or limits.store != "redis":
            problems.append(
                (
                    "budgets.store",
                    "redis shares the rate limits' Redis: set rate_limits.store: redis "
                    "with a redis: section",
                )
            )
    prices = config.prices or PricesConfig()
    try:
        book = prices.book()
    except ValueError as exc:
        problems.append(("prices.unpriced", str(exc)))
        book = PricesConfig(catalog=prices.catalog, models=prices.models).book()
    if budgets is None:
        return problems
    declared = _declared_models(config)
    for key, item in budgets.items.items():
        if item.scope != "model" or item.match is None or item.match in declared:
            continue
        if any(book._find(p, item.match, c.format) for p, c in config.providers.items()):
            continue
        problems.append(
            (
                f"budgets.items.{key}.match",
                f"unknown model '{item.match}' (not in models, routes or consumers, "
                "and without a price)",
            )
        )
    return problems


def _declared_models(config: Config) -> set[str]:
    models = config.models
    found = {alias for alias in models.aliases}
    found.update(a.model for a in models.aliases.values() if a.model)
    found.update(t.model for a in models.aliases.values() for t in a.targets)
    found.update(n for names in models.catalog.values() for n in names)
    for names in [r.models or () for r in config.routes] + [
        c.models or () for c in config.consumers.values()
    ]:
        found.update(n for n in names if "*" not in n)
    found.update(d for d in (models.default, *(r.default_model for r in config.routes)) if d)
    if config.prices is not None:
        found.update(m.model for m in config.prices.models)
    return found
