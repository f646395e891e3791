"""What a run prints and writes: derived figures, the text tables, a Markdown table for
docs/performance.md. Pure functions of the report dict (see bench/schema.py)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from bench.profile import render_profile
from bench.stack import REPO_ROOT, SETUP_LABEL
from bench.targets import BUSY_CORES, format_target, memory_per_stream


def _usable(runs: dict[str, Any], setup: str, key: str) -> dict | None:
    """A run that completed requests (a broken one has no percentiles to compare)."""
    r = runs.get(setup, {}).get(key)
    return r if r is not None and r["client"]["completed"] > 0 else None


def _versus(run: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    c, b = run["client"], base["client"]
    pct = ("p50", "p99")
    entry: dict[str, Any] = {
        "added_chunk_ms": {p: c["chunk_ms"].get(p, 0) - b["chunk_ms"].get(p, 0) for p in pct},
        "added_ttfb_ms": {p: c["ttfb_ms"].get(p, 0) - b["ttfb_ms"].get(p, 0) for p in pct},
        "rps_vs_envoy": c["requests_per_s"] / b["requests_per_s"] if b["requests_per_s"] else None,
    }
    if run["proxy_cpu_us_per_request"] and base["proxy_cpu_us_per_request"]:
        entry["proxy_cpu_per_request_vs_envoy"] = (
            run["proxy_cpu_us_per_request"] / base["proxy_cpu_us_per_request"]
        )
    return entry


def derive(results: dict[str, Any], sweep: dict[str, Any] | None = None) -> dict[str, Any]:
    """Differences against Envoy alone, per shape (main runs) and per sweep level."""
    derived: dict[str, Any] = {}
    shapes = {shape for per_shape in results.values() for shape in per_shape}
    for shape in sorted(shapes):
        base = _usable(results, "envoy", shape)
        d = {
            setup: _versus(r, base)
            for setup in results
            if base is not None and (r := _usable(results, setup, shape)) is not None
        }
        if d:
            derived[shape] = d
    by_level: dict[str, Any] = {}
    for setup, levels in (sweep or {}).items():
        for level in levels:
            base, r = _usable(sweep, "envoy", level), _usable(sweep, setup, level)
            if base is not None and r is not None:
                by_level.setdefault(setup, {})[level] = _versus(r, base)
    if by_level:
        derived["sweep"] = by_level
    memory = {s: m for s, levels in (sweep or {}).items() if (m := memory_per_stream(levels))}
    if memory:
        derived["memory_per_stream"] = memory
    return derived


# -- text ---------------------------------------------------------------------------


def _f(value: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


HEADER = (
    f"{'setup':<23} {'req/s':>8} {'TTFB p50':>8} {'p99':>6} {'chunk p50':>9} {'p99':>6} "
    f"{'added p50':>9} {'p99':>6} {'msgs/req':>8} {'µs CPU/msg':>10} {'proxy µs/req':>12} "
    f"{'x Envoy':>7} {'host busy':>9} {'other':>6} {'errors':>6}"
)


def _row(label: str, r: dict[str, Any], d: dict[str, Any]) -> str:
    c = r["client"]
    added = d.get("added_chunk_ms", {})
    return (
        f"{label:<23} {c['requests_per_s']:>8.1f} "
        f"{_f(c['ttfb_ms'].get('p50')):>8} {_f(c['ttfb_ms'].get('p99')):>6} "
        f"{_f(c['chunk_ms'].get('p50'), '{:.3f}'):>9} {_f(c['chunk_ms'].get('p99')):>6} "
        f"{_f(added.get('p50'), '{:+.3f}'):>9} {_f(added.get('p99'), '{:+.2f}'):>6} "
        f"{_f(r['messages_per_request'], '{:.1f}'):>8} "
        f"{_f(r['extproc_cpu_us_per_message'], '{:.0f}'):>10} "
        f"{_f(r['proxy_cpu_us_per_request'], '{:.0f}'):>12} "
        f"{_f(d.get('proxy_cpu_per_request_vs_envoy'), '{:.2f}'):>7} "
        f"{r['host_busy'] * 100:>8.0f}% {r['other_cpu_cores']:>6.2f} "
        f"{sum(c['errors'].values()):>6}"
    )


def _all_runs(report: dict[str, Any]):
    """(where, run) for every run in the report, for the problem and load checks (with
    rounds, every round's raw runs: a median would hide a failed request or a busy run)."""
    rounds = report.get("rounds") or [{"results": report["results"]}]
    for k, rnd in enumerate(rounds):
        tag = f"round {k + 1}, " if len(rounds) > 1 else ""
        for setup, per_shape in rnd["results"].items():
            for shape, r in per_shape.items():
                yield f"{tag}{SETUP_LABEL[setup]} [{shape}]", r
    for setup, levels in (report.get("sweep") or {}).items():
        for level, r in levels.items():
            yield f"{SETUP_LABEL[setup]} [{level} streams]", r
    for n, r in (report.get("workers") or {}).items():
        yield f"meter, {n} workers", r


def _problems(report: dict[str, Any]) -> list[str]:
    problems = []
    for where, r in _all_runs(report):
        c = r["client"]
        if c["errors"]:
            problems.append(
                f"  {where}: {sum(c['errors'].values())} failed requests {c['errors']}; "
                f"first: {c['first_error'].strip()[:200]}"
            )
        ours, envoys = r["extproc_messages"], r["envoy_extproc_messages_sent"]
        if ours and abs(ours - envoys) > 0.02 * ours:
            problems.append(f"  {where}: counted {ours} ext_proc messages, Envoy sent {envoys}")
    problems += [f"  {SETUP_LABEL[s]}: {msg}" for s, msg in report["failures"].items()]
    return problems


def render(report: dict[str, Any]) -> str:
    meta, results, derived = report["meta"], report["results"], report["derived"]
    lines = [
        "",
        f"Envoy {meta['envoy_version']} on loopback, {meta['cpus']} CPUs ({meta['cpu_model']}), "
        f"Python {meta['python']}, commit {meta['commit']}; {meta['concurrency']} concurrent "
        f"streams, {meta['frames']} content frames per stream ({meta['frames'] + 2} timed), "
        f"{meta['duration_s']:g} s per run",
        "Latencies in ms. chunk: client receive - provider send, per frame; added: minus "
        "Envoy alone (same percentile).",
        "µs CPU/msg: ext_proc process CPU per ext_proc message. proxy µs/req: Envoy + "
        "ext_proc CPU per request; x Envoy: that vs Envoy alone.",
        "host busy: whole machine; other: CPU cores used by processes outside the bench.",
    ]
    n = _rounds(report)
    if n > 1:
        lines.append(
            f"Main runs: {n} rounds (odd rounds in the reverse order); the tables show each "
            "figure's median over the rounds, a target the median of its per-round figures."
        )
    for shape in meta["shapes"]:
        desc = (
            f"one write per frame, {meta['gap_ms']:g} ms apart"
            if shape == "gapped"
            else "all frames in one write"
        )
        if n > 1:
            desc += f"; median of {n} rounds"
        lines += ["", f"[{shape}] {desc}", HEADER, "-" * len(HEADER)]
        for setup in meta["setups"]:
            r = results.get(setup, {}).get(shape)
            if r is None:
                failure = report["failures"].get(setup, "not run")
                lines.append(f"{SETUP_LABEL[setup]:<23} FAILED: {failure.splitlines()[0][:100]}")
                continue
            lines.append(_row(SETUP_LABEL[setup], r, derived.get(shape, {}).get(setup, {})))
    if n > 1:
        lines += ["", *_per_round_text(report)]
    sweep = report.get("sweep") or {}
    if sweep:
        lines += [
            "",
            f"[sweep] gapped, the same offered load at every level: {meta['sweep_frames_per_s']:g} "
            "frames/s in all (the gap grows with the streams)",
            HEADER, "-" * len(HEADER),
        ]  # fmt: skip
        for setup, levels in sweep.items():
            for level in sorted(levels, key=int):
                d = derived.get("sweep", {}).get(setup, {}).get(level, {})
                lines.append(_row(f"{setup} @{level}", levels[level], d))
        for setup, mem in derived.get("memory_per_stream", {}).items():
            kib = mem["bytes_per_stream"] / 1024
            lines.append(
                f"memory per open stream, {SETUP_LABEL[setup]}: {kib:.1f} KiB "
                f"({mem['from_streams']:g} -> {mem['to_streams']:g} open streams)"
            )
    workers = report.get("workers") or {}
    if workers:
        lines += ["", f"[workers] metering only, coalesced, {meta['concurrency']} streams"]
        lines.append(f"{'workers':>7} {'req/s':>8} {'msgs/s':>8} {'µs CPU/msg':>10} {'errors':>6}")
        for n in sorted(workers, key=int):
            r = workers[n]
            lines.append(
                f"{n:>7} {r['client']['requests_per_s']:>8.1f} "
                f"{_f(r['extproc_messages_per_s'], '{:.0f}'):>8} "
                f"{_f(r['extproc_cpu_us_per_message'], '{:.0f}'):>10} "
                f"{sum(r['client']['errors'].values()):>6}"
            )
    problems = _problems(report)
    if problems:
        lines += ["", "Problems:", *problems]
    other = max((r["other_cpu_cores"] for _, r in _all_runs(report)), default=0.0)
    if other > BUSY_CORES:
        lines += [
            "",
            f"WARNING: other processes used up to {other:.2f} CPU cores during the runs; "
            "latencies (and less so CPU per message) are unreliable. Rerun on a quiet machine.",
        ]
    for setup, per_shape in (report.get("profiles") or {}).items():
        for shape, summary in per_shape.items():
            lines += ["", render_profile(f"{SETUP_LABEL[setup]} [{shape}]", summary)]
    lines += ["", "Targets (a miss is reported, never fatal):"]
    lines += [format_target(t) for t in report["targets"]]
    return "\n".join(lines)


def _rounds(report: dict[str, Any]) -> int:
    return len(report.get("rounds") or ()) or 1


def _per_round(report: dict[str, Any]):
    """(setup, shape, [µs CPU/msg of each round], median) for the per-round tables."""
    meta, rounds = report["meta"], report["rounds"]
    for setup in meta["setups"]:
        for shape in meta["shapes"]:
            runs = [r["results"].get(setup, {}).get(shape) for r in rounds]
            values = [r and r["extproc_cpu_us_per_message"] for r in runs]
            if any(v is not None for v in values):  # not Envoy alone, not broken throughout
                median = report["results"].get(setup, {}).get(shape) or {}
                yield setup, shape, values, median.get("extproc_cpu_us_per_message")


def _orders(report: dict[str, Any]) -> str:
    return "; ".join(
        f"round {k + 1}: {', '.join(r['order'])}" for k, r in enumerate(report["rounds"])
    )


def _per_round_text(report: dict[str, Any]) -> list[str]:
    n = _rounds(report)
    head = f"{'setup':<23} {'shape':<9} " + " ".join(f"{f'r{k + 1}':>6}" for k in range(n))
    lines = [
        f"[rounds] ext_proc µs CPU/msg in each round ({_orders(report)})",
        f"{head} {'median':>6}",
        "-" * (len(head) + 7),
    ]
    for setup, shape, values, median in _per_round(report):
        cells = " ".join(f"{_f(v, '{:.0f}'):>6}" for v in values)
        lines.append(f"{SETUP_LABEL[setup]:<23} {shape:<9} {cells} {_f(median, '{:.0f}'):>6}")
    return lines


def _per_round_markdown(report: dict[str, Any]) -> list[str]:
    n = _rounds(report)
    lines = [
        "",
        f"ext_proc µs CPU per message in each round ({_orders(report)}):",
        "",
        "| setup | shape | " + " | ".join(f"round {k + 1}" for k in range(n)) + " | median |",
        "|---|---" + "|---" * (n + 1) + "|",
    ]
    for setup, shape, values, median in _per_round(report):
        cells = " | ".join(_f(v, "{:.0f}") for v in values)
        lines.append(
            f"| {SETUP_LABEL[setup].lstrip('+ ')} | {shape} | {cells} | {_f(median, '{:.0f}')} |"
        )
    return lines


def markdown(report: dict[str, Any]) -> str:
    """The targets and the main figures as Markdown tables, for docs/performance.md."""
    meta, n = report["meta"], _rounds(report)
    rounds = f"; main runs: median of {n} rounds (odd rounds in reverse order)" if n > 1 else ""
    lines = [
        f"Measured {meta['when']} at commit `{meta['commit']}` on {meta['host_desc']}; "
        f"{meta['concurrency']} streams of {meta['frames']} content frames, "
        f"{meta['duration_s']:g} s per run{' (quick mode)' if meta['quick'] else ''}{rounds}.",
        "",
        "| target | measured | limit | result |",
        "|---|---|---|---|",
    ]
    for t in report["targets"]:
        shown = format_target({**t, "note": ""})
        value = shown.split(": ", 1)[1].split(" (target")[0]
        limit = shown.split("(target ", 1)[1].rstrip(")")
        result = {True: "met", False: "missed", None: "not judged"}[t["pass"]]
        note = f" ({t['note']})" if t["note"] else ""
        lines.append(f"| {t['name']} | {value} | {limit} | {result}{note} |")
    for shape in meta["shapes"]:
        lines += [
            "",
            f"| {shape}{f', median of {n} rounds' if n > 1 else ''} | req/s "
            "| chunk p50 / p99 (ms) | ext_proc µs CPU/msg "
            "| ext_proc µs CPU/chunk | proxy µs CPU/chunk |",
            "|---|---|---|---|---|---|",
        ]
        for setup in meta["setups"]:
            r = report["results"].get(setup, {}).get(shape)
            if r is None:
                continue
            c = r["client"]
            lines.append(
                f"| {SETUP_LABEL[setup].lstrip('+ ')} | {c['requests_per_s']:.1f} | "
                f"{_f(c['chunk_ms'].get('p50'))} / {_f(c['chunk_ms'].get('p99'))} | "
                f"{_f(r['extproc_cpu_us_per_message'], '{:.0f}')} | "
                f"{_f(r.get('extproc_cpu_us_per_chunk'), '{:.1f}')} | "
                f"{_f(r['proxy_cpu_us_per_chunk'], '{:.1f}')} |"
            )
    if n > 1:
        lines += _per_round_markdown(report)
    lines += _markdown_sweep(report)
    other = max((r["other_cpu_cores"] for _, r in _all_runs(report)), default=0.0)
    lines += [
        "",
        f"Other processes on the machine used up to {other:.2f} CPU cores during the runs.",
    ]
    return "\n".join(lines) + "\n"


def _markdown_sweep(report: dict[str, Any]) -> list[str]:
    """One row per swept setup: CPU per message and chunk p99 at each level."""
    sweep, meta = report.get("sweep") or {}, report["meta"]
    if not sweep:
        return []
    levels = meta["sweep_levels"]
    lines = [
        "",
        f"| sweep ({meta['sweep_frames_per_s']:g} frames/s): µs CPU/msg, chunk p99 ms | "
        + " | ".join(f"{c} streams" for c in levels) + " |",
        "|---" * (len(levels) + 1) + "|",
    ]  # fmt: skip
    for setup, runs in sweep.items():
        cells = []
        for c in levels:
            r = runs.get(str(c))
            cells.append("-" if r is None else (
                f"{_f(r['extproc_cpu_us_per_message'], '{:.0f}')}, "
                f"{_f(r['client']['chunk_ms'].get('p99'), '{:.1f}')}"
            ))  # fmt: skip
        lines.append(f"| {SETUP_LABEL[setup].lstrip('+ ')} | " + " | ".join(cells) + " |")
    return lines


# -- the machine and the code -------------------------------------------------------


def commit() -> str:
    """The checked-out commit (short), with `+dirty` when files differ from it."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD") or "?"
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "extproc", "bench")
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return f"{head}+dirty" if dirty else head


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def host_desc(cpus: int | None = None) -> str:
    """`2 x Intel(R) Xeon(R) ..., Linux 6.1, Python 3.11.2`: the machine in one line."""
    return (
        f"{cpus or os.cpu_count()} x {cpu_model()}, {platform.system()} "
        f"{platform.release().split('-')[0]}, Python {platform.python_version()}"
    )
