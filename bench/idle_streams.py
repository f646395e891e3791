"""Sidecar memory per open stream, the streams idle (issue 14: < 50 KiB per stream).

`bench/run.py`'s sweep measures memory under load, where the figure mixes buffers in
flight with what an open stream keeps. Here each stream gets its first frame and then
nothing for minutes (the bench provider's gap), as a reasoning model that thinks before
it answers: N such streams are held open through Envoy, the sidecar's resident memory
(its process tree, from /proc) is read once Envoy counts them all open to it, at two
levels, and the slope between them is the cost of one open stream (the process's fixed
memory cancels out). Per setup: `meter`, `full`, `meter-offpath` (there an idle exchange
holds the observer's gRPC stream: the synchronous one ended at the response headers).

Run: `python -m bench.idle_streams [--levels 100,500] [--setups meter,full,meter-offpath]`.
Prints one line per setup and level, and a JSON summary (`--out`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.measure import open_streams, process_tree, rss_bytes
from bench.stack import INCLUDE_USAGE, BenchStack, setup_api_key, write_policy
from bench.targets import MEMORY_PER_STREAM

IDLE_GAP_MS = 600_000  # ten minutes between the first frame and the next
BODY = {
    "model": "gpt-4o-mini",
    "stream": True,
    "messages": [{"role": "user", "content": "Think for a while, then answer."}],
}


async def open_stream(host: str, port: int, setup: str, key: str | None) -> asyncio.StreamWriter:
    """One request whose answer started (headers and the first frame came) and idles."""
    body = {**BODY, "stream_options": {"include_usage": True}} if setup in INCLUDE_USAGE else BODY
    data = json.dumps(body).encode()
    head = [
        "POST /v1/chat/completions HTTP/1.1",
        f"host: {host}:{port}",
        "content-type: application/json",
        f"content-length: {len(data)}",
        "x-bench-frames: 4",
        f"x-bench-gap-ms: {IDLE_GAP_MS}",
    ]
    if key:
        head.append(f"authorization: Bearer {key}")
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
    await writer.drain()
    seen = b""
    while b"data: " not in seen:
        chunk = await asyncio.wait_for(reader.read(65536), 30)
        if not chunk:
            raise RuntimeError(f"stream closed before its first frame: {seen[:200]!r}")
        seen += chunk
    if not seen.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"not a 200: {seen[:200]!r}")
    return writer


def steady_rss(pids: set[int], samples: int = 8, gap: float = 0.25) -> float:
    values = []
    for _ in range(samples):
        time.sleep(gap)
        values.append(rss_bytes(pids))
    return statistics.median(values)


async def measure_setup(setup: str, levels: list[int], root: Path) -> dict[str, Any]:
    workdir = root / setup
    workdir.mkdir(parents=True)
    path = write_policy(workdir, setup)  # admission limits out of the way
    stack = BenchStack(path, workdir, variant=setup)
    key = setup_api_key(setup)
    writers: list[asyncio.StreamWriter] = []
    # Off path the synchronous stream ends at the response headers: one stream each,
    # the observer's.
    per_exchange = 1
    points = []
    try:
        stack.start()
        pids = process_tree(stack.pid("sidecar"))
        host, port = stack.config.envoy.listen.rsplit(":", 1)
        for level in sorted(levels):
            while len(writers) < level:
                batch = min(50, level - len(writers))
                writers += await asyncio.gather(
                    *(open_stream(host, int(port), setup, key) for _ in range(batch))
                )
            deadline = time.monotonic() + 30
            while (open_streams(stack) or 0) < level * per_exchange:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Envoy counts {open_streams(stack)} streams open")
                await asyncio.sleep(0.2)
            rss = await asyncio.to_thread(steady_rss, pids)
            points.append({"streams": level, "grpc_streams": open_streams(stack), "rss": rss})
            print(f"  {setup}: {level} idle streams open, sidecar RSS {rss / 2**20:.1f} MiB")
    finally:
        for writer in writers:
            writer.close()
        stack.stop()
    (a, b) = points[-2], points[-1]
    per_stream = (b["rss"] - a["rss"]) / (b["streams"] - a["streams"])
    return {"levels": points, "bytes_per_stream": per_stream}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="extproc-idle-"))
    out = {}
    for setup in args.setups:
        out[setup] = await measure_setup(setup, args.levels, root)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.idle_streams", description=__doc__)
    parser.add_argument("--levels", default="100,500", help="two or more stream counts")
    parser.add_argument("--setups", default="meter,full,meter-offpath")
    parser.add_argument("--out", type=Path, help="write the JSON summary here")
    args = parser.parse_args()
    args.levels = [int(x) for x in args.levels.split(",")]
    args.setups = args.setups.split(",")
    if len(args.levels) < 2:
        parser.error("--levels needs two levels at least")
    results = asyncio.run(main_async(args))
    for setup, r in results.items():
        kib = r["bytes_per_stream"] / 1024
        verdict = "met" if r["bytes_per_stream"] < MEMORY_PER_STREAM else "missed"
        print(f"{setup}: {kib:.1f} KiB per idle open stream (target < 50 KiB: {verdict})")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    json.dump(results, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
