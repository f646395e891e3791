"""What each guard detector costs per character on hostile text, as the text grows.

    .venv/bin/python bench/adversarial_bench.py            # 10 KB, 100 KB, 1 MB (~2 min)
    .venv/bin/python bench/adversarial_bench.py --quick    # 10 KB, 100 KB
    .venv/bin/python bench/adversarial_bench.py --sizes 10000 --only credit_card

One table per path, rows = detector, columns = input x size, cells = µs per character:

  whole   `Scanner.find_all` on the whole text (a request's prompt, a JSON answer)
  stream  `RunningText.feed` in 64-character pieces then the end (a streamed answer)
  frame   one `feed` of the whole text as a single frame, then the end (a fast upstream
          coalescing a huge answer into one chunk)

A linear detector shows a flat figure along a row's sizes; a super-linear one grows
with the size (x10 per column for quadratic). A cell whose projected time exceeds
`--cap` seconds (from the previous size) is skipped and printed as `skip`. The `all`
row is every built-in detector in one scanner, as `detectors: [pii, secrets]` would
be: its worst figure is what the guard stage's per-request budget is sized on.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script
    sys.path.insert(0, str(REPO))

from extproc.policy.guards import detectors as det  # noqa: E402
from extproc.policy.guards.scanner import RunningText, Scanner  # noqa: E402

B64 = "MIIEowIBAAKCAQEAq1w2e3r4t5y6u7i8o9p0aSdFgHjKlZxCvBnM+/="

# name -> one period of the hostile text (repeated to the size)
INPUTS: dict[str, str] = {
    "1_1_1": "1 ",
    "1-1-1": "1-",
    "1.1.1": "1.",
    "1:1:1": "1:",
    "4_4_4": "4 ",  # a Visa-looking start at every digit
    "5-5-5": "5-",
    "digits": "7",
    "seps": "1 2-3.4:5/6(7)8+9,0",
    "dates": "2023-01-15 05/12/2023 ",
    "@flood": "@",
    "a@a@": "a@",
    "email-ish": "a.bc@de.fg@",
    "word": "a",
    "dotted": "abc.def.",
    "hex": "0123456789abcdef",
    "hex:": "ab:cd:",
    "pem": "-----BEGIN RSA PRIVATE KEY-----\n" + B64 + "\n",
    "iban-ish": "DE89 ",
    "bearer": "Bearer ",
    "sk-": "sk-",
}


def detectors() -> dict[str, list[det.Detector]]:
    names = [n for n in det.BUILTIN_NAMES if n not in det.ALIASES]
    rows = {name: [det.builtin(name)] for name in names}
    rows["re2"] = [det.custom("EMPLOYEE_ID", r"EMP-[0-9]{6}|(?:[a-z0-9]+[.@])+[a-z]{2,}")]
    rows["keywords"] = [det.keywords(["project falcon", "zeta", "1 1 2", "a@b"])]
    rows["all"] = [det.builtin(n) for n in names]
    return rows


def text_of(period: str, size: int) -> str:
    return (period * (size // len(period) + 1))[:size]


def run_whole(scanner: Scanner, text: str) -> None:
    scanner.find_all(text)


def run_stream(scanner: Scanner, text: str) -> None:
    running = RunningText([scanner])
    for i in range(0, len(text), 64):
        running.feed(text[i : i + 64])
    running.feed("", final=True)


def run_frame(scanner: Scanner, text: str) -> None:
    running = RunningText([scanner])
    running.feed(text)
    running.feed("", final=True)


PATHS: dict[str, Callable[[Scanner, str], None]] = {
    "whole": run_whole,
    "stream": run_stream,
    "frame": run_frame,
}


def measure(fn: Callable[[Scanner, str], None], scanner: Scanner, text: str) -> float:
    """µs per character, best of a few runs for small texts (one run for big ones)."""
    repeats = max(1, min(5, 200_000 // max(1, len(text))))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(scanner, text)
        best = min(best, time.perf_counter() - t0)
    return best * 1e6 / len(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="sizes 10 KB and 100 KB")
    parser.add_argument("--sizes", type=int, nargs="+")
    parser.add_argument("--only", nargs="+", help="detector rows to run")
    parser.add_argument("--inputs", nargs="+", help="inputs to run")
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    parser.add_argument("--cap", type=float, default=5.0, help="seconds per cell before skip")
    parser.add_argument("--holdback", type=int, default=16384, help="max_holdback_chars")
    args = parser.parse_args(argv)
    sizes = args.sizes or ([10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000])
    rows = detectors()
    if args.only:
        rows = {k: v for k, v in rows.items() if k in args.only}
    inputs = {k: v for k, v in INPUTS.items() if not args.inputs or k in args.inputs}
    got: dict[tuple[str, str, str, int], float] = {}
    for path in args.paths:
        fn = PATHS[path]
        for size in sizes:
            print(f"\n== {path}, {size} characters: µs per character")
            print(f"{'detector':<12}" + "".join(f"{name[:9]:>10}" for name in inputs))
            for row, found in rows.items():
                scanner = Scanner(found, args.holdback)
                cells = []
                for name, period in inputs.items():
                    smaller = [got[path, row, name, s] for s in sizes if s < size]
                    if smaller and smaller[-1] * size / 1e6 > args.cap:
                        cells.append("skip")
                        continue
                    us = got[path, row, name, size] = measure(fn, scanner, text_of(period, size))
                    cells.append(f"{us:.2f}")
                print(f"{row:<12}" + "".join(f"{c:>10}" for c in cells), flush=True)
    print("\n== worst µs/char per path and size (detector on input)")
    for path in args.paths:
        for size in sizes:
            cells = {k: v for k, v in got.items() if k[0] == path and k[3] == size}
            if cells:
                (_, row, name, _), us = max(cells.items(), key=lambda kv: kv[1])
                print(f"{path:<7}{size:>9}: {us:8.2f}  ({row} on {name})")
    if len(sizes) > 1:
        print(f"\n== growth: µs/char at {sizes[-1]} over {sizes[0]} (1.0 = linear)")
        for path in args.paths:
            ratios = [
                (got[key] / got[path, key[1], key[2], sizes[0]], key[1], key[2])
                for key in got
                if key[0] == path and key[3] == sizes[-1] and got[path, key[1], key[2], sizes[0]]
            ]
            if ratios:
                ratio, row, name = max(ratios)
                print(f"{path:<7} worst growth {ratio:.2f} ({row} on {name})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
