"""py-spy on the ext_proc server during an extra, unmeasured run (`--profile`), and
its samples grouped by where the time goes.

py-spy writes collapsed stacks (`--format raw`: one line per distinct stack, frames
root to leaf joined by ";", then the sample count; speedscope.app and flamegraph.pl
read it). Samples of a thread that waits (epoll, poll, a lock) are left out; each
other sample is charged to its *top frame*: the innermost frame that is not
the interpreter or libc itself (with `native`, a sample inside CPython's allocator or
memcpy counts for the code that called it). Top frames are grouped by file:

  grpc/asyncio  the transport: grpc (cygrpc, grpc.aio) or the sidecar's own
                (extproc/h2*.py, hpack), asyncio and the selector loop
  protobuf      google.protobuf / upb, generated *_pb2 modules, extproc/envoy_wire.py
  metrics       prometheus_client, extproc/metrics.py and telemetry
  guards        extproc/policy/guards, RE2
  decoder       extproc/providers, extproc/sse.py, extproc/usage.py, json
  other         everything else (the exchange state machine, policy stages, ...)

`native` mode (the default) also sees C frames (cygrpc, upb, RE2, orjson) but must
pause the process for each sample; `python` mode does not pause it but charges C
code to the Python line that called it (gRPC's poller thread shows as `Thread.run`,
in "other"): a coarse view, for where native unwinding fails.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

GROUPS = ("grpc/asyncio", "protobuf", "metrics", "guards", "decoder", "other")
# First match wins; each pattern is searched in the frame's "file" (inside the parens)
# and function name.
_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("protobuf", re.compile(r"google/protobuf|_pb2(_grpc)?\.py|\bupb|_message\.|envoy_wire")),
    ("metrics", re.compile(r"prometheus_client|extproc/metrics|telemetry|opentelemetry")),
    ("guards", re.compile(r"extproc/policy/guards|\bre2\b|_re2|re2\.cpython|libre2")),
    ("decoder", re.compile(r"extproc/providers/|extproc/sse\.py|extproc/usage\.py|\bjson/|orjson")),
    ("grpc/asyncio", re.compile(
        r"\bgrpc|cygrpc|asyncio/|selectors\.py|selectmodule|socketmodule|_asyncio|uvloop|"
        r"libgrpc|\.pyx|extproc/h2|\bhpack"
    )),
)  # fmt: skip
# Frames that are the machinery under every sample, never a place time is spent for a
# reason: the interpreter, libc, the loader, unresolved addresses.
_GENERIC = re.compile(
    r"\((?:libc\.so|libpthread|libm\.so|ld-linux|libpython|python3(?:\.\d+)?\)|"
    r"\[kernel|<unknown>)|"
    r"^(?:_?Py[A-Z_]\w*|_PyEval\w*|slot_\w+|vectorcall\w*|method_vectorcall\w*|cfunction_\w+|"
    r"object_\w+|dict_\w+|list_\w+|builtin_\w+) \("
)
# A thread blocked in one of these waits for work: py-spy's `--native` mode pauses the
# process and cannot tell such a thread from a running one, so these samples are idle.
_WAITS = frozenset({
    "epoll_wait", "epoll_pwait", "epoll_pwait2", "poll", "ppoll", "select", "pselect",
    "pselect6", "nanosleep", "clock_nanosleep", "accept", "accept4", "pthread_cond_wait",
    "pthread_cond_timedwait", "sem_wait", "sem_timedwait", "sem_clockwait",
    "PyThread_acquire_lock_timed", "__futex_abstimed_wait_common",
})  # fmt: skip
_SELECT_LEAF = re.compile(r"^\w*Selector\.select \(selectors\.py")
_FRAME_FILE = re.compile(r"\(([^()]*)\)\s*$")
_SKIP_PREFIX = ("process ", "thread ")


def parse_collapsed(text: str) -> list[tuple[list[str], int]]:
    """(frames root to leaf, samples) per line of py-spy's raw output."""
    stacks: list[tuple[list[str], int]] = []
    for line in text.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [f for f in stack.split(";") if f and not f.startswith(_SKIP_PREFIX)]
        if frames:
            stacks.append((frames, int(count)))
    return stacks


