"""Budgets that survive a restart without Redis: seed the in-process store from the
ledger at start.

For each budget: the spend of its current calendar period (one slot), or of its
rolling window slot by slot, per subject (the ledger column of the budget's scope).
A row records one team, so a consumer in several teams counts only in the team the
stage recorded. Reservations in flight at the restart were never settled and are not
in the ledger: they are simply gone, as their exchanges are.
"""

from __future__ import annotations

from extproc.spend.budgets import SLOTS, Planner
from extproc.spend.ledger import Backend
from extproc.spend.store import LocalBudgetStore

COLUMN = {"consumer": "consumer", "team": "team", "route": "route", "model": "model"}


def rebuild(store: LocalBudgetStore, planner: Planner, backend: Backend, now: float) -> int:
    """Seed `store` with what the ledger says each budget has spent; the micro-dollars
    seeded. Blocking (it queries the database): call it before serving."""
    from extproc.spend.budgets import period_bounds

    total = 0
    now_ms = int(now * 1000)
    for budget in planner.budgets:
        column = COLUMN.get(budget.scope)  # None: global
        if budget.period is not None:
            start, _, _ = period_bounds(budget.period, now, planner.zone)
            rows = backend.sums(column, int(start * 1000), now_ms + 1, 0)
            seeds = [(subject, 0, micros) for subject, _, micros in rows]
        else:
            assert budget.window is not None
            width = budget.window / SLOTS
            first = (int(now // width) - SLOTS + 1) * width
            width_ms = width * 1000
            if width_ms == int(width_ms):  # slots of whole milliseconds: the database buckets
                rows = backend.sums(column, int(first * 1000), now_ms + 1, int(width_ms))
                seeds = list(rows)
            else:  # bucket by second, then slot here
                rows = backend.sums(column, int(first * 1000), now_ms + 1, 1000)
                seeds = [(s, int(sec // width), m) for s, sec, m in rows]
        for subject, slot, micros in seeds:
            if budget.match is not None and subject != budget.match:
                continue
            if not subject:
                continue  # no consumer/team/... recorded: no budget of that scope applied
            check = planner.check(budget, subject, now)
            store.seed(check, slot if budget.window is not None else check.slot, micros)
            total += micros
    return total
