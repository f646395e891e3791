"""CPU per gRPC stream of the sidecar's own transport (`extproc.h2grpc`), in process:
the do-nothing servicer of bench/noop_extproc.py (or the sidecar's, `--servicer`) fed
the frames Envoy sends, with no socket and no Envoy, so a change to the transport's
per-stream work shows in seconds.

    .venv/bin/python bench/h2_bench.py                      # both shapes, ~20 s
    .venv/bin/python bench/h2_bench.py --shapes coalesced --profile
    .venv/bin/python bench/h2_bench.py --servicer meter    # the sidecar's own servicer

What a stream is here is what Envoy 1.40 sent in a capture of `bench/run.py`'s noop-h2
setup: HEADERS with Envoy's own HPACK block (the first stream of a connection adds
:authority, te, content-type, x-envoy-internal and x-forwarded-for to the dynamic
table; later streams send the same 46 bytes of indexed references and a Huffman-coded
:path), then the messages of one streamed chat completion (bench/exchange_bench.py's),
each sent once the answer to the one before arrived, the body message of 18 KB split
into frames of 16 KiB as Envoy does, and RST_STREAM after the last answer (Envoy never
half-closes an ext_proc stream). `-c` streams are open at once; what the peer has to
send in one loop turn goes in one `data_received`, as a socket read would bring it.

The figure includes this stand-in peer's own parsing of the server's frames (a few
percent). Rounds alternate nothing: run a before/after pair side by side with
`git stash` or two worktrees, several rounds, and compare medians; never a test.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import struct
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Run as a script, bench/ is sys.path[0] and its profile.py would shadow the stdlib's.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest  # noqa: E402

from bench.exchange_bench import exchange_messages  # noqa: E402
from bench.noop_extproc import SERVICE_NAME, NoopProcessor  # noqa: E402
from extproc.h2frames import (  # noqa: E402
    DATA,
    END_HEADERS,
    HEADERS,
    PREFACE,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    frame,
)
from extproc.h2grpc import Connection, Method, Server  # noqa: E402

# Envoy 1.40's header blocks for its ext_proc streams (nghttp2's encoder), as captured.
FIRST_BLOCK = bytes.fromhex(
    "8304a560b5773fa5d05b3b98855cbe5315761c8bf7657c1e525b2a1d1aec390a841ec635d872150841852f"
    "94d761c98640027465864d833505b11f5f8b1d75d0620d263d4c4d6564408cf2b16aee7f4b1aa496ca8747"
    "834d9697408bf2b4a7b3c0ec90b22d29ec870be25c0b89717f"
)
LATER_BLOCK = bytes.fromhex(
    "8304a560b5773fa5d05b3b98855cbe5315761c8bf7657c1e525b2a1d1aec390a841ec635d8721508c286c1c0bfbe"
)
ENVOY_FRAME = 16384  # Envoy's DATA frames toward the sidecar
_HEAD = struct.Struct(">BHBBL")


def steps(shape: str, chunks: int, setup: str = "meter") -> list[list[tuple[int, bytes]]]:
    """What the peer sends before each answer it waits for: (frame type, payload)."""
    out = []
    for message in exchange_messages(setup, chunks, shape):
        data = message.SerializeToString()
        data = struct.pack(">BL", 0, len(data)) + data
        out.append([(DATA, data[at : at + ENVOY_FRAME]) for at in range(0, len(data), ENVOY_FRAME)])
    return out


class Peer(asyncio.Transport):
    """Envoy's side of one connection, and the transport the server writes to."""

    def __init__(self, loop: asyncio.AbstractEventLoop, script: list, streams: int, open_: int):
        super().__init__()
        self.loop, self.script = loop, script
        self.left, self.open = streams, open_
        self.next_id = 1
        self.step: dict[int, int] = {}
        self.pending: list[bytes] = []
        self.credit = 0
        self.done = loop.create_future()
        self.conn: Connection | None = None
        self.active = 0
        self.answers = 0

    # the transport's side
    def write(self, data: bytes) -> None:
        at, end = 0, len(data)
        while at < end:
            high, low, kind, _flags, sid = _HEAD.unpack_from(data, at)
            length = high << 16 | low
            at += 9 + length
            if kind == DATA and sid:
                self.credit += length
                self.answers += 1
                self._answered(sid)

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:  # the bench never fills the server's inboxes
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return False

    def close(self) -> None:
        pass

    # the peer's side
    def start(self, conn: Connection) -> None:
        self.conn = conn
        grow = struct.pack(">L", (1 << 31) - 1 - 65535)
        self._send(PREFACE + frame(SETTINGS, 0, 0, b"") + frame(WINDOW_UPDATE, 0, 0, grow))
        for _ in range(min(self.open, self.left)):
            self._new_stream()

    def _send(self, data: bytes) -> None:
        if not self.pending:
            self.loop.call_soon(self._flush)
        self.pending.append(data)

    def _flush(self) -> None:
        data = b"".join(self.pending)
        self.pending.clear()
        if self.credit > 1 << 24:
            data += frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", self.credit))
            self.credit = 0
        assert self.conn is not None
        self.conn.data_received(data)

    def _new_stream(self) -> None:
        sid, self.next_id = self.next_id, self.next_id + 2
        self.left -= 1
        self.active += 1
        block = FIRST_BLOCK if sid == 1 else LATER_BLOCK
        self.step[sid] = 0
        self._send(frame(HEADERS, END_HEADERS, sid, block) + self._frames(sid, 0))

    def _frames(self, sid: int, index: int) -> bytes:
        return b"".join(frame(kind, 0, sid, payload) for kind, payload in self.script[index])

    def _answered(self, sid: int) -> None:
        index = self.step[sid] + 1
        if index < len(self.script):
            self.step[sid] = index
            self._send(self._frames(sid, index))
            return
        del self.step[sid]
        self._send(frame(RST_STREAM, 0, sid, struct.pack(">L", 2)))  # what Envoy sends
        self.active -= 1
        if self.left:
            self._new_stream()
        elif not self.active and not self.done.done():
            self.loop.call_soon(self.done.set_result, None)


