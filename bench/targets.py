"""The performance targets (issue 14), evaluated on one run's results: pure functions.

Every target is a ratio or a size taken within one run (with `--rounds`, within one
round, and the median of the rounds' figures is judged: bench/rounds.py), so the
machine's speed cancels out; each is reported met, missed or not measured (with why),
never fatal and never a timed test. `tests/test_bench.py` feeds these canned results.
"""

from __future__ import annotations

from typing import Any

FULL_VS_NOOP = 1.25  # full policy CPU per ext_proc message vs the do-nothing server
METER_VS_NOOP = 1.1  # metering only vs the do-nothing server
GUARDS_ON_VS_OFF = 1.15  # full policy vs the same policy without its response guard
TRANSLATED_VS_METER = 1.5  # metering an Anthropic stream translated vs an OpenAI one
MEMORY_PER_STREAM = 50 * 1024  # bytes of sidecar RSS per open stream, strictly below
FLATNESS = 1.2  # CPU per message at any sweep level / at the lowest level
WORKERS_EFFICIENCY = 0.8  # messages/s with N workers >= 0.8 * N * (1 worker's)
ADDED_P99_MS = 1.0  # added p99 per chunk vs Envoy alone, gapped, strictly below
TARGET_STREAMS = 50
OFFPATH_VS_NOOP = 0.6  # metering off path: ext_proc CPU per chunk vs the do-nothing server
OFFPATH_STREAMS = 20  # the off-path targets are set at 20 streams
# CPU cores used by processes outside the bench during a run, above which its latencies
# say more about the machine than about the gateway: latency targets are not judged.
BUSY_CORES = 0.15
# Cores the rest of the bench needs beside N sidecar workers: Envoy, the load client
# and the provider take about one each at saturation.
OTHER_CORES = 2


def cpu_per_message(results: dict[str, Any], setup: str, shape: str) -> float | None:
    """A main-matrix run's ext_proc CPU per message, None when it did not complete."""
    run = results.get(setup, {}).get(shape)
    if run is None or not run["client"]["completed"]:
        return None
    return run["extproc_cpu_us_per_message"]


def cpu_per_chunk(results: dict[str, Any], setup: str, shape: str) -> float | None:
    """ext_proc CPU per chunk the clients received: the figure that compares a server
    answering every message with one that answers none (the observer)."""
    run = results.get(setup, {}).get(shape)
    if run is None or not run["client"]["completed"]:
        return None
    return run.get("extproc_cpu_us_per_chunk")


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def memory_per_stream(levels: dict[str, Any]) -> dict[str, Any] | None:
    """Sidecar RSS per open stream: the slope between the sweep's two highest levels
    (steady-state medians), so the process's fixed memory cancels out and neither level
    sits below the high-water mark that the main runs (50 streams) left behind."""
    points = [
        (run["memory"]["open_streams"], run["memory"]["rss_bytes"], int(c))
        for c, run in levels.items()
        if run.get("memory") and run["memory"]["open_streams"] is not None
    ]
    if len(points) < 2:
        return None
    points.sort()
    (s0, m0, c0), (s1, m1, c1) = points[-2], points[-1]
    if s1 - s0 < 1:
        return None
    return {
        "bytes_per_stream": (m1 - m0) / (s1 - s0),
        "from_streams": s0,
        "to_streams": s1,
        "from_concurrency": c0,
        "to_concurrency": c1,
    }


def flatness(levels: dict[str, Any]) -> dict[str, Any] | None:
    """The most CPU per ext_proc message at any sweep level over the lowest level's
    (1.0 = never above it). Only growth counts: with more streams open, gRPC handles
    more messages per loop wake-up and the do-nothing server's cost falls too."""
    cpu = {
        int(c): run["extproc_cpu_us_per_message"]
        for c, run in levels.items()
        if run["client"]["completed"] and run["extproc_cpu_us_per_message"]
    }
    if len(cpu) < 2:
        return None
    return {"ratio": max(cpu.values()) / cpu[min(cpu)], "us_per_message": cpu}


