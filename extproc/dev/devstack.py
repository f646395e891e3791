"""The whole local stack: built-in mock provider, the sidecar and a real Envoy.

`make run` and the end-to-end tests start the same thing through `Stack`, so what the
tests prove is what a user runs. Each part is its own process (as in production) and
the stack waits until all three say they are ready before it returns.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.bootstrap import bootstrap_yaml
from extproc.config import Config, ConfigError, load_config, worker_addresses
from extproc.envoybin import envoy_binary

MOCK_PROVIDER = "mock"  # a provider of this name is served by the built-in mock
REPO = Path(__file__).resolve().parents[2]


class StackError(RuntimeError):
    pass


@dataclass
class Stack:
    """Start with `start()`, stop with `stop()` (or use as a context manager)."""

    config_path: Path
    workdir: Path
    mock_delay_ms: float = 0.0
    envoy_concurrency: int = 2
    capture: bool = True  # write each process's output to workdir/<name>.log
    env: dict[str, str] = field(default_factory=dict)
    # Sidecar worker processes (`serve --workers`); None = the policy's server.workers.
    # The Envoy bootstrap lists as many endpoints.
    workers: int | None = None
    config: Config = field(init=False)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.config = load_config(str(self.config_path))

    def __enter__(self) -> Stack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def sidecar_addresses(self) -> list[str]:
        """Where each sidecar worker listens, in worker order."""
        workers = self.workers or self.config.server.workers
        return worker_addresses(self.config.server.grpc_listen, workers)

    @property
    def base_url(self) -> str:
        return f"http://{self.config.envoy.listen}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.config.server.metrics_listen}/metrics"

    @property
    def admin_url(self) -> str:
        return f"http://{self.config.envoy.admin}"

    @property
    def mock_url(self) -> str | None:
        provider = self.config.providers.get(MOCK_PROVIDER)
        return provider.url if provider else None

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, timeout: float = 30.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            if self.mock_url:
                self.start_mock()
            self.start_sidecar()
            deadline = time.monotonic() + timeout
            # Envoy after the sidecar: its first gRPC health check then passes, so
            # every worker is a healthy endpoint at once (a failed first check is
            # retried only after the 5 s interval, and until then outlier ejection
            # cannot steer streams away from a worker that dies).
            self.wait_sidecar(deadline)
            self.start_envoy()
            if self.mock_url:
                self._wait("mock", lambda: _http_ok(f"{self.mock_url}/healthz"), deadline)
            self._wait("envoy", lambda: _http_ok(f"{self.admin_url}/ready"), deadline)
        except BaseException:
            self.stop()
            raise

    def start_mock(self) -> None:
        provider = self.config.providers[MOCK_PROVIDER]
        self._spawn(
            "mock",
            [
                sys.executable,
                "-m",
                "extproc.dev.mock",
                "--host",
                provider.host,
                "--port",
                str(provider.port),
                "--delay-ms",
                str(self.mock_delay_ms),
            ],
        )

    def start_sidecar(self) -> None:
        self._spawn(
            "sidecar",
            [
                sys.executable,
                "-m",
                "extproc",
                "serve",
                "--config",
                str(self.config_path),
                *(["--workers", str(self.workers)] if self.workers else []),
            ],
        )

    def start_envoy(self) -> None:
        bootstrap = self.workdir / "envoy.yaml"
        config = self.config
        if self.workers:
            config = replace(config, server=replace(config.server, workers=self.workers))
        bootstrap.write_text(bootstrap_yaml(config))
        self._spawn(
            "envoy",
            [
                str(envoy_binary()),
                "-c",
                str(bootstrap),
                "--use-dynamic-base-id",
                "--concurrency",
                str(self.envoy_concurrency),
                "--log-level",
                "warn",
            ],
        )

    def wait_sidecar(self, deadline: float) -> None:
        for address in self.sidecar_addresses:
            self._wait("sidecar", lambda a=address: grpc_serving(a), deadline)

    def stop_process(self, name: str, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return proc.returncode if proc else 0
        proc.send_signal(sig)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def stop(self) -> None:
        for name in ("envoy", "sidecar", "mock"):
            self.stop_process(name)

    def _spawn(self, name: str, argv: list[str]) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        out = open(self.workdir / f"{name}.log", "ab") if self.capture else None  # noqa: SIM115
        self.procs[name] = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT if out else None, env=env, cwd=REPO
        )
        if out is not None:
            out.close()  # the child holds its own descriptor

    def _wait(self, name: str, check, deadline: float) -> None:
        while time.monotonic() < deadline:
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise StackError(f"{name} exited with {proc.returncode}:\n{self.log(name)[-3000:]}")
            if check():
                return
            time.sleep(0.05)
        raise StackError(f"{name} not ready in time:\n{self.log(name)[-3000:]}")


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False


def grpc_serving(target: str, service: str = "") -> bool:
    """True when the sidecar's gRPC health service says SERVING."""
    try:
        with grpc.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
            return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


SEED_CURL = (
    """curl -N "{base}/openai" -H content-type:application/json -d '{{\n"""
    """  "stream": true, "model": "gpt-3.5-turbo",\n"""
    """  "messages": [{{"role": "user", "content": "In a couple words, """
    """tell me what I should call my first GitHub repo."}}]}}'"""
)


def main(args: argparse.Namespace) -> int:
    """`extproc run`: start the stack in the foreground until Ctrl-C."""
    config_path = Path(args.config)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="extproc-run-"))
    try:
        stack = Stack(config_path, workdir, mock_delay_ms=args.mock_delay_ms, capture=False)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    try:
        stack.start()
    except StackError as exc:
        print(f"could not start the stack: {exc}", file=sys.stderr)
        return 1
    print(
        f"\nReady. Envoy on {stack.base_url} (admin {stack.admin_url}), "
        f"sidecar metrics on {stack.metrics_url}, config {config_path}\n"
        f"Try:\n\n{SEED_CURL.format(base=stack.base_url)}\n\nCtrl-C stops everything.",
        flush=True,
    )
    stopping = False

    def _stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        while not stopping:
            for name, proc in stack.procs.items():
                if proc.poll() is not None:
                    print(f"{name} exited with {proc.returncode}; stopping", file=sys.stderr)
                    stopping = True
            time.sleep(0.2)
    finally:
        stack.stop()
    return 0
