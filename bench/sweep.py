"""The sweeps: one setup at several concurrency levels, and the sidecar at several
worker counts.

Concurrency sweep: gapped streams at 10/50/200/500 concurrent streams with the *same
offered load* at every level (`--sweep-rate` frames per second in all: the gap between
a stream's frames grows with the number of streams), so what changes between levels is
the number of open streams, not how busy the machine is. CPU per message that does not
grow from the lowest level says that no per-message cost grows with the streams open;
the sidecar's resident memory at the two highest levels gives its memory per open
stream (the slope, so fixed memory cancels out; the lower levels come after the main
runs' high-water mark). Each level runs at least 1.5 stream lengths.

Workers sweep: metering only, coalesced streams (the sidecar is the bottleneck) at
the main concurrency, with 1..N `server.workers`; ext_proc messages per second.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.measure import measure, run_client
from bench.stack import BenchStack, setup_api_key, write_policy

SWEEP_SETUPS = ("envoy", "noop", "meter", "full")
LEVELS = (10, 50, 200, 500)
QUICK_LEVELS = (10, 50)
SWEEP_RATE = 3000.0  # frames per second offered, in all, at every level


def level_gap_ms(level: int, rate: float) -> float:
    """The per-stream gap that makes `level` streams offer `rate` frames per second."""
    return level * 1000.0 / rate


def level_duration(duration: float, frames: int, gap_ms: float) -> float:
    """At least one and a half stream lengths, so that the level reaches its steady
    state (every stream open) and requests complete within the window."""
    return max(duration, 1.5 * (frames + 2) * gap_ms / 1000)


def concurrency_sweep(
    stack: BenchStack,
    args: argparse.Namespace,
    workdir: Path,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """Gapped runs of one started stack at each level; keyed by the level as text."""
    out: dict[str, Any] = {}
    key = setup_api_key(stack.variant, args.api_key)
    for level in args.sweep_levels:
        progress(f" @{level}")
        gap = level_gap_ms(level, args.sweep_rate)
        out[str(level)] = measure(
            stack, "gapped", level, level_duration(args.sweep_duration, stack.frames, gap),
            workdir, key, gap_ms=gap,
        )  # fmt: skip
    return out


def workers_sweep(
    args: argparse.Namespace, root: Path, progress: Callable[[str], None]
) -> dict[str, Any]:
    """Metering only, coalesced, at each worker count on a fresh stack; by count as text."""
    out: dict[str, Any] = {}
    for n in args.workers_levels:
        workdir = root / f"workers-{n}"
        workdir.mkdir(parents=True)
        stack = BenchStack(
            write_policy(workdir, "meter", args.policy, workers=n), workdir,
            variant="meter", frames=args.frames, gap_ms=args.gap_ms, workers=n,
        )  # fmt: skip
        progress(f" {n}")
        stack.start()
        try:
            key = setup_api_key("meter", args.api_key)
            run_client(
                stack, "coalesced", args.concurrency, args.warmup, workdir / "client.log", key
            )
            out[str(n)] = measure(stack, "coalesced", args.concurrency, args.duration, workdir, key)
        finally:
            stack.stop()
    return out
