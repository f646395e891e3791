"""The thin gRPC layer: one `Exchange` per ext_proc `Process` stream, nothing else.

Also owns what a worker process has once: the policy (config + resolved provider keys)
and its live reload, the metrics registry, gRPC health (readiness), and the graceful
shutdown on SIGTERM. Several workers are started and watched by `extproc.supervisor`.

Live reload: the policy file is polled for a change of *content* (a ConfigMap update
swaps a symlink, so the mtime of the path proves nothing). A valid new policy replaces
`ExternalProcessor.policy` whole; an `Exchange` keeps the `Policy` it was created with,
so streams in flight finish under the policy they started with. An invalid file is
refused, logged (file, key, reason) and counted, and the old policy stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time

from grpc_health.v1 import health_pb2
from prometheus_client import start_http_server

from extproc import eventloop, logcontext
from extproc.admission import Admission, Limits, shed_response
from extproc.config import Config, ConfigError, load_config
from extproc.envoy_wire import Response, parse_request
from extproc.exchange import Exchange, offpath
from extproc.failover.attempt import Attempt
from extproc.failover.plan import UPSTREAM, UPSTREAM_STAGE
from extproc.h2grpc import Server
from extproc.h2stream import EOF, Method, Stream, StreamEnded
from extproc.headers import OBSERVER_METADATA
from extproc.metrics import Metrics
from extproc.msgtimes import MessageTimes
from extproc.netaddr import worker_addresses
from extproc.policy import Policy, Shared, build_policy
from extproc.readiness import Health, Readiness
from extproc.reload import (
    POLL_INTERVAL_S,
    SNAPSHOT_ENV,
    PolicyWatcher,
    read_file,
    report_reload,
)

log = logging.getLogger("extproc.server")
SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"
# How long before the end of the shutdown grace the streams still open are ended with an
# error event (at most a quarter of the grace): a token stream sends a chunk far sooner.
END_BEFORE_GRACE_S = 2.0


# ------------------------------------------------------------------------ gRPC


class ExternalProcessor:
    def __init__(self, policy: Policy, metrics: Metrics, worker: int = 0) -> None:
        self.policy = policy  # swapped whole on reload; each exchange keeps its own
        self.metrics = metrics
        self._background: set[asyncio.Future] = set()
        self.open_streams = 0
        self.exchanges: set[Exchange] = set()  # open ones, for the end of the grace period
        self.draining = False
        self._taken = metrics.worker_streams.labels(str(worker))
        self.admission = Admission(limits_of(policy.config))
        self._shed = shed_response()
        self._shed_requests = metrics.requests.labels("unknown", "", "503")

    async def Process(self, context: Stream) -> None:
        clock = time.perf_counter
        admission = self.admission
        try:
            first = await context.read()
            if first is EOF:
                return
            caller = _Caller(context.invocation_metadata())
            if caller.observing:  # `streaming.meter_off_path`: never answered
                await offpath.observe(first, context, clock, self._run_after)
                return
            upstream = caller.upstream
            # Only a client's request is shed (an Envoy local reply starts at response
            # headers; a failover attempt belongs to a request already admitted).
            if first.WhichOneof("request") == "request_headers" and not upstream:
                reason = admission.admit()
                if reason is not None:
                    await self._refuse_overloaded(context, reason)
                    return
            else:
                admission.open += 1  # counted like any stream, never refused
        except StreamEnded as exc:  # a hang-up before the exchange began: nothing to settle
            log.debug("ext_proc stream ended before its first answer: %r", exc)
            return
        if upstream:
            await self._attempt(first, context)
            return
        exchange = Exchange(self.policy, self.metrics, clock())
        exchange.traceparent = caller.traceparent  # Envoy's span of this ext_proc call
        times = MessageTimes(self.metrics.phase_time)  # added to the histogram in bulk
        # One message per response chunk: the loop's lookups are made once per stream.
        read, write, on, observe, eof = context.read, context.write, exchange.on, times.observe, EOF
        self._taken.inc()
        self.open_streams += 1
        self.exchanges.add(exchange)
        try:
            request = first
            while True:
                if request is None:
                    request = await read()
                    if request is eof:
                        break
                start = clock()
                kind = request.WhichOneof("request")  # the phase: dispatch and metric label
                response = on(kind, request, start)
                request = None
                if response.__class__ is not Response:  # the request body's stages may await
                    admission.wait_started()
                    try:
                        response = await response
                    finally:
                        admission.wait_ended()
                observe(kind, clock() - start)
                await write(response)
                if exchange.after:
                    self._run_after(exchange)
                if exchange.off_path is not None and kind == "response_headers":
                    break  # metered off path: the observer has the rest (`offpath.keep_slot`)
        except asyncio.CancelledError:
            raise  # Envoy or the client went away; `finally` settles the exchange
        except StreamEnded as exc:
            # The RPC ended under a read or write (Envoy reset the stream between our
            # read and our answer): a hang-up like a cancellation, not a failure of
            # ours. `finally` settles the exchange.
            log.debug("ext_proc stream ended under us route=%s: %r", exchange.route_name, exc)
        except Exception:
            self.metrics.errors.labels("internal").inc()
            log.exception("ext_proc stream failed route=%s", exchange.route_name)
            raise
        finally:
            times.flush()
            self.open_streams -= 1
            self.exchanges.discard(exchange)
            exchange.close(clock())
            if not offpath.keep_slot(exchange, admission.release):
                admission.release()
            if exchange.after:
                self._run_after(exchange)

    async def _attempt(self, first, context: Stream) -> None:
        """A stream of the upstream (cluster-level) filter: one failover attempt."""
        attempt = Attempt(self.policy, self.metrics)
        self.open_streams += 1
        try:
            request = first
            while request is not EOF:
                await context.write(attempt.on(request))
                request = await context.read()
        except StreamEnded as exc:  # Envoy ended the attempt (reset, per-try timeout)
            log.debug("failover attempt stream ended under us: %r", exc)
        finally:
            self.open_streams -= 1
            self.admission.release()
            attempt.close()

    async def _refuse_overloaded(self, context: Stream, reason: str) -> None:
        """503 `overloaded` at once; no Exchange, no stage, nothing reaches the provider.
        Not logged per request (a flood would be logged as one): counted, and readiness
        says so."""
        self.metrics.errors.labels("overloaded").inc()
        self.metrics.shed.labels(reason).inc()
        self._shed_requests.inc()  # in the 5xx ratio: no route or model was read
        await context.write(self._shed)
        while await context.read() is not EOF:  # Envoy ends the stream
            pass

    def _run_after(self, exchange: Exchange) -> None:
        """Settlement I/O (e.g. Redis) runs beside the stream, never in its way, and
        survives the stream's cancellation."""
        for work in exchange.after:
            task = asyncio.ensure_future(work)
            self._background.add(task)
            task.add_done_callback(self._background_done)
        exchange.after.clear()

    def _background_done(self, task: asyncio.Future) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.metrics.errors.labels("internal").inc()
            log.error("settlement failed", exc_info=task.exception())

    async def settle(self, timeout: float) -> None:
        """Shutdown: let settlement work of finished streams complete (bounded)."""
        if self._background:
            await asyncio.wait(set(self._background), timeout=timeout)