def classify(frame: str) -> str:
    """The group of one frame, e.g. `read (grpc/aio/_call.py:1)` -> grpc/asyncio."""
    frame = frame.split(" > ", 1)[0]
    match = _FRAME_FILE.search(frame)
    where = f"{frame[: match.start()]} {match.group(1)}" if match else frame
    for group, pattern in _RULES:
        if pattern.search(where):
            return group
    return "other"


def is_idle(frames: list[str]) -> bool:
    """A sample of a thread that waits (epoll, poll, a lock), not one that runs. In
    `python` mode the wait is the selector's Python frame itself."""
    if _SELECT_LEAF.match(frames[-1]):
        return True
    return any(f.split(" (", 1)[0] in _WAITS for f in frames[-4:])


def top_frame(frames: list[str]) -> str:
    """The innermost frame that is not the interpreter or libc (the leaf when all are),
    with the leaf's name when that is a named libc call: `0x7f.. (cygrpc...so) > sendmsg`."""
    for frame in reversed(frames):
        if not _GENERIC.search(frame):
            leaf = frames[-1]
            if leaf is not frame and "(libc.so" in leaf and not leaf.startswith("0x"):
                return f"{frame} > {leaf.split(' (', 1)[0]}"
            return frame
    return frames[-1]


def _short(frame: str) -> str:
    """A frame without its line number, so samples of one function add up."""
    frame = re.sub(r"\.cpython-[\w-]+\.so\)", ".so)", frame)  # cygrpc.cpython-311-x86...so
    return re.sub(r":\d+\)( > \w+)?$", r")\1", frame)


def group_profile(text: str, top: int = 15) -> dict[str, Any]:
    """Samples per group and the `top` top frames (function level), from raw output."""
    per_frame: Counter[str] = Counter()
    idle = 0
    for frames, count in parse_collapsed(text):
        if is_idle(frames):
            idle += count
        else:
            per_frame[_short(top_frame(frames))] += count
    total = sum(per_frame.values())
    groups = dict.fromkeys(GROUPS, 0)
    for frame, count in per_frame.items():
        groups[classify(frame)] += count
    return {
        "samples": total,
        "idle_samples": idle,
        "groups": groups,
        "top": [
            {"frame": frame, "group": classify(frame), "samples": count}
            for frame, count in per_frame.most_common(top)
        ],
    }


def render_profile(title: str, summary: dict[str, Any]) -> str:
    """Group shares on one line, then the top frames with their share and group."""
    total = summary["samples"]
    if not total:
        return f"profile {title}: no samples"
    shares = ", ".join(
        f"{group} {count / total * 100:.0f}%" for group, count in summary["groups"].items()
    )
    idle = summary.get("idle_samples", 0)
    lines = [f"profile {title} ({total} busy samples, {idle} idle left out): {shares}"]
    for row in summary["top"]:
        lines.append(
            f"  {row['samples'] / total * 100:5.1f}%  {row['group']:<12}  {row['frame'][:110]}"
        )
    return "\n".join(lines)


# -- py-spy -------------------------------------------------------------------------


def py_spy() -> str | None:
    """The py-spy next to this interpreter (the dev extras install it), or on PATH."""
    return shutil.which(
        "py-spy", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    )


def start_profiler(pid: int, out: Path, duration: float, mode: str) -> subprocess.Popen:
    """py-spy recording `pid` and its worker processes for about `duration` seconds."""
    spy = py_spy()
    if spy is None:
        raise FileNotFoundError("py-spy is not installed: `.venv/bin/pip install py-spy`")
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [spy, "record", "--pid", str(pid), "--subprocesses", "--rate", "200", "--format",
            "raw", "--duration", str(int(duration) + 5), "--output", str(out)]  # fmt: skip
    argv += ["--native"] if mode == "native" else ["--nonblocking"]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def stop_profiler(spy: subprocess.Popen) -> str:
    """Stop py-spy (it writes its output on Ctrl-C); its error output, if any."""
    spy.send_signal(signal.SIGINT)
    try:
        _, err = spy.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        spy.kill()
        _, err = spy.communicate()
    return (err or b"").decode(errors="replace").strip()
