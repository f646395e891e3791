"""`bench/run.py --rounds N`: the main runs N times, interleaved, judged on medians.

On a shared machine two adjacent setups of one run differ by up to +-20 % with nothing
changed, so one run cannot judge a 10 % lever. Round k (from 0) runs the setups in the
given order when k is even and reversed when k is odd, so no setup always follows the
same neighbour or always runs first. Every target of the main runs is taken within a
round (that round's no-op server is the floor) and the median of the rounds' figures is
judged; the tables show each setup's median over the rounds, and every round's raw
runs stay in the report's `rounds` list. Pure functions: bench/run.py runs the rounds.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from bench.report import derive
from bench.schema import SCHEMA_VERSION
from bench.targets import _target, main_targets, sweep_targets


def round_order(setups: Sequence[str], k: int) -> list[str]:
    """The setups in round k's order: as given on even rounds, reversed on odd ones."""
    return list(setups) if k % 2 == 0 else list(reversed(setups))


def median_record(records: Sequence[Any]) -> Any:
    """The field-by-field median of run records (or of any nested figures). Failed
    requests add up over the rounds (a median would hide them), text takes the first
    non-empty value, and a figure missing from some rounds is the others' median."""
    present = [r for r in records if r is not None]
    if not present:
        return None
    if isinstance(present[0], dict):
        keys = dict.fromkeys(k for r in present if isinstance(r, dict) for k in r)
        return {
            key: _summed([r.get(key) for r in present])
            if key == "errors"
            else median_record([r.get(key) for r in present])
            for key in keys
        }
    numbers = [v for v in present if isinstance(v, int | float) and not isinstance(v, bool)]
    if len(numbers) < len(present):  # text, flags
        return next((v for v in present if v), present[0])
    middle = statistics.median(numbers)
    return round(middle) if all(isinstance(v, int) for v in numbers) else middle


def _summed(counts: list[dict[str, int] | None]) -> dict[str, int]:
    total: dict[str, int] = {}
    for c in counts:
        for kind, n in (c or {}).items():
            total[kind] = total.get(kind, 0) + n
    return total


def median_results(rounds: Sequence[dict[str, Any]], setups: Sequence[str]) -> dict[str, Any]:
    """Per setup and shape, the median run over the rounds that measured it."""
    out: dict[str, Any] = {}
    for setup in setups:
        shapes = dict.fromkeys(s for r in rounds for s in r["results"].get(setup, {}))
        for shape in shapes:
            runs = [r["results"].get(setup, {}).get(shape) for r in rounds]
            out.setdefault(setup, {})[shape] = median_record(runs)
    return out


def combine_targets(per_round: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One target per id: the median of the rounds' values, judged again, with each
    round's value (in round order) under `rounds`. The median comes from the middle
    round (two, for an even count): when that round was not judged (a latency run on
    a busy machine), neither is the median, with that round's note."""
    rows: dict[str, list[dict[str, Any] | None]] = {}
    for k, targets in enumerate(per_round):
        for t in targets:
            rows.setdefault(t["id"], [None] * len(per_round))[k] = t
    out = []
    for tid, by_round in rows.items():
        first = next(t for t in by_round if t is not None)
        values = [None if t is None else t["value"] for t in by_round]
        measured = sorted((v, k) for k, v in enumerate(values) if v is not None)
        n = len(measured)
        middle = [by_round[k] for _, k in measured[(n - 1) // 2 : n // 2 + 1]]
        value = statistics.median(v for v, _ in measured) if measured else None
        note = (middle[0] if middle else first)["note"]
        t = _target(tid, first["name"], value, first["unit"], first["op"], first["limit"], note)
        unjudged = [m for m in middle if m is not None and m["pass"] is None]
        if unjudged:
            t["pass"], t["note"] = None, unjudged[0]["note"]
        t["rounds"] = values
        out.append(t)
    return out


def _failures(rounds: Sequence[dict[str, Any]], after: dict[str, str]) -> dict[str, str]:
    merged: dict[str, list[str]] = {}
    for k, r in enumerate(rounds):
        for setup, msg in r["failures"].items():
            merged.setdefault(setup, []).append(f"round {k + 1}: {msg}")
    for setup, msg in after.items():
        merged.setdefault(setup, []).append(f"after the rounds: {msg}")
    return {setup: "; ".join(msgs) for setup, msgs in merged.items()}


def assemble(
    meta: dict[str, Any],
    rounds: list[dict[str, Any]],
    sweep: dict[str, Any],
    workers: dict[str, Any],
    profiles: dict[str, Any],
    after: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The report of a run: each of `rounds` is {order, results, failures}; `after`,
    the setups that broke in the sweeps and profiles run after several rounds. With one
    round it has exactly the shape of a run before `--rounds` existed (no `rounds` list,
    targets without per-round values)."""
    report: dict[str, Any] = {"schema": SCHEMA_VERSION, "meta": meta}
    if len(rounds) == 1:
        only = rounds[0]
        report.update({
            "results": only["results"], "sweep": sweep, "workers": workers,
            "profiles": profiles, "failures": only["failures"],
            "derived": derive(only["results"], sweep),
        })  # fmt: skip
        report["targets"] = main_targets(report) + sweep_targets(report)
        return report
    per_round_derived, per_round_targets = [], []
    for r in rounds:
        view = {"meta": meta, "results": r["results"], "derived": derive(r["results"])}
        per_round_derived.append(view["derived"])
        per_round_targets.append(main_targets(view))
    # Differences against Envoy alone: per round, then their median (like the targets).
    derived = median_record(per_round_derived) or {}
    derived.update(derive({}, sweep))
    report.update({
        "results": median_results(rounds, meta["setups"]), "sweep": sweep, "workers": workers,
        "profiles": profiles, "failures": _failures(rounds, after or {}), "derived": derived,
    })  # fmt: skip
    report["targets"] = combine_targets(per_round_targets) + sweep_targets(report)
    report["rounds"] = rounds
    return report


def unanswered(report: dict[str, Any]) -> list[str]:
    """Setups that broke, and runs (of any round) in which no request completed."""
    rounds = report.get("rounds") or [{"results": report["results"]}]
    tag = len(rounds) > 1
    return sorted(report["failures"]) + [
        f"{setup}/{shape}" + (f" (round {k + 1})" if tag else "")
        for k, r in enumerate(rounds)
        for setup, per_shape in r["results"].items()
        for shape, run in per_shape.items()
        if run["client"]["completed"] == 0
    ]
