"""Budget planning and the in-process store, sans-I/O with an injected clock: calendar
periods in a time zone (a monthly budget resets on the 1st, DST days are 23 or 25
hours), rolling windows, all-or-none reservations, settles, soft notices once."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from extproc.config.base import ConfigError
from extproc.spend.budgets import (
    SLOTS,
    Budget,
    Planner,
    Subject,
    parse_duration,
    period_bounds,
    refusal,
    remaining_micros,
)
from extproc.spend.settings import BudgetsConfig, validate
from extproc.spend.store import LocalBudgetStore

PARIS = ZoneInfo("Europe/Paris")
ALICE = Subject(consumer="alice", teams=("research", "ops"), route="chat", model="gpt-4o")


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def at(*parts: int, zone: ZoneInfo = PARIS) -> float:
    return datetime(*parts, tzinfo=zone).timestamp()


def setup(*budgets: Budget, now: float, zone: str = "Europe/Paris"):
    clock = Clock(now)
    return clock, Planner(budgets, zone, clock), LocalBudgetStore(clock)


def test_monthly_budget_resets_at_local_midnight_on_the_first():
    month = Budget("monthly", "consumer", limit_micros=1_000_000, period="month")
    clock, planner, store = setup(month, now=at(2026, 1, 31, 23, 59, 59))
    checks = planner.checks(ALICE)
    assert checks[0].key == "b:monthly:2026-01:alice"
    assert store.reserve_now(checks, 1_000_000).admitted
    refused = store.reserve_now(planner.checks(ALICE), 1)
    assert not refused.admitted and refused.blocked == [0]
    why = refusal(planner.checks(ALICE), refused)
    assert why is not None and why.budget == "monthly"
    assert why.resets_at == at(2026, 2, 1)  # Paris midnight, 23:00 UTC
    assert "resets at" in why.message()
    clock.now = at(2026, 2, 1) - 0.001
    assert not store.reserve_now(planner.checks(ALICE), 1).admitted
    clock.now = at(2026, 2, 1)
    fresh = planner.checks(ALICE)
    assert fresh[0].key == "b:monthly:2026-02:alice"
    assert store.reserve_now(fresh, 1_000_000).admitted


def test_day_periods_follow_dst_and_december_rolls_the_year():
    start, end, label = period_bounds("day", at(2026, 3, 29, 12), PARIS)
    assert (label, end - start) == ("2026-03-29", 23 * 3600)  # clocks go forward
    start, end, label = period_bounds("day", at(2026, 10, 25, 12), PARIS)
    assert end - start == 25 * 3600
    start, end, label = period_bounds("month", at(2026, 12, 15), PARIS)
    assert (label, end) == ("2026-12", at(2027, 1, 1))


def test_rolling_window_lets_spend_leave_slot_by_slot():
    hour = Budget("hourly", "global", limit_micros=100, window=3600.0)
    width = 3600 / SLOTS
    clock, planner, store = setup(hour, now=1_000 * 3600.0)
    assert store.reserve_now(planner.checks(ALICE), 60).admitted
    clock.now += width * 30
    assert store.reserve_now(planner.checks(ALICE), 40).admitted
    assert not store.reserve_now(planner.checks(ALICE), 1).admitted
    clock.now = 1_000 * 3600.0 + 3600 - 1  # the first 60 are still in the window
    assert not store.reserve_now(planner.checks(ALICE), 1).admitted
    clock.now = 1_000 * 3600.0 + 3600  # ...and now they left it
    outcome = store.reserve_now(planner.checks(ALICE), 60)
    assert outcome.admitted and outcome.spent == [100]


def test_a_request_must_fit_every_budget_or_is_charged_in_none():
    consumer = Budget("alice-day", "consumer", limit_micros=1_000, period="day")
    team = Budget("team-day", "team", limit_micros=500, period="day")
    glob = Budget("all", "global", limit_micros=10_000, period="month")
    _, planner, store = setup(consumer, team, glob, now=at(2026, 5, 5))
    checks = planner.checks(ALICE)
    assert [c.subject for c in checks] == ["alice", "research", "ops", "*"]
    assert store.reserve_now(checks, 400).admitted
    outcome = store.reserve_now(checks, 200)  # both teams would pass 500
    assert not outcome.admitted and outcome.blocked == [1, 2]
    assert [store.spent(c) for c in checks] == [400, 400, 400, 400]
    assert remaining_micros(checks, outcome.spent) == 100


def test_settle_refunds_or_charges_extra_exactly_in_micro_dollars():
    day = Budget("d", "consumer", limit_micros=10_000_000, period="day")
    _, planner, store = setup(day, now=at(2026, 5, 5))
    checks = planner.checks(ALICE)
    for _ in range(1000):
        store.reserve_now(checks, 7_000)  # worst case
        store.settle_now(checks, 3 - 7_000)  # exact cost: 3 micro-dollars
    assert store.spent(checks[0]) == 3_000
    store.reserve_now(checks, 10)
    out = store.settle_now(checks, 90)  # cost more than reserved: charged anyway
    assert out.spent == [3_100]


def test_settle_after_the_period_ended_moves_nothing():
    day = Budget("d", "consumer", limit_micros=100, period="day")
    clock, planner, store = setup(day, now=at(2026, 5, 5, 23, 59))
    checks = planner.checks(ALICE)
    store.reserve_now(checks, 100)
    clock.now = at(2026, 5, 7)  # the key expired with its period (+ an hour)
    assert store.settle_now(checks, -100).spent == [0]
    assert store.spent(planner.checks(ALICE)[0]) == 0


def test_soft_limit_fires_once_per_period():
    day = Budget("d", "consumer", limit_micros=1_000, period="day", soft_limit=0.8)
    clock, planner, store = setup(day, now=at(2026, 5, 5, 10))
    fired = []
    for _ in range(10):
        checks = planner.checks(ALICE)
        out = store.reserve_now(checks, 100)
        fired += out.soft_crossed
        store.settle_now(checks, -50)  # refunds let it fall below and cross again
        fired += store.settle_now(checks, 50).soft_crossed
    assert fired == [0]
    clock.now = at(2026, 5, 6, 10)
    checks = planner.checks(ALICE)
    assert store.reserve_now(checks, 900).soft_crossed == [0]


def test_scopes_match_and_subjects():
    only = Budget("ops-only", "team", limit_micros=1, period="day", match="ops")
    route = Budget("r", "route", limit_micros=1, period="day")
    model = Budget("m", "model", limit_micros=1, period="day", match="gpt-5")
    _, planner, _ = setup(only, route, model, now=at(2026, 5, 5))
    assert [(c.budget.name, c.subject) for c in planner.checks(ALICE)] == [
        ("ops-only", "ops"),
        ("r", "chat"),
    ]
    assert planner.checks(Subject()) == []


ONE_SPAN = "set exactly one of period (day, month) or window (e.g. 7d)"


def test_durations_and_budget_settings():
    assert parse_duration("7d") == 7 * 86400 and parse_duration("90s") == 90
    for bad in ("7", "0m", "400d", "1w", ""):
        with pytest.raises(ValueError):
            parse_duration(bad)
    settings = validate(
        BudgetsConfig,
        {
            "timezone": "America/New_York",
            "items": {
                "a": {"scope": "consumer", "limit_usd": "12.5", "period": "month"},
                "b": {"scope": "global", "limit_usd": 100, "window": "7d", "soft_limit": 0.8},
            },
        },
    )
    a, b = (item.budget() for item in settings.items.values())
    assert (a.name, a.limit_micros, a.period) == ("a", 12_500_000, "month")
    assert b.window == 7 * 86400 and b.soft_limit == 0.8
    assert validate(BudgetsConfig, {}).items == {}
    with pytest.raises(ConfigError) as refused:
        validate(
            BudgetsConfig,
            {
                "timezone": "Mars/Olympus",
                "over_budget_status": 403,
                "items": {
                    "no-span": {"scope": "consumer", "limit_usd": 1},
                    "both": {"scope": "team", "limit_usd": 1, "period": "day", "window": "1d"},
                    "g": {"scope": "global", "limit_usd": 0, "period": "week", "match": "x"},
                    "u": {"scope": "user", "limit_usd": 1, "window": "1w"},
                },
            },
            key="budgets",
        )
    assert refused.value.lines() == [
        "<policy>: budgets.timezone: unknown IANA time zone 'Mars/Olympus' (e.g. Europe/Paris)",
        "<policy>: budgets.over_budget_status: Input should be 429 or 402",
        f"<policy>: budgets.items.no-span: {ONE_SPAN}",
        f"<policy>: budgets.items.both: {ONE_SPAN}",
        "<policy>: budgets.items.g.limit_usd: a zero budget admits nothing; expected > 0",
        "<policy>: budgets.items.g.period: unknown period 'week' (known: day, month)",
        "<policy>: budgets.items.g.match: a global budget matches everything: remove match",
        "<policy>: budgets.items.u.scope: unknown scope 'user' "
        "(known: consumer, team, route, model, global)",
        "<policy>: budgets.items.u.window: window '1w': "
        "expected a number and s, m, h or d (e.g. 7d)",
    ]
