"""The benchmark: the gateway through a real Envoy, against Envoy alone and against a
do-nothing ext_proc server, side by side in one run.

    .venv/bin/python bench/run.py            # full: 50 streams, about 2 minutes
    .venv/bin/python bench/run.py --quick    # smoke run: 10 streams, < 45 s
    .venv/bin/python bench/run.py --help     # --profile (py-spy), --policy, --workers, ...

Setups, each a fresh stack on fresh loopback ports (`extproc.dev.devstack.Stack`, with the
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
`ai_gateway_extproc_message_seconds_count`; Envoy's own ext_proc stats cross-check
both). A missed target is printed, never fatal: the exit status is non-zero only when
the harness broke or a setup answered no request at all.

Results also go to bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
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
from extproc.dev.devstack import Stack, StackError  # noqa: E402
from extproc.envoybin import EnvoyNotFoundError, envoy_binary  # noqa: E402

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
OTHER_LOAD_WARN = 0.15  # CPU cores used outside the bench before the results are suspect
_CLK_TCK = os.sysconf("SC_CLK_TCK")


class HarnessError(RuntimeError):
    """The benchmark itself could not run (as opposed to a missed target)."""


class SetupBroken(RuntimeError):
    """One setup started but answered no request: reported, the other setups still run."""


def _log_hint(stack: Stack) -> str:
    """The last warning lines of Envoy's and the ext_proc server's logs."""
    lines = []
    for name in ("envoy", "sidecar"):
        tail = [ln for ln in stack.log(name).splitlines() if not ln.startswith("{")][-3:]
        lines += [f"\n    {name}: {ln[:300]}" for ln in tail]
    return "".join(lines)


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


# The default bench policy: the product's defaults (usage metering on: streams without
# include_usage get it injected and the usage chunk hidden), one open route, no auth.
BENCH_POLICY: dict[str, Any] = {
    "server": {"log_level": "info"},
    "envoy": {},
    "providers": {"mock": {"format": "openai"}},
    "routes": [{"name": "bench", "prefix": "/v1/", "provider": "mock"}],
}


def write_policy(directory: Path, base: Path | None = None) -> Path:
    """BENCH_POLICY (or `base`, e.g. --policy config/dev.yaml) on fresh loopback ports,
    with every route sent to the bench provider (named "mock" so `Stack` starts it)."""
    config = yaml.safe_load(base.read_text()) if base else json.loads(json.dumps(BENCH_POLICY))
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


def _proc_cpu(pid: int) -> tuple[float, int]:
    """(utime + stime in seconds, parent pid) from /proc/<pid>/stat; all threads."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK, int(fields[1])


