"""Soak and overload benchmark (issue 17): the full policy, 2 workers, Redis, loopback.

Phases (`--phases`, in order; each bounded):

  baseline  a few streams, unloaded: the TTFB the overload phase is held to
  overload  2x the admission capacity (workers x server.max_open_streams): admitted
            streams keep TTFB p99 within 2x of the baseline, the rest get 503
            `overloaded` in < 50 ms (the goals are printed next to the figures)
  soak      `--streams` concurrent streams for `--duration` s
  kill9     `--fault-streams` streams; one worker gets SIGKILL mid-run
  redis     Redis killed for 10 s, started again on its port
  hangup    a third of the clients hang up at a random byte of the answer
  sigterm   one worker gets SIGTERM mid-run (the supervisor starts it again)
  reload    the policy file changes mid-run (a live reload)
  provider  a quarter of the answers are provider 500s, a quarter are cut mid-stream

Each phase prints completed / shed / failed by kind, TTFB p50/p99, the shed answers'
latency, metered vs served completion tokens, the active streams after, and RSS per
open stream. Served tokens count the content frames that reached a client; metered
ones are `ai_gateway_tokens_total{kind="completion"}`.

The load generator is lean on purpose (httpx was the largest CPU user at 1,000
streams): raw HTTP/1.1 over asyncio streams, one connection per request, the body
de-chunked and scanned once at its end. A shed client waits its Retry-After.

Run: `python -m bench.soak [--phases baseline,overload] [--streams 1000] [--duration 60]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from bench.measure import open_streams, process_tree, rss_bytes
from bench.stack import BENCH_KEY, BenchStack, write_policy
from tests.redis_server import RedisServer

PHASES = (
    "baseline", "overload", "soak", "kill9", "redis", "hangup", "sigterm", "reload", "provider",
)  # fmt: skip
CONTENT = b'"delta":{"content":" '
BODY = json.dumps(
    {
        "model": "gpt-4o-mini",
        "stream": True,
        "messages": [{"role": "user", "content": "Write a short poem about a gateway."}],
    }
).encode()


@dataclass
class Tally:
    """What one phase's clients saw."""

    outcomes: Counter = field(default_factory=Counter)
    ttfb: list[float] = field(default_factory=list)  # admitted 200s: send -> first body byte
    shed_s: list[float] = field(default_factory=list)  # 503 overloaded: send -> whole answer
    served_tokens: int = 0


def dechunk(data: bytes) -> tuple[bytes, bool]:
    """An HTTP/1.1 chunked body; False when it ends before its last chunk."""
    out, pos = bytearray(), 0
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            return bytes(out), False
        size = int(data[pos:end].split(b";")[0] or b"0", 16)
        if size == 0:
            return bytes(out), True
        out += data[end + 2 : end + 2 + size]
        if end + 2 + size > len(data):
            return bytes(out), False
        pos = end + 4 + size


