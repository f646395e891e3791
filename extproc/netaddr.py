"""Listen and connect addresses, shared by the config check, the Envoy bootstrap and the
server, so that what the check accepts is exactly what gets rendered and bound."""

from __future__ import annotations

import ipaddress

UNIX_PREFIX = "unix:"
UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the terminating NUL


def split_host_port(text: str) -> tuple[str, int]:
    """`127.0.0.1:8080` or `[::1]:8080` -> (ip, port); ValueError names what is wrong.

    Envoy listeners need IP literals (it does not resolve names for binds), so
    hostnames are refused here rather than by Envoy at start-up.
    """
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError("expected [ipv6]:port")
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise ValueError("expected host:port")
        if ":" in host:
            raise ValueError("write an IPv6 address in brackets: [addr]:port")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"host must be an IP address, got '{host}'") from None
    if text.startswith("[") and ip.version != 6:
        raise ValueError("only IPv6 addresses go in brackets")
    if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise ValueError(f"port must be 1-65535, got '{port}'")
    return str(ip), int(port)


def is_ip_literal(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def unix_socket_path(text: str) -> str | None:
    """The socket path of a `unix:/path` address, None for host:port."""
    return text[len(UNIX_PREFIX) :] if text.startswith(UNIX_PREFIX) else None


def worker_addresses(address: str, workers: int) -> list[str]:
    """Where each of `workers` processes listens (or is reached), in worker order.

    One worker keeps `address` as is. N workers take N consecutive ports starting at
    the given one (`h:50051` -> `h:50051` .. `h:50051+N-1`), or N numbered sockets
    (`unix:/run/x.sock` -> `unix:/run/x.sock.0` .. `.N-1`). Envoy keeps one HTTP/2
    connection per worker thread per endpoint, so each process must be an endpoint.
    """
    if workers <= 1:
        return [address]
    path = unix_socket_path(address)
    if path is not None:
        return [f"{UNIX_PREFIX}{path}.{index}" for index in range(workers)]
    host, _, port = address.rpartition(":")
    return [f"{host}:{int(port) + index}" for index in range(workers)]
