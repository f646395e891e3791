"""The in-process store: one dict of `tat`s, for a single sidecar process.

Atomic for free: acquire and settle run on the event loop without awaiting, so no
two requests interleave inside one. Keys whose bucket is full again (`tat <= now`)
carry no information and are swept, so per-IP or per-model keys cannot grow memory
without bound. Counts are per process: `server.workers > 1` is refused at start
(config check) because each worker would enforce its own copy of every limit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from extproc.policy.ratelimit import gcra
from extproc.policy.ratelimit.gcra import Rate
from extproc.policy.ratelimit.store import Lease, Outcome

# Sweep after this many writes, or after as many writes as keys survived the last
# sweep, whichever is larger: a sweep is O(keys), so its cost per write stays O(1).
SWEEP_EVERY = 4096


class LocalStore:
    name = "local"

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tats: dict[str, float] = {}
        self._writes = 0
        self._next_sweep = SWEEP_EVERY

    def __len__(self) -> int:
        return len(self._tats)

    def acquire_now(
        self, keys: Sequence[str], rates: Sequence[Rate], costs: Sequence[float]
    ) -> Outcome:
        now = self._clock()
        tats = self._tats
        current = [tats.get(key, now) for key in keys]
        admitted, after = gcra.acquire(current, now, rates, costs)
        if admitted:
            for key, tat in zip(keys, after, strict=True):
                tats[key] = tat
            self._wrote(len(keys), now)
            return Outcome(True, now, after)
        blocked = [
            i
            for i, (t, r, c) in enumerate(zip(current, rates, costs, strict=True))
            if not gcra.fits(t, now, r, c)
        ]
        return Outcome(False, now, after, blocked)

    async def acquire(
        self,
        keys: Sequence[str],
        rates: Sequence[Rate],
        costs: Sequence[float],
        lease: Lease | None = None,
    ) -> Outcome:
        return self.acquire_now(keys, rates, costs)  # no lease: the counters die with us

    def settle(
        self,
        keys: Sequence[str],
        rates: Sequence[Rate],
        deltas: Sequence[float],
        lease: str | None = None,
    ) -> None:
        now = self._clock()
        tats = self._tats
        for key, rate, delta in zip(keys, rates, deltas, strict=True):
            tat = gcra.adjust(tats.get(key, now), now, rate, delta)
            if tat > now:
                tats[key] = tat
            else:
                tats.pop(key, None)  # full again: nothing to remember
        self._wrote(len(keys), now)
        return None

    def _wrote(self, count: int, now: float) -> None:
        self._writes += count
        if self._writes >= self._next_sweep:
            self._tats = {k: t for k, t in self._tats.items() if t > now}
            # The next sweep waits for as many writes as keys survived: O(1) per write.
            self._writes = 0
            self._next_sweep = max(SWEEP_EVERY, len(self._tats))