def workers_scaling(workers: dict[str, Any], cpus: int) -> list[dict[str, Any]]:
    """Per N > 1: efficiency = (msgs/s at N / msgs/s at 1) / N, and whether the machine
    has the cores to show it."""
    base = workers.get("1")
    base_rate = base and base["extproc_messages_per_s"]
    out = []
    for n_text, run in sorted(workers.items(), key=lambda kv: int(kv[0])):
        n = int(n_text)
        if n == 1:
            continue
        rate = run["extproc_messages_per_s"]
        efficiency = rate / base_rate / n if rate and base_rate else None
        out.append({
            "workers": n, "efficiency": efficiency,
            "cores_free": cpus >= n + OTHER_CORES,
        })  # fmt: skip
    return out


def _target(
    tid: str, name: str, value: float | None, unit: str, op: str, limit: float, note: str = ""
) -> dict[str, Any]:
    """One target's record; `pass` is None when it could not be measured. The value is
    compared at 4 decimals, so a ratio that is the limit up to float noise meets it."""
    if value is not None:
        value = round(value, 4)
    if value is None:
        passed = None
    elif op == "<=":
        passed = value <= limit
    elif op == "<":
        passed = value < limit
    else:  # ">="
        passed = value >= limit
    return {
        "id": tid, "name": name, "value": value, "unit": unit, "op": op, "limit": limit,
        "pass": passed, "note": note,
    }  # fmt: skip


