"""Budgets in USD (sans-I/O): which budgets a request meets, and where each one counts.

A budget caps spend per consumer, team, route, model or globally, over a calendar
period (`day`, `month`, in the configured IANA time zone: a monthly budget resets at
local midnight on the 1st, DST included) or a rolling window (`7d`, `1h`). Money is
integral micro-dollars throughout, so sums never drift.

This module only plans: for a subject and an injected clock it names one `Check` per
applicable budget (a store key, the slot that this request's spend goes to, the
oldest slot still inside the window, a TTL, the soft threshold). A store (local or
Redis, extproc/spend/store.py) runs the reserve-all-or-none and settle arithmetic on
those checks atomically. A calendar period is one key per period (a new period is a
new key, so the reset needs no job); a rolling window is one key of SLOTS slots,
summed over the last SLOTS, so spend leaves the window slot by slot.

A reservation counts in the period it was made in: a stream that starts at 23:59 on
the 31st settles into that month, even when it ends in the next one.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

PERIODS = ("day", "month")
SLOTS = 60  # a rolling window is counted in this many slots
Scope = Literal["consumer", "team", "route", "model", "global"]
_DURATION = re.compile(r"^(\d+)(s|m|h|d)$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_WINDOW = 366 * 86400


def parse_duration(text: str) -> float:
    """'90s', '30m', '12h', '7d' -> seconds (at least one minute, at most a year)."""
    m = _DURATION.match(text.strip())
    if not m:
        raise ValueError(f"window {text!r}: expected a number and s, m, h or d (e.g. 7d)")
    seconds = int(m.group(1)) * _UNIT[m.group(2)]
    if not 60 <= seconds <= MAX_WINDOW:
        raise ValueError(f"window {text!r}: between 1m and 366d")
    return float(seconds)


@dataclass(frozen=True, slots=True)
class Budget:
    name: str
    scope: Scope
    limit_micros: int
    period: str | None = None  # day | month
    window: float | None = None  # seconds, rolling
    match: str | None = None  # only this consumer/team/route/model; None: each apart
    soft_limit: float | None = None  # fraction of the limit that fires a notice once

    def __post_init__(self) -> None:
        if (self.period is None) == (self.window is None):
            raise ValueError(f"budget {self.name}: exactly one of period or window")
        if self.period is not None and self.period not in PERIODS:
            raise ValueError(f"budget {self.name}: period must be day or month")
        if self.limit_micros <= 0:
            raise ValueError(f"budget {self.name}: limit must be positive")


@dataclass(frozen=True, slots=True)
class Subject:
    """Who and what one request is: every budget scope reads one field."""

    consumer: str = ""
    teams: tuple[str, ...] = ()
    route: str = ""
    model: str = ""


@dataclass(frozen=True, slots=True)
class Check:
    """One budget as it applies to one request at one instant."""

    budget: Budget
    subject: str  # the consumer/team/route/model it counts for ("*" for global)
    key: str  # store key, without the store's prefix
    slot: int  # where this request's spend goes
    lo: int  # the oldest slot still counted
    span: int  # slots per window (a soft notice may fire again one span later)
    ttl_ms: int  # the key is worthless after this
    resets_at: float  # epoch seconds: period end, or when the oldest slot leaves
    soft_micros: int  # 0: no soft limit

    @property
    def limit(self) -> int:
        return self.budget.limit_micros


@dataclass(slots=True)
class Outcome:
    """A store's answer to one reserve (or settle: `admitted` is then True)."""

    admitted: bool
    spent: list[int]  # per check, after (or, when refused, without) this reservation
    blocked: list[int] = field(default_factory=list)  # checks that did not fit
    soft_crossed: list[int] = field(default_factory=list)  # soft notices due now


@dataclass(frozen=True, slots=True)
class OverBudget:
    """Why a request was refused: the budget to name and when it resets."""

    budget: str
    subject: str
    limit_micros: int
    spent_micros: int
    resets_at: float

    def message(self) -> str:
        when = datetime.fromtimestamp(self.resets_at).astimezone().isoformat(timespec="seconds")
        return (
            f"budget {self.budget!r} for {self.subject!r} is spent "
            f"(${self.spent_micros / 1e6:.6f} of ${self.limit_micros / 1e6:.6f}); "
            f"it resets at {when}"
        )


