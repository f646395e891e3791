"""Sidecar log lines that join Envoy's access log: each line logged for an exchange
carries its `request_id` (Envoy's `x-request-id`) and `trace_id`, from a context
variable the exchange sets once (every gRPC stream runs in its own task, so the value
is the stream's own, and background settlement work inherits it). `server.log_format`
chooses text lines or one JSON object per line."""

from __future__ import annotations

import logging
import time
from contextvars import ContextVar

import orjson

# (request_id, trace_id) of the exchange this task serves; ("", "") outside one.
EXCHANGE: ContextVar[tuple[str, str]] = ContextVar("extproc_exchange", default=("", ""))
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s%(exchange)s"
MAX_ID = 128  # a client may send its own x-request-id: bounded in every line


def trace_id_of(traceparent: str) -> str:
    """The 32 hex digits of a W3C traceparent (`00-<trace>-<span>-<flags>`), or ""."""
    parts = traceparent.strip().split("-")
    if len(parts) >= 4 and len(parts[1]) == 32 and parts[1] != "0" * 32:
        trace = parts[1].lower()
        if all(c in "0123456789abcdef" for c in trace):
            return trace
    return ""


def set_exchange(request_id: str, trace_id: str) -> None:
    EXCHANGE.set((_printable(request_id[:MAX_ID]), trace_id))


def _printable(text: str) -> str:
    return text if text.isprintable() and " " not in text else repr(text)


class ExchangeFilter(logging.Filter):
    """Adds `request_id`, `trace_id` and, for text lines, `exchange` to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id, trace_id = EXCHANGE.get()
        record.request_id = request_id
        record.trace_id = trace_id
        parts = []
        if request_id:
            parts.append(f" request_id={request_id}")
        if trace_id:
            parts.append(f" trace_id={trace_id}")
        record.exchange = "".join(parts)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, pid, message, the ids, any error."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        for key in ("request_id", "trace_id"):
            value = getattr(record, key, "")
            if value:
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line).decode()


def configure(level: str, log_format: str = "text") -> None:
    """The root logger: one stderr handler with the exchange filter, text or JSON."""
    handler = logging.StreamHandler()
    handler.addFilter(ExchangeFilter())
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
