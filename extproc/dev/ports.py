"""Which of the local stack's addresses are already taken, and by which config key.

Envoy and gRPC both bind with SO_REUSEPORT, so a second `extproc run` on the ports of
a running stack binds them all without an error, its readiness probes reach the
first stack, and it prints "Ready" while serving nothing. So the stack checks every
address before it starts anything: a bind without SO_REUSEPORT fails against any
listener, ours or another program's. SO_REUSEADDR keeps a port left in TIME_WAIT by a
stack that just stopped from counting as taken.
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass

from extproc.config import Config
from extproc.netaddr import split_host_port, unix_socket_path, worker_addresses

MOCK_PROVIDER = "mock"


@dataclass(frozen=True)
class Address:
    key: str  # the config key (or flag) that moves it
    address: str  # host:port or unix:/path
    what: str  # what listens there


def stack_addresses(config: Config, workers: int, listen_flag: bool = False) -> list[Address]:
    """Every address the dev stack listens on, in start order."""
    out: list[Address] = []
    mock = config.providers.get(MOCK_PROVIDER)
    if mock is not None:
        host = f"[{mock.host}]" if ":" in mock.host else mock.host
        out.append(Address("providers.mock.url", f"{host}:{mock.port}", "the mock provider"))
    for i, address in enumerate(worker_addresses(config.server.grpc_listen, workers)):
        what = "the sidecar" if workers == 1 else f"sidecar worker {i} (port + {i})"
        out.append(Address("server.grpc_listen", address, what))
    out.append(Address("server.metrics_listen", config.server.metrics_listen, "sidecar metrics"))
    key = "--listen" if listen_flag else "envoy.listen"
    out.append(Address(key, config.envoy.listen, "the Envoy listener"))
    out.append(Address("envoy.admin", config.envoy.admin, "Envoy's admin interface"))
    return out


def taken(address: str) -> bool:
    """True when something already listens on `address` (host:port or unix:/path)."""
    path = unix_socket_path(address)
    if path is not None:
        if not os.path.exists(path):
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(path)
            except OSError:
                return False  # a stale socket file: the server removes and binds it
            return True
    try:
        host, port = split_host_port(address)
    except ValueError:  # a provider URL may name a host ("localhost")
        name, _, number = address.rpartition(":")
        host, port = name.strip("[]"), int(number)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False  # not ours to diagnose here: the process reports it
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(sockaddr)
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def taken_addresses(addresses: list[Address]) -> list[Address]:
    return [a for a in addresses if taken(a.address)]


def describe(busy: list[Address], config_path: str) -> str:
    """One line per taken address, naming the key that moves it, then what to do."""
    lines = [
        f"{a.address} ({a.what}) is already in use: move it with {a.key}"
        + ("" if a.key.startswith("--") else f" in {config_path}")
        for a in busy
    ]
    lines.append(
        "Another `extproc run` (or `make run`) may be running: stop it, or give this one "
        "other ports (`extproc run --listen HOST:PORT` moves the Envoy listener)."
    )
    return "\n".join(lines)
