"""`extproc run` (what `make run` calls) as a user runs it: a second stack on taken
ports refuses to start and names each port and the key that moves it; `--listen`
moves Envoy; stdout has one writer, so `make run > file` keeps every access-log line."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from extproc.dev.devstack import Stack
from tests.conftest import REPO, free_port, wait_for, write_config

KEYS = (
    "providers.mock.url",
    "server.grpc_listen",
    "server.metrics_listen",
    "envoy.listen",
    "envoy.admin",
)


def run(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "extproc", "run", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        **kw,
    )


def addresses(policy: Path) -> dict[str, str]:
    doc = yaml.safe_load(policy.read_text())
    return {
        "providers.mock.url": doc["providers"]["mock"]["url"].removeprefix("http://"),
        "server.grpc_listen": doc["server"]["grpc_listen"],
        "server.metrics_listen": doc["server"]["metrics_listen"],
        "envoy.listen": doc["envoy"]["listen"],
        "envoy.admin": doc["envoy"]["admin"],
    }


def test_a_second_stack_on_the_same_ports_exits_naming_each_port_and_key(stack, tmp_path):
    """Envoy and gRPC bind with SO_REUSEPORT: without the check the second stack's
    probes reach the first and it says Ready while serving nothing."""
    out = run("--config", str(stack.config_path), "--workdir", str(tmp_path / "second"))
    assert out.returncode == 1, out
    assert "Ready" not in out.stdout
    lines = out.stderr.splitlines()
    for key, address in addresses(stack.config_path).items():
        named = [ln for ln in lines if ln.startswith(f"{address} ") and f"with {key} " in ln]
        assert len(named) == 1, (key, address, out.stderr)
        assert str(stack.config_path) in named[0]
    assert "--listen HOST:PORT" in out.stderr
    # Nothing of the second stack started, and the first one still answers.
    assert not (tmp_path / "second" / "envoy.yaml").exists()
    assert httpx.get(f"{stack.admin_url}/ready", timeout=5).status_code == 200


def test_one_taken_port_is_named_alone(tmp_path):
    policy = write_config(tmp_path)
    metrics = addresses(policy)["server.metrics_listen"]
    host, _, port = metrics.rpartition(":")
    with socket.socket() as squatter:  # another program, without SO_REUSEPORT
        squatter.bind((host, int(port)))
        squatter.listen()
        out = run("--config", str(policy), "--workdir", str(tmp_path / "w"))
    assert out.returncode == 1, out
    named = [ln for ln in out.stderr.splitlines() if "already in use" in ln]
    assert named == [
        f"{metrics} (sidecar metrics) is already in use: move it with "
        f"server.metrics_listen in {policy}"
    ], out.stderr


def test_listen_must_be_an_ip_and_port(tmp_path):
    out = run("--config", str(write_config(tmp_path)), "--listen", "localhost:80")
    assert out.returncode == 2 and "--listen" in out.stderr and "IP address" in out.stderr


def test_a_stack_that_keeps_its_ports_is_checked_too(tmp_path):
    """Stack.start() (tests, `make run`) refuses before it spawns anything."""
    policy = write_config(tmp_path)
    taken = addresses(policy)["envoy.admin"]
    host, _, port = taken.rpartition(":")
    with socket.socket() as squatter:
        squatter.bind((host, int(port)))
        squatter.listen()
        stack = Stack(policy, tmp_path / "w")
        with pytest.raises(Exception) as refused:
            stack.start()
    assert f"{taken} (Envoy's admin interface) is already in use" in str(refused.value)
    assert not stack.procs


@pytest.mark.parametrize("merged", [False, True], ids=["stdout-to-file", "both-to-one-file"])
def test_run_with_listen_and_output_to_a_file_keeps_every_access_log_line(tmp_path, merged):
    """`make run > file` (and `> file 2>&1`, where the sidecar's log lines used to land on
    Envoy's, at their own offset: 2 of 30 lines lost): the banner, then every
    access-log line whole; the processes' own output goes to stderr."""
    policy = write_config(tmp_path, envoy={"access_log": "/dev/stdout"})
    configured = addresses(policy)["envoy.listen"]
    listen = f"127.0.0.1:{free_port()}"
    stdout_path, stderr_path = tmp_path / "out.txt", tmp_path / "err.txt"
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "extproc", "run", "--config", str(policy),
             "--listen", listen, "--workdir", str(tmp_path / "w"), "--mock-delay-ms", "0"],
            stdout=out, stderr=out if merged else err, cwd=REPO,
        )  # fmt: skip
    try:
        ready = wait_for(lambda: b"Ctrl-C stops everything." in stdout_path.read_bytes(), 60)
        assert ready, stdout_path.read_text(errors="replace")[-3000:]
        ids = [uuid.uuid4().hex for _ in range(30)]
        with httpx.Client(base_url=f"http://{listen}", timeout=30) as client:
            for i, rid in enumerate(ids):
                body = {"model": "gpt-4o-mini", "stream": i % 2 == 0,
                        "messages": [{"role": "user", "content": f"hello {i}"}]}  # fmt: skip
                r = client.post("/openai", json=body, headers={"x-request-id": rid})
                assert r.status_code == 200
        with pytest.raises(httpx.ConnectError):  # envoy.listen was moved, not added
            httpx.get(f"http://{configured}/openai", timeout=5)

        def logged() -> bool:
            text = stdout_path.read_text(errors="replace")
            return all(rid in text for rid in ids)

        wait_for(logged, 15)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    assert code == 0
    text = stdout_path.read_text()
    banner, marker, rest = text.partition("Ctrl-C stops everything.\n")
    assert marker and f"Ready. Envoy on http://{listen} " in banner
    lines = rest.splitlines()
    if not merged:
        assert banner.lstrip().startswith("Ready.")  # nothing but this process's writes
        assert all(line.startswith("{") for line in lines if line), rest[-3000:]
        assert "mockprovider listening" in stderr_path.read_text()  # children: stderr
    entries = [json.loads(line) for line in lines if line.startswith("{")]  # each whole
    assert sorted(e["request_id"] for e in entries if e["request_id"] in ids) == sorted(ids)
    assert all(e["status"] == 200 for e in entries)
