"""What hostile response streams cost the event loop, in process (no Envoy): CPU ms
per MiB at two sizes, so a figure that grows with the size is superlinear. The cases
of the fifth response review (docs/security.md): many tiny frames, one huge frame,
near-miss card digits a frame at a time, a usage nested deep, a line that almost
matches the guards' pre-check, thousands of content blocks.

    .venv/bin/python bench/hostile_response_bench.py [--scale 1] [--repeat 3]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script
    sys.path.insert(0, str(REPO))

from extproc.config import GuardConfig, GuardsConfig, StreamingConfig  # noqa: E402
from extproc.policy import Policy, Shared  # noqa: E402
from extproc.policy import guards as guards_module  # noqa: E402
from extproc.policy.guards import detectors as det  # noqa: E402
from tests.test_exchange import CHAT, CONFIG, Run  # noqa: E402
from tests.test_guard_stage import Consumer  # noqa: E402

PII = GuardConfig(name="pii", detectors=tuple(det.expand(["pii", "secrets"])))
ANTHROPIC = {"model": "claude-x", "max_tokens": 10, "stream": True,
             "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
HEAD = (
    b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[{"index":0,"delta":{"content":"'
)
TAIL = b'"},"finish_reason":null}],"usage":null}\n\n'
DONE = b"data: [DONE]\n\n"


def chat(text: bytes) -> bytes:
    return HEAD + text + TAIL


def split(body: bytes, size: int) -> list[bytes]:
    return [body[i : i + size] for i in range(0, len(body), size)]


def stream_cost(chunks: list[bytes], guard: bool, anthropic: bool = False) -> float:
    """CPU seconds for one exchange's response chunks."""
    run = Run()
    config = replace(CONFIG, streaming=StreamingConfig(max_frame_bytes=1 << 20))
    if guard:
        config = replace(config, guards=GuardsConfig(rules=(PII,)))
        stage = guards_module.build(config, Shared(run.metrics), {})
        run.ex.policy = Policy(config, stages=(Consumer(), stage))
    else:
        run.ex.policy = Policy(config)
    if anthropic:
        run.request(ANTHROPIC, path="/v1/messages")
    else:
        run.request({**CHAT, "stream": True})
    start = time.process_time()
    run.respond(chunks)
    return time.process_time() - start


def blocks(n: int) -> list[bytes]:
    message = {"type": "message_start", "message": {
        "id": "m", "type": "message", "role": "assistant", "model": "c",
        "content": [{"type": "text", "text": "hello there "}] * n,
        "usage": {"input_tokens": 1, "output_tokens": 1}}}  # fmt: skip
    return [
        b"event: message_start\ndata: " + orjson.dumps(message) + b"\n\n"
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    ]


def tiny(n: int) -> list[bytes]:
    return split(b"data: {}\n\n" * 10 * n + DONE, 65536)


def near_shape(n: int) -> list[bytes]:
    """One long line that fails the pre-check's frame shape only at its end."""
    head = b'data: {"id":"' + b"x" * 90 * n
    return [head + b'","choices":[{"index":0,"delta":{"content":"a"}}]}\n\n']


# name -> (chunks for size n, guards on, Anthropic route)
CASES: dict[str, tuple[Callable[[int], list[bytes]], bool, bool]] = {
    "tiny frames, metering": (tiny, False, False),
    "tiny frames, guards": (tiny, True, False),
    "1-char content frames": (
        lambda n: split(b"".join(chat(b"a") for _ in range(n)) + DONE, 65536), True, False
    ),
    "one huge frame": (lambda n: split(chat(b"lorem ipsum " * 8 * n) + DONE, 16384), True, False),
    "near-miss card digits": (
        lambda n: [b"".join(chat(b"4111 1111 1111 111 ") for _ in range(n)) + DONE], True, False
    ),
    "a digit a chunk": (lambda n: [chat(b"1 ") for _ in range(n)] + [DONE], True, False),
    "usage nested deep": (
        lambda n: [chat(b"x") + b'data: {"choices":[],"usage":' + b"[" * n + b"]" * n + b"}\n\n"],
        False,
        False,
    ),
    "near pre-check shape": (near_shape, True, False),
    "content blocks": (blocks, True, True),
}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=1, help="multiplies the sizes")
    parser.add_argument("--repeat", type=int, default=3, help="best of")
    args = parser.parse_args()
    logging.getLogger("extproc").setLevel(logging.ERROR)  # each run's "ending stream"
    for name, (make, guard, anthropic) in CASES.items():
        cells = []
        for n in (2000 * args.scale, 8000 * args.scale):
            chunks = make(n)
            size = sum(map(len, chunks))
            best = min(stream_cost(chunks, guard, anthropic) for _ in range(args.repeat))
            cells.append(f"{size / 1024:7.0f} KiB {best / size * (1 << 20) * 1000:7.1f} ms/MiB")
        print(f"{name:24} " + "   ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
