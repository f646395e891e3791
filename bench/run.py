"""The benchmark: the gateway through a real Envoy, against Envoy alone and against a
do-nothing ext_proc server, side by side in one run, with the targets of issue 14.

    .venv/bin/python bench/run.py            # everything, about 8 minutes on 2 cores
    .venv/bin/python bench/run.py --quick    # the same parts, small: about 2 minutes
    .venv/bin/python bench/run.py --help     # sizes, --profile (py-spy), --policy, ...

Parts, each on fresh stacks (bench/stack.py for the setups):
  main     every setup (envoy, noop, meter, full, full-nomask, translated) at 50 streams, gapped
           (one write per frame, 5 ms apart, as providers stream) and coalesced (every
           frame in one write); with --rounds N, N times, odd rounds in reverse order,
           the targets judged on the median of the rounds' ratios (bench/rounds.py),
           and the sweep and profiles after the rounds, on fresh stacks
  sweep    envoy, noop, meter, full at 10/50/200/500 streams, the same offered load at
           each level (bench/sweep.py); memory per open stream from it
  workers  metering only at 1..N sidecar workers (N = CPUs, at most 4)
  profile  with --profile: one extra, unmeasured run per ext_proc setup and shape under
           py-spy, its top frames grouped (bench/profile.py)

Measurements in bench/measure.py, targets in bench/targets.py (printed MET, MISSED or
N/A; a miss is never fatal: the exit status is non-zero only when the harness broke or
a setup answered no request). Results: bench/results/latest.json (also kept as
run-<time>.json; shape in bench/schema.py), latest.md (Markdown tables for
docs/performance.md) and sweep.png (bench/plot.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: `python bench/run.py`
    sys.path.insert(0, str(REPO))

from jsonschema import ValidationError  # noqa: E402

from bench import profile as spy  # noqa: E402
from bench.measure import HarnessError, measure, run_client, sample_busy  # noqa: E402
from bench.report import commit, cpu_model, host_desc, markdown, render  # noqa: E402
from bench.rounds import assemble, round_order, unanswered  # noqa: E402
from bench.schema import validate  # noqa: E402
from bench.stack import (  # noqa: E402
    LOOP_SETUPS,
    SETUP_LABEL,
    SETUPS,
    SIDECARS,
    BenchStack,
    setup_api_key,
    write_policy,
)
from bench.sweep import (  # noqa: E402
    LEVELS,
    QUICK_LEVELS,
    SWEEP_RATE,
    SWEEP_SETUPS,
    concurrency_sweep,
    workers_sweep,
)
from bench.targets import TARGET_STREAMS  # noqa: E402
from extproc.dev.devstack import StackError  # noqa: E402
from extproc.envoybin import EnvoyNotFoundError, envoy_binary  # noqa: E402

RESULTS = REPO / "bench" / "results"
SHAPES = ("gapped", "coalesced")


class SetupBroken(RuntimeError):
    """One setup started but answered no request: reported, the other setups still run."""


def _progress(text: str) -> None:
    print(text, end="", flush=True)


def needs_extras(variant: str, args: argparse.Namespace) -> bool:
    """Whether the setup has a sweep or a profile to run (after the rounds, with several)."""
    swept = variant in args.sweep_setups and bool(args.sweep_levels)
    return swept or (bool(args.profile) and variant != "envoy")


def run_setup(
    variant: str, args: argparse.Namespace, workdir: Path, *, main: bool = True,
    extras: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """One setup's stack: warm-up, the main shapes, its sweep levels, its profiles
    (`main` or `extras` False leaves out the main shapes or the sweep and profiles)."""
    workdir.mkdir(parents=True)
    policy = args.policy if variant in ("meter", "full") else None
    telemetry = None
    if args.tracing is not None and variant in SIDECARS:
        telemetry = {"endpoint": args.collector.endpoint, "sampling_ratio": args.tracing}
    stack = BenchStack(
        write_policy(workdir, variant, policy, telemetry=telemetry), workdir, variant=variant,
        frames=args.frames, gap_ms=args.gap_ms,
        workers=args.workers if variant in SIDECARS else None,
    )  # fmt: skip
    key = setup_api_key(variant, args.api_key)
    out: dict[str, Any] = {"main": {}, "sweep": None, "profiles": {}}
    _progress(f"  {SETUP_LABEL[variant]}: starting")
    try:
        stack.start()
        # Warm-up: connections (client, upstream pool, ext_proc HTTP/2) and caches.
        warm = run_client(
            stack, "gapped", args.concurrency, args.warmup, workdir / "client.log", key
        )
        if not warm["completed"]:
            raise SetupBroken(
                f"no request succeeded during warm-up: {warm['first_error'].strip()}"
                f"{stack.log_hint()}"
            )
        for shape in args.shapes if main else ():
            _progress(f", {shape}")
            out["main"][shape] = measure(
                stack, shape, args.concurrency, args.duration, workdir, key
            )
        if extras and variant in args.sweep_setups and args.sweep_levels:
            _progress(", sweep")
            out["sweep"] = concurrency_sweep(stack, args, workdir, _progress)
        if extras and args.profile and stack.ext_proc is not None:
            for shape in args.shapes:
                _progress(f", profile {shape}")
                out["profiles"][shape] = profile_run(stack, shape, args, workdir, key)
        print(" - done", flush=True)
        return out
    except BaseException:
        print(" - failed", flush=True)
        raise
    finally:
        stack.stop()


def profile_run(
    stack: BenchStack, shape: str, args: argparse.Namespace, workdir: Path, key: str | None
) -> dict[str, Any]:
    """One load run with py-spy attached (not a measurement); its grouped top frames."""
    out = args.out.parent / f"profile-{stack.variant}-{shape}.txt"
    pid = stack.pid("sidecar")
    if pid is None:
        raise HarnessError("the ext_proc server is not running")
    proc = spy.start_profiler(pid, out, args.duration, args.profile)
    try:
        time.sleep(1.0)  # py-spy attaches to every worker
        run_client(stack, shape, args.concurrency, args.duration, workdir / "client.log", key)
    finally:
        err = spy.stop_profiler(proc)
    if not out.exists():
        raise HarnessError(f"py-spy wrote no profile: {err[-500:]}")
    summary = spy.group_profile(out.read_text())
    summary["file"] = str(out.relative_to(REPO) if out.is_relative_to(REPO) else out)
    return summary


def envoy_version() -> str:
    try:
        out = subprocess.run(
            [str(envoy_binary()), "--version"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired, EnvoyNotFoundError):
        return "?"
    match = re.search(r"/(\d+\.\d+\.\d+)/", out)
    return match.group(1) if match else "?"


# -- main ---------------------------------------------------------------------------


def _csv(text: str, kind: type = str) -> list:
    return [kind(s) for s in text.split(",") if s.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="every part, small (about 2 minutes)")
    p.add_argument("-c", "--concurrency", type=int, help="streams of the main runs (50; quick 10)")
    p.add_argument("-d", "--duration", type=float, help="seconds per main run (15; quick 2.5)")
    p.add_argument("--warmup", type=float, help="seconds of warm-up per stack (1.5; quick 0.5)")
    p.add_argument("--frames", type=int, default=64, help="content frames per stream")
    p.add_argument("--gap-ms", type=float, default=5.0, help="gap between frames (gapped)")
    p.add_argument("--setups", default=",".join(SETUPS), help="subset, comma-separated")
    p.add_argument("--shapes", default=",".join(SHAPES), help="subset, comma-separated")
    p.add_argument("--workers", type=int, help="sidecar workers in main and sweep (default 1)")
    p.add_argument("--sweep", help=f"concurrency levels ({','.join(map(str, LEVELS))}; quick "
                   f"{','.join(map(str, QUICK_LEVELS))}; 'none' skips the sweep)")  # fmt: skip
    p.add_argument("--sweep-setups", default=",".join(SWEEP_SETUPS), help="setups swept")
    p.add_argument("--sweep-rate", type=float, default=SWEEP_RATE,
                   help="frames per second offered at every sweep level, in all")  # fmt: skip
    p.add_argument("--sweep-duration", type=float, help="seconds per level (10; quick 2.5)")
    p.add_argument("--workers-sweep", help="worker counts, e.g. 1,2 (default 1..CPUs, at most 4; "
                   "'none' skips)")  # fmt: skip
    p.add_argument("--policy", type=Path, help="bench this policy file in the meter and full "
                   "setups (ports, providers and route targets are replaced)")  # fmt: skip
    p.add_argument(
        "--tracing",
        type=float,
        metavar="RATIO",
        help="sidecar setups trace (telemetry:) at this sampling ratio to an "
        "in-process OTLP collector (tests/otlp_receiver.py); compare a run with "
        "1.0 and 0.1 against one without",
    )
    p.add_argument("--api-key", help="send `Authorization: Bearer KEY` (for a --policy with auth)")
    p.add_argument("--profile", nargs="?", const="native", choices=("native", "python"),
                   help="extra py-spy runs per ext_proc setup and shape; native (default) "
                   "sees C frames but pauses the process per sample")  # fmt: skip
    p.add_argument("--out", type=Path, default=RESULTS / "latest.json", help="JSON results")
    p.add_argument("--plot", type=Path, default=RESULTS / "sweep.png", help="the sweep's PNG")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs, configs)")
    p.add_argument("--rounds", type=int, default=1, metavar="N",
                   help="run the main runs N times, odd rounds in reverse order, and judge "
                   "each target on the median of its per-round figures (5 to judge a "
                   "lever; the sweeps run once, after the rounds)")  # fmt: skip
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds: at least 1")
    quick = args.quick
    args.concurrency = args.concurrency or (10 if quick else TARGET_STREAMS)
    args.duration = args.duration or (2.5 if quick else 15.0)
    args.warmup = args.warmup or (0.5 if quick else 1.5)
    args.sweep_duration = args.sweep_duration or (2.5 if quick else 10.0)
    args.setups, args.shapes = _csv(args.setups), _csv(args.shapes)
    args.sweep_setups = [s for s in _csv(args.sweep_setups) if s in args.setups]
    if args.sweep == "none":
        args.sweep_levels = []
    else:
        args.sweep_levels = (
            _csv(args.sweep, int) if args.sweep else list(QUICK_LEVELS if quick else LEVELS)
        )
    if args.workers_sweep == "none":
        args.workers_levels = []
    elif args.workers_sweep:
        args.workers_levels = _csv(args.workers_sweep, int)
    else:
        args.workers_levels = list(range(1, min(4, os.cpu_count() or 1) + 1))
    known = SETUPS + LOOP_SETUPS
    bad = [s for s in args.setups if s not in known] + [s for s in args.shapes if s not in SHAPES]
    if bad:
        p.error(f"unknown setup/shape {bad}; setups {known}, shapes {SHAPES}")
    # --policy replaces the built-in policy of meter and full, never of full-nomask.
    full = [s for s in args.setups if s == "full-nomask" or (s == "full" and not args.policy)]
    if (args.workers or 1) > 1 and full:
        p.error(
            f"--workers {args.workers}: the full policy's token limit counts in process, which "
            "the sidecar refuses with several workers; leave out "
            f"{','.join(full)} (--setups) or give a --policy with a Redis store"
        )
    if args.tracing is not None and not 0.0 <= args.tracing <= 1.0:
        p.error("--tracing: a sampling ratio from 0 to 1")
    if args.profile and spy.py_spy() is None:
        p.error("--profile needs py-spy (`.venv/bin/pip install py-spy`; the dev extras have it)")
    return args


_interrupted = False


def _terminate(signum: int, frame: object) -> None:
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt  # unwinds through every `finally`, which stops the stacks


def build_meta(args: argparse.Namespace, started: float, busy: float) -> dict[str, Any]:
    cpus = os.cpu_count() or 1
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "commit": commit(),
        "host": platform.node(),
        "host_desc": host_desc(cpus),
        "cpus": cpus,
        "cpu_model": cpu_model(),
        "loadavg_before": os.getloadavg(),
        "busy_before": busy,
        "python": platform.python_version(),
        "envoy_version": envoy_version(),
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "frames": args.frames,
        "gap_ms": args.gap_ms,
        "sidecar_workers": args.workers or 1,
        "policy": (str(args.policy) if args.policy else "built-in (bench/stack.py)")
        + (f"; tracing at sampling {args.tracing:g}" if args.tracing is not None else ""),
        "setups": args.setups,
        "shapes": args.shapes,
        "sweep_levels": args.sweep_levels,
        "sweep_setups": args.sweep_setups,
        "sweep_frames_per_s": args.sweep_rate,
        "sweep_duration_s": args.sweep_duration,
        "workers_levels": args.workers_levels,
        "quick": args.quick,
        "profiled": args.profile,
        "rounds": args.rounds,
        "wall_s": time.monotonic() - started,
    }


def write_outputs(report: dict[str, Any], args: argparse.Namespace) -> bool:
    """latest.json (+ a dated copy), latest.md and the sweep's PNG; False when the report
    does not match bench/schema.py (written all the same, for a look)."""
    try:
        validate(report)
        valid = True
    except ValidationError as exc:
        print(f"\nbench: the report does not match bench/schema.py: {exc.message} at "
              f"{'/'.join(map(str, exc.absolute_path))}", file=sys.stderr)  # fmt: skip
        valid = False
    text = json.dumps(report, indent=2) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.out.parent / f"run-{stamp}.json").write_text(text)
    args.out.with_suffix(".md").write_text(markdown(report))
    written = [args.out, args.out.with_suffix(".md")]
    if report["sweep"]:
        try:
            from bench.plot import plot
        except ImportError:
            print("(no plot: matplotlib is not installed; the dev extras have it)")
        else:
            written.append(plot(report, args.plot))
    print("\nresults: " + ", ".join(str(p) for p in written), end="")
    return valid


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.collector = None
    if args.tracing is not None:
        from tests.otlp_receiver import OtlpReceiver

        args.collector = OtlpReceiver().start()
    try:
        return _main(args)
    finally:
        if args.collector is not None:
            print(f"bench: the collector received {len(args.collector.spans)} spans")
            args.collector.stop()


def _main(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    root = Path(tempfile.mkdtemp(prefix="extproc-bench-"))
    started = time.monotonic()
    busy = sample_busy(1.0)
    rounds = f", {args.rounds} rounds" if args.rounds > 1 else ""
    print(
        f"bench: {len(args.setups)} setups x {len(args.shapes)} shapes at {args.concurrency} "
        f"streams, {args.duration:g} s each{rounds}; sweep {args.sweep_levels or 'off'}; workers "
        f"{args.workers_levels or 'off'} (work dir {root}); machine {busy * 100:.0f}% busy "
        "before start",
        flush=True,
    )
    rounds: list[dict[str, Any]] = []
    sweep: dict[str, Any] = {}
    profiles: dict[str, Any] = {}
    workers: dict[str, Any] = {}
    after: dict[str, str] = {}  # setups broken in the sweeps and profiles after the rounds
    single = args.rounds == 1

    def run(variant: str, workdir: Path, failures: dict[str, str], **parts: bool) -> dict:
        try:
            got = run_setup(variant, args, workdir, **parts)
        except SetupBroken as exc:
            failures[variant] = str(exc)
            return {}
        if got["sweep"]:
            sweep[variant] = got["sweep"]
        if got["profiles"]:
            profiles[variant] = got["profiles"]
        return got

    try:
        # One round: each setup's sweep and profiles on the stack of its main runs, as
        # ever. Several: the rounds' main runs first, then the extras on fresh stacks.
        for k in range(args.rounds):
            order = round_order(args.setups, k)
            if not single:
                print(f"  round {k + 1} of {args.rounds}: {', '.join(order)}", flush=True)
            rnd: dict[str, Any] = {"order": order, "results": {}, "failures": {}}
            for variant in order:
                workdir = root / variant if single else root / f"round-{k + 1}" / variant
                got = run(variant, workdir, rnd["failures"], extras=single)
                if got:
                    rnd["results"][variant] = got["main"]
            rounds.append(rnd)
        extras = [] if single else [v for v in args.setups if needs_extras(v, args)]
        if extras:
            print("  after the rounds: sweep and profiles", flush=True)
        for variant in extras:
            run(variant, root / "after" / variant, after, main=False)
        if args.workers_levels:
            _progress("  sidecar workers (metering, coalesced):")
            workers = workers_sweep(args, root, _progress)
            print(" - done", flush=True)
    except KeyboardInterrupt:
        print(f"\nbench: interrupted; everything stopped (logs in {root})", file=sys.stderr)
        return 130
    except (StackError, HarnessError, EnvoyNotFoundError, OSError) as exc:
        if _interrupted:  # Ctrl-C reached the children first
            print(f"\nbench: interrupted; everything stopped (logs in {root})", file=sys.stderr)
            return 130
        print(f"\nbench: harness failure: {exc}\n(logs kept in {root})", file=sys.stderr)
        return 2
    report = assemble(build_meta(args, started, busy), rounds, sweep, workers, profiles, after)
    print(render(report))
    valid = write_outputs(report, args)
    print(f" (wall {report['meta']['wall_s']:.0f} s)")
    broken = unanswered(report)
    if broken:
        print(
            f"bench: nothing measured for {', '.join(broken)}; logs kept in {root}", file=sys.stderr
        )
    elif args.keep:
        print(f"work dir kept: {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if broken else 0 if valid else 2


if __name__ == "__main__":
    raise SystemExit(main())
