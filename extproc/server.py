"""The thin gRPC layer: one `Exchange` per ext_proc `Process` stream, nothing else.

Also owns what a process has once: the policy (config + resolved provider keys), the
metrics registry and its HTTP endpoint, gRPC health, and signal handling.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import start_http_server

from extproc.config import Config
from extproc.exchange import Exchange
from extproc.metrics import Metrics
from extproc.policy import Policy, Shared, build_policy

log = logging.getLogger("extproc.server")
SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"


class ExternalProcessor(ext_proc_grpc.ExternalProcessorServicer):
    def __init__(self, policy: Policy, metrics: Metrics) -> None:
        self.policy = policy  # swapped whole on reload; each exchange keeps its own
        self.metrics = metrics
        self._background: set[asyncio.Future] = set()

    async def Process(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        clock = time.perf_counter
        exchange = Exchange(self.policy, self.metrics, clock())
        phase_time = self.metrics.phase_time
        try:
            while True:
                request = await context.read()
                if request is grpc.aio.EOF:
                    break
                start = clock()
                kind = request.WhichOneof("request")
                if kind == "request_body":  # the one phase that may wait on I/O
                    response = await exchange.on_request_body(request.request_body.body, start)
                else:
                    response = exchange.handle(request, start)
                phase_time[kind].observe(clock() - start)
                await context.write(response)
                if exchange.after:
                    self._run_after(exchange)
        except asyncio.CancelledError:
            raise  # Envoy or the client went away; `finally` settles the exchange
        except Exception:
            self.metrics.errors.labels("internal").inc()
            log.exception("ext_proc stream failed route=%s", exchange.route_name)
            raise
        finally:
            exchange.close(clock())
            if exchange.after:
                self._run_after(exchange)

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


def _bind(server: grpc.aio.Server, listen: str) -> None:
    """`host:port` or `unix:/path`; grpc says 0 when a TCP port cannot be bound."""
    if server.add_insecure_port(listen) == 0 and not listen.startswith("unix:"):
        raise OSError(f"cannot listen on {listen}")


async def serve(config: Config, *, ready: asyncio.Event | None = None) -> None:
    policy = build_policy(config, Shared())
    metrics = Metrics()
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_concurrent_streams", 10000),
            ("grpc.so_reuseport", 0),
        ]
    )
    processor = ExternalProcessor(policy, metrics)
    ext_proc_grpc.add_ExternalProcessorServicer_to_server(processor, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    _bind(server, config.server.grpc_listen)
    host, _, port = config.server.metrics_listen.rpartition(":")
    start_http_server(int(port), addr=host or "0.0.0.0", registry=metrics.registry)
    await server.start()
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "ext_proc listening on %s, metrics on http://%s/metrics, config %s",
        config.server.grpc_listen,
        config.server.metrics_listen,
        config.path,
    )
    if ready is not None:
        ready.set()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: refusing new streams, letting open ones finish")
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.stop(grace=10)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def main(config: Config) -> int:
    configure_logging(config.server.log_level)
    asyncio.run(serve(config))
    return 0
