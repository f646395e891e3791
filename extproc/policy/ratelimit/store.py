"""What a rate-limit store does, whatever keeps the counters (this process or Redis).

Two operations, both atomic over every bucket of one request: `acquire` (admit and
reserve, all or nothing) and `settle` (move each bucket by a signed amount: the real
usage minus what was reserved). A store never decides what a limit means; it runs the
GCRA arithmetic of `gcra.py` on `tat`s it keeps by key.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from extproc.policy.ratelimit.gcra import Rate


class StoreUnavailable(Exception):
    """The store could not answer (Redis down, timed out, refused the script): an
    outage, where the configured failure mode (open or closed) applies."""


class StoreBusy(Exception):
    """Too many checks already wait for a healthy store: back-pressure, not an outage.
    Never a StoreUnavailable, so it can never fail open: the request is refused."""


@dataclass(slots=True)
class Outcome:
    """The store's answer to one acquire, in seconds on the store's own clock."""

    admitted: bool
    now: float
    tats: list[float]  # per bucket, after the reservation (unchanged when refused)
    blocked: list[int] = field(default_factory=list)  # buckets that did not fit
    lease: str | None = None  # the reservation's lease, where the store keeps leases


@dataclass(slots=True)
class Lease:
    """Ask a shared store to record a reservation with an expiry (its owner's lease),
    so that if this process dies, another one settles it. `buckets`: the indices of
    the buckets the reservation will settle; `progress`: what each of them has used so
    far (the metered frames), or None while nothing is known (the estimate stands)."""

    buckets: list[int]
    progress: Callable[[], list[int] | None]


class Store(Protocol):
    name: str

    async def acquire(
        self,
        keys: Sequence[str],
        rates: Sequence[Rate],
        costs: Sequence[float],
        lease: Lease | None = None,
    ) -> Outcome:
        """Admit and reserve `costs` in every bucket, or in none; raise StoreUnavailable
        (outage) or StoreBusy (queue full). A store of one process ignores `lease`: its
        counters die with it. A caller cancelled while waiting reserves nothing."""
        ...

    def settle(
        self,
        keys: Sequence[str],
        rates: Sequence[Rate],
        deltas: Sequence[float],
        lease: str | None = None,
    ) -> Awaitable[None] | None:
        """Charge (delta > 0) or refund (< 0) each bucket and end the lease. Never
        raises: a store that cannot be reached logs and counts the loss. None when
        already done (no I/O)."""
        ...