def cpu_seconds(pid: int | None) -> float:
    """CPU time of a process and its live descendants (a sidecar with workers > 1 is a
    supervisor plus worker processes)."""
    if pid is None:
        return 0.0
    cpu: dict[int, float] = {}
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cpu[int(entry)], parent[int(entry)] = _proc_cpu(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    tree, frontier = {pid}, [pid]
    while frontier:
        ppid = frontier.pop()
        children = [p for p, pp in parent.items() if pp == ppid and p not in tree]
        tree.update(children)
        frontier += children
    return sum(cpu.get(p, 0.0) for p in tree)


def host_cpu() -> tuple[float, float, float]:
    """(busy, total, task) jiffies of the whole machine, from /proc/stat. `task` is
    time that processes are charged with (user, nice, system) plus steal (the hypervisor
    running someone else); interrupt time is left out since nobody is charged with it."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, idle, iowait, _irq, _softirq, steal = values[:8]
    total = sum(values[:8])
    return total - idle - iowait, total, user + nice + system + steal


def _sample_busy(seconds: float) -> float:
    """Share of the machine's CPU in use over `seconds` (before the bench starts)."""
    busy0, total0, _ = host_cpu()
    time.sleep(seconds)
    busy1, total1, _ = host_cpu()
    return (busy1 - busy0) / max(1, total1 - total0)


def _children_cpu() -> float:
    """CPU of this process's finished children (the load clients), in seconds."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()


_COUNT_RE = re.compile(r"^ai_gateway_extproc_message_seconds_count\{[^}]*\}\s+(\S+)$", re.M)
_ENVOY_MSGS_RE = re.compile(r"\.ext_proc\.stream_msgs_sent: (\d+)$", re.M)


def extproc_messages(stack: BenchStack) -> int | None:
    """ext_proc messages handled so far: the noop's count, or the sidecar's metric."""
    server = stack.config.server
    if stack.variant == "noop":
        return int(json.loads(_get(f"http://{server.metrics_listen}/"))["messages"])
    if stack.variant == "sidecar":
        text = _get(f"http://{server.metrics_listen}/metrics")
        counts = _COUNT_RE.findall(text)
        return round(sum(float(v) for v in counts)) if counts else None
    return None


def envoy_extproc_messages(stack: BenchStack) -> int:
    """Messages Envoy sent to the ext_proc server (its own stats): the cross-check."""
    return sum(int(v) for v in _ENVOY_MSGS_RE.findall(_get(f"{stack.admin_url}/stats")))


def run_client(
    stack: BenchStack,
    shape: str,
    concurrency: int,
    duration: float,
    log: Path,
    api_key: str | None = None,
) -> dict[str, Any]:
    argv = [
        sys.executable, "-m", "bench.client", "--url", f"{stack.base_url}/v1/chat/completions",
        "-c", str(concurrency), "-d", str(duration), "--shape", shape,
        "--frames", str(stack.frames), "--gap-ms", str(stack.gap_ms),
    ]  # fmt: skip
    env = dict(os.environ)
    if api_key:
        env["BENCH_API_KEY"] = api_key  # not on the command line
    with open(log, "ab") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, cwd=REPO, env=env)
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


def start_profiler(pid: int | None, out: Path, duration: float) -> subprocess.Popen | None:
    """py-spy on the ext_proc process for one run (`--profile`): a speedscope file."""
    spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    if pid is None or spy is None:
        if spy is None:
            print(" (py-spy not installed: `.venv/bin/pip install py-spy`)", end="", flush=True)
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [spy, "record", "--pid", str(pid), "--duration", str(int(duration) + 5), "--rate", "250",
         "--nonblocking", "--format", "speedscope", "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def stop_profiler(spy: subprocess.Popen | None) -> None:
    if spy is None:
        return
    spy.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
    try:
        spy.wait(30)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait()


def measure(
    stack: BenchStack,
    shape: str,
    concurrency: int,
    duration: float,
    workdir: Path,
    profile: Path | None = None,
    api_key: str | None = None,
) -> dict[str, Any]:
    """One load run, with CPU and message counters read around it (scrapes outside)."""
    pids = {name: stack.pid(name) for name in ("envoy", "sidecar", "mock")}
    msgs0, envoy_msgs0 = extproc_messages(stack), envoy_extproc_messages(stack)
    spy = start_profiler(pids["sidecar"], profile, duration) if profile else None
    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    children0 = _children_cpu()
    host0, wall0 = host_cpu(), time.monotonic()
    try:
        client = run_client(stack, shape, concurrency, duration, workdir / "client.log", api_key)
    finally:
        host1, wall1 = host_cpu(), time.monotonic()
        cpu1 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        client_cpu = _children_cpu() - children0  # the whole client process, start-up too
        stop_profiler(spy)
    msgs1, envoy_msgs1 = extproc_messages(stack), envoy_extproc_messages(stack)
    for name in pids:
        if name == "sidecar" and stack.variant == "envoy":
            continue
        if stack.pid(name) is None:
            raise HarnessError(f"{name} died during the run:\n{stack.log(name)[-3000:]}")
    cpu = {name: cpu1[name] - cpu0[name] for name in pids}
    messages = None if msgs0 is None or msgs1 is None else msgs1 - msgs0
    envoy_messages = envoy_msgs1 - envoy_msgs0
    counted_by = "ext_proc server"
    if messages is None and stack.variant != "envoy":
        # The sidecar's metric is missing (renamed?): fall back to Envoy's own count.
        messages, counted_by = envoy_messages, "envoy stats"
    completed = client["completed"]
    busy = (host1[0] - host0[0]) / max(1, host1[1] - host0[1])
    # CPU that none of the bench's processes used: other work on the machine, which
    # makes latencies unreliable (a shared CI box, a test suite running alongside).
    ours = sum(cpu.values()) + client_cpu
    others = ((host1[2] - host0[2]) / _CLK_TCK - ours) / max(1e-9, wall1 - wall0)
    return {
        "client": client,
        "cpu_s": {"envoy": cpu["envoy"], "extproc": cpu["sidecar"], "provider": cpu["mock"],
                  "client": client["client_cpu_s"]},
        "extproc_messages": messages,
        "extproc_messages_counted_by": counted_by if stack.variant != "envoy" else None,
        "envoy_extproc_messages_sent": envoy_messages,
        "messages_per_request": messages / completed if messages and completed else None,
        "extproc_cpu_us_per_message": cpu["sidecar"] / messages * 1e6 if messages else None,
        "envoy_cpu_us_per_request": cpu["envoy"] / completed * 1e6 if completed else None,
        "proxy_cpu_us_per_request": (cpu["envoy"] + cpu["sidecar"]) / completed * 1e6
        if completed else None,
        "host_busy": busy,
        "other_cpu_cores": max(0.0, others),
    }  # fmt: skip


def run_setup(variant: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    workdir = root / variant
    workdir.mkdir(parents=True)
    stack = BenchStack(
        write_policy(workdir, args.policy),
        workdir,
        variant=variant,
        frames=args.frames,
        gap_ms=args.gap_ms,
        workers=args.workers if variant == "sidecar" else None,
    )
    print(f"  {SETUP_LABEL[variant]}: starting", end="", flush=True)
    try:
        stack.start()
        # Warm-up: connections (client, upstream pool, ext_proc HTTP/2) and caches.
        warm = run_client(
            stack, "gapped", args.concurrency, args.warmup, workdir / "client.log", args.api_key
        )
        if not warm["completed"]:
            raise SetupBroken(
                f"no request succeeded during warm-up: {warm['first_error'].strip()}"
                f"{_log_hint(stack)}"
            )
        results = {}
        for shape in args.shapes:
            print(f", {shape}", end="", flush=True)
            profile = None
            if args.profile and variant != "envoy":
                profile = RESULTS.parent / f"profile-{variant}-{shape}.speedscope.json"
            results[shape] = measure(
                stack, shape, args.concurrency, args.duration, workdir, profile, args.api_key
            )
            if profile is not None and profile.exists():
                results[shape]["profile"] = str(profile.relative_to(REPO))
        print(" - done", flush=True)
        return results
    except BaseException:
        print(" - failed", flush=True)
        raise
    finally:
        stack.stop()


# -- report -------------------------------------------------------------------------


def _usable(results: dict[str, dict[str, Any]], setup: str, shape: str) -> dict | None:
    """A run that completed requests (a broken one has no percentiles to compare)."""
    r = results.get(setup, {}).get(shape)
    return r if r is not None and r["client"]["completed"] > 0 else None


def derive(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Differences against Envoy alone and the sidecar/noop ratios, per shape."""
    derived: dict[str, Any] = {}
    for shape in SHAPES:
        base = _usable(results, "envoy", shape)
        noop = _usable(results, "noop", shape)
        ours = _usable(results, "sidecar", shape)
        d: dict[str, Any] = {}
        for setup in results:
            r = _usable(results, setup, shape)
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
        if (
            noop
            and ours
            and noop["extproc_cpu_us_per_message"]
            and ours["extproc_cpu_us_per_message"]
        ):
            d["cpu_per_message_ratio"] = (
                ours["extproc_cpu_us_per_message"] / noop["extproc_cpu_us_per_message"]
            )
        if d:
            derived[shape] = d
    return derived


def targets(
    derived: dict[str, Any], setups: list[str], shapes: list[str], concurrency: int
) -> list[dict[str, Any]]:
    """PASS/MISS per target and shape; `pass` is None when it could not be measured."""
    out: list[dict[str, Any]] = []
    streams = "" if concurrency == TARGET_STREAMS else f" [{concurrency} streams, not 50]"
    for shape in shapes:
        d = derived.get(shape, {})
        if {"noop", "sidecar"} <= set(setups):
            ratio = d.get("cpu_per_message_ratio")
            out.append({
                "name": f"sidecar CPU per ext_proc message vs no-op ({shape})",
                "value": ratio, "unit": "x", "target": f"<= {CPU_RATIO_TARGET}x",
                "pass": None if ratio is None else ratio <= CPU_RATIO_TARGET,
            })  # fmt: skip
        if {"envoy", "sidecar"} <= set(setups):
            added = d.get("sidecar", {}).get("added_chunk_ms", {}).get("p99")
            out.append({
                "name": f"added p99 per chunk, sidecar vs Envoy alone ({shape}){streams}",
                "value": added, "unit": "ms", "target": f"< {ADDED_P99_TARGET_MS:g} ms",
                "pass": None if added is None else added < ADDED_P99_TARGET_MS,
            })  # fmt: skip
    return out


def _f(value: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


def _row(setup: str, r: dict[str, Any], d: dict[str, Any]) -> str:
    c = r["client"]
    added = d.get("added_chunk_ms", {}) if setup != "envoy" else {}
    return (
        f"{SETUP_LABEL[setup]:<18} {c['requests_per_s']:>8.1f} "
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


def render(report: dict[str, Any]) -> str:
    meta, results, derived = report["meta"], report["results"], report["derived"]
    lines = [
        "",
        f"Envoy {meta['envoy_version']} on loopback, {meta['cpus']} CPUs, Python "
        f"{meta['python']}; {meta['concurrency']} concurrent streams, {meta['frames']} content "
        f"frames per stream ({meta['frames'] + 2} timed), {meta['duration_s']:g} s per run",
        "Latencies in ms. chunk: client receive - provider send, per frame; added: minus "
        "Envoy alone (same percentile).",
        "µs CPU/msg: ext_proc process CPU per ext_proc message. proxy µs/req: Envoy + "
        "ext_proc CPU per request; x Envoy: that vs Envoy alone.",
        "host busy: whole machine; other: CPU cores used by processes outside the bench.",
    ]
    header = (
        f"{'setup':<18} {'req/s':>8} {'TTFB p50':>8} {'p99':>6} {'chunk p50':>9} {'p99':>6} "
        f"{'added p50':>9} {'p99':>6} {'msgs/req':>8} {'µs CPU/msg':>10} "
        f"{'proxy µs/req':>12} {'x Envoy':>7} {'host busy':>9} {'other':>6} {'errors':>6}"
    )
    for shape in meta["shapes"]:
        desc = (
            f"one write per frame, {meta['gap_ms']:g} ms apart"
            if shape == "gapped"
            else "all frames in one write"
        )
        lines += ["", f"[{shape}] {desc}", header, "-" * len(header)]
        for setup in meta["setups"]:
            r = results.get(setup, {}).get(shape)
            if r is None:
                failure = report["failures"].get(setup, "not run")
                lines.append(f"{SETUP_LABEL[setup]:<18} FAILED: {failure.splitlines()[0][:100]}")
                continue
            lines.append(_row(setup, r, derived.get(shape, {}).get(setup, {})))
        d = derived.get(shape, {})
        ratio = d.get("cpu_per_message_ratio")
        if ratio is not None:
            lines.append(f"sidecar / no-op CPU per ext_proc message: {ratio:.2f}x")
        rps = [
            f"{SETUP_LABEL[s].lstrip('+ ')} {_f(d[s].get('rps_vs_envoy'))}x"
            for s in ("noop", "sidecar")
            if s in d
        ]
        if rps:
            lines.append("req/s vs Envoy alone: " + ", ".join(rps))
    problems = [
        f"  {SETUP_LABEL[setup]} [{shape}]: {sum(r['client']['errors'].values())} failed "
        f"requests {r['client']['errors']}; first: {r['client']['first_error'].strip()}"
        for setup, per_shape in results.items()
        for shape, r in per_shape.items()
        if r["client"]["errors"]
    ]
    problems += [f"  {SETUP_LABEL[s]}: {msg}" for s, msg in report["failures"].items()]
    for setup, per_shape in results.items():
        for shape, r in per_shape.items():
            ours, envoys = r["extproc_messages"], r["envoy_extproc_messages_sent"]
            if ours and abs(ours - envoys) > 0.02 * ours:
                problems.append(
                    f"  {SETUP_LABEL[setup]} [{shape}]: counted {ours} ext_proc messages, "
                    f"Envoy says it sent {envoys}"
                )
    if problems:
        lines += ["", "Problems:", *problems]
    other = max(
        (r["other_cpu_cores"] for per_shape in results.values() for r in per_shape.values()),
        default=0.0,
    )
    if other > OTHER_LOAD_WARN:
        lines += [
            "",
            f"WARNING: other processes used up to {other:.2f} CPU cores during the runs; "
            "latencies (and less so CPU per message) are unreliable. Rerun on a quiet machine.",
        ]
    lines += ["", "Targets (a miss is reported, never fatal):"]
    for t in report["targets"]:
        if t["pass"] is None:
            lines.append(f"  N/A   {t['name']}: not measured (target {t['target']})")
            continue
        value = f"{t['value']:.2f}x" if t["unit"] == "x" else f"{t['value']:+.2f} ms"
        lines.append(
            f"  {'PASS' if t['pass'] else 'MISS'}  {t['name']}: {value} (target {t['target']})"
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
    parser.add_argument("-d", "--duration", type=float, help="seconds per run (15; quick 2.5)")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up per setup (1.5; 0.5)")
    parser.add_argument("--frames", type=int, default=64, help="content frames per stream")
    parser.add_argument("--gap-ms", type=float, default=5.0, help="gap between frames (gapped)")
    parser.add_argument(
        "--workers", type=int, help="sidecar worker processes (default: the policy's, 1)"
    )
    parser.add_argument(
        "--policy",
        type=Path,
        help="bench this policy file instead of the built-in one (ports, providers and "
        "route targets are replaced; every route goes to the bench provider)",
    )
    parser.add_argument(
        "--api-key", help="send `Authorization: Bearer KEY` (for a --policy with auth)"
    )
    parser.add_argument("--setups", default=",".join(SETUPS), help="subset, comma-separated")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="subset, comma-separated")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON results file")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, configs)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the ext_proc servers during each run (bench/results/profile-*.json, "
        "open in speedscope.app); skews the CPU figures a little",
    )
    args = parser.parse_args(argv)
    quick = args.quick
    args.concurrency = args.concurrency or (10 if quick else TARGET_STREAMS)
    args.duration = args.duration or (2.5 if quick else 15.0)
    args.warmup = args.warmup or (0.5 if quick else 1.5)
    args.setups = [s for s in args.setups.split(",") if s]
    args.shapes = [s for s in args.shapes.split(",") if s]
    bad = [s for s in args.setups if s not in SETUPS] + [s for s in args.shapes if s not in SHAPES]
    if bad:
        parser.error(f"unknown setup/shape {bad}; setups {SETUPS}, shapes {SHAPES}")
    return args


_interrupted = False


def _terminate(signum: int, frame: object) -> None:
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt  # unwinds through every `finally`, which stops the stacks


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    root = Path(tempfile.mkdtemp(prefix="extproc-bench-"))
    started = time.monotonic()
    loadavg = os.getloadavg()
    idle_busy = _sample_busy(1.0)
    print(
        f"bench: {len(args.setups)} setups x {len(args.shapes)} shapes, "
        f"{args.concurrency} streams, {args.duration:g} s each (work dir {root}); "
        f"machine {idle_busy * 100:.0f}% busy before start",
        flush=True,
    )
    results: dict[str, dict[str, Any]] = {}
    failures: dict[str, str] = {}
    try:
        for variant in args.setups:
            try:
                results[variant] = run_setup(variant, args, root)
            except SetupBroken as exc:
                failures[variant] = str(exc)
    except KeyboardInterrupt:
        print(f"\nbench: interrupted; everything stopped (logs in {root})", file=sys.stderr)
        return 130
    except (StackError, HarnessError, EnvoyNotFoundError, OSError) as exc:
        if _interrupted:  # Ctrl-C reached the children first
            print(f"\nbench: interrupted; everything stopped (logs in {root})", file=sys.stderr)
            return 130
        print(f"\nbench: harness failure: {exc}\n(logs kept in {root})", file=sys.stderr)
        return 2
    derived = derive(results)
    report = {
        "meta": {
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "loadavg_before": loadavg,
            "busy_before": idle_busy,
            "python": platform.python_version(),
            "envoy_version": envoy_version(),
            "concurrency": args.concurrency,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "frames": args.frames,
            "gap_ms": args.gap_ms,
            "sidecar_workers": args.workers or 1,
            "policy": str(args.policy) if args.policy else "built-in (bench/run.py BENCH_POLICY)",
            "setups": args.setups,
            "shapes": args.shapes,
            "quick": args.quick,
            "profiled": args.profile,
            "wall_s": time.monotonic() - started,
        },
        "results": results,
        "failures": failures,
        "derived": derived,
        "targets": targets(derived, args.setups, args.shapes, args.concurrency),
    }
    print(render(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nresults: {args.out} (wall {report['meta']['wall_s']:.0f} s)")
    broken = sorted(failures) + [
        f"{setup}/{shape}"
        for setup, per_shape in results.items()
        for shape, r in per_shape.items()
        if r["client"]["completed"] == 0
    ]
    if broken:
        print(
            f"bench: nothing measured for {', '.join(broken)}; logs kept in {root}", file=sys.stderr
        )
    elif args.keep:
        print(f"work dir kept: {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if broken else 0


if __name__ == "__main__":
    raise SystemExit(main())
