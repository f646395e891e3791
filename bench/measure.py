"""One load run against a started stack, and what is read around it.

CPU per ext_proc message is utime+stime of the ext_proc process tree (from
/proc/<pid>/stat, before and after the load) divided by the messages it handled (the
noop counts them; the sidecar's `ai_gateway_extproc_message_seconds_count`; Envoy's own
ext_proc stats cross-check both). During the run a sampler thread reads, four times a
second, the ext_proc tree's resident memory and Envoy's count of open streams to it,
for memory per open stream. Per-chunk latency comes from the load client.
"""

from __future__ import annotations

import json
import os
import re
import resource
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.stack import INCLUDE_USAGE, REPO_ROOT, BenchStack
from extproc.bootstrap import EXTPROC_CLUSTER

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
SAMPLE_EVERY_S = 0.25


class HarnessError(RuntimeError):
    """The benchmark itself could not run (as opposed to a missed target)."""


# -- processes and the machine ------------------------------------------------------


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, utime+stime jiffies) of every process."""
    table: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        try:
            table[int(entry)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
        except (ValueError, IndexError):
            continue
    return table


def _tree(table: dict[int, tuple[int, int]], pid: int) -> set[int]:
    """`pid` and its live descendants (a sidecar with workers > 1 is a supervisor plus
    worker processes)."""
    tree, frontier = {pid}, [pid]
    while frontier:
        ppid = frontier.pop()
        children = [p for p, row in table.items() if row[0] == ppid and p not in tree]
        tree.update(children)
        frontier += children
    return tree


def cpu_seconds(pid: int | None) -> float:
    """CPU time of a process and its live descendants."""
    if pid is None:
        return 0.0
    table = _proc_table()
    return sum(table[p][1] for p in _tree(table, pid) if p in table) / _CLK_TCK


def process_tree(pid: int | None) -> set[int]:
    """A process and its live descendants, now."""
    return set() if pid is None else _tree(_proc_table(), pid)


def rss_bytes(pids: set[int]) -> int:
    """Resident memory of these processes (statm: cheaper than a scan of /proc)."""
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return total * _PAGE


def host_cpu() -> tuple[float, float, float]:
    """(busy, total, task) jiffies of the whole machine, from /proc/stat. `task` is
    time that processes are charged with (user, nice, system) plus steal (the hypervisor
    running someone else); interrupt time is left out since nobody is charged with it."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, idle, iowait, _irq, _softirq, steal = values[:8]
    total = sum(values[:8])
    return total - idle - iowait, total, user + nice + system + steal


def sample_busy(seconds: float) -> float:
    """Share of the machine's CPU in use over `seconds` (before the bench starts)."""
    busy0, total0, _ = host_cpu()
    time.sleep(seconds)
    busy1, total1, _ = host_cpu()
    return (busy1 - busy0) / max(1, total1 - total0)


def _children_cpu() -> float:
    """CPU of this process's finished children (the load clients), in seconds."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# -- counters ------------------------------------------------------------------------


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()


_COUNT_RE = re.compile(r"^ai_gateway_extproc_message_seconds_count\{[^}]*\}\s+(\S+)$", re.M)
_ENVOY_MSGS_RE = re.compile(r"\.ext_proc\.stream_msgs_sent: (\d+)$", re.M)
# The observing filter's messages (`streaming.meter_off_path`): never answered, so the
# sidecar times none of them; Envoy's count is the count.
_OBSERVED_MSGS_RE = re.compile(r"\.ext_proc\.observer\.stream_msgs_sent: (\d+)$", re.M)
_ACTIVE_RE = re.compile(rf"^cluster\.{EXTPROC_CLUSTER}\.upstream_rq_active: (\d+)$", re.M)


def extproc_messages(stack: BenchStack) -> int | None:
    """ext_proc messages handled so far: the noop's count, or the sidecar's metric."""
    server = stack.config.server
    if stack.ext_proc == "noop":
        return int(json.loads(_get(f"http://{server.metrics_listen}/"))["messages"])
    if stack.ext_proc == "sidecar":
        counts = _COUNT_RE.findall(_get(f"http://{server.metrics_listen}/metrics"))
        return round(sum(float(v) for v in counts)) if counts else None
    return None


def envoy_extproc_messages(stack: BenchStack) -> int:
    """Messages Envoy sent to the ext_proc server (its own stats): the cross-check."""
    return sum(int(v) for v in _ENVOY_MSGS_RE.findall(_get(f"{stack.admin_url}/stats")))


def observed_messages(stack: BenchStack) -> int:
    """Messages Envoy sent to the sidecar's observing filter (0 without one)."""
    return sum(int(v) for v in _OBSERVED_MSGS_RE.findall(_get(f"{stack.admin_url}/stats")))


