"""Policy sections `prices:`, `budgets:` and `ledger:` as frozen pydantic models.

Not yet read by the config loader: the config package includes these models when
the spend stage is wired in. Each model converts to the sans-I/O objects it
configures (`PricesSettings.book()`, `BudgetSettings.budget()`).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from extproc.spend.budgets import PERIODS, Budget, parse_duration
from extproc.spend.prices import Override, Price, PriceBook, Rates

Usd = Annotated[Decimal, Field(ge=0, max_digits=18, decimal_places=6)]
Name = Annotated[str, Field(min_length=1, max_length=200)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TierSettings(_Frozen):
    """Rates that apply to every token once the prompt is above `above_prompt_tokens`."""

    above_prompt_tokens: Annotated[int, Field(ge=0)]
    input: Usd
    output: Usd
    cached_input: Usd | None = None
    cache_write: Usd | None = None
    reasoning: Usd | None = None


class PriceSettings(_Frozen):
    """$ per 1M tokens for one model; `provider` omitted means any provider."""

    model: Name
    provider: Name | None = None
    input: Usd
    output: Usd
    cached_input: Usd | None = None
    cache_write: Usd | None = None
    reasoning: Usd | None = None
    tiers: Annotated[tuple[TierSettings, ...], Field(max_length=16)] = ()

    @field_validator("tiers")
    @classmethod
    def _ascending(cls, tiers: tuple[TierSettings, ...]) -> tuple[TierSettings, ...]:
        starts = [t.above_prompt_tokens for t in tiers]
        if starts != sorted(set(starts)):
            raise ValueError("tiers: above_prompt_tokens must be distinct and ascending")
        return tiers

    def override(self) -> Override:
        def rates(s: PriceSettings | TierSettings) -> Rates:
            return Rates.per_million(s.input, s.output, s.cached_input, s.cache_write, s.reasoning)

        tiers = tuple((t.above_prompt_tokens, rates(t)) for t in self.tiers)
        return Override(self.model, Price(rates(self), tiers, "override"), self.provider)


class PricesSettings(_Frozen):
    """`prices:`: the catalog (bundled genai-prices snapshot) plus overrides."""

    catalog: bool = True
    unpriced: Annotated[str, Field(pattern=r"^(refuse|zero|estimate-from:\s*\S.*)$")] = "zero"
    models: Annotated[tuple[PriceSettings, ...], Field(max_length=10_000)] = ()

    def book(self) -> PriceBook:
        return PriceBook(
            overrides=[m.override() for m in self.models],
            unpriced=self.unpriced,
            catalog=self.catalog,
        )


class BudgetSettings(_Frozen):
    """One budget: `limit_usd` per `period` (day, month) or rolling `window` (1h, 7d)."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    scope: Literal["consumer", "team", "route", "model", "global"]
    match: Name | None = None  # one consumer/team/route/model; None: each one apart
    limit_usd: Annotated[Decimal, Field(gt=0, max_digits=18, decimal_places=6)]
    period: Literal["day", "month"] | None = None
    window: str | None = None
    soft_limit: Annotated[float, Field(gt=0, lt=1)] | None = None

    @model_validator(mode="after")
    def _one_span(self) -> BudgetSettings:
        if (self.period is None) == (self.window is None):
            raise ValueError("set exactly one of period (day, month) or window (e.g. 7d)")
        if self.window is not None:
            parse_duration(self.window)  # raises ValueError with the reason
        if self.scope == "global" and self.match is not None:
            raise ValueError("a global budget has no match")
        return self

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


class BudgetsSettings(_Frozen):
    """`budgets:`: the list, the calendar's time zone, and where counters live."""

    timezone: str = "UTC"
    store: Literal["local", "redis"] = "local"
    over_budget_status: Literal[429, 402] = 429
    items: Annotated[tuple[BudgetSettings, ...], Field(max_length=1000)] = ()

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown IANA time zone {value!r}") from None
        return value

    @field_validator("items")
    @classmethod
    def _unique(cls, items: tuple[BudgetSettings, ...]) -> tuple[BudgetSettings, ...]:
        names = [b.name for b in items]
        if len(names) != len(set(names)):
            raise ValueError("budget names must be unique")
        return items


class LedgerSettings(_Frozen):
    """`ledger:`: where rows go (sqlite:///path or postgresql://...), batching, and the
    journal directory that doubles as the outage spool."""

    url: str = "sqlite:///data/ledger.sqlite3"
    batch_size: Annotated[int, Field(ge=1, le=10_000)] = 500
    flush_interval_s: Annotated[float, Field(gt=0, le=60)] = 1.0
    queue_limit: Annotated[int, Field(ge=1, le=10_000_000)] = 100_000
    journal_dir: str = "data/ledger-journal"
    retry_interval_s: Annotated[float, Field(gt=0, le=300)] = 2.0
    spool_max_bytes: Annotated[int, Field(ge=1 << 16)] = 256 << 20
    pool_size: Annotated[int, Field(ge=1, le=64)] = 4

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str) -> str:
        if not value.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ValueError("expected sqlite:///PATH or postgresql://...")
        return value


__all__ = [
    "PERIODS",
    "BudgetSettings",
    "BudgetsSettings",
    "LedgerSettings",
    "PriceSettings",
    "PricesSettings",
    "TierSettings",
]