def server(servicer: str = "noop") -> Server:
    """The no-op of bench/noop_extproc.py, or the sidecar's `ExternalProcessor` with the
    policy of bench/exchange_bench.py's setup of that name."""
    if servicer == "noop":
        handler = NoopProcessor().Process
    else:
        from bench.exchange_bench import bench_policy
        from extproc.server import ExternalProcessor

        handler = ExternalProcessor(*bench_policy(servicer)).Process
    path = f"/{SERVICE_NAME}/Process"
    return Server({path: Method(ProcessingRequest.FromString, handler)})


async def run_streams(
    script: list, streams: int, open_: int, servicer: str = "noop"
) -> tuple[float, int]:
    """CPU seconds for `streams` streams, and the answers the peer received."""
    loop = asyncio.get_running_loop()
    peer = Peer(loop, script, streams, open_)
    conn = Connection(server(servicer))
    conn.connection_made(peer)
    start = time.process_time()
    peer.start(conn)
    await peer.done
    spent = time.process_time() - start
    await asyncio.sleep(0)
    conn.connection_lost(None)
    return spent, peer.answers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="gapped,coalesced")
    parser.add_argument("--chunks", type=int, default=64, help="content frames per stream")
    parser.add_argument("-n", type=int, default=4000, help="streams per round")
    parser.add_argument("-c", type=int, default=50, help="streams open at once")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--servicer", choices=("noop", "meter", "full"), default="noop")
    parser.add_argument("--profile", action="store_true", help="cProfile one round instead")
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    for shape in args.shapes.split(","):
        script = steps(shape, args.chunks, "meter" if args.servicer == "noop" else args.servicer)
        n = args.n if shape == "coalesced" else max(args.n // 10, args.c)
        if args.profile:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            asyncio.run(run_streams(script, n, args.c, args.servicer))
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
            continue
        asyncio.run(run_streams(script, min(n, 500), args.c, args.servicer))  # warm-up
        per_stream, per_message = [], []
        for _ in range(args.rounds):
            spent, messages = asyncio.run(run_streams(script, n, args.c, args.servicer))
            assert messages == n * len(script), (messages, n, len(script))
            per_stream.append(spent / n * 1e6)
            per_message.append(spent / messages * 1e6)
        print(
            f"{shape:9} {len(script):3} msgs/stream  µs CPU per stream: median "
            f"{statistics.median(per_stream):7.1f} (best {min(per_stream):.1f}), per message "
            f"{statistics.median(per_message):5.1f} (best {min(per_message):.1f})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
