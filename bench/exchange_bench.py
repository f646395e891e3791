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
  meter-offpath  `meter` with `streaming.meter_off_path: auto` and a client that asks
         for usage: the request phases on the synchronous stream, the body on an
         observing one (`offpath.observe`, fed through a stand-in stream)

`--log` logs as the server under bench/run.py does (`server.log_level: info`, one
`exchange` line per exchange, to a file): the log line's cost is then in the figures.

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
from extproc.exchange import Exchange, offpath  # noqa: E402
from extproc.h2stream import EOF  # noqa: E402
from extproc.headers import EXCHANGE_HEADER  # noqa: E402
from extproc.logcontext import configure  # noqa: E402
from extproc.metrics import Metrics  # noqa: E402
from extproc.policy import Shared, build_policy  # noqa: E402

REQUEST_FIELDS: dict[str, Any] = {
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
REQUEST = orjson.dumps(REQUEST_FIELDS)
# The off-path client asks for usage, so its stream qualifies (bench/stack.py's too).
REQUEST_WITH_USAGE = orjson.dumps({**REQUEST_FIELDS, "stream_options": {"include_usage": True}})


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


def exchange_messages(
    setup: str, chunks: int, shape: str, stamp: bool = False
) -> list[ProcessingRequest]:
    """What Envoy sends for one streamed chat completion, in order. `stamp`: each
    frame ends in a member that differs from frame to frame, as the bench provider's
    `"bench_t"` and OpenAI's `"obfuscation"` do."""
    pairs = {
        ":method": "POST",
        ":path": "/v1/chat/completions",
        "content-type": "application/json",
        "x-request-id": "bench-request",
    }
    if setup in ("full", "full-nomask", "spend"):
        pairs["authorization"] = f"Bearer {BENCH_KEY}"
    body = frames(chunks, planted=False)
    if stamp:
        body = [
            f[:-3] + b',"bench_t":%d}\n\n' % (10**15 + 7919 * i) if f[6:7] == b"{" else f
            for i, f in enumerate(body)
        ]
    parts = [b"".join(body)] if shape == "coalesced" else body
    return [
        _headers(pairs, response=False),
        ProcessingRequest(request_body=HttpBody(body=REQUEST, end_of_stream=True)),
        _headers({":status": "200", "content-type": "text/event-stream"}, response=True),
        *(_body(data, i == len(parts) - 1) for i, data in enumerate(parts)),
    ]


def build(setup: str, chunks: int, shape: str, stamp: bool = False):
    """A closure running one exchange of `setup`, and its ext_proc message count."""
    policy, metrics = bench_policy(setup)
    head, _, answer, *messages = exchange_messages(setup, chunks, shape, stamp)
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


class _Observed:
    """The observing stream's part of `extproc.h2stream.Stream`: its queued messages."""

    def __init__(self, messages: list[ProcessingRequest]) -> None:
        self._messages = iter(messages)

    async def read(self) -> object:
        return next(self._messages, EOF)


def build_offpath(chunks: int, shape: str, stamp: bool = False):
    """`build` for `meter-offpath`: the synchronous stream to its response headers (it
    ends there, as the server's loop does), the observing stream for the body, and the
    observer's first message (request headers: the exchange's token) as Envoy sends it."""
    policy, metrics = bench_policy("meter-offpath")
    head, _, answer, *messages = exchange_messages("meter-offpath", chunks, shape, stamp)
    loop = asyncio.new_event_loop()

    async def exchange() -> None:
        ex = Exchange(policy, metrics, 0.0)
        ex.handle(head, 0.0)
        reply = await ex.on_request_body(REQUEST_WITH_USAGE, 0.0)
        assert not reply.HasField("immediate_response"), reply
        assert ex.off_path is not None, "the stream does not qualify to go off path"
        token = ex.off_path.token
        observed = _headers({EXCHANGE_HEADER: token}, response=False)
        watcher = asyncio.ensure_future(
            offpath.observe(observed, _Observed(messages), _clock, _run_after)
        )
        await asyncio.sleep(0)  # the observer attaches (its first message came first)
        ex.handle(answer, 0.0)
        assert ex.off_path is not None, "the answer does not qualify to go off path"
        ex.close(0.0)
        await watcher
        assert ex.closed

    def one() -> None:
        loop.run_until_complete(exchange())

    return one, 3 + 1 + len(messages)


def _clock() -> float:
    return 0.0


_AFTER: set[asyncio.Future] = set()  # settlement work, kept until done


def _run_after(ex: Exchange) -> None:
    for work in ex.after:
        task = asyncio.ensure_future(work)
        _AFTER.add(task)
        task.add_done_callback(_AFTER.discard)
    ex.after.clear()


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


def pick(setup: str):
    """The builder of `setup`'s exchange."""
    if setup == "meter-offpath":
        return lambda _setup, chunks, shape, stamp: build_offpath(chunks, shape, stamp)
    return build


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", default="meter,full")
    parser.add_argument("--shapes", default="gapped,coalesced")
    parser.add_argument("--chunks", type=int, default=16, help="content frames per stream")
    parser.add_argument("--n", type=int, default=1000, help="exchanges per round")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--profile", metavar="SETUP", help="cProfile this setup (first --shapes)")
    parser.add_argument("--log", action="store_true", help="log at info, to a file")
    parser.add_argument(
        "--stamp", action="store_true", help='frames end in a "bench_t" that differs each time'
    )
    args = parser.parse_args()
    if args.log:
        log_to = Path(tempfile.mkdtemp(prefix="exchange-bench-")) / "sidecar.log"
        print(f"logging to {log_to}")
        stderr, sys.stderr = sys.stderr, log_to.open("w")
        configure("info")  # the handler keeps the file: stderr itself is back at once
        sys.stderr = stderr
    if args.profile:
        one, _ = pick(args.profile)(
            args.profile, args.chunks, args.shapes.split(",")[0], args.stamp
        )
        measure(one, 10, 1)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.n):
            one()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        pstats.Stats(prof).sort_stats("cumulative").print_stats(40)
        return 0
    print(f"{'setup':<14}{'shape':<11}{'msgs':>5}{'cpu us/exch':>13}{'us/msg':>9}")
    for setup in args.setups.split(","):
        for shape in args.shapes.split(","):
            one, msgs = pick(setup)(setup, args.chunks, shape, args.stamp)
            us = measure(one, args.n, args.repeat)
            print(f"{setup:<14}{shape:<11}{msgs:>5}{us:>13.1f}{us / msgs:>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
