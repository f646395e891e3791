"""Which event loop a worker runs on (`server.event_loop`).

uvloop's libuv loop wakes and schedules the gRPC completions of each ext_proc message
with less Python work than the standard library's selector loop: measured through Envoy
in `bench/run.py` (docs/performance.md, "The event loop"). The standard loop stays one
setting away, and is what runs where uvloop cannot be installed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

log = logging.getLogger("extproc.server")
T = TypeVar("T")


def run(main: Coroutine[Any, Any, T], loop: str) -> T:
    """`asyncio.run(main)` on the named loop."""
    if loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            log.warning("server.event_loop is uvloop but uvloop is not installed: using asyncio")
        else:
            return uvloop.run(main)
    return asyncio.run(main)


def running() -> str:
    """The running loop's kind, for the start-up log line."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"
