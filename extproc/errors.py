"""OpenAI-style error bodies: every refusal the gateway makes looks like one from
OpenAI, so SDKs raise their usual typed exceptions (BadRequestError, RateLimitError...)."""

from __future__ import annotations

import orjson

SHOWN_CHARS = 64  # of one client-supplied value quoted in an error message
MAX_MESSAGE_CHARS = 1024  # of a whole error message


# The reason (`details`) of every immediate response the sidecar sends starts with this,
# so Envoy's local-reply mappers can leave the sidecar's own JSON answers alone.
SIDECAR_DETAILS_PREFIX = "ai_gateway_"


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
