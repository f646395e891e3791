"""The benchmark: the gateway through a real Envoy, against Envoy alone and against a
do-nothing ext_proc server, side by side in one run.

    .venv/bin/python bench/run.py            # full: 50 streams, ~2-3 minutes
    .venv/bin/python bench/run.py --quick    # smoke run: 10 streams, < 45 s

Setups, each a fresh stack on fresh loopback ports (`extproc.devstack.Stack`, with the
mock provider swapped for the lighter `bench.provider`):
  envoy    Envoy alone: the same bootstrap, ext_proc filter (and its cluster) removed
  noop     Envoy + `bench.noop_extproc` (answers every message with an empty response)
  sidecar  Envoy + `python -m extproc serve` with the default policy (usage metering on)
Shapes, per setup: `gapped` (one write per frame, a few ms apart, as providers stream)
and `coalesced` (every frame in one write).

What is reported, and how: per-chunk latency is the client's receive time minus the
provider's CLOCK_MONOTONIC send stamp inside each frame; "added" is that figure minus
the same percentile for Envoy alone. CPU per ext_proc message is utime+stime of the
ext_proc process (from /proc/<pid>/stat, before and after the load) divided by the
messages it handled (the noop counts them; the sidecar's
`ai_gateway_extproc_message_seconds_count`). A missed target is printed, never fatal:
the exit status is non-zero only when the harness itself broke.

Results also go to bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: `python bench/run.py`
    sys.path.insert(0, str(REPO))

from extproc.bootstrap import EXTPROC_CLUSTER, EXTPROC_FILTER, render_bootstrap  # noqa: E402
from extproc.devstack import Stack, StackError  # noqa: E402
from extproc.envoybin import EnvoyNotFoundError, envoy_binary  # noqa: E402

DEV_CONFIG = REPO / "config" / "dev.yaml"
RESULTS = REPO / "bench" / "results" / "latest.json"
SETUPS = ("envoy", "noop", "sidecar")
SHAPES = ("gapped", "coalesced")
SETUP_LABEL = {
    "envoy": "Envoy alone",
    "noop": "+ no-op ext_proc",
    "sidecar": "+ extproc sidecar",
}
CPU_RATIO_TARGET = 1.3  # sidecar CPU/message vs do-nothing ext_proc
ADDED_P99_TARGET_MS = 1.0  # added p99 per chunk at 50 concurrent streams
TARGET_STREAMS = 50
_CLK_TCK = os.sysconf("SC_CLK_TCK")


class HarnessError(RuntimeError):
    """The benchmark itself could not run (as opposed to a missed target)."""


# -- processes ----------------------------------------------------------------------


@dataclass
class BenchStack(Stack):
    """`Stack` with the bench provider as "mock" and a choice of ext_proc server."""

    variant: str = "sidecar"  # envoy | noop | sidecar
    frames: int = 64
    gap_ms: float = 5.0

    def start_mock(self) -> None:
        provider = self.config.providers["mock"]
        self._spawn("mock", [
            sys.executable, "-m", "bench.provider", "--host", provider.host,
            "--port", str(provider.port), "--frames", str(self.frames),
            "--gap-ms", str(self.gap_ms),
        ])  # fmt: skip

    def start_sidecar(self) -> None:
        if self.variant == "envoy":
            return
        if self.variant == "noop":
            server = self.config.server
            self._spawn("sidecar", [
                sys.executable, "-m", "bench.noop_extproc",
                "--listen", server.grpc_listen, "--stats", server.metrics_listen,
            ])  # fmt: skip
            return
        super().start_sidecar()

    def wait_sidecar(self, deadline: float) -> None:
        if self.variant != "envoy":
            super().wait_sidecar(deadline)

    def start_envoy(self) -> None:
        if self.variant != "envoy":
            super().start_envoy()
            return
        # Same argv as Stack.start_envoy; only the bootstrap differs.
        bootstrap = self.workdir / "envoy.yaml"
        bootstrap.write_text(yaml.safe_dump(envoy_alone_bootstrap(self.config), sort_keys=False))
        self._spawn("envoy", [
            str(envoy_binary()), "-c", str(bootstrap), "--use-dynamic-base-id",
            "--concurrency", str(self.envoy_concurrency), "--log-level", "warn",
        ])  # fmt: skip

    def pid(self, name: str) -> int | None:
        proc = self.procs.get(name)
        return proc.pid if proc is not None and proc.poll() is None else None


def envoy_alone_bootstrap(config: Any) -> dict[str, Any]:
    """The product's bootstrap minus the ext_proc filter, its per-route config and cluster."""
    boot = render_bootstrap(config)
    resources = boot["static_resources"]
    for listener in resources["listeners"]:
        for chain in listener["filter_chains"]:
            for net_filter in chain["filters"]:
                hcm = net_filter["typed_config"]
                if "http_filters" not in hcm:
                    continue
                filters = hcm["http_filters"]
                hcm["http_filters"] = [f for f in filters if f["name"] != EXTPROC_FILTER]
                for vhost in hcm["route_config"]["virtual_hosts"]:
                    for route in vhost["routes"]:
                        per_filter = route.get("typed_per_filter_config", {})
                        per_filter.pop(EXTPROC_FILTER, None)
                        if not per_filter:
                            route.pop("typed_per_filter_config", None)
    resources["clusters"] = [c for c in resources["clusters"] if c["name"] != EXTPROC_CLUSTER]
    return boot


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_policy(directory: Path) -> Path:
    """The dev policy on fresh loopback ports; the provider named "mock" is the bench one."""
    config = yaml.safe_load(DEV_CONFIG.read_text())
    config.setdefault("server", {}).update(
        grpc_listen=f"127.0.0.1:{free_port()}", metrics_listen=f"127.0.0.1:{free_port()}"
    )
    config.setdefault("envoy", {}).update(
        listen=f"127.0.0.1:{free_port()}",
        admin=f"127.0.0.1:{free_port()}",
        access_log=str(directory / "access.log"),
    )
    config["providers"] = {"mock": {"url": f"http://127.0.0.1:{free_port()}", "format": "openai"}}
    for route in config["routes"]:
        route["provider"] = "mock"
    path = directory / "policy.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# -- measurements -------------------------------------------------------------------


