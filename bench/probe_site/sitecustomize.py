"""Experiments on the sidecar under the real bench, without changing the product:
where does the CPU per message that the no-op server does not pay go (issue 14)?

Put this directory first on PYTHONPATH and name the probes in `EXTPROC_PROBE` (comma-
separated); only an `extproc serve` process takes them (the bench's other processes
inherit the environment and ignore it):

    noop-servicer  the sidecar process (its imports, heap, threads, metrics server,
                   background tasks) answering every message as bench/noop_extproc.py
                   does: what the process costs apart from the per-message code
    burn=US        with noop-servicer: US µs (thread CPU, measured at start) of plain
                   Python per message: how a µs of in-process work shows through Envoy
    gc-off         the cyclic GC disabled
    gc-freeze      gc.collect() then gc.freeze() half a second after start

    PYTHONPATH=bench/probe_site:. EXTPROC_PROBE=noop-servicer,burn=10 \\
        .venv/bin/python bench/run.py --setups noop,meter --shapes gapped \\
        --sweep none --workers-sweep none -c 50 -d 6 --out /tmp/probe.json

The sidecar's own message count is then 0: divide `cpu_s.extproc` by
`envoy_extproc_messages_sent` in the results file.
"""

from __future__ import annotations

import os
import sys

_NAMED = os.environ.get("EXTPROC_PROBE", "")
PROBES = {name: value for name, _, value in (p.partition("=") for p in _NAMED.split(",") if p)}


def _spin(n: int) -> int:
    total = 0
    for i in range(n):
        total += i
    return total


def _iterations(microseconds: float) -> int:
    """Loop turns of `_spin` that take `microseconds` of this thread's CPU."""
    import time

    start = time.thread_time()
    _spin(200_000)
    return max(1, int(microseconds * 1e-6 / ((time.thread_time() - start) / 200_000)))


def _install() -> None:
    import gc

    import extproc.server as server

    if "gc-off" in PROBES:
        gc.disable()
    if "gc-freeze" in PROBES:
        run = server.Worker.run

        async def frozen_run(self, ready=None):
            import asyncio

            async def freeze() -> None:
                await asyncio.sleep(0.5)
                gc.collect()
                gc.freeze()

            task = asyncio.get_running_loop().create_task(freeze())  # noqa: F841 - runs
            return await run(self, ready)

        server.Worker.run = frozen_run
    if "noop-servicer" in PROBES:
        import grpc

        from bench.noop_extproc import ANSWERS

        turns = _iterations(float(PROBES["burn"])) if PROBES.get("burn") else 0

        async def process(self, request_iterator, context) -> None:
            while True:
                request = await context.read()
                if request is grpc.aio.EOF:
                    break
                kind = request.WhichOneof("request")
                if turns:
                    _spin(turns)
                await context.write(ANSWERS[kind])

        server.ExternalProcessor.Process = process


if PROBES and "serve" in sys.argv:
    _install()
