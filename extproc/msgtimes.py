"""The `ai_gateway_extproc_message_seconds` histogram, counted per stream.

prometheus-client's `observe` takes a lock and searches the buckets in Python: about
0.9 µs per ext_proc message here (1 % of a message's whole cost, more in multiprocess
mode, where each value is a file-backed mmap). A stream's servicer instead counts its
messages into local buckets (one `bisect`) and adds them to the histogram every
`FLUSH_EVERY` messages and when the stream ends: the same buckets, sum and count, a
long stream's figures at most `FLUSH_EVERY` messages late.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Mapping
from typing import Any

FLUSH_EVERY = 64


def _aggregatable(child: Any) -> bool:
    """The child exposes what a bulk add needs (prometheus-client's own attributes,
    stable for years; a version without them gets one `observe` per message)."""
    return (
        hasattr(child, "_buckets")
        and hasattr(child, "_sum")
        and len(getattr(child, "_upper_bounds", ())) == len(child._buckets)
    )


# The buckets' bounds by histogram, or None where a child lacks the bulk attributes:
# checked once per set of children (the Metrics of a process), not per stream.
_BOUNDS: dict[int, tuple[Mapping[str, Any], list[float] | None]] = {}


def _bounds_of(children: Mapping[str, Any]) -> list[float] | None:
    known = _BOUNDS.get(id(children))
    if known is not None and known[0] is children:  # held here, so its id is not reused
        return known[1]
    first = next(iter(children.values()), None)
    bulk = first is not None and all(_aggregatable(c) for c in children.values())
    bounds = list(first._upper_bounds) if bulk else None
    if len(_BOUNDS) >= 16:  # a process has one Metrics (tests make many): stay small
        _BOUNDS.clear()
    _BOUNDS[id(children)] = (children, bounds)
    return bounds


class MessageTimes:
    """One stream's message times by phase, added to the histogram in bulk. A stream
    touches a few buckets of a few phases: only those are kept, and added."""

    __slots__ = ("_bounds", "_children", "_counts", "_pending", "_sums")

    def __init__(self, children: Mapping[str, Any]) -> None:
        self._children = children
        self._bounds = _bounds_of(children)
        self._counts: dict[tuple[str, int], int] = {}  # (phase, bucket) -> messages
        self._sums: dict[str, float] = {}
        self._pending = 0

    def observe(self, phase: str, seconds: float) -> None:
        bounds = self._bounds
        if bounds is None:
            self._children[phase].observe(seconds)
            return
        key = (phase, bisect_left(bounds, seconds))  # the first bound >= seconds
        counts = self._counts
        counts[key] = counts.get(key, 0) + 1
        sums = self._sums
        sums[phase] = sums.get(phase, 0.0) + seconds
        self._pending += 1
        if self._pending >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        """Add what was counted to the histogram (at the end of the stream, and as it goes)."""
        if not self._pending:
            return
        self._pending = 0
        children = self._children
        for (phase, bucket), count in self._counts.items():
            children[phase]._buckets[bucket].inc(count)
        for phase, total in self._sums.items():
            children[phase]._sum.inc(total)
        self._counts.clear()
        self._sums.clear()
