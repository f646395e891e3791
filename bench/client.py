"""Load generator: C concurrent streaming Chat Completions clients (aiohttp), one process.

Each worker posts a streaming request (no `stream_options`, like most clients), reads
the SSE body as it arrives, and for every frame records `receive time - send time`
from the `"bench_t"` CLOCK_MONOTONIC stamp the bench provider wrote into it
(CLOCK_MONOTONIC is system-wide on Linux, so processes can compare). A frame split
across reads counts when its end arrives. It also checks what a user would: status
200, every frame present, `[DONE]` last, and no usage figures leaked to a client that
did not ask for them (`"usage":null`, what OpenAI sends while usage is on, is no
figure). Prints one JSON object on stdout.

Run: `python -m bench.client --url http://127.0.0.1:8080/v1/chat/completions -c 50 -d 10`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

import aiohttp
import orjson

TS_KEY = b'"bench_t":'
# A stamp that went through translation: inside the text (`" word bench_t=<ns>"`).
TS_TEXT = b"bench_t="
_DONE = b"data: [DONE]"
_USAGE = b'"usage":{'
BODY_FIELDS = {
    "model": "gpt-4o-mini",
    "stream": True,
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Write a short poem about a gateway between worlds."},
    ],
}
BODY = orjson.dumps(BODY_FIELDS)
# `--include-usage`: the client asks for usage, and gets one more frame (the usage one).
USAGE_BODY = orjson.dumps({**BODY_FIELDS, "stream_options": {"include_usage": True}})


class Results:
    def __init__(self) -> None:
        self.chunk_ns: list[int] = []  # per-frame latency, ns
        self.trace: list[tuple[int, int, int]] | None = None  # (receive ns, latency, index)
        self.ttfb_ns: list[int] = []  # request sent -> first body byte
        self.duration_ns: list[int] = []
        self.completed = 0
        self.in_window = 0
        self.errors: dict[str, int] = {}
        self.first_error = ""
        self.include_usage = False  # the client asked for usage: a usage frame is no leak

    def error(self, kind: str, detail: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        if not self.first_error:
            self.first_error = f"{kind}: {detail}"[:500]


async def one_request(
    session: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    expected: int,
    res: Results,
    text_stamps: bool = False,
) -> bool:
    monotonic_ns = time.monotonic_ns
    start = monotonic_ns()
    first = 0
    frames = 0
    done = False
    leaked = False
    tail = b""
    lat = res.chunk_ns
    trace = res.trace
    body = USAGE_BODY if res.include_usage else BODY
    async with session.post(url, data=body, headers=headers) as resp:
        if resp.status != 200:
            text = await resp.text(errors="replace")
            res.error(f"status_{resp.status}", text)
            return False
        async for chunk in resp.content.iter_any():
            now = monotonic_ns()
            if not first:
                first = now
            data = tail + chunk if tail else chunk
            cut = data.rfind(b"\n\n")
            if cut < 0:
                tail = data
                continue
            tail = data[cut + 2 :]
            pos = data.find(TS_KEY)
            while 0 <= pos < cut:
                pos += len(TS_KEY)
                end = data.find(b"}", pos)
                lat.append(now - int(data[pos:end]))
                if trace is not None:
                    trace.append((now, lat[-1], frames))
                frames += 1
                pos = data.find(TS_KEY, end)
            pos = data.find(TS_TEXT) if text_stamps else -1
            while 0 <= pos < cut:
                pos += len(TS_TEXT)
                end = data.find(b'"', pos)
                lat.append(now - int(data[pos:end]))
                if trace is not None:
                    trace.append((now, lat[-1], frames))
                frames += 1
                pos = data.find(TS_TEXT, end)
            if not done and _DONE in data:
                done = True
            if not leaked and _USAGE in data:
                leaked = True
    finished = monotonic_ns()
    if leaked and not res.include_usage:
        res.error("usage_leaked", "the client did not ask for usage but got usage figures")
    if frames != expected or not done or tail.strip():
        res.error("incomplete", f"{frames}/{expected} frames, [DONE]={done}, tail={tail[:80]!r}")
        return False
    res.ttfb_ns.append(first - start)
    res.duration_ns.append(finished - start)
    return True


async def worker(
    session: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    expected: int,
    deadline: int,
    res: Results,
    text_stamps: bool = False,
) -> None:
    while time.monotonic_ns() < deadline:
        try:
            ok = await one_request(session, url, headers, expected, res, text_stamps)
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            res.error(type(exc).__name__, str(exc))
            await asyncio.sleep(0.05)  # do not spin on a dead gateway
            continue
        if ok:
            res.completed += 1
            if time.monotonic_ns() <= deadline:
                res.in_window += 1


def summary(values_ns: list[int]) -> dict[str, float | int]:
    """Percentiles in milliseconds (nearest rank)."""
    if not values_ns:
        return {"n": 0}
    ordered = sorted(values_ns)
    n = len(ordered)

    def pct(p: float) -> float:
        return ordered[min(n - 1, max(0, round(p / 100 * n) - 1))] / 1e6

    return {
        "n": n,
        "mean": sum(ordered) / n / 1e6,
        "p50": pct(50),
        "p90": pct(90),
        "p99": pct(99),
        "max": ordered[-1] / 1e6,
    }


async def run(args: argparse.Namespace) -> dict:
    headers = {
        "content-type": "application/json",
        "x-bench-shape": args.shape,
        "x-bench-frames": str(args.frames),
        "x-bench-gap-ms": str(args.gap_ms),
    }
    if os.environ.get("BENCH_API_KEY"):
        headers["authorization"] = f"Bearer {os.environ['BENCH_API_KEY']}"
    # Role chunk, content chunks, finish chunk (and the usage chunk, when asked).
    expected = args.frames + 2 + args.include_usage
    if args.stamped is not None:  # a translated stream: stamps in the text
        expected = args.stamped
    res = Results()
    res.include_usage = args.include_usage
    if args.trace:
        res.trace = []
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None)
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False
    ) as session:
        cpu0 = os.times()
        start = time.monotonic_ns()
        deadline = start + int(args.duration * 1e9)
        await asyncio.gather(
            *(
                worker(
                    session, args.url, headers, expected, deadline, res, args.stamped is not None
                )
                for _ in range(args.concurrency)
            )
        )
        end = time.monotonic_ns()
        cpu1 = os.times()
    if args.trace:
        with open(args.trace, "wb") as f:
            f.write(orjson.dumps({"start_ns": start, "frames": res.trace}))
    return {
        "concurrency": args.concurrency,
        "shape": args.shape,
        "duration_s": args.duration,
        "elapsed_s": (end - start) / 1e9,
        "completed": res.completed,
        "completed_in_window": res.in_window,
        "requests_per_s": res.in_window / args.duration,
        "frames": len(res.chunk_ns),
        "errors": res.errors,
        "first_error": res.first_error,
        "chunk_ms": summary(res.chunk_ns),
        "ttfb_ms": summary(res.ttfb_ns),
        "request_ms": summary(res.duration_ns),
        "client_cpu_s": (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system),
    }


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.client", description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("-c", "--concurrency", type=int, default=50)
    parser.add_argument("-d", "--duration", type=float, default=10.0, help="seconds of load")
    parser.add_argument("--shape", choices=("gapped", "coalesced"), default="gapped")
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument(
        "--stamped",
        type=int,
        help="stamped frames per stream when the stamps travel in the text (a translated "
        "stream: content frames only); default: frames + 2 with stamps in the JSON",
    )
    parser.add_argument("--gap-ms", type=float, default=5.0)
    parser.add_argument("--request-timeout", type=float, default=60.0)
    parser.add_argument(
        "--include-usage", action="store_true", help="ask for usage (stream_options)"
    )
    parser.add_argument(
        "--trace",
        help="write every frame's (receive ns, latency ns, index) "
        "as JSON to this file, to see when slow frames happen",
    )
    args = parser.parse_args()
    result = asyncio.run(run(args))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
