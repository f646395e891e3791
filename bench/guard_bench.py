"""What the prompt guards cost per streamed chunk, against the same stream without them.

    .venv/bin/python bench/guard_bench.py            # in-process + through Envoy (~2 min)
    .venv/bin/python bench/guard_bench.py --quick    # smoke run (< 45 s)
    .venv/bin/python bench/guard_bench.py --no-envoy # in-process figures only (~10 s)

Two measurements, one policy per row:

  off          the bench policy (usage metering on), no guards
  guards       one masking guard on requests and responses: credit_card, us_ssn,
               phone, iban, ipv4, ipv6 and every secret detector (no email)
  guards+email the same plus the email detector

1. In-process (sans-I/O, exact): the exchange state machine fed the messages Envoy
   would send, the OpenAI decoder and the guard stream filter included, no gRPC. It
   reports the CPU time to answer one response chunk (median over streams), in two
   shapes: `gapped` (one frame per chunk, as providers stream) and `coalesced` (the
   whole answer in one chunk), and a `planted` stream whose every 8th frame carries
   part of an email, card or key (so frames are held, masked and re-encoded).
2. Through the real Envoy (`bench.stack`'s stack, bench provider, load client): sidecar
   CPU per ext_proc message and the client's per-chunk latency (p50, p99) with
   C concurrent streams, each policy on a fresh stack.

Why `guards+email` adds latency but little CPU: any word can be the start of an email
address (`jane` of `jane@example.com`), so a frame that ends inside a word waits for
the next frame before it leaves: one inter-frame gap per frame. The other detectors
hold back only digits, hex or key prefixes, which ordinary text rarely ends with.
Results go to bench/results/guards.json.
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

import orjson
import yaml

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script
    sys.path.insert(0, str(REPO))

from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue  # noqa: E402
from envoy.service.ext_proc.v3.external_processor_pb2 import (  # noqa: E402
    HttpBody,
    HttpHeaders,
    ProcessingRequest,
)

from extproc.config import parse_config  # noqa: E402
from extproc.exchange import Exchange  # noqa: E402
from extproc.metrics import Metrics  # noqa: E402
from extproc.policy import Shared, build_policy  # noqa: E402

RESULTS = REPO / "bench" / "results" / "guards.json"
NO_EMAIL = ["credit_card", "us_ssn", "phone", "iban", "ipv4", "ipv6", "secrets"]
POLICIES: dict[str, list[dict[str, Any]] | None] = {
    "off": None,
    "guards": [{"name": "pii", "detectors": NO_EMAIL}],
    "guards+email": [{"name": "pii", "detectors": [*NO_EMAIL, "email"]}],
}
VOCAB = (
    "gateway", "stream", "token", "river", "lantern", "orbit", "maple", "quartz",
    "signal", "harbor", "meadow", "pixel", "cobalt", "ember", "falcon", "garden",
)  # fmt: skip
PLANTED = [
    "jane",
    ".roe@",
    "example.org",
    " card 4111",
    " 1111 1111",
    " 1111",
    " sk-proj-",
    "a" * 24,
]
BASE_POLICY: dict[str, Any] = {
    "providers": {"mock": {"url": "http://127.0.0.1:9", "format": "openai"}},
    "routes": [{"name": "bench", "prefix": "/v1/", "provider": "mock"}],
}
REQUEST = orjson.dumps(
    {
        "model": "gpt-4o-mini",
        "stream": True,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Write a short poem about a gateway between worlds."},
        ],
    }
)


# -- in-process -------------------------------------------------------------------------


def _headers(pairs: dict[str, str], *, response: bool) -> ProcessingRequest:
    hm = HeaderMap(headers=[HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()])
    req = ProcessingRequest()
    (req.response_headers if response else req.request_headers).CopyFrom(HttpHeaders(headers=hm))
    return req


def _body(data: bytes, end: bool) -> ProcessingRequest:
    req = ProcessingRequest()
    req.response_body.CopyFrom(HttpBody(body=data, end_of_stream=end))
    return req


def frames(n: int, planted: bool) -> list[bytes]:
    head = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1, "model": "m"}

    def chunk(delta: dict, finish: str | None = None, usage: Any = None) -> bytes:
        obj = {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        obj["usage"] = usage
        return b"data: " + orjson.dumps(obj) + b"\n\n"

    out = [chunk({"role": "assistant", "content": ""})]
    for i in range(n):
        text = " " + VOCAB[i % len(VOCAB)]
        if planted and i % 8 == 0:
            text = PLANTED[(i // 8) % len(PLANTED)]
        out.append(chunk({"content": text}))
    out.append(chunk({}, "stop"))
    usage = {"prompt_tokens": 24, "completion_tokens": n, "total_tokens": 24 + n}
    out.append(b"data: " + orjson.dumps({**head, "choices": [], "usage": usage}) + b"\n\n")
    out.append(b"data: [DONE]\n\n")
    return out


def in_process(rules: list[dict] | None, shape: str, n: int, streams: int) -> dict[str, float]:
    """Median CPU (perf_counter) to answer one response chunk, over `streams` runs."""
    doc = dict(BASE_POLICY)
    if rules:
        doc["guards"] = {"rules": rules}
    config = parse_config(doc, "bench")
    metrics = Metrics()
    shared = Shared(metrics)
    policy = build_policy(config, shared, {})
    body = frames(n, planted=shape == "planted")
    chunks = [b"".join(body)] if shape == "coalesced" else body
    per_chunk: list[float] = []
    clock = time.perf_counter
    for _ in range(streams):
        ex = Exchange(policy, metrics, clock())
        route = {":method": "POST", ":path": "/v1/chat/completions"}
        ex.handle(_headers({**route, "content-type": "application/json"}, response=False), 0.0)
        asyncio.run(ex.on_request_body(REQUEST, 0.0))
        sse = {":status": "200", "content-type": "text/event-stream"}
        ex.handle(_headers(sse, response=True), 0.0)
        start = clock()
        for i, data in enumerate(chunks):
            ex.handle(_body(data, i == len(chunks) - 1), 0.0)
        per_chunk.append((clock() - start) / len(chunks))
    return {"us_per_chunk": statistics.median(per_chunk) * 1e6, "chunks": len(chunks)}


# -- through Envoy ----------------------------------------------------------------------


def through_envoy(rules: list[dict] | None, args: argparse.Namespace, root: Path) -> dict:
    from bench.measure import measure, run_client
    from bench.stack import BenchStack, write_policy

    workdir = root / f"policy{len(list(root.iterdir()))}"
    workdir.mkdir(parents=True)
    path = write_policy(workdir)
    if rules:
        doc = yaml.safe_load(path.read_text())
        doc["guards"] = {"rules": rules}
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
    stack = BenchStack(path, workdir, variant="meter", frames=args.frames, gap_ms=args.gap_ms)
    stack.start()
    try:
        run_client(stack, "gapped", args.concurrency, args.warmup, workdir / "client.log")
        out = {}
        for shape in ("gapped", "coalesced"):
            r = measure(stack, shape, args.concurrency, args.duration, workdir)
            out[shape] = {
                "extproc_cpu_us_per_message": r["extproc_cpu_us_per_message"],
                "chunk_ms_p50": r["client"]["chunk_ms"].get("p50"),
                "chunk_ms_p99": r["client"]["chunk_ms"].get("p99"),
                "requests_per_s": r["client"]["requests_per_s"],
                "errors": r["client"]["errors"],
            }
        return out
    finally:
        stack.stop()


# -- main -------------------------------------------------------------------------------


def _fmt(value: Any, spec: str = "{:.1f}") -> str:
    return "-" if value is None else spec.format(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench/guard_bench.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-envoy", action="store_true", help="in-process figures only")
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--gap-ms", type=float, default=5.0)
    parser.add_argument("-c", "--concurrency", type=int)
    parser.add_argument("-d", "--duration", type=float)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.concurrency = args.concurrency or (10 if args.quick else 50)
    args.duration = args.duration or (2.5 if args.quick else 10.0)
    args.warmup = 0.5 if args.quick else 1.5
    streams = 50 if args.quick else 300

    report: dict[str, Any] = {"frames": args.frames, "in_process": {}, "envoy": {}}
    print(f"in-process: {args.frames} content frames per stream, median of {streams} streams")
    print(f"  {'policy':<14}{'shape':<11}{'us/chunk':>10}{'added':>9}{'ratio':>8}")
    for shape in ("gapped", "coalesced", "planted"):
        base = None
        for name, rules in POLICIES.items():
            r = in_process(rules, shape, args.frames, streams)
            report["in_process"].setdefault(name, {})[shape] = r
            us = r["us_per_chunk"]
            base = us if base is None else base
            print(
                f"  {name:<14}{shape:<11}{us:>10.1f}{us - base:>+9.1f}{us / base:>8.2f}",
                flush=True,
            )
    if not args.no_envoy:
        root = Path(tempfile.mkdtemp(prefix="guard-bench-"))
        print(
            f"through Envoy: {args.concurrency} streams, {args.duration:g} s per shape, "
            f"gap {args.gap_ms:g} ms (work dir {root})"
        )
        print(
            f"  {'policy':<14}{'shape':<11}{'cpu us/msg':>11}{'chunk p50':>11}"
            f"{'chunk p99':>11}{'req/s':>8}"
        )
        for name, rules in POLICIES.items():
            r = through_envoy(rules, args, root)
            report["envoy"][name] = r
            for shape, s in r.items():
                p50, p99 = _fmt(s["chunk_ms_p50"], "{:.2f}"), _fmt(s["chunk_ms_p99"], "{:.2f}")
                print(
                    f"  {name:<14}{shape:<11}{_fmt(s['extproc_cpu_us_per_message']):>11}"
                    f"{p50:>11}{p99:>11}{_fmt(s['requests_per_s']):>8}"
                    + (f"  errors {s['errors']}" if s["errors"] else ""),
                    flush=True,
                )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results: {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
