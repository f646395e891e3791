"""Shared fixtures: free loopback ports (tests/ports.py), policy files, and the real stack
(mock provider + sidecar + Envoy, each its own process) that `make run` starts."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from extproc.dev import devstack
from tests.ports import free_port, free_ports

REPO = Path(__file__).resolve().parent.parent
DEV_CONFIG = REPO / "config" / "dev.yaml"
# The consumer key config/dev.yaml ships: its /v1 routes require a key.
DEV_API_KEY = "my-secret-key"
# What every test policy sets in `server`: no shedding on event-loop lag. A machine
# busy with other tests (pytest-xdist, other runs) delays a sidecar's loop past the
# 250 ms default now and then, and a test's request got a 503 `overloaded` instead of
# its answer; the admission tests set their own limits.
TEST_SERVER = {"max_queue_delay_ms": 0}
# Envoy writes a file access log out every 10 s by default (`--file-flush-interval-msec`):
# a test reading its request's line would wait for that.
ACCESS_LOG_FLUSH_MS = 20
# How the tests run Envoy. Hot restart off instead of `--use-dynamic-base-id`: two
# Envoys starting at once (pytest-xdist workers, other runs on the machine) can pick
# the same base id, and then one takes the other over.
ENVOY_TEST_FLAGS = (
    "--disable-hot-restart",
    *("--file-flush-interval-msec", str(ACCESS_LOG_FLUSH_MS)),
)


def envoy_test_argv(argv: list[str]) -> list[str]:
    """An Envoy command line with the tests' flags (ENVOY_TEST_FLAGS)."""
    return [*(a for a in argv if a != "--use-dynamic-base-id"), *ENVOY_TEST_FLAGS]


class Stack(devstack.Stack):
    """The dev stack, with Envoy run by `envoy_test_argv`."""

    def _spawn(self, name: str, argv: list[str]) -> None:
        super()._spawn(name, envoy_test_argv(argv) if name == "envoy" else argv)


def consecutive_free_ports(count: int) -> int:
    """A loopback port p with p .. p+count-1 all free (one per worker)."""
    return free_ports(count)


def loopback_sections(directory: Path, **server: object) -> dict:
    """`server`, `envoy` and a `mock` provider on free loopback ports (the access log in
    `directory`): the start of a test policy written from scratch; `server` adds to or
    replaces the server keys."""
    return {
        "server": {
            "grpc_listen": f"127.0.0.1:{free_port()}",
            "metrics_listen": f"127.0.0.1:{free_port()}",
            **TEST_SERVER,
            **server,
        },
        "envoy": {
            "listen": f"127.0.0.1:{free_port()}",
            "admin": f"127.0.0.1:{free_port()}",
            "access_log": str(directory / "access.log"),
        },
        "providers": {"mock": {"url": f"http://127.0.0.1:{free_port()}"}},
    }


def write_config(directory: Path, **sections: dict) -> Path:
    """The dev policy with fresh loopback ports, plus overrides per section."""
    config = yaml.safe_load(DEV_CONFIG.read_text())
    config.setdefault("server", {}).update(
        grpc_listen=f"127.0.0.1:{free_port()}",
        metrics_listen=f"127.0.0.1:{free_port()}",
        **TEST_SERVER,
    )
    config.setdefault("envoy", {}).update(
        listen=f"127.0.0.1:{free_port()}",
        admin=f"127.0.0.1:{free_port()}",
        access_log=str(directory / "access.log"),
    )
    # Every provider served by the built-in mock (one process, all formats) moves with it.
    mock_url = config["providers"]["mock"]["url"]
    new_url = f"http://127.0.0.1:{free_port()}"
    for provider in config["providers"].values():
        if provider.get("url") == mock_url:
            provider["url"] = new_url
    for name, values in sections.items():
        if isinstance(values, dict) and isinstance(config.get(name), dict):
            config[name].update(values)
        else:
            config[name] = values
    path = directory / "policy.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def start_stack(directory: Path, **sections: dict) -> Stack:
    directory.mkdir(parents=True, exist_ok=True)
    stack = Stack(write_config(directory, **sections), directory)
    stack.start()
    return stack


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One dev stack for the whole session (tests must not change its policy)."""
    s = start_stack(tmp_path_factory.mktemp("stack"))
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def client(stack: Stack) -> Iterator[httpx.Client]:
    """An HTTP client of the dev stack, authenticated as its consumer (`my-secret-key`)."""
    headers = {"authorization": f"Bearer {DEV_API_KEY}"}
    with httpx.Client(base_url=stack.base_url, timeout=30, headers=headers) as c:
        yield c


def metric(stack: Stack, name: str, **labels: str) -> float:
    """Read one sample from the sidecar's /metrics (0 when absent)."""
    text = httpx.get(stack.metrics_url, timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{(.*)\})?\s+(\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(4))
    return total


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05):
    """Poll until predicate() is truthy (the sidecar settles after Envoy's last byte)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def mock_exchange(stack: Stack, request_id: str) -> dict:
    """What the mock provider received and sent for `x-mock-request-id: request_id`."""

    def fetch():
        r = httpx.get(f"{stack.mock_url}/_mock/exchanges/{request_id}", timeout=5)
        return r.json() if r.status_code == 200 else None

    found = wait_for(fetch)
    assert found, f"mock never saw request {request_id}"
    return found


def sse_payloads(body: bytes) -> list[bytes]:
    """The `data: ` payloads of an LF-framed SSE body."""
    return [line[6:] for line in body.split(b"\n") if line.startswith(b"data: ")]
