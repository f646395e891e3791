"""The whole local stack: built-in mock provider, the sidecar and a real Envoy.

`make run` and the end-to-end tests start the same thing through `Stack`, so what the
tests prove is what a user runs. Each part is its own process (as in production) and
the stack waits until all three say they are ready before it returns.

Before it starts anything it checks every address it will listen on (`ports.py`):
Envoy and gRPC bind with SO_REUSEPORT, so a second stack on the same ports would
otherwise start, reach the first one's readiness probes and say "Ready".

`extproc run` (capture=False) keeps stdout for one writer, this process: the "Ready"
banner, then Envoy's access log. Envoy given `/dev/stdout` would open it again, with
an offset of its own: with stdout redirected to a file (`make run > file`) its lines
and the Python processes' writes overwrite each other. So Envoy appends to
`<workdir>/access.log` instead, this process copies every complete line of it to its
stdout, and the child processes' own output (logs, diagnostics) goes to stderr.
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
from extproc.config import Config, ConfigError, load_config
from extproc.dev import ports
from extproc.envoybin import envoy_binary
from extproc.netaddr import worker_addresses

MOCK_PROVIDER = "mock"  # a provider of this name is served by the built-in mock
REPO = Path(__file__).resolve().parents[2]


class StackError(RuntimeError):
    pass


class PortsInUse(StackError):
    """Some address the stack needs is taken; the message names each and its key."""

    def __init__(self, busy: list[ports.Address], config_path: str) -> None:
        super().__init__(ports.describe(busy, config_path))
        self.busy = busy


# Access-log paths that mean "the terminal": Envoy would reopen them (see above).
STD_STREAMS = {"/dev/stdout": "stdout", "/dev/stderr": "stderr"}


class LogCopier:
    """Copies the complete lines Envoy appended to `path` to `out`, from one writer."""

    def __init__(self, path: Path, out) -> None:  # out: a binary stream
        self.path = path
        self.out = out
        self._file = None
        self._partial = b""

    def pump(self) -> None:
        if self._file is None:
            try:
                self._file = open(self.path, "rb")  # noqa: SIM115 - kept open while running
            except FileNotFoundError:
                return  # Envoy has not created it yet
        data = self._file.read()
        if not data:
            return
        data = self._partial + data
        complete, _, self._partial = data.rpartition(b"\n")
        if complete:
            self.out.write(complete + b"\n")
            self.out.flush()

    def close(self) -> None:
        self.pump()
        if self._partial:  # Envoy stopped mid-line: keep what there is
            self.out.write(self._partial + b"\n")
            self.out.flush()
            self._partial = b""
        if self._file is not None:
            self._file.close()
            self._file = None


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
    # host:port for Envoy's listener instead of envoy.listen (`extproc run --listen`).
    listen: str | None = None
    config: Config = field(init=False)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict, init=False)
    access_copier: LogCopier | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.config = load_config(str(self.config_path))
        envoy = self.config.envoy
        if self.listen is not None:
            envoy = replace(envoy, listen=self.listen)
        stream = STD_STREAMS.get(envoy.access_log)
        if stream is not None and not self.capture:
            log = (self.workdir / "access.log").absolute()
            envoy = replace(envoy, access_log=str(log))
            self.access_copier = LogCopier(log, getattr(sys, stream).buffer)
        if self.workers:
            self.config = replace(
                self.config, server=replace(self.config.server, workers=self.workers)
            )
        self.config = replace(self.config, envoy=envoy)

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

    def check_ports(self) -> None:
        """Raise PortsInUse naming every address the stack needs that is taken."""
        addresses = ports.stack_addresses(
            self.config, self.config.server.workers, listen_flag=self.listen is not None
        )
        if not self.mock_url:
            addresses = [a for a in addresses if a.key != "providers.mock.url"]
        busy = ports.taken_addresses(addresses)
        if busy:
            raise PortsInUse(busy, str(self.config_path))

    def start(self, timeout: float = 30.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.check_ports()  # before anything starts: nothing to stop on failure
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
        bootstrap.write_text(bootstrap_yaml(self.config))
        if self.access_copier is not None:  # a reused --workdir: copy this run's lines only
            self.access_copier.path.unlink(missing_ok=True)
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
        if self.access_copier is not None:
            self.access_copier.close()  # Envoy flushed its last lines when it stopped

    def _spawn(self, name: str, argv: list[str]) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        if self.capture:
            out = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115
            self.procs[name] = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO
            )
            out.close()  # the child holds its own descriptor
        else:  # stdout is this process's alone (module docstring)
            self.procs[name] = subprocess.Popen(
                argv, stdout=sys.stderr.fileno(), stderr=None, env=env, cwd=REPO
            )

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
        stack = Stack(
            config_path,
            workdir,
            mock_delay_ms=args.mock_delay_ms,
            capture=False,
            listen=getattr(args, "listen", None),
        )
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    try:
        stack.start()
    except PortsInUse as exc:
        print(f"cannot start the stack:\n{exc}", file=sys.stderr)
        return 1
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
            if stack.access_copier is not None:
                stack.access_copier.pump()
            time.sleep(0.2)
    finally:
        stack.stop()
    return 0
