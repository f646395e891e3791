"""CPU per ext_proc message of the whole servicer in process, with the caches as cold as
through Envoy: a predictor of `bench/run.py`'s ratios that needs no Envoy.

    .venv/bin/python bench/servicer_bench.py                  # ~40 s
    .venv/bin/python bench/servicer_bench.py --evict 0        # warm caches, as exchange_bench
    .venv/bin/python bench/servicer_bench.py --setups noop,meter --shapes gapped --rounds 9

Each setup's real `Process` coroutine (the sidecar's `ExternalProcessor`, or the no-op
server of bench/noop_extproc.py, the floor of the targets) is fed the messages Envoy
sends for one streamed chat completion (bench/exchange_bench.py's) through a stand-in for
grpc.aio's stream context: `read()` parses each message from its bytes and `write()`
serialises each answer, as gRPC does, on the sidecar's default loop (uvloop).

Why cold: through Envoy a worker's Python runs between gRPC's C core, Envoy and the load,
which evict the CPU caches at every message, and Python work then costs about 2.5-3x what
a warm in-process loop says (docs/performance.md, "Why in-process figures understate").
So before each message this bench writes over a buffer of `--evict` KiB (4096 by
default: twice the L2 caches of this machine), and leaves that copy's own CPU time out.
Rounds run the setups interleaved, the order reversed every other round, and the figures
are medians over rounds. A figure to compare before/after in one run, never a test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# Run as a script, bench/ is sys.path[0] and its profile.py would shadow the stdlib's.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest  # noqa: E402

from bench.exchange_bench import bench_policy, exchange_messages  # noqa: E402
from bench.noop_extproc import NoopProcessor  # noqa: E402
from extproc import eventloop  # noqa: E402
from extproc.h2stream import EOF  # noqa: E402
from extproc.server import ExternalProcessor  # noqa: E402

SETUPS = ("noop", "meter", "full", "full-nomask")


class Evictor:
    """Writes over a buffer larger than the L2 caches; counts the CPU time it took."""

    def __init__(self, kib: int) -> None:
        size = kib * 1024
        self._buffer = bytearray(size)
        self._source = bytes(range(256)) * (size // 256)
        self.spent_ns = 0

    def __call__(self) -> None:
        start = time.thread_time_ns()
        self._buffer[:] = self._source
        self.spent_ns += time.thread_time_ns() - start


class Context:
    """The part of `grpc.aio.ServicerContext` the servicers use, over serialised messages."""

    __slots__ = ("_at", "_evict", "_messages", "answers", "written")

    def __init__(self, messages: list[bytes], evict: Evictor | None) -> None:
        self._messages = messages
        self._at = 0
        self._evict = evict
        self.answers = 0
        self.written = 0

    def invocation_metadata(self) -> tuple:
        return ()

    async def read(self) -> Any:
        if self._at == len(self._messages):
            return EOF
        if self._evict is not None:
            self._evict()
        data = self._messages[self._at]
        self._at += 1
        return ProcessingRequest.FromString(data)

    async def write(self, response: Any) -> None:
        self.answers += 1
        self.written += len(response.SerializeToString())


def servicer(setup: str) -> Any:
    if setup == "noop":
        return NoopProcessor()
    policy, metrics = bench_policy(setup)
    return ExternalProcessor(policy, metrics)


async def run(processor: Any, messages: list[bytes], n: int, evict: Evictor | None) -> None:
    for _ in range(n):
        context = Context(messages, evict)
        await processor.Process(context)
        if context.answers != len(messages):  # a refusal, or a stream that broke
            raise SystemExit(f"servicer_bench: {context.answers} answers to {len(messages)}")


async def measure(args: argparse.Namespace) -> dict[tuple[str, str], list[float]]:
    """µs of this thread's CPU per message, one figure per round, for each setup x shape."""
    evict = Evictor(args.evict) if args.evict else None
    built = {}
    for shape in args.shapes:
        for setup in args.setups:
            processor = servicer(setup)
            raw = [m.SerializeToString() for m in exchange_messages(setup, args.chunks, shape)]
            await run(processor, raw, 20, evict)  # warm-up
            built[setup, shape] = processor, raw
    figures: dict[tuple[str, str], list[float]] = {key: [] for key in built}
    for round_ in range(args.rounds):
        keys = list(built) if round_ % 2 == 0 else list(built)[::-1]
        for key in keys:
            processor, raw = built[key]
            if evict is not None:
                evict.spent_ns = 0
            start = time.thread_time_ns()
            await run(processor, raw, args.n, evict)
            spent = time.thread_time_ns() - start - (evict.spent_ns if evict else 0)
            figures[key].append(spent / 1e3 / args.n / len(raw))
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", default=",".join(SETUPS), help=f"of {','.join(SETUPS)}")
    parser.add_argument("--shapes", default="gapped,coalesced")
    parser.add_argument("--chunks", type=int, default=64, help="content frames per stream")
    parser.add_argument("--evict", type=int, default=4096, help="KiB written before each "
                        "message (0: warm caches)")  # fmt: skip
    parser.add_argument("--n", type=int, default=40, help="exchanges per setup and round")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    args.setups = args.setups.split(",")
    args.shapes = args.shapes.split(",")
    unknown = [s for s in args.setups if s not in SETUPS]
    if unknown:
        parser.error(f"unknown setups {unknown}; known: {','.join(SETUPS)}")
    if "noop" not in args.setups:
        args.setups.insert(0, "noop")  # the floor of every ratio
    figures = eventloop.run(measure(args), "uvloop")  # the sidecar's default loop
    print(
        f"µs CPU per ext_proc message, median of {args.rounds} rounds x {args.n} exchanges "
        f"({args.chunks} content frames; caches {'warm' if not args.evict else 'cold'}: "
        f"{args.evict} KiB evicted before each message)"
    )
    # No ratio: the no-op server's figure here lacks gRPC's C core, the bulk of its cost
    # through Envoy; what the sidecar adds per message is the figure to compare.
    print(f"{'setup':<13}{'shape':<11}{'msgs':>5}{'µs/msg':>9}{'added':>9}  rounds")
    for shape in args.shapes:
        floor = statistics.median(figures["noop", shape])
        for setup in args.setups:
            rounds = figures[setup, shape]
            median = statistics.median(rounds)
            msgs = len(exchange_messages(setup, args.chunks, shape))
            each = ", ".join(f"{v:.1f}" for v in rounds)
            print(f"{setup:<13}{shape:<11}{msgs:>5}{median:>9.2f}{median - floor:>+9.2f}  {each}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
