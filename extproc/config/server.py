"""The sidecar's own listeners, how Envoy's bootstrap is rendered, response inspection."""

from __future__ import annotations

from typing import Annotated

from extproc.config.base import Section, section
from extproc.config.types import (
    AbsPath,
    Bool,
    Int,
    ListenAddress,
    choice,
    grpc_address,
    in_file,
    target_address,
)

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("text", "json")
ON_BLOCK_MODES = ("drain", "close")  # streaming.on_block
OFF_PATH_MODES = ("auto", "off")  # streaming.meter_off_path
EVENT_LOOPS = ("uvloop", "asyncio")  # server.event_loop
MAX_WORKERS = 256


@section
class ServerConfig(Section):
    """The sidecar's own listeners."""

    empty_ok = True

    grpc_listen: Annotated[str, in_file(grpc_address)] = "127.0.0.1:50051"
    """Where the ext_proc gRPC server listens and Envoy connects: `ip:port` or
    `unix:/absolute/path`."""
    metrics_listen: ListenAddress = "127.0.0.1:9464"
    """Prometheus `/metrics`."""
    log_level: choice(LOG_LEVELS, "log level") = "info"
    """The sidecar's log level (secrets never reach a log line)."""
    log_format: choice(LOG_FORMATS, "log format") = "text"
    """`text` lines, or `json`: one object per line. Either way a line logged for an
    exchange carries its `request_id` (Envoy's `x-request-id`) and `trace_id`."""
    workers: Int(1, MAX_WORKERS) = 1
    """Processes serving ext_proc, each on its own listener: one Python process handles a
    few thousand messages a second, one per core scales it. Worker N listens on the gRPC
    port + N (`unix:/path` becomes `/path.0`, `/path.1`, ...); `extproc serve --workers N`
    overrides it."""
    event_loop: choice(EVENT_LOOPS, "event loop") = "uvloop"
    """Each worker's event loop: `uvloop` (libuv; less CPU per ext_proc message, see
    [performance.md](performance.md#the-event-loop)), or the standard library's
    `asyncio` loop. Where uvloop is not installed (Windows) the worker logs so and runs
    `asyncio`."""
    shutdown_grace_seconds: Int(0, 3600) = 30
    """On SIGTERM: refuse new streams, give open ones this long to finish, then exit."""
    max_open_streams: Int(1, 1_000_000) = 64
    """Admission control, per worker: past this many open exchanges a new request gets
    an immediate 503 `overloaded` with `Retry-After` before anything reaches the
    provider; open streams are never cut. The default is from the overload benchmark
    (streams of 50 tokens 20 ms apart, full policy with mask guards, one message per
    token: [operations.md](operations.md#overload-and-admission-control)); raise it for
    slower or coalesced streams, lower it for faster ones."""
    max_queued_requests: Int(1, 1_000_000) = 64
    """Admission control, per worker: past this many request bodies waiting on their
    stages (a slow rate-limit store or guard webhook), new requests are shed."""
    max_queue_delay_ms: Int(0, 60_000) = 250
    """Admission control, per worker: while the event loop is this late handling ready
    messages (measured every 50 ms), new requests are shed; `0` turns the check off.
    Keep it well below `envoy.message_timeout_ms`, past which Envoy answers 504."""


@section
class EnvoyConfig(Section):
    """How the shipped Envoy bootstrap is rendered. Addresses are IP literals: Envoy
    binds them as is."""

    empty_ok = True

    listen: ListenAddress = "127.0.0.1:8080"
    """Where clients send requests."""
    admin: ListenAddress = "127.0.0.1:9901"
    """Envoy's admin interface; keep it on loopback."""
    failure_mode_allow: Bool = False
    """`false`: fail closed, a 500 JSON error when the sidecar is down or fails. `true`:
    traffic bypasses the policy."""
    message_timeout_ms: Int(1, 3_600_000) = 2000
    """How long Envoy waits for the sidecar's answer to one message (Envoy's own 200 ms
    default is too short for big bodies)."""
    max_request_bytes: Int(1, 2**32 - 1) = 1 << 20
    """Request bodies are buffered whole; larger ones get 413 (Envoy's
    per_connection_buffer_limit_bytes is a uint32)."""
    access_log: AbsPath = "/dev/stdout"
    """Absolute path of the JSON access log
    ([observability.md](observability.md#access-log))."""
    sidecar_address: Annotated[str | None, in_file(target_address)] = None
    """Where Envoy reaches the sidecar when it is not beside it on `server.grpc_listen`:
    `host:port` with an IP or a DNS name (e.g. a headless Service: every pod and worker
    port becomes an endpoint)."""


@section
class StreamingConfig(Section):
    """Limits and switches for response inspection."""

    empty_ok = True

    max_frame_bytes: Int() = 1 << 20
    """One SSE frame larger than this ends the stream with an error event."""
    ensure_usage: Bool = True
    """Ask OpenAI-style providers for usage on streams; the extra usage chunk is hidden
    from clients that did not ask."""
    max_json_response_bytes: Int() = 8 << 20
    """Non-streaming JSON responses up to this size are kept whole (for their usage and
    response guards). A larger one is metered from its last 64 KiB, where every API
    writes its usage; with a response guard it is refused (502)."""
    on_block: choice(ON_BLOCK_MODES, "on_block mode") = "drain"
    """After the gateway ended a stream (guard block, oversized frame, undecodable
    stream): `drain` clears the provider's later chunks (the client's stream ends cleanly
    when the provider finishes); `close` stops the provider at its next chunk (Envoy
    resets the client's stream after the error event)
    ([errors.md](errors.md#ending-a-stream-the-gateway-blocked-streamingon_block))."""
    meter_off_path: choice(OFF_PATH_MODES, "meter_off_path mode") = "off"
    """`auto`: a stream that is only metered (no response guard or other stream filter,
    usage not hidden from the client, not gzip) is read by a second, observing ext_proc
    filter that Envoy never waits for, so its chunks leave at Envoy's own pace; the
    usage still settles the limits, budgets, metrics and the sidecar's log line, but
    Envoy's access log line of such a stream has no token counts. Works with any
    `server.workers` (each worker gets its own observing filter); not with a DNS
    `envoy.sidecar_address`, which may name several pods. `off`: every response chunk
    waits for the sidecar's answer
    ([performance.md](performance.md#metering-off-the-latency-path))."""