def open_streams(stack: BenchStack) -> int | None:
    """gRPC streams Envoy has open to the ext_proc server right now."""
    text = _get(
        f"{stack.admin_url}/stats?filter=^cluster\\.{EXTPROC_CLUSTER}\\.upstream_rq_active$"
    )
    found = _ACTIVE_RE.findall(text)
    return int(found[0]) if found else None


class Sampler(threading.Thread):
    """The ext_proc tree's RSS and Envoy's open ext_proc streams, SAMPLE_EVERY_S apart."""

    def __init__(self, stack: BenchStack, pid: int | None) -> None:
        super().__init__(daemon=True)
        self.stack, self.pids = stack, process_tree(pid)
        self.samples: list[tuple[float, int, int]] = []  # (t, rss bytes, open streams)
        self._stop_event = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        while not self._stop_event.wait(SAMPLE_EVERY_S):
            try:
                streams = open_streams(self.stack)
            except OSError:
                continue
            if streams is not None:
                self.samples.append((time.monotonic() - start, rss_bytes(self.pids), streams))

    def stop(self) -> dict[str, Any] | None:
        """The steady state: medians over the samples of the busiest half of the run."""
        self._stop_event.set()
        self.join(5)
        if not self.samples:
            return None
        peak = max(s[2] for s in self.samples)
        steady = [s for s in self.samples if s[2] >= peak / 2] or self.samples
        return {
            "rss_bytes": statistics.median(s[1] for s in steady),
            "open_streams": statistics.median(s[2] for s in steady),
            "max_rss_bytes": max(s[1] for s in self.samples),
            "max_open_streams": peak,
            "samples": len(self.samples),
        }


# -- one run -------------------------------------------------------------------------


