"""The concurrency sweep as a PNG (matplotlib): CPU per message and chunk latency p99
against open streams, per setup. `python -m bench.plot [results.json] [-o out.png]`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.stack import REPO_ROOT, SETUP_LABEL

PLOTTED = ("envoy", "noop", "meter", "full")
STYLE = {"envoy": "k-o", "noop": "C0-s", "meter": "C2-^", "full": "C3-D"}


def series(sweep: dict[str, Any], setup: str, key: str) -> tuple[list[int], list[float]]:
    """(concurrency levels, values) of one figure, skipping levels without it."""
    xs, ys = [], []
    for level in sorted(sweep.get(setup, {}), key=int):
        run = sweep[setup][level]
        value = run["client"]["chunk_ms"].get("p99") if key == "chunk_p99" else run.get(key)
        if value is not None and run["client"]["completed"]:
            xs.append(int(level))
            ys.append(value)
    return xs, ys


def plot(report: dict[str, Any], out: Path) -> Path:
    """Three panels: proxy (Envoy + ext_proc) CPU per chunk for every setup, ext_proc
    CPU per ext_proc message, and per-chunk latency p99."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep, meta = report["sweep"], report["meta"]
    panels = (
        ("proxy_cpu_us_per_chunk", "Envoy + ext_proc CPU per chunk (µs)"),
        ("extproc_cpu_us_per_message", "ext_proc CPU per message (µs)"),
        ("chunk_p99", "chunk latency p99 (ms)"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4.6))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for setup in PLOTTED:
            xs, ys = series(sweep, setup, key)
            if xs:
                ax.plot(xs, ys, STYLE[setup], label=SETUP_LABEL[setup].lstrip("+ "))
        ax.set_xscale("log")
        ax.set_xticks(meta["sweep_levels"], [str(c) for c in meta["sweep_levels"]])
        ax.minorticks_off()
        ax.set_xlabel("concurrent streams")
        ax.set_title(title)
        if key == "chunk_p99":
            ax.set_yscale("log")  # Envoy alone's 1 ms and a saturated server's 100 ms
        else:
            ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    fig.suptitle(
        f"{meta['sweep_frames_per_s']:g} frames/s offered at every level; commit {meta['commit']}, "
        f"{meta['when']}, {meta['host_desc']}",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__)
    default = REPO_ROOT / "bench" / "results" / "latest.json"
    parser.add_argument("results", nargs="?", type=Path, default=default)
    parser.add_argument(
        "-o", "--out", type=Path, default=REPO_ROOT / "bench" / "results" / "sweep.png"
    )
    args = parser.parse_args(argv)
    print(plot(json.loads(args.results.read_text()), args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
