"""Admission control: a worker past its capacity refuses new exchanges at once.

Without it an overloaded worker takes every stream and answers each message late; past
Envoy's message timeout the client gets a 504 after seconds (issue 17). A fast 503
`overloaded` with `Retry-After` is the better answer, and it is given at the request
headers, so nothing reaches the provider. Streams already admitted are never cut.

Sans-I/O: the server tells it when a stream opens and closes, when a request phase
starts and ends waiting, and what the event loop's lag was (`observe_lag`, measured by
a probe: the delay between a ready message and its handling). Three limits, any one
of which sheds: open streams, queued request phases (request bodies waiting on their
stages: a slow Redis or webhook), and the loop lag. Saturation (what readiness
reports, so Envoy's least-request and health checks steer new streams elsewhere) has
hysteresis: it starts at a limit and ends only below the low-water mark.
"""

from __future__ import annotations

from dataclasses import dataclass

from extproc import envoy_wire as wire
from extproc.envoy_wire import Response
from extproc.errors import SIDECAR_DETAILS_PREFIX, error_body

LOW_WATER = 0.8  # saturation ends below this share of every limit
RETRY_AFTER_S = 1  # what a shed client is told to wait
# The reasons a stream is shed (the `reason` label of ai_gateway_shed_total).
SHED_REASONS = ("open_streams", "queued_requests", "queue_delay")


@dataclass(frozen=True)
class Limits:
    """Per worker. `max_queue_delay` in seconds; 0 turns that check off."""

    max_open_streams: int
    max_queued_requests: int
    max_queue_delay: float


class Admission:
    """Counts one worker's load and decides, per new stream, admit or shed."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.open = 0  # admitted streams not yet closed
        self.queued = 0  # request phases waiting on their stages
        self.lag = 0.0  # the last loop lag observed (seconds)
        self.saturated = False

    def admit(self) -> str | None:
        """A new stream: None to admit it (counted open), else the shed reason."""
        reason = self._over()
        if reason is None:
            self.open += 1
            self._update()  # reaching a limit saturates before the next one is shed
        else:
            self.saturated = True
        return reason

    def release(self) -> None:
        """An admitted stream ended."""
        self.open -= 1
        self._update()

    def wait_started(self) -> None:
        self.queued += 1
        self._update()

    def wait_ended(self) -> None:
        self.queued -= 1
        self._update()

    def observe_lag(self, lag: float) -> None:
        self.lag = lag
        self._update()

    def readiness(self) -> str | None:
        """None while below saturation, else why (a readiness check's answer)."""
        if not self.saturated:
            return None
        return (
            f"saturated: {self.open}/{self.limits.max_open_streams} open streams, "
            f"{self.queued}/{self.limits.max_queued_requests} queued requests, "
            f"loop lag {self.lag * 1000:.0f} ms"
        )

    def _over(self) -> str | None:
        limits = self.limits
        if self.open >= limits.max_open_streams:
            return "open_streams"
        if self.queued >= limits.max_queued_requests:
            return "queued_requests"
        if limits.max_queue_delay and self.lag >= limits.max_queue_delay:
            return "queue_delay"
        return None

    def _update(self) -> None:
        limits = self.limits
        if self._over() is not None:
            self.saturated = True
        elif self.saturated and (
            self.open < LOW_WATER * limits.max_open_streams
            and self.queued < LOW_WATER * limits.max_queued_requests
            and (not limits.max_queue_delay or self.lag < LOW_WATER * limits.max_queue_delay)
        ):
            self.saturated = False


def shed_response() -> Response:
    """The request-headers answer of a shed stream: 503 `overloaded`, OpenAI-style.
    Built once per worker (the shed path must stay cheaper than admitting)."""
    body = error_body(
        503, "The gateway is overloaded; retry after the time in Retry-After.", "overloaded"
    )
    headers = {"retry-after": str(RETRY_AFTER_S)}
    return wire.refuse(503, headers, body, f"{SIDECAR_DETAILS_PREFIX}overloaded")
