"""`extproc serve --workers N`: N ext_proc worker processes under one supervisor.

One Python process handles a few thousand ext_proc messages a second, and token
streaming sends one per token, so the sidecar scales over cores with processes. Each
worker is an ordinary `server.Worker` on its own address (`config.worker_addresses`:
consecutive ports, or numbered unix sockets), because Envoy keeps one HTTP/2
connection per worker thread per endpoint: only several endpoints spread the streams.

Workers are spawned (a fresh interpreter each), never forked: grpc's C core does not
survive fork() once it has started threads, and the supervisor never needs grpc.

The supervisor:
- validates the policy and writes it to a private snapshot that workers load, so a
  worker restarted while the mounted file is broken still gets the working policy;
- serves the one /metrics endpoint for all workers (prometheus-client multiprocess
  mode: every process writes its samples to files under PROMETHEUS_MULTIPROC_DIR,
  which this process sums; counters survive a worker's restart);
- restarts a worker that dies (at once, or with a growing delay if it keeps dying);
- watches the policy file: validates a change once, logs and counts it, writes the
  snapshot and sends SIGHUP to the workers;
- forwards SIGTERM/SIGINT, waits for the workers to drain (their grace period plus a
  margin), then exits.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from extproc import logcontext
from extproc.config import Config, ConfigError, load_config
from extproc.reload import POLL_INTERVAL_S, SNAPSHOT_ENV, PolicyWatcher, read_file, report_reload

log = logging.getLogger("extproc.supervisor")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
TICK_S = 0.1
STABLE_S = 10.0  # a worker that ran this long is restarted at once when it dies
MAX_BACKOFF_S = 30.0
KILL_MARGIN_S = 5.0  # after the grace period, before SIGKILL


@dataclass
class _Slot:
    index: int
    proc: subprocess.Popen | None = None
    started: float = 0.0
    quick_exits: int = 0  # exits in a row, each within STABLE_S of its start
    restart_at: float = 0.0


def _write_atomically(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class Supervisor:
    def __init__(self, config: Config, workers: int) -> None:
        self.config = config
        self.workers = workers
        self.slots = [_Slot(index) for index in range(workers)]
        self.stopping = False
        self._reload_now = False
        self._kill_at = 0.0
        self._killed = False

    # -- signals --------------------------------------------------------------------

    def _on_stop(self, signum: int, frame: object) -> None:
        if self.stopping:
            return
        self.stopping = True
        grace = self.config.server.shutdown_grace_seconds
        self._kill_at = time.monotonic() + grace + KILL_MARGIN_S
        log.info(
            "%s: stopping %d workers (open streams get up to %d s)",
            signal.Signals(signum).name,
            self.workers,
            grace,
        )
        for slot in self.slots:
            if slot.proc is not None and slot.proc.poll() is None:
                slot.proc.send_signal(signal.SIGTERM)

    def _on_hup(self, signum: int, frame: object) -> None:
        self._reload_now = True

    # -- workers --------------------------------------------------------------------

    def _spawn(self, slot: _Slot) -> None:
        argv = [
            sys.executable,
            "-m",
            "extproc.supervisor",
            "--worker",
            str(slot.index),
            "--of",
            str(self.workers),
            "--config",
            self.config.path,
        ]
        env = {**os.environ, SNAPSHOT_ENV: self.snapshot, MULTIPROC_ENV: self.metrics_dir}
        slot.proc = subprocess.Popen(argv, env=env)
        slot.started = time.monotonic()
        log.info("worker %d started (pid %d)", slot.index, slot.proc.pid)

    def _reap(self, slot: _Slot, now: float) -> None:
        proc = slot.proc
        assert proc is not None
        slot.proc = None
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(proc.pid, self.metrics_dir)  # its live gauges
        if self.stopping:
            log.info("worker %d (pid %d) exited with %s", slot.index, proc.pid, proc.returncode)
            return
        ran = now - slot.started
        if ran >= STABLE_S:
            slot.quick_exits = 0
        # At once the first time (every second without it fails streams, closed);
        # 1, 2, 4 ... 30 s while it keeps dying right after starting.
        delay = min(MAX_BACKOFF_S, 2.0 ** (slot.quick_exits - 1)) if slot.quick_exits else 0.0
        slot.quick_exits += 1
        slot.restart_at = now + delay
        self.metrics.worker_restarts.inc()
        log.error(
            "worker %d (pid %d) exited with %s after %.1f s; restarting in %.0f s",
            slot.index,
            proc.pid,
            proc.returncode,
            ran,
            delay,
        )

    # -- policy ---------------------------------------------------------------------

    def _check_policy(self) -> None:
        previous = self.watcher.config
        reload = self.watcher.check()
        if reload is None:
            return
        report_reload(reload, previous, self.metrics)
        if reload.config is None:
            return
        self.config = reload.config
        if reload.data is not None:
            _write_atomically(self.snapshot, reload.data)
        for slot in self.slots:
            if slot.proc is not None and slot.proc.poll() is None:
                slot.proc.send_signal(signal.SIGHUP)

    # -- main loop ------------------------------------------------------------------

    def run(self) -> int:
        state = tempfile.mkdtemp(prefix="extproc-")
        try:
            return self._run(state)
        finally:
            shutil.rmtree(state, ignore_errors=True)

    def _run(self, state: str) -> int:
        self.snapshot = os.path.join(state, "policy.yaml")
        self.metrics_dir = os.path.join(state, "metrics")
        os.mkdir(self.metrics_dir)
        # Before any metric exists in this process: its values go to the shared files.
        os.environ[MULTIPROC_ENV] = self.metrics_dir
        from prometheus_client import CollectorRegistry, start_http_server, values
        from prometheus_client.multiprocess import MultiProcessCollector

        values.ValueClass = values.get_value_class()  # in case it was imported already
        from extproc.metrics import Metrics

        self.metrics = Metrics()
        data = read_file(self.config.path)
        try:  # the file may have changed since the CLI checked it
            self.config = load_config(self.config.path, data)
        except ConfigError as exc:
            for line in exc.lines():
                log.error("%s", line)
            return 1
        assert data is not None
        _write_atomically(self.snapshot, data)
        self.watcher = PolicyWatcher(self.config.path, self.config, data)

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.metrics_dir)
        host, _, port = self.config.server.metrics_listen.rpartition(":")
        start_http_server(int(port), addr=host or "0.0.0.0", registry=registry)

        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        log.info(
            "supervising %d workers, metrics on http://%s/metrics, config %s",
            self.workers,
            self.config.server.metrics_listen,
            self.config.path,
        )
        next_check = time.monotonic() + POLL_INTERVAL_S
        while True:
            now = time.monotonic()
            for slot in self.slots:
                if slot.proc is not None and slot.proc.poll() is not None:
                    self._reap(slot, now)
                if slot.proc is None and not self.stopping and now >= slot.restart_at:
                    self._spawn(slot)
            if self.stopping:
                if all(slot.proc is None for slot in self.slots):
                    log.info("all workers stopped")
                    return 0
                if now >= self._kill_at and not self._killed:
                    self._killed = True
                    for slot in self.slots:
                        if slot.proc is not None:
                            log.error("worker %d did not stop in time: SIGKILL", slot.index)
                            slot.proc.kill()
            elif self._reload_now or now >= next_check:
                self._reload_now = False
                next_check = now + POLL_INTERVAL_S
                try:
                    self._check_policy()
                except Exception:
                    log.exception("policy check failed")
            time.sleep(TICK_S)


def main(config: Config, workers: int) -> int:
    logcontext.configure(config.server.log_level, config.server.log_format)
    return Supervisor(config, workers).run()


def _worker_entry(argv: list[str]) -> int:
    """`python -m extproc.supervisor --worker I --of N --config FILE` (spawned only)."""
    import argparse

    parser = argparse.ArgumentParser(prog="extproc-worker")
    parser.add_argument("--worker", type=int, required=True)
    parser.add_argument("--of", type=int, required=True)
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    from extproc.server import worker_main

    return worker_main(args.config, args.worker, args.of)


if __name__ == "__main__":
    # Until the worker's loop handles SIGHUP, a reload signal must not kill it.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    sys.exit(_worker_entry(sys.argv[1:]))
