"""Request header limits the sidecar enforces, so an oversized request gets a JSON 431.

Envoy's own limits (HCM `max_request_headers_kb`, 60 by default, and
`max_headers_count`, 100) fail in the codec: over HTTP/1 the 431 it generates goes
through the ext_proc filter while the connection is being closed and the client gets
an empty reply; over HTTP/2 the stream is reset. So the rendered bootstrap sets Envoy's
limits to twice these (a backstop against memory abuse) and the sidecar refuses a
request above these ones in the request-headers phase, with an OpenAI-style body over
either protocol. Pseudo-headers (`:path`...) do not count; Envoy's own additions
(`x-request-id`, `x-forwarded-*`) do.
"""

from __future__ import annotations

from collections.abc import Iterable

MAX_HEADER_BYTES = 60 * 1024  # names + values
MAX_HEADERS = 100
# Envoy's codec limits in the rendered bootstrap: beyond these, Envoy's empty reply.
CODEC_HEADERS_KB = 2 * MAX_HEADER_BYTES // 1024
CODEC_HEADERS_COUNT = 2 * MAX_HEADERS


def header_problem(headers: Iterable[tuple[str, str]]) -> str | None:
    """Why these request headers are refused (a message for the client), or None. Every
    entry counts, a repeated name too."""
    count = size = 0
    for name, value in headers:
        if name.startswith(":"):
            continue
        count += 1
        size += len(name) + len(value)
    if count > MAX_HEADERS:
        return f"Request has {count} headers; this gateway accepts at most {MAX_HEADERS}."
    if size > MAX_HEADER_BYTES:
        return (
            f"Request headers are {size} bytes; this gateway accepts at most "
            f"{MAX_HEADER_BYTES} bytes of headers."
        )
    return None