def run_client(
    stack: BenchStack,
    shape: str,
    concurrency: int,
    duration: float,
    log: Path,
    api_key: str | None = None,
    gap_ms: float | None = None,
) -> dict[str, Any]:
    """`bench.client` as a subprocess; its JSON summary."""
    gap = stack.gap_ms if gap_ms is None else gap_ms
    argv = [
        sys.executable, "-m", "bench.client", "--url", f"{stack.base_url}/v1/chat/completions",
        "-c", str(concurrency), "-d", str(duration), "--shape", shape,
        "--frames", str(stack.frames), "--gap-ms", str(gap),
    ]  # fmt: skip
    if stack.variant == "translated":  # only content frames carry a stamp through
        argv += ["--stamped", str(stack.frames)]
    if stack.variant in INCLUDE_USAGE:
        argv.append("--include-usage")
    env = dict(os.environ)
    if api_key:
        env["BENCH_API_KEY"] = api_key  # not on the command line
    stream_s = (stack.frames + 2) * gap / 1000
    with open(log, "ab") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, cwd=REPO_ROOT, env=env)
        try:
            out, _ = proc.communicate(timeout=duration + 4 * stream_s + 120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise HarnessError(f"the load client failed ({proc.returncode}):\n{tail}")
    return json.loads(out)


def measure(
    stack: BenchStack,
    shape: str,
    concurrency: int,
    duration: float,
    workdir: Path,
    api_key: str | None = None,
    gap_ms: float | None = None,
) -> dict[str, Any]:
    """One load run, with CPU, memory and message counters read around it."""
    pids = {name: stack.pid(name) for name in ("envoy", "sidecar", "mock")}
    msgs0, envoy_msgs0 = extproc_messages(stack), envoy_extproc_messages(stack)
    observed0 = observed_messages(stack) if stack.ext_proc else 0
    rss_idle = rss_bytes(process_tree(pids["sidecar"]))
    sampler = Sampler(stack, pids["sidecar"]) if stack.ext_proc else None
    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    children0 = _children_cpu()
    host0, wall0 = host_cpu(), time.monotonic()
    if sampler is not None:
        sampler.start()
    memory = None
    try:
        client = run_client(
            stack, shape, concurrency, duration, workdir / "client.log", api_key, gap_ms
        )
    finally:
        host1, wall1 = host_cpu(), time.monotonic()
        cpu1 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        client_cpu = _children_cpu() - children0  # the whole client process, start-up too
        if sampler is not None:
            memory = sampler.stop()
    msgs1, envoy_msgs1 = extproc_messages(stack), envoy_extproc_messages(stack)
    observed = (observed_messages(stack) if stack.ext_proc else 0) - observed0
    for name in pids:
        if name == "sidecar" and stack.ext_proc is None:
            continue
        if stack.pid(name) is None:
            raise HarnessError(f"{name} died during the run:\n{stack.log(name)[-3000:]}")
    cpu = {name: cpu1[name] - cpu0[name] for name in pids}
    messages = None if msgs0 is None or msgs1 is None else msgs1 - msgs0 + observed
    envoy_messages = envoy_msgs1 - envoy_msgs0 + observed
    counted_by = "ext_proc server"
    if messages is None and stack.ext_proc is not None:
        # The sidecar's metric is missing (renamed?): fall back to Envoy's own count.
        messages, counted_by = envoy_messages, "envoy stats"
    if memory is not None:
        memory["rss_idle_bytes"] = rss_idle
    return summarise(
        client, cpu, client_cpu, messages, envoy_messages, host0, host1, wall1 - wall0,
        memory=memory, counted_by=counted_by if stack.ext_proc else None,
        gap_ms=stack.gap_ms if gap_ms is None else gap_ms,
    )  # fmt: skip


def summarise(
    client: dict[str, Any],
    cpu: dict[str, float],
    client_cpu: float,
    messages: int | None,
    envoy_messages: int,
    host0: tuple[float, float, float],
    host1: tuple[float, float, float],
    wall_s: float,
    *,
    memory: dict[str, Any] | None,
    counted_by: str | None,
    gap_ms: float,
) -> dict[str, Any]:
    """The run's record in the results file (pure: `tests/test_bench.py` builds one)."""
    completed = client["completed"]
    busy = (host1[0] - host0[0]) / max(1, host1[1] - host0[1])
    # CPU that none of the bench's processes used: other work on the machine, which
    # makes latencies unreliable (a shared CI box, a test suite running alongside).
    ours = sum(cpu.values()) + client_cpu
    others = ((host1[2] - host0[2]) / _CLK_TCK - ours) / max(1e-9, wall_s)
    chunks = client["frames"]
    return {
        "client": client,
        "gap_ms": gap_ms,
        "cpu_s": {"envoy": cpu["envoy"], "extproc": cpu["sidecar"], "provider": cpu["mock"],
                  "client": client["client_cpu_s"]},
        "extproc_messages": messages,
        "extproc_messages_counted_by": counted_by,
        "envoy_extproc_messages_sent": envoy_messages,
        "messages_per_request": messages / completed if messages and completed else None,
        "extproc_cpu_us_per_message": cpu["sidecar"] / messages * 1e6 if messages else None,
        "extproc_messages_per_s": messages / wall_s if messages else None,
        "envoy_cpu_us_per_request": cpu["envoy"] / completed * 1e6 if completed else None,
        "proxy_cpu_us_per_request": (cpu["envoy"] + cpu["sidecar"]) / completed * 1e6
        if completed else None,
        "proxy_cpu_us_per_chunk": (cpu["envoy"] + cpu["sidecar"]) / chunks * 1e6
        if chunks else None,
        "extproc_cpu_us_per_chunk": cpu["sidecar"] / chunks * 1e6 if chunks else None,
        "memory": memory,
        "host_busy": busy,
        "other_cpu_cores": max(0.0, others),
        "wall_s": wall_s,
    }  # fmt: skip
