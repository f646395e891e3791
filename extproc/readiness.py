"""A worker's readiness: whether Envoy should send it new streams (gRPC health)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from grpc_health.v1 import health_pb2

from extproc.h2stream import EOF, Abort, Stream
from extproc.policy import Shared

# None when ready, else the reason (logged when readiness changes).
ReadinessCheck = Callable[[], Awaitable[str | None]]


class Readiness:
    """Whether this worker should be sent new streams (evaluated once a second).

    The policy is loaded before the server starts, so a worker that runs is ready
    unless a check says otherwise: one registered with `add`, or any object in the
    worker's `Shared` that has `async def readiness_check(self) -> str | None` (so
    the shared rate-limit store can report "Redis unreachable" without plumbing).
    """

    def __init__(self, shared: Shared | None = None) -> None:
        self.checks: dict[str, ReadinessCheck] = {}
        self.shared = shared

    def add(self, name: str, check: ReadinessCheck) -> None:
        self.checks[name] = check

    async def problems(self) -> list[str]:
        out = []
        checks = dict(self.checks)
        for item in self.shared.values() if self.shared is not None else ():
            check = getattr(item, "readiness_check", None)
            if check is not None:
                checks.setdefault(type(item).__name__, check)
        for name, check in checks.items():
            try:
                reason = await check()
            except Exception as exc:  # a broken check must not take the worker down
                reason = f"check failed: {exc!r}"
            if reason:
                out.append(f"{name}: {reason}")
        return out


class Health:
    """grpc.health.v1 `Check` (Envoy's health check, Kubernetes' gRPC probes): the
    status of the server (`""`) and of the ext_proc service."""

    def __init__(self) -> None:
        self.status: dict[str, int] = {}

    async def set(self, service: str, status: int) -> None:
        self.status[service] = status

    async def Check(self, context: Stream) -> None:
        request = await context.read()
        if request is EOF:
            raise Abort(3, "no request")  # INVALID_ARGUMENT
        status = self.status.get(request.service)
        if status is None:
            raise Abort(5, "unknown service")  # NOT_FOUND, as grpc_health answers
        await context.write(health_pb2.HealthCheckResponse(status=status))
