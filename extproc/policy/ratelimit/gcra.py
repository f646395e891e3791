"""GCRA (the generic cell rate algorithm), sans-I/O: numbers in, numbers out.

A limit of `limit` units per `window` is a bucket that holds `limit` units and refills
continuously at `limit / window` units a second. GCRA keeps that bucket as ONE number
per key, the theoretical arrival time (`tat`): the moment the bucket will be full
again. `tat - now` is the part of the window in use, so:

    used      = (tat - now) / interval        (interval = window / limit)
    remaining = limit - used
    admit n   iff  max(tat, now) + n * interval - now <= window

Why GCRA and not a sliding window: one number per key (one small Redis string with a
TTL, no sorted set of timestamps), O(1) per check whatever the window (seconds to
days), weights are native (a 900-token request moves `tat` by 900 intervals), and the
two-phase token accounting is a plain addition: refunding or charging the difference
moves `tat` back or forward. The reset time OpenAI's headers ask for ("when is the
bucket full again") is simply `tat - now`. The price, stated in the docs: like every
token bucket it admits a full burst and then refills smoothly, so over any span `s`
at most `limit * (1 + s / window)` units pass, never a fixed-window double burst at a
boundary and never more than `limit` at once.

Every function takes `now` and returns new values; the in-process store keeps `tat`s
in a dict, the Redis store runs the same arithmetic in a Lua script, and the tests
check both against this module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

# Floating-point slack, as a fraction of one unit's interval: 7 requests of 86400/7 s
# each must fit a 86400 s window although 7 * (86400 / 7) may round above it. Far
# below one unit, so it never admits a whole extra request or token.
SLACK = 1e-3


@dataclass(frozen=True, slots=True)
class Rate:
    """`limit` units per `window` seconds (burst `limit`, refill limit/window per second)."""

    limit: int
    window: float

    @property
    def interval(self) -> float:
        """Seconds one unit occupies (and takes to refill)."""
        return self.window / self.limit


def fits(tat: float, now: float, rate: Rate, cost: float) -> bool:
    """Would `cost` units fit the bucket whose arrival time is `tat`?"""
    interval = rate.interval
    return max(tat, now) + cost * interval - now <= rate.window + SLACK * interval


def acquire(
    tats: Sequence[float], now: float, rates: Sequence[Rate], costs: Sequence[float]
) -> tuple[bool, list[float]]:
    """All or nothing over every bucket a request must pass.

    Returns (admitted, tats after): on admission each bucket moved by its cost; on
    refusal nothing changes (a request refused by one limit spends none of the others).
    """
    if all(fits(t, now, r, c) for t, r, c in zip(tats, rates, costs, strict=True)):
        return True, [
            max(t, now) + c * r.interval for t, r, c in zip(tats, rates, costs, strict=True)
        ]
    return False, list(tats)


def adjust(tat: float, now: float, rate: Rate, delta: float) -> float:
    """Settle a reservation: `delta` > 0 charges more (may go past the window: debt that
    later requests wait out), < 0 refunds (never above a full bucket)."""
    return max(now, max(tat, now) + delta * rate.interval)


def used(tat: float, now: float, rate: Rate) -> float:
    """Units in use (may exceed the limit after a charge beyond the reservation)."""
    return max(0.0, tat - now) / rate.interval


def remaining(tat: float, now: float, rate: Rate) -> int:
    """Whole units that would fit now, 0..limit."""
    left = rate.limit - used(tat, now, rate)
    return max(0, min(rate.limit, math.floor(left + SLACK)))


def reset_after(tat: float, now: float) -> float:
    """Seconds until the bucket is full again (OpenAI's `x-ratelimit-reset-*`)."""
    return max(0.0, tat - now)


def retry_after(tat: float, now: float, rate: Rate, cost: float) -> float:
    """Seconds until `cost` units fit (0 if they fit now; inf if they never can)."""
    if cost > rate.limit:
        return math.inf
    interval = rate.interval
    return max(0.0, max(tat, now) + cost * interval - rate.window - now)


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: `20ms`, `1.5s`, `6m0s`, `2h0m5s`, `1d2h0m0s`."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    if seconds < 60:
        text = f"{seconds:.3f}".rstrip("0").rstrip(".")
        return f"{text}s"
    total = math.ceil(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h{minutes}m{secs}s"
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s"