def cpu_seconds(pid: int | None) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    if pid is None:
        return 0.0
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # fields 14 and 15 of stat


def host_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    total = sum(values[:8])
    idle = values[3] + values[4]
    return total - idle, total


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()


_COUNT_RE = re.compile(r"^ai_gateway_extproc_message_seconds_count\{[^}]*\}\s+(\S+)$", re.M)


def extproc_messages(stack: BenchStack) -> int | None:
    """ext_proc messages handled so far: the noop's count, or the sidecar's metric."""
    server = stack.config.server
    if stack.variant == "noop":
        return int(json.loads(_get(f"http://{server.metrics_listen}/"))["messages"])
    if stack.variant == "sidecar":
        text = _get(f"http://{server.metrics_listen}/metrics")
        return round(sum(float(v) for v in _COUNT_RE.findall(text)))
    return None


def run_client(
    stack: BenchStack, shape: str, concurrency: int, duration: float, log: Path
) -> dict[str, Any]:
    argv = [
        sys.executable, "-m", "bench.client", "--url", f"{stack.base_url}/v1/chat/completions",
        "-c", str(concurrency), "-d", str(duration), "--shape", shape,
        "--frames", str(stack.frames), "--gap-ms", str(stack.gap_ms),
    ]  # fmt: skip
    with open(log, "ab") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, cwd=REPO)
        try:
            out, _ = proc.communicate(timeout=duration + 120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise HarnessError(f"the load client failed ({proc.returncode}):\n{tail}")
    return json.loads(out)


def measure(
    stack: BenchStack, shape: str, concurrency: int, duration: float, workdir: Path
) -> dict[str, Any]:
    """One load run, with CPU and message counters read around it (scrapes outside)."""
    pids = {name: stack.pid(name) for name in ("envoy", "sidecar", "mock")}
    msgs0 = extproc_messages(stack)
    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    host0 = host_cpu()
    client = run_client(stack, shape, concurrency, duration, workdir / "client.log")
    host1 = host_cpu()
    cpu1 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    msgs1 = extproc_messages(stack)
    for name in pids:
        if name == "sidecar" and stack.variant == "envoy":
            continue
        if stack.pid(name) is None:
            raise HarnessError(f"{name} died during the run:\n{stack.log(name)[-3000:]}")
    cpu = {name: cpu1[name] - cpu0[name] for name in pids}
    messages = None if msgs0 is None or msgs1 is None else msgs1 - msgs0
    completed = client["completed"]
    busy = (host1[0] - host0[0]) / max(1, host1[1] - host0[1])
    return {
        "client": client,
        "cpu_s": {"envoy": cpu["envoy"], "extproc": cpu["sidecar"], "provider": cpu["mock"],
                  "client": client["client_cpu_s"]},
        "extproc_messages": messages,
        "messages_per_request": messages / completed if messages and completed else None,
        "extproc_cpu_us_per_message": cpu["sidecar"] / messages * 1e6 if messages else None,
        "envoy_cpu_us_per_request": cpu["envoy"] / completed * 1e6 if completed else None,
        "proxy_cpu_us_per_request": (cpu["envoy"] + cpu["sidecar"]) / completed * 1e6
        if completed else None,
        "host_busy": busy,
    }  # fmt: skip


def run_setup(variant: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    workdir = root / variant
    workdir.mkdir(parents=True)
    stack = BenchStack(
        write_policy(workdir), workdir, variant=variant, frames=args.frames, gap_ms=args.gap_ms
    )
    print(f"  {SETUP_LABEL[variant]}: starting", end="", flush=True)
    try:
        stack.start()
        # Warm-up: connections (client, upstream pool, ext_proc HTTP/2) and caches.
        run_client(stack, "gapped", args.concurrency, args.warmup, workdir / "client.log")
        results = {}
        for shape in args.shapes:
            print(f", {shape}", end="", flush=True)
            results[shape] = measure(stack, shape, args.concurrency, args.duration, workdir)
        print(" - done", flush=True)
        return results
    except BaseException:
        print(" - failed", flush=True)
        raise
    finally:
        stack.stop()


# -- report -------------------------------------------------------------------------


def derive(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Differences against Envoy alone and the sidecar/noop ratios, per shape."""
    derived: dict[str, Any] = {}
    shapes = {shape for per_setup in results.values() for shape in per_setup}
    for shape in shapes:
        base = results.get("envoy", {}).get(shape)
        noop = results.get("noop", {}).get(shape)
        ours = results.get("sidecar", {}).get(shape)
        d: dict[str, Any] = {}
        for setup, per_shape in results.items():
            r = per_shape.get(shape)
            if r is None or base is None:
                continue
            c, b = r["client"], base["client"]
            entry = {
                "added_chunk_ms": {
                    p: c["chunk_ms"].get(p, 0) - b["chunk_ms"].get(p, 0) for p in ("p50", "p99")
                },
                "added_ttfb_ms": {
                    p: c["ttfb_ms"].get(p, 0) - b["ttfb_ms"].get(p, 0) for p in ("p50", "p99")
                },
                "rps_vs_envoy": c["requests_per_s"] / b["requests_per_s"]
                if b["requests_per_s"]
                else None,
            }
            if r["proxy_cpu_us_per_request"] and base["proxy_cpu_us_per_request"]:
                entry["proxy_cpu_per_request_vs_envoy"] = (
                    r["proxy_cpu_us_per_request"] / base["proxy_cpu_us_per_request"]
                )
            d[setup] = entry
        if noop and ours and noop["extproc_cpu_us_per_message"] and ours[
            "extproc_cpu_us_per_message"
        ]:
            d["cpu_per_message_ratio"] = (
                ours["extproc_cpu_us_per_message"] / noop["extproc_cpu_us_per_message"]
            )
        derived[shape] = d
    return derived


def targets(derived: dict[str, Any], concurrency: int) -> list[dict[str, Any]]:
    out = []
    for shape, d in derived.items():
        ratio = d.get("cpu_per_message_ratio")
        if ratio is not None:
            out.append({
                "name": f"sidecar CPU/message vs no-op ext_proc ({shape})",
                "value": ratio, "unit": "x", "target": f"<= {CPU_RATIO_TARGET}x",
                "pass": ratio <= CPU_RATIO_TARGET,
            })  # fmt: skip
        added = d.get("sidecar", {}).get("added_chunk_ms", {}).get("p99")
        if added is not None:
            note = "" if concurrency == TARGET_STREAMS else f" [at {concurrency}, not 50, streams]"
            out.append({
                "name": f"added p99 per chunk, sidecar vs Envoy alone ({shape}){note}",
                "value": added, "unit": "ms", "target": f"< {ADDED_P99_TARGET_MS} ms",
                "pass": added < ADDED_P99_TARGET_MS,
            })  # fmt: skip
    return out


def _f(value: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


def render(report: dict[str, Any]) -> str:
    meta, results, derived = report["meta"], report["results"], report["derived"]
    lines = [
        "",
        f"Envoy {meta['envoy_version']} on loopback, {meta['cpus']} CPUs, Python "
        f"{meta['python']}; {meta['concurrency']} concurrent streams, {meta['frames']} content "
        f"frames per stream ({meta['frames'] + 2} timed), {meta['duration_s']:g} s per run",
        "Latencies in ms; chunk = client receive - provider send, per frame; "
        "added = minus Envoy alone",
    ]
    header = (
        f"{'setup':<18} {'req/s':>8} {'TTFB p50':>8} {'p99':>6} {'chunk p50':>9} {'p99':>6} "
        f"{'added p50':>9} {'p99':>6} {'msgs/req':>8} {'µs CPU/msg':>10} "
        f"{'proxy µs/req':>12} {'x Envoy':>7} {'host busy':>9} {'errors':>6}"
    )
    for shape in meta["shapes"]:
        desc = (
            f"one write per frame, {meta['gap_ms']:g} ms apart"
            if shape == "gapped"
            else "all frames in one write"
        )
        lines += ["", f"[{shape}] {desc}", header, "-" * len(header)]
        for setup in SETUPS:
            r = results.get(setup, {}).get(shape)
            if r is None:
                continue
            c = r["client"]
            d = derived.get(shape, {}).get(setup, {})
            added = d.get("added_chunk_ms", {})
            errors = sum(c["errors"].values())
            lines.append(
                f"{SETUP_LABEL[setup]:<18} {c['requests_per_s']:>8.1f} "
                f"{_f(c['ttfb_ms'].get('p50')):>8} {_f(c['ttfb_ms'].get('p99')):>6} "
                f"{_f(c['chunk_ms'].get('p50'), '{:.3f}'):>9} "
                f"{_f(c['chunk_ms'].get('p99')):>6} "
                f"{_f(added.get('p50') if setup != 'envoy' else None, '{:+.3f}'):>9} "
                f"{_f(added.get('p99') if setup != 'envoy' else None, '{:+.2f}'):>6} "
                f"{_f(r['messages_per_request'], '{:.1f}'):>8} "
                f"{_f(r['extproc_cpu_us_per_message'], '{:.0f}'):>10} "
                f"{_f(r['proxy_cpu_us_per_request'], '{:.0f}'):>12} "
                f"{_f(d.get('proxy_cpu_per_request_vs_envoy'), '{:.2f}'):>7} "
                f"{r['host_busy'] * 100:>8.0f}% {errors:>6}"
            )
        ratio = derived.get(shape, {}).get("cpu_per_message_ratio")
        if ratio is not None:
            lines.append(f"sidecar / no-op CPU per ext_proc message: {ratio:.2f}x")
        rps = {s: d.get("rps_vs_envoy") for s, d in derived.get(shape, {}).items()
               if isinstance(d, dict) and s != "envoy"}  # fmt: skip
        if rps:
            lines.append(
                "req/s vs Envoy alone: "
                + ", ".join(f"{SETUP_LABEL[s].lstrip('+ ')} {_f(v)}x" for s, v in rps.items())
            )
    problems = [
        f"{SETUP_LABEL[setup]} [{shape}]: {sum(r['client']['errors'].values())} failed "
        f"requests {r['client']['errors']}; first: {r['client']['first_error']}"
        for setup, per_shape in results.items()
        for shape, r in per_shape.items()
        if r["client"]["errors"]
    ]
    if problems:
        lines += ["", "Client-visible problems:", *problems]
    lines += ["", "Targets (a miss is reported, not fatal):"]
    for t in report["targets"]:
        unit = "x" if t["unit"] == "x" else " ms"
        lines.append(
            f"  {'PASS' if t['pass'] else 'MISS'}  {t['name']}: "
            f"{t['value']:.2f}{unit} (target {t['target']})"
        )
    return "\n".join(lines)


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run.py", description="Envoy alone vs no-op ext_proc vs the sidecar."
    )
    parser.add_argument("--quick", action="store_true", help="short smoke run (< 45 s)")
    parser.add_argument("-c", "--concurrency", type=int, help="streams (default 50; quick 10)")
    parser.add_argument("-d", "--duration", type=float, help="seconds per run (12; quick 2.5)")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up per setup (1.5; 0.5)")
    parser.add_argument("--frames", type=int, default=64, help="content frames per stream")
    parser.add_argument("--gap-ms", type=float, default=5.0, help="gap between frames (gapped)")
    parser.add_argument("--setups", default=",".join(SETUPS), help="subset, comma-separated")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="subset, comma-separated")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON results file")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, configs)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.concurrency = args.concurrency or (10 if quick else TARGET_STREAMS)
    args.duration = args.duration or (2.5 if quick else 12.0)
    args.warmup = args.warmup or (0.5 if quick else 1.5)
    args.setups = [s for s in args.setups.split(",") if s]
    args.shapes = [s for s in args.shapes.split(",") if s]
    bad = [s for s in args.setups if s not in SETUPS] + [s for s in args.shapes if s not in SHAPES]
    if bad:
        parser.error(f"unknown setup/shape {bad}; setups {SETUPS}, shapes {SHAPES}")
    return args


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds through every `finally`, which stops the stacks


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    root = Path(tempfile.mkdtemp(prefix="extproc-bench-"))
    started = time.monotonic()
    keep = args.keep
    print(
        f"bench: {len(args.setups)} setups x {len(args.shapes)} shapes, "
        f"{args.concurrency} streams, {args.duration:g} s each (work dir {root})",
        flush=True,
    )
    results: dict[str, dict[str, Any]] = {}
    try:
        for variant in args.setups:
            results[variant] = run_setup(variant, args, root)
    except (StackError, HarnessError, EnvoyNotFoundError, OSError) as exc:
        print(f"\nbench: harness failure: {exc}\n(logs kept in {root})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nbench: interrupted; everything stopped (logs in {root})", file=sys.stderr)
        return 130
    derived = derive(results)
    report = {
        "meta": {
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "loadavg_before": os.getloadavg(),
            "python": platform.python_version(),
            "envoy_version": envoy_version(),
            "concurrency": args.concurrency,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "frames": args.frames,
            "gap_ms": args.gap_ms,
            "setups": args.setups,
            "shapes": args.shapes,
            "quick": args.quick,
            "wall_s": time.monotonic() - started,
        },
        "results": results,
        "derived": derived,
        "targets": targets(derived, args.concurrency),
    }
    print(render(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nresults: {args.out} (wall {report['meta']['wall_s']:.0f} s)")
    broken = [
        f"{setup}/{shape}"
        for setup, per_shape in results.items()
        for shape, r in per_shape.items()
        if r["client"]["completed"] == 0
    ]
    if broken:
        print(f"bench: no request completed in {', '.join(broken)}; logs in {root}",
              file=sys.stderr)
        keep = True
    if keep:
        print(f"work dir kept: {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if broken else 0


if __name__ == "__main__":
    raise SystemExit(main())