def limits_of(config: Config) -> Limits:
    server = config.server
    return Limits(
        server.max_open_streams, server.max_queued_requests, server.max_queue_delay_ms / 1000
    )


LAG_PROBE_S = 0.05


async def probe_lag(admission: Admission, metrics: Metrics, interval: float = LAG_PROBE_S) -> None:
    """How late the loop wakes a timer is how late it handles any ready message: the
    queue time of this worker, fed to admission control and the histogram."""
    loop = asyncio.get_running_loop()
    observe = metrics.queue_time.observe
    while True:
        due = loop.time() + interval
        await asyncio.sleep(interval)
        lag = max(0.0, loop.time() - due)
        observe(lag)
        admission.observe_lag(lag)
        metrics.saturated.set(1 if admission.saturated else 0)


class _Caller:
    """What the gRPC metadata of a `Process` stream says, read in one pass: which
    filter sent it (the observing one sends `OBSERVER_METADATA`, a failover attempt's
    upstream filter `UPSTREAM_STAGE`) and Envoy's span of the call."""

    __slots__ = ("observing", "traceparent", "upstream")

    def __init__(self, metadata) -> None:
        self.observing = self.upstream = False
        self.traceparent = ""
        for key, value in metadata or ():
            if key == "traceparent":
                self.traceparent = value if isinstance(value, str) else ""
            elif key == OBSERVER_METADATA:
                self.observing = True
            elif key == UPSTREAM_STAGE:
                self.upstream = value == UPSTREAM