async def one(host: str, port: int, head: bytes, tally: Tally, hangup: float | None) -> float:
    """One request; returns how long to wait before the next (Retry-After)."""
    start = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
    except (OSError, TimeoutError):
        tally.outcomes["failed:connect"] += 1
        return 0.5
    try:
        writer.write(head)
        status_head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        first = time.monotonic()
        status = int(status_head.split(b" ", 2)[1])
        chunked = b"transfer-encoding: chunked" in status_head.lower()
        data = bytearray()
        limit = None if hangup is None else int(hangup * 14_000)
        while True:
            piece = await asyncio.wait_for(reader.read(65536), 30)
            if not piece:
                break
            if not data:
                first = time.monotonic()
            data += piece
            if limit is not None and len(data) >= limit:
                tally.outcomes["hung_up"] += 1
                return 0.0
        body, whole = dechunk(bytes(data)) if chunked else (bytes(data), True)
        if status == 503 and b'"overloaded"' in body:
            tally.outcomes["shed"] += 1
            tally.shed_s.append(time.monotonic() - start)
            retry = status_head.lower().split(b"retry-after: ", 1)
            return float(retry[1].split(b"\r\n", 1)[0]) if len(retry) == 2 else 1.0
        if status != 200:
            tally.outcomes[f"failed:{status}"] += 1
            return 0.2
        tally.served_tokens += body.count(CONTENT)
        if not whole or not body.rstrip().endswith(b"data: [DONE]"):
            tally.outcomes["failed:cut"] += 1
            return 0.0
        tally.outcomes["completed"] += 1
        tally.ttfb.append(first - start)
        return 0.0
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
        tally.outcomes[f"failed:{type(exc).__name__}"] += 1
        return 0.2
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def load(
    base: str,
    streams: int,
    seconds: float,
    frames: int,
    gap_ms: float,
    hangups: float = 0.0,
    ramp: float = 5.0,
    faults: bool = False,
) -> Tally:
    """`streams` clients, each posting streams back to back until `seconds` passed."""
    host, port = base.removeprefix("http://").rsplit(":", 1)

    def head(extra: str = "") -> bytes:
        return (
            f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}:{port}\r\n"
            f"content-type: application/json\r\nauthorization: Bearer {BENCH_KEY}\r\n"
            f"x-bench-frames: {frames}\r\nx-bench-gap-ms: {gap_ms}\r\n{extra}"
            f"content-length: {len(BODY)}\r\nconnection: close\r\n\r\n"
        ).encode() + BODY

    plain = head()
    failing = head("x-bench-status: 500\r\n")
    tally = Tally()
    deadline = time.monotonic() + seconds

    async def client(index: int) -> None:
        await asyncio.sleep(random.random() * min(ramp, seconds / 4))  # starts spread
        while time.monotonic() < deadline:
            hangup = random.random() if random.random() < hangups else None
            request, dice = plain, random.random()
            if faults and dice < 0.25:
                request = failing
            elif faults and dice < 0.5:
                request = head(f"x-bench-cut-after: {random.randint(1, frames)}\r\n")
            wait = await one(host, int(port), request, tally, hangup)
            if wait:
                await asyncio.sleep(wait)

    await asyncio.gather(*(client(i) for i in range(streams)))
    return tally


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