def evaluate(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target that the run's setups allow, in a stable order."""
    return main_targets(report) + sweep_targets(report)


def main_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets of the main runs (`results` and `derived`): with `--rounds`, each
    round's are taken within that round (bench/rounds.py keeps their medians)."""
    meta, results = report["meta"], report["results"]
    setups, out = set(meta["setups"]), []
    streams = meta["concurrency"]
    not50 = "" if streams == TARGET_STREAMS else f"at {streams} streams, not {TARGET_STREAMS}"
    pairs = (
        ("full_vs_noop", "full", "noop", FULL_VS_NOOP, "full policy vs no-op"),
        ("meter_vs_noop", "meter", "noop", METER_VS_NOOP, "metering only vs no-op"),
        ("guards_on_vs_off", "full", "full-nomask", GUARDS_ON_VS_OFF,
         "response guard on vs off (full policy)"),
        ("translated_vs_meter", "translated", "meter", TRANSLATED_VS_METER,
         "translated to Anthropic vs native (metering)"),
        # Not the targets (its floor is grpc.aio's no-op): the same limits against
        # a no-op on the sidecar's own transport, i.e. what the sidecar's Python costs.
        ("full_vs_noop_h2", "full", "noop-h2", FULL_VS_NOOP,
         "full policy vs no-op on the same transport"),
        ("meter_vs_noop_h2", "meter", "noop-h2", METER_VS_NOOP,
         "metering only vs no-op on the same transport"),
    )  # fmt: skip
    for tid, ours, base, limit, label in pairs:
        if not {ours, base} <= setups:
            continue
        for shape in meta["shapes"]:
            value = ratio(
                cpu_per_message(results, ours, shape), cpu_per_message(results, base, shape)
            )
            note = not50 if base != "noop-h2" else "informational" + (not50 and f", {not50}")
            out.append(_target(
                f"{tid}_{shape}", f"CPU per ext_proc message, {label} ({shape})",
                value, "x", "<=", limit, note,
            ))  # fmt: skip
    if {"meter-offpath", "noop"} <= setups:
        for shape in meta["shapes"]:
            value = ratio(
                cpu_per_chunk(results, "meter-offpath", shape),
                cpu_per_chunk(results, "noop", shape),
            )
            note = "" if streams == OFFPATH_STREAMS else (
                f"at {streams} streams, not {OFFPATH_STREAMS}"
            )  # fmt: skip
            out.append(_target(
                f"offpath_vs_noop_{shape}",
                f"ext_proc CPU per chunk, metering off path vs no-op ({shape})",
                value, "x", "<=", OFFPATH_VS_NOOP, note,
            ))  # fmt: skip
    if "gapped" in meta["shapes"] and "envoy" in setups:
        for setup in ("meter", "full", "meter-offpath"):
            added = report["derived"].get("gapped", {}).get(setup, {}).get("added_chunk_ms", {})
            if setup not in setups:
                continue
            runs = [results.get(s, {}).get("gapped") for s in ("envoy", setup)]
            busy = max((r["other_cpu_cores"] for r in runs if r), default=0.0)
            want = OFFPATH_STREAMS if setup == "meter-offpath" else TARGET_STREAMS
            note = (
                f"machine busy: other processes used {busy:.2f} cores"
                if busy > BUSY_CORES
                else ("" if streams == want else f"at {streams} streams, not {want}")
            )
            t = _target(
                f"added_p99_{setup.replace('-', '_')}",
                f"added p99 per chunk vs Envoy alone, {setup} (gapped)",
                added.get("p99"), "ms", "<", ADDED_P99_MS, note,
            )  # fmt: skip
            if busy > BUSY_CORES:
                t["pass"] = None
            out.append(t)
    return out


def sweep_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets of the parts that run once (the sweep, the workers sweep)."""
    meta, out = report["meta"], []
    sweep = report.get("sweep") or {}
    if "full" in sweep:
        mem = memory_per_stream(sweep["full"])
        out.append(_target(
            "memory_per_stream", "sidecar memory per open stream (full policy)",
            mem and mem["bytes_per_stream"] / 1024, "KiB", "<", MEMORY_PER_STREAM / 1024,
            "" if mem else "needs two sweep levels with open streams",
        ))  # fmt: skip
    for setup in ("meter", "full"):
        if setup in sweep:
            flat = flatness(sweep[setup])
            levels = "/".join(str(c) for c in sorted(int(c) for c in sweep[setup]))
            out.append(_target(
                f"cpu_flat_{setup}", f"CPU per message over {levels} streams, {setup} "
                f"(highest / at {levels.split('/')[0]})", flat and flat["ratio"], "x", "<=",
                FLATNESS,
            ))  # fmt: skip
    for row in workers_scaling(report.get("workers") or {}, meta["cpus"]):
        n = row["workers"]
        note = "" if row["cores_free"] else (
            f"needs {n + OTHER_CORES} cores, has {meta['cpus']}: Envoy and the load take 2"
        )  # fmt: skip
        t = _target(
            f"workers_{n}", f"messages/s with {n} workers vs {n} x 1 worker",
            row["efficiency"], "x", ">=", WORKERS_EFFICIENCY, note,
        )  # fmt: skip
        if not row["cores_free"]:
            t["pass"] = None
        out.append(t)
    return out


def format_target(t: dict[str, Any]) -> str:
    """`MET   name: 1.12x (target <= 1.25x)` and the like; with rounds,
    `1.12x (median of 1.10, 1.12, 1.31)` (each round's figure, in round order)."""
    unit = t["unit"]
    fmt = {"x": "{:.2f}x", "ms": "{:+.2f} ms", "KiB": "{:.1f} KiB"}[unit]
    limit = {"x": "{:g}x", "ms": "{:g} ms", "KiB": "{:g} KiB"}[unit].format(t["limit"])
    value = "-" if t["value"] is None else fmt.format(t["value"])
    per_round = t.get("rounds") or []
    if len(per_round) > 1:
        bare = {"x": "{:.2f}", "ms": "{:+.2f}", "KiB": "{:.1f}"}[unit]
        shown = ", ".join("-" if v is None else bare.format(v) for v in per_round)
        value += f" (median of {shown})"
    status = {True: "MET  ", False: "MISSED", None: "N/A  "}[t["pass"]]
    note = f" [{t['note']}]" if t["note"] else ""
    return f"  {status} {t['name']}: {value} (target {t['op']} {limit}){note}"