def remaining_micros(checks: Sequence[Check], spent: Sequence[int]) -> int | None:
    """What is left of the tightest budget (for x-ai-gateway-budget-remaining-usd)."""
    left = [c.limit - s for c, s in zip(checks, spent, strict=True)]
    return max(0, min(left)) if left else None


def refusal(checks: Sequence[Check], outcome: Outcome) -> OverBudget | None:
    """The first budget that blocked, named for the 429/402 body; None if admitted."""
    if outcome.admitted or not outcome.blocked:
        return None
    i = outcome.blocked[0]
    c = checks[i]
    return OverBudget(c.budget.name, c.subject, c.limit, outcome.spent[i], c.resets_at)


class Planner:
    """Budgets + time zone + clock -> the checks of one request."""

    def __init__(
        self,
        budgets: Iterable[Budget],
        timezone: str = "UTC",
        clock: Callable[[], float] | None = None,
    ) -> None:
        import time

        self.budgets = tuple(budgets)
        self.zone = ZoneInfo(timezone)
        self.clock = clock or time.time
        self._periods: dict[str, tuple[float, float, str]] = {}  # the current ones

    def _period(self, period: str, now: float) -> tuple[float, float, str]:
        """period_bounds, computed once per period (zoneinfo costs microseconds)."""
        hit = self._periods.get(period)
        if hit is None or not hit[0] <= now < hit[1]:
            hit = self._periods[period] = period_bounds(period, now, self.zone)
        return hit

    def checks(self, subject: Subject, now: float | None = None) -> list[Check]:
        now = self.clock() if now is None else now
        out: list[Check] = []
        for budget in self.budgets:
            for value in _subjects(budget, subject):
                out.append(self.check(budget, value, now))
        return out

    def check(self, budget: Budget, value: str, now: float) -> Check:
        """The check of one budget for one subject value ("*" for global)."""
        soft = int(budget.limit_micros * budget.soft_limit) if budget.soft_limit else 0
        if budget.period is not None:
            _, end, label = self._period(budget.period, now)
            return Check(
                budget=budget,
                subject=value,
                key=f"b:{budget.name}:{label}:{value}",
                slot=0,
                lo=0,
                span=1,
                ttl_ms=int((end - now) * 1000) + 3_600_000,  # late settles still land
                resets_at=end,
                soft_micros=soft,
            )
        assert budget.window is not None
        width = budget.window / SLOTS
        slot = int(now // width)
        lo = slot - SLOTS + 1
        return Check(
            budget=budget,
            subject=value,
            key=f"b:{budget.name}:w:{value}",
            slot=slot,
            lo=lo,
            span=SLOTS,
            ttl_ms=int((budget.window + width) * 1000),
            resets_at=(slot + 1) * width,  # the oldest slot leaves then
            soft_micros=soft,
        )


def _subjects(budget: Budget, subject: Subject) -> list[str]:
    if budget.scope == "global":
        return ["*"]
    if budget.scope == "team":
        values = list(dict.fromkeys(t for t in subject.teams if t))
    else:
        one = getattr(subject, budget.scope)
        values = [one] if one else []
    if budget.match is not None:
        values = [v for v in values if v == budget.match]
    return values


def period_bounds(period: str, now: float, zone: ZoneInfo) -> tuple[float, float, str]:
    """(start, end, label) of the calendar period holding `now`, in `zone`."""
    local = datetime.fromtimestamp(now, zone)
    if period == "day":
        first = local.date()
        after = first + timedelta(days=1)
        label = first.isoformat()
    elif period == "month":
        first = date(local.year, local.month, 1)
        after = date(local.year + local.month // 12, local.month % 12 + 1, 1)
        label = first.strftime("%Y-%m")
    else:
        raise ValueError(f"unknown period {period!r}")
    return _midnight(first, zone), _midnight(after, zone), label


def _midnight(day: date, zone: ZoneInfo) -> float:
    return datetime(day.year, day.month, day.day, tzinfo=zone).timestamp()