def metric(url: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in httpx.get(url, timeout=5).text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def workers_of(stack: BenchStack) -> list[int]:
    supervisor = stack.pid("sidecar")
    return sorted(process_tree(supervisor) - {supervisor}) if supervisor else []


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.redis = RedisServer(workdir / "redis").start()
        policy = write_policy(workdir, "full", workers=args.workers)
        config = yaml.safe_load(policy.read_text())
        config["rate_limits"]["store"] = "redis"
        config["rate_limits"]["redis"] = {"url": self.redis.url}
        config["server"]["log_level"] = "warning"
        if args.max_open_streams:
            config["server"]["max_open_streams"] = args.max_open_streams
        if args.max_queue_delay_ms is not None:
            config["server"]["max_queue_delay_ms"] = args.max_queue_delay_ms
        policy.write_text(yaml.safe_dump(config, sort_keys=False))
        self.policy = policy
        self.stack = BenchStack(
            policy, workdir, variant="full", frames=args.frames, gap_ms=args.gap_ms,
            workers=args.workers,
        )  # fmt: skip
        self.stack.start()
        self.capacity = args.workers * self.stack.config.server.max_open_streams
        self.baseline_p99: float | None = None

    def close(self) -> None:
        self.stack.stop()
        self.redis.stop()

    async def fault(self, phase: str, after: float) -> None:
        await asyncio.sleep(after)
        if phase in ("kill9", "sigterm"):
            pids = workers_of(self.stack)
            if pids:
                os.kill(pids[0], signal.SIGKILL if phase == "kill9" else signal.SIGTERM)
        elif phase == "redis":
            self.redis.kill()
            await asyncio.sleep(10)
            await asyncio.to_thread(self.redis.start)
        elif phase == "reload":
            text = self.policy.read_text()
            self.policy.write_text(text + f"\n# reloaded at {time.time()}\n")

    async def phase(self, phase: str) -> dict:
        a = self.args
        streams, seconds, hangups = a.fault_streams, a.fault_duration, 0.0
        if phase == "baseline":
            streams, seconds = a.baseline_streams, 10.0
        elif phase == "overload":
            streams, seconds = 2 * self.capacity, a.overload_duration
        elif phase == "soak":
            streams, seconds = a.streams, a.duration
        elif phase == "hangup":
            hangups = 1 / 3
        url = self.stack.metrics_url
        metered0 = metric(url, "ai_gateway_tokens_total", kind="completion")
        supervisor = self.stack.pid("sidecar")
        rss_idle = rss_bytes(process_tree(supervisor))
        peak = {"open": 0, "rss": 0}

        async def sample() -> None:
            while True:
                await asyncio.sleep(1.0)
                opened = await asyncio.to_thread(open_streams, self.stack) or 0
                if opened > peak["open"]:
                    peak["open"] = opened
                    peak["rss"] = rss_bytes(process_tree(self.stack.pid("sidecar")))

        sampler = asyncio.create_task(sample())
        fault = None
        if phase not in ("baseline", "overload", "soak", "hangup", "provider"):
            fault = asyncio.create_task(self.fault(phase, seconds / 3))
        t0 = time.monotonic()
        tally = await load(
            self.stack.base_url, streams, seconds, a.frames, a.gap_ms, hangups, a.ramp,
            faults=phase == "provider",
        )  # fmt: skip
        elapsed = time.monotonic() - t0
        sampler.cancel()
        if fault is not None:
            await fault
        await asyncio.sleep(2.0)  # settlement runs after the last byte
        active = metric(url, "ai_gateway_active_streams")
        metered = metric(url, "ai_gateway_tokens_total", kind="completion") - metered0
        ttfb50, ttfb99 = pct(tally.ttfb, 50), pct(tally.ttfb, 99)
        if phase == "baseline":
            self.baseline_p99 = ttfb99
        out = {
            "phase": phase,
            "streams": streams,
            "seconds": round(elapsed, 1),
            "outcomes": dict(sorted(tally.outcomes.items())),
            "ttfb_ms_p50": _ms(ttfb50),
            "ttfb_ms_p99": _ms(ttfb99),
            "shed_ms_p50": _ms(pct(tally.shed_s, 50)),
            "shed_ms_p99": _ms(pct(tally.shed_s, 99)),
            "served_tokens": tally.served_tokens,
            "metered_tokens": int(metered),
            "active_streams_after": int(active),
            "peak_open_streams": peak["open"],
            "rss_kib_per_open_stream": round((peak["rss"] - rss_idle) / 1024 / peak["open"], 1)
            if peak["open"]
            else None,
        }
        if phase == "overload" and self.baseline_p99 and ttfb99 is not None:
            out["capacity"] = self.capacity
            out["goal_ttfb_p99_within_2x"] = ttfb99 <= 2 * self.baseline_p99
            shed99 = pct(tally.shed_s, 99)
            out["goal_shed_under_50ms"] = shed99 is not None and shed99 < 0.05
        return out


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


async def main_async(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        soak = Soak(args, Path(tmp))
        try:
            for phase in args.phases.split(","):
                if phase not in PHASES:
                    raise SystemExit(f"unknown phase {phase!r}; one of {', '.join(PHASES)}")
                result = await soak.phase(phase)
                sys.stdout.write(json.dumps(result) + "\n")
                sys.stdout.flush()
        finally:
            soak.close()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--streams", type=int, default=1000, help="soak: concurrent streams")
    parser.add_argument("--duration", type=float, default=60.0, help="soak: seconds")
    parser.add_argument("--overload-duration", type=float, default=30.0)
    parser.add_argument("--baseline-streams", type=int, default=10)
    parser.add_argument("--fault-streams", type=int, default=100)
    parser.add_argument("--fault-duration", type=float, default=30.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--frames", type=int, default=50, help="tokens per stream")
    parser.add_argument("--gap-ms", type=float, default=20.0, help="between tokens")
    parser.add_argument("--max-open-streams", type=int, default=0,
                        help="server.max_open_streams (0: the product default)")  # fmt: skip
    parser.add_argument("--max-queue-delay-ms", type=int, default=None)
    parser.add_argument("--ramp", type=float, default=5.0, help="clients start within this")
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
