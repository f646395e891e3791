"""What the normalised view (extproc/policy/guards/normalize.py) costs per chunk.

    .venv/bin/python bench/normalize_bench.py

A mask plan with the `pii` and `secrets` detectors reads a stream of 4-character
chunks through `RunningText`, in four texts: ASCII (the fast path, no view built),
accented Latin (a view, offsets equal), CJK (the same) and text with zero-width
characters and full-width digits (a view with an offset map). Also a request's
texts scanned whole: one text, and the same text in 8 parts (the joined scan).
Figures are microseconds per chunk (per request), median of several runs.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from extproc.config import GuardConfig, GuardsConfig  # noqa: E402
from extproc.policy.guards import detectors as det  # noqa: E402
from extproc.policy.guards.engine import Findings, GuardSet, scan_texts  # noqa: E402
from extproc.policy.guards.scanner import RunningText  # noqa: E402

RULES = (GuardConfig(name="pii", detectors=tuple(det.expand(["pii", "secrets"]))),)
PLAN = GuardSet(GuardsConfig(rules=RULES)).plan("response", "r", "")
SCANNER = PLAN.mask.scanner

TEXTS = {
    "ascii": "the quick brown fox jumps over the lazy dog, then it rests. " * 20,
    "accented": "le café crème à la française, très élégant, n'est-ce pas? " * 20,
    "cjk": "日本語のテキストはここに書かれています、それから休みます。" * 20,
    "zero-width": "pay \u200bwith \uff14\uff11\uff11\uff11 soon\u00a0or later, ok " * 20,
}


def per_chunk(text: str, size: int = 4, runs: int = 7) -> float:
    chunks = [text[i : i + size] for i in range(0, len(text), size)]
    times = []
    for _ in range(runs):
        running = RunningText([SCANNER])
        start = time.perf_counter()
        for chunk in chunks:
            running.feed(chunk)
        running.feed("", final=True)
        times.append((time.perf_counter() - start) / len(chunks))
    return statistics.median(times) * 1e6


def per_request(texts: list[str], runs: int = 7) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        scan_texts(PLAN, texts, Findings())
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    print("stream, 4-character chunks    us/chunk")
    for name, text in TEXTS.items():
        print(f"  {name:<26} {per_chunk(text):8.1f}")
    print("request (whole texts)         us/request")
    for name, text in TEXTS.items():
        size = len(text) // 8
        parts = [text[i : i + size] for i in range(0, len(text), size)]
        one, eight = per_request([text]), per_request(parts)
        print(f"  {name:<10} 1 text {one:8.1f}   8 parts {eight:8.1f}")


if __name__ == "__main__":
    main()
