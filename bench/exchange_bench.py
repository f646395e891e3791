"""CPU per whole exchange in process: what the per-exchange work of a policy costs.

    .venv/bin/python bench/exchange_bench.py              # ~15 s
    .venv/bin/python bench/exchange_bench.py --profile full   # + cProfile, top 25

One exchange is what Envoy sends for one streamed chat completion: request headers,
the request body, response headers, N response chunks (`--chunks`, one SSE frame
each: `gapped`; or all frames in one chunk: `coalesced`), the end of the stream, and
the work the server runs after answering (settlement). It is fed to the sans-I/O
`Exchange` with the built-in policies of bench/stack.py:

  meter  usage metering only (the product's defaults)
  full   API-key auth + request guard + token limit + response mask guard + metering
  spend  `full` + the spend stage (a price, two in-process budgets, a SQLite ledger)

Reported: microseconds of this process's CPU per exchange (best of `--repeat` rounds
of `--n` exchanges: the least disturbed by other work on the machine), and per
ext_proc message. A figure to compare before/after in one run, never a test.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# Run as a script, bench/ is sys.path[0] and its profile.py would shadow the stdlib's.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
import cProfile  # noqa: E402
import pstats  # noqa: E402

import orjson  # noqa: E402
from envoy.service.ext_proc.v3.external_processor_pb2 import (  # noqa: E402
    HttpBody,
    ProcessingRequest,
)

if str(REPO) not in sys.path:  # run as a script
    sys.path.insert(0, str(REPO))

from bench.guard_bench import _body, _headers, frames  # noqa: E402
from bench.spend_bench import spend_sections  # noqa: E402
from bench.stack import BENCH_KEY, setup_policy  # noqa: E402
from extproc.config import parse_config  # noqa: E402
from extproc.exchange import Exchange  # noqa: E402
from extproc.metrics import Metrics  # noqa: E402
from extproc.policy import Shared, build_policy  # noqa: E402

REQUEST = orjson.dumps(
    {
        "model": "gpt-4o-mini",
        "stream": True,
        "max_tokens": 256,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
            {"role": "user", "content": "Write a short poem about a gateway between worlds."},
            {"role": "assistant", "content": "Between two worlds a quiet arch stands. " * 4},
            {"role": "user", "content": "Now make it rhyme, and keep it under ten lines."},
        ],
    }
)


def bench_policy(setup: str) -> tuple[Any, Metrics]:
    """The built-in policy of `setup` (bench/stack.py), as the sidecar builds it."""
    doc = setup_policy("full" if setup == "spend" else setup)
    if setup == "spend":
        tmp = Path(tempfile.mkdtemp(prefix="exchange-bench-"))
        doc.update(spend_sections("gpt-4o-mini", 0.15, 0.6, tmp))
    doc["server"] = {"log_level": "warning"}  # as under load: no per-request info lines
    doc["providers"]["mock"]["url"] = "http://127.0.0.1:9"
    metrics = Metrics()
    return build_policy(parse_config(doc, "bench"), Shared(metrics), {}), metrics


def exchange_messages(setup: str, chunks: int, shape: str) -> list[ProcessingRequest]:
    """What Envoy sends for one streamed chat completion, in order."""
    pairs = {
        ":method": "POST",
        ":path": "/v1/chat/completions",
        "content-type": "application/json",
        "x-request-id": "bench-request",
    }
    if setup in ("full", "full-nomask", "spend"):
        pairs["authorization"] = f"Bearer {BENCH_KEY}"
    body = frames(chunks, planted=False)
    parts = [b"".join(body)] if shape == "coalesced" else body
    return [
        _headers(pairs, response=False),
        ProcessingRequest(request_body=HttpBody(body=REQUEST, end_of_stream=True)),
        _headers({":status": "200", "content-type": "text/event-stream"}, response=True),
        *(_body(data, i == len(parts) - 1) for i, data in enumerate(parts)),
    ]


def build(setup: str, chunks: int, shape: str):
    """A closure running one exchange of `setup`, and its ext_proc message count."""
    policy, metrics = bench_policy(setup)
    head, _, answer, *messages = exchange_messages(setup, chunks, shape)
    loop = asyncio.new_event_loop()

    def one() -> None:
        ex = Exchange(policy, metrics, 0.0)
        ex.handle(head, 0.0)
        reply = loop.run_until_complete(ex.on_request_body(REQUEST, 0.0))
        assert not reply.HasField("immediate_response"), reply
        ex.handle(answer, 0.0)
        for message in messages:
            ex.handle(message, 0.0)
        ex.close(0.0)
        for work in ex.after:
            loop.run_until_complete(work)

    return one, 3 + len(messages)


def measure(one, n: int, repeat: int) -> float:
    """Best-of-`repeat` CPU microseconds per exchange."""
    for _ in range(200):
        one()
    best = float("inf")
    for _ in range(repeat):
        cpu = time.process_time()
        for _ in range(n):
            one()
        best = min(best, (time.process_time() - cpu) / n * 1e6)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", default="meter,full")
    parser.add_argument("--shapes", default="gapped,coalesced")
    parser.add_argument("--chunks", type=int, default=16, help="content frames per stream")
    parser.add_argument("--n", type=int, default=1000, help="exchanges per round")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--profile", metavar="SETUP", help="cProfile this setup (first --shapes)")
    args = parser.parse_args()
    if args.profile:
        one, _ = build(args.profile, args.chunks, args.shapes.split(",")[0])
        measure(one, 10, 1)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.n):
            one()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        pstats.Stats(prof).sort_stats("cumulative").print_stats(40)
        return 0
    print(f"{'setup':<8}{'shape':<11}{'msgs':>5}{'cpu us/exch':>13}{'us/msg':>9}")
    for setup in args.setups.split(","):
        for shape in args.shapes.split(","):
            one, msgs = build(setup, args.chunks, shape)
            us = measure(one, args.n, args.repeat)
            print(f"{setup:<8}{shape:<11}{msgs:>5}{us:>13.1f}{us / msgs:>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
