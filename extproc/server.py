"""The thin gRPC layer: one `Exchange` per ext_proc `Process` stream, nothing else.

Also owns what a process has once: the policy (config + resolved provider keys), the
metrics registry and its HTTP endpoint, gRPC health, and signal handling.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import start_http_server

from extproc.config import Config
from extproc.exchange import Exchange, Policy
from extproc.metrics import Metrics

log = logging.getLogger("extproc.server")
SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"


def resolve_policy(config: Config, environ: dict[str, str] | None = None) -> Policy:
    """Read provider keys once, at load time (never on the request path)."""
    env = os.environ if environ is None else environ
    keys: dict[str, str] = {}
    for name, provider in config.providers.items():
        key = None
        if provider.api_key_env:
            key = env.get(provider.api_key_env)
        if not key and provider.api_key_file:
            try:
                key = Path(provider.api_key_file).read_text().strip()
            except OSError as exc:
                log.warning("provider %s: cannot read api_key_file: %s", name, exc.strerror)
        if key:
            keys[name] = key
    return Policy(config=config, provider_keys=keys)


class ExternalProcessor(ext_proc_grpc.ExternalProcessorServicer):
    def __init__(self, policy: Policy, metrics: Metrics) -> None:
        self.policy = policy
        self.metrics = metrics

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
                response = exchange.handle(request, start)
                done = clock()
                phase_time[request.WhichOneof("request")].observe(done - start)
                await context.write(response)
        except asyncio.CancelledError:
            raise  # Envoy or the client went away; `finally` settles the exchange
        except Exception:
            self.metrics.errors.labels("internal").inc()
            log.exception("ext_proc stream failed route=%s", exchange.route_name)
            raise
        finally:
            exchange.close(clock())


def _bind(server: grpc.aio.Server, listen: str) -> None:
    """`host:port` or `unix:/path`; grpc says 0 when a TCP port cannot be bound."""
    if server.add_insecure_port(listen) == 0 and not listen.startswith("unix:"):
        raise OSError(f"cannot listen on {listen}")


async def serve(config: Config, *, ready: asyncio.Event | None = None) -> None:
    policy = resolve_policy(config)
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
