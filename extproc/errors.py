"""OpenAI-style error bodies: every refusal the gateway makes looks like one from
OpenAI, so SDKs raise their usual typed exceptions (BadRequestError, RateLimitError...)."""

from __future__ import annotations

import orjson

SHOWN_CHARS = 64  # of one client-supplied value quoted in an error message
MAX_MESSAGE_CHARS = 1024  # of a whole error message


# The reason (`details`) of every immediate response the sidecar sends starts with this,
# so Envoy's local-reply mappers can leave the sidecar's own JSON answers alone.
SIDECAR_DETAILS_PREFIX = "ai_gateway_"


class GatewayError(Exception):
    """The one family of errors the gateway answers for, as h11's `ProtocolError`
    carries `error_status_hint`: each says the HTTP status it maps to (`status`, a hint
    once the response has started) and its `errors_total{kind}` label (`kind`), so the
    exchange reads both instead of guessing with `getattr`."""

    status: int = 500
    kind: str = "internal"
    code: str | None = None  # the error body's `code` (OpenAI's), when it has one
    param: str | None = None  # the request field at fault, when one is

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class RequestError(GatewayError):
    """A client request the gateway refuses before it reaches the provider."""

    kind = "bad_request"

    def __init__(
        self, message: str, code: str | None, param: str | None = None, status: int = 400
    ) -> None:
        super().__init__(message)
        self.code = code
        self.param = param
        self.status = status


class StreamError(GatewayError):
    """The response stream cannot be decoded any further (bad CRC, broken framing, a
    frame over the limit: `sse.FrameTooLarge`).

    Raised by `ResponseDecoder.feed`/`finish`: the caller ends the stream with the
    format's error event (whose code is `kind`, also the metrics label) and clears the
    rest. `status` is only a hint: the response has started.
    """

    status = 502
    kind = "malformed_stream"
    # The events of the same chunk decoded before the bad frame: the client's SDK reads
    # them, so a translator writes them before its error (as its per-frame path does).
    before: list = []  # never mutated: each raise sets its own


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """A client-supplied value as an error message or log line may quote it: printable
    characters only (no header or log-line injection) and at most `limit` of them, so
    a 10 KB token header or model name is never reflected back at its own size."""
    text = value if isinstance(value, str) else repr(value)
    cut = text[:limit]
    clean = cut if cut.isprintable() else "".join(c if c.isprintable() else "?" for c in cut)
    return clean if len(text) <= limit else f"{clean}... ({len(text)} characters)"


def bounded(message: str) -> str:
    """A whole message, cut to MAX_MESSAGE_CHARS (the last line of defence)."""
    return message if len(message) <= MAX_MESSAGE_CHARS else message[:MAX_MESSAGE_CHARS] + "..."


_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_exceeded",
    502: "server_error",
    503: "server_error",
}


def error_body(status: int, message: str, code: str | None, param: str | None = None) -> bytes:
    """`{"error": {"message", "type", "param", "code"}}` as OpenAI sends it."""
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return orjson.dumps(
        {"error": {"message": bounded(message), "type": kind, "param": param, "code": code}}
    )
