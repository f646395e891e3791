"""Where budget counters live: this process (`LocalBudgetStore`) or Redis
(`extproc/spend/redis_store.py`), one interface, the shape of the rate-limit store.

`reserve` adds `amount` micro-dollars to every check's slot if every budget still has
room for it, or to none (all or nothing, atomically); `settle` moves each by a signed
delta (the exact cost minus what was reserved: a refund, or an extra charge that may
pass the limit, since the exchange already happened). Both report soft limits crossed
for the first time in the period (or, for a rolling window, in one window's span).
The arithmetic is the same in both stores: keep `_reserve_one` and the Lua in step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from extproc.spend.budgets import Check, Outcome

SWEEP_EVERY = 4096


class BudgetStore(Protocol):
    name: str

    async def reserve(self, checks: Sequence[Check], amount: int) -> Outcome:
        """Reserve in every check or none; raise StoreUnavailable or StoreBusy."""
        ...

    async def settle(self, checks: Sequence[Check], delta: int) -> Outcome:
        """Refund (< 0) or charge (> 0) each check's reservation slot. Never raises."""
        ...


@dataclass(slots=True)
class _Counter:
    slots: dict[int, int] = field(default_factory=dict)
    soft_at: int | None = None  # slot at which the soft notice fired
    expires: float = 0.0


class LocalBudgetStore:
    """One dict, for a single sidecar process. Atomic for free: nothing awaits inside
    reserve or settle. Expired keys are swept every SWEEP_EVERY writes."""

    name = "local"

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        import time

        self._clock = clock or time.time
        self._counters: dict[str, _Counter] = {}
        self._writes = 0

    def __len__(self) -> int:
        return len(self._counters)

    def spent(self, check: Check) -> int:
        counter = self._live(check.key)
        return _sum(counter, check.lo) if counter else 0

    def seed(self, check: Check, slot: int, amount: int) -> None:
        """Add spend recorded elsewhere (the ledger, at start) to one slot."""
        counter = self._counter(check)
        if slot >= check.lo:
            counter.slots[slot] = counter.slots.get(slot, 0) + amount

    def reserve_now(self, checks: Sequence[Check], amount: int) -> Outcome:
        counters = [self._live(c.key) for c in checks]
        spent = [_sum(k, c.lo) if k else 0 for k, c in zip(counters, checks, strict=True)]
        blocked = [
            i for i, (c, s) in enumerate(zip(checks, spent, strict=True)) if s + amount > c.limit
        ]
        if blocked:
            return Outcome(False, spent, blocked)
        crossed = []
        for i, c in enumerate(checks):
            counter = self._counter(c)
            counter.slots[c.slot] = counter.slots.get(c.slot, 0) + amount
            spent[i] += amount
            if _soft_due(counter, c, spent[i]):
                crossed.append(i)
        self._wrote(len(checks))
        return Outcome(True, spent, [], crossed)

    async def reserve(self, checks: Sequence[Check], amount: int) -> Outcome:
        return self.reserve_now(checks, amount)

    async def settle(self, checks: Sequence[Check], delta: int) -> Outcome:
        return self.settle_now(checks, delta)

    def settle_now(self, checks: Sequence[Check], delta: int) -> Outcome:
        spent, crossed = [], []
        now = self._clock()
        for i, c in enumerate(checks):
            counter = self._live(c.key)
            lo = oldest_slot(c, now)
            if counter is None or c.slot < lo:
                spent.append(0)  # the period or the slot is over: nothing to move
                continue
            counter.slots[c.slot] = counter.slots.get(c.slot, 0) + delta
            total = _sum(counter, lo)
            spent.append(total)
            if delta > 0 and _soft_due(counter, c, total):
                crossed.append(i)
        return Outcome(True, spent, [], crossed)

    def _live(self, key: str) -> _Counter | None:
        counter = self._counters.get(key)
        if counter is not None and counter.expires <= self._clock():
            del self._counters[key]
            return None
        return counter

    def _counter(self, check: Check) -> _Counter:
        counter = self._counters.get(check.key)
        if counter is None:
            counter = self._counters[check.key] = _Counter()
        counter.expires = self._clock() + check.ttl_ms / 1000
        for old in [s for s in counter.slots if s < check.lo]:
            del counter.slots[old]
        return counter

    def _wrote(self, count: int) -> None:
        self._writes += count
        if self._writes >= max(SWEEP_EVERY, len(self._counters)):
            now = self._clock()
            self._counters = {k: v for k, v in self._counters.items() if v.expires > now}
            self._writes = 0


def _sum(counter: _Counter, lo: int) -> int:
    return sum(v for s, v in counter.slots.items() if s >= lo)


def oldest_slot(check: Check, now: float) -> int:
    """The oldest slot still counted now (settles may come long after the reserve)."""
    if check.span == 1:
        return check.slot
    width = check.budget.window / check.span  # type: ignore[operator]
    return int(now // width) - check.span + 1


def _soft_due(counter: _Counter, check: Check, spent: int) -> bool:
    if not check.soft_micros or spent < check.soft_micros:
        return False
    if counter.soft_at is not None and counter.soft_at + check.span > check.slot:
        return False
    counter.soft_at = check.slot
    return True
