"""Loopback ports for the tests' servers, from outside the kernel's ephemeral range.

A port found free by binding port 0 comes from the ephemeral range, which every
outgoing connection draws from too: between a test picking it and its server binding
it (seconds, for a whole stack), a connection made elsewhere (Envoy's upstreams, the
other pytest worker's clients) may take it, and the stack fails with "Address already
in use" (seen in CI). Ports outside that range are never given to connections; each
xdist worker draws from its own slice, so two workers never pick the same port, and a
worker hands out each port once, from a random start (another run on the machine
rarely walks the same ports at the same time).
"""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

LOWEST = 10000  # below: well-known services' defaults (Redis, PostgreSQL, ...)


def _ephemeral() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def _slice() -> list[int]:
    """This worker's ports: outside the ephemeral range, split among the workers."""
    low, high = _ephemeral()
    ports = [p for p in range(LOWEST, 65536) if not low <= p <= high]
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    count = max(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1), index + 1)
    size = len(ports) // count
    mine = ports[index * size : (index + 1) * size]
    start = random.randrange(len(mine))
    return mine[start:] + mine[:start]


_PORTS: list[int] = []
_NEXT = 0


def free_port() -> int:
    return free_ports(1)


def free_ports(count: int = 1) -> int:
    """A loopback port p with p .. p+count-1 all free now and not handed out before by
    this process (N consecutive ports: one per sidecar worker)."""
    global _NEXT
    if not _PORTS:
        _PORTS.extend(_slice())
    for _ in range(len(_PORTS)):
        first = _PORTS[_NEXT % len(_PORTS)]
        _NEXT += count
        run = range(first, first + count)
        if run[-1] <= 65535 and _all_free(run):
            return first
    raise RuntimeError("no run of free loopback ports left")


def _all_free(run: range) -> bool:
    for port in run:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True