def grpc_server(processor: ExternalProcessor, health_check: Health) -> Server:
    """The worker's gRPC methods on the sidecar's own transport (`extproc.h2grpc`)."""
    return Server({
        f"/{SERVICE_NAME}/Process": Method(parse_request, processor.Process),
        "/grpc.health.v1.Health/Check": Method(
            health_pb2.HealthCheckRequest.FromString, health_check.Check
        ),
    })  # fmt: skip


class Worker:
    """One ext_proc server process.

    `index`/`count` place it among the supervisor's workers: it listens on its own
    address (`worker_addresses`). Alone (`count == 1`) it also serves /metrics and
    watches the policy file itself; supervised, the supervisor does both and sends
    SIGHUP once a new policy, written to `snapshot`, has been validated.
    """

    def __init__(
        self,
        config: Config,
        *,
        index: int = 0,
        count: int = 1,
        snapshot: str | None = None,
        snapshot_data: bytes | None = None,
    ) -> None:
        self.config = config  # as started: listen addresses and workers stay until restart
        self.index = index
        self.count = count
        self.snapshot = snapshot
        self._snapshot_data = snapshot_data
        self.listen = worker_addresses(config.server.grpc_listen, count)[index]
        offpath.set_worker(index)  # its exchange tokens lead its own observer to it
        self.metrics = Metrics()
        # Outlives reloads: counters, caches, connections; stages count into our metrics.
        self.shared = Shared(self.metrics, worker=index)
        self.processor = ExternalProcessor(
            build_policy(config, self.shared), self.metrics, worker=index
        )
        self.readiness = Readiness(self.shared)
        self.readiness.add("admission", self._admission_check)
        self.health = Health()
        self.watcher = PolicyWatcher(config.path, config) if snapshot is None else None
        self._serving: bool | None = None
        self._parent = os.getppid()
        self._stop = asyncio.Event()

    @property
    def policy(self) -> Policy:
        return self.processor.policy

    async def _admission_check(self) -> str | None:
        return self.processor.admission.readiness()

    def apply(self, config: Config) -> None:
        """Swap in a validated config: new streams get it, open ones keep theirs."""
        policy = build_policy(config, self.shared)  # re-reads api_key_file (rotated Secrets)
        self.processor.policy = policy
        self.processor.admission.limits = limits_of(config)
        logging.getLogger().setLevel(config.server.log_level.upper())

    async def reload_from_snapshot(self) -> None:
        """Supervised: SIGHUP says the snapshot holds a new, validated policy (or that
        a key file changed: the keys are read again either way)."""
        assert self.snapshot is not None
        data = await asyncio.to_thread(read_file, self.snapshot)
        try:
            config = await asyncio.to_thread(load_config, self.config.path, data)
        except ConfigError as exc:  # the supervisor validated it: only a race gets here
            for line in exc.lines():
                log.error("worker %d: reload refused: %s", self.index, line)
            return
        self.apply(config)  # on the loop: stage builders may touch Shared
        changed = data != self._snapshot_data
        self._snapshot_data = data
        log.info("worker %d: %s", self.index, "policy reloaded" if changed else "keys re-read")

    async def check_policy_file(self) -> None:
        """Alone: validate a changed policy file and apply it, or refuse it."""
        assert self.watcher is not None
        previous = self.watcher.config
        reload = await asyncio.to_thread(self.watcher.check)
        if reload is None:
            return
        report_reload(reload, previous, self.metrics)
        if reload.config is not None:
            self.apply(reload.config)  # on the loop: stage builders may touch Shared

    async def set_serving(self, serving: bool, reason: str = "") -> None:
        if serving == self._serving or (serving and self.processor.draining):
            return
        self._serving = serving
        status = health_pb2.HealthCheckResponse.SERVING
        if not serving:
            status = health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)
        if serving:
            log.info("worker %d: ready (SERVING)", self.index)
        else:
            log.warning("worker %d: not ready (NOT_SERVING): %s", self.index, reason)

    async def _tick(self, stop: asyncio.Event, reload: asyncio.Event) -> None:
        """Once a second (or on SIGHUP): the policy, readiness, and an orphan check."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reload.wait(), POLL_INTERVAL_S)
            forced = reload.is_set()
            reload.clear()
            if stop.is_set():
                return
            try:
                if self.snapshot is None:
                    await self.check_policy_file()
                elif os.getppid() != self._parent:  # the supervisor was killed
                    log.error("worker %d: supervisor is gone; shutting down", self.index)
                    stop.set()
                    return
                elif forced:
                    await self.reload_from_snapshot()
                problems = await self.readiness.problems()
                if not stop.is_set():
                    await self.set_serving(not problems, "; ".join(problems))
            except Exception:
                log.exception("worker %d: periodic check failed", self.index)

    def request_stop(self) -> None:
        """What SIGTERM does: start the graceful shutdown."""
        self._stop.set()

    async def run(self, ready: asyncio.Event | None = None) -> None:
        stop, reload = self._stop, asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, reload.set)
        if self.snapshot is not None and read_file(self.snapshot) != self._snapshot_data:
            reload.set()  # a SIGHUP may have come before the handler was in place
        server = grpc_server(self.processor, self.health)
        await server.listen(self.listen)
        await self.shared.start()  # the spend ledger replays, budgets rebuilt: then serve
        metrics_at = "the supervisor's"
        if self.count == 1 and self.snapshot is None:
            host, _, port = self.config.server.metrics_listen.rpartition(":")
            start_http_server(int(port), addr=host or "0.0.0.0", registry=self.metrics.registry)
            metrics_at = f"http://{self.config.server.metrics_listen}/metrics"
        problems = await self.readiness.problems()
        await self.set_serving(not problems, "; ".join(problems))
        log.info(
            "ext_proc worker %d of %d listening on %s, metrics on %s, config %s, loop %s",
            self.index,
            self.count,
            self.listen,
            metrics_at,
            self.config.path,
            eventloop.running(),
        )
        if ready is not None:
            ready.set()
        tick = asyncio.create_task(self._tick(stop, reload))
        lag = asyncio.create_task(probe_lag(self.processor.admission, self.metrics))
        await stop.wait()
        await self.shutdown(server)
        tick.cancel()
        lag.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)

    async def shutdown(self, server: Server) -> None:
        """NOT_SERVING, refuse new streams, let open ones finish within the grace period."""
        grace = self.policy.config.server.shutdown_grace_seconds
        await self.set_serving(False, "shutting down")
        self.processor.draining = True
        log.info(
            "worker %d: shutting down: refusing new streams, %d open ones get up to %d s",
            self.index,
            self.processor.open_streams,
            grace,
        )
        watch = asyncio.create_task(self._report_cut(grace))
        ending = asyncio.create_task(self._end_streams(grace))
        await server.stop(grace=grace)  # returns once every stream ended, or at the deadline
        watch.cancel()
        ending.cancel()
        await self.processor.settle(timeout=5.0)
        await self.shared.aclose()
        log.info("worker %d: stopped", self.index)

    async def _end_streams(self, grace: float) -> None:
        """Shortly before the grace period ends, the streams still open are ended by
        the gateway: each one's next chunk becomes the format's error event (+ `[DONE]`),
        so the client sees a clean end rather than a truncated body (Envoy can only
        change a chunk it sends us: a stream with no chunk in that time is cut)."""
        await asyncio.sleep(max(0.0, grace - min(END_BEFORE_GRACE_S, grace / 4)))
        now = time.perf_counter()
        ended = sum(ex.end_for_shutdown(now) for ex in list(self.processor.exchanges))
        if ended:
            log.warning(
                "worker %d: ending %d streams with an error event: the grace period ends",
                self.index,
                ended,
            )

    async def _report_cut(self, grace: float) -> None:
        await asyncio.sleep(grace)
        if self.processor.open_streams:
            log.warning(
                "worker %d: %d streams cut at the end of the grace period",
                self.index,
                self.processor.open_streams,
            )


async def serve(config: Config, *, ready: asyncio.Event | None = None) -> None:
    """One worker that also serves /metrics and watches its policy file."""
    await Worker(config).run(ready)


def configure_logging(level: str, log_format: str = "text") -> None:
    logcontext.configure(level, log_format)


def main(config: Config) -> int:
    configure_logging(config.server.log_level, config.server.log_format)
    eventloop.run(serve(config), config.server.event_loop)
    return 0


def worker_main(config_path: str, index: int, count: int) -> int:
    """A supervised worker: runs the supervisor's snapshot of the policy."""
    snapshot = os.environ[SNAPSHOT_ENV]
    data = read_file(snapshot)
    try:
        config = load_config(config_path, data)
    except ConfigError as exc:
        for line in exc.lines():
            print(line, file=sys.stderr)
        return 1
    configure_logging(config.server.log_level, config.server.log_format)
    worker = Worker(config, index=index, count=count, snapshot=snapshot, snapshot_data=data)
    eventloop.run(worker.run(), config.server.event_loop)
    return 0
