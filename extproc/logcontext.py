"""Sidecar log lines that join Envoy's access log: each line logged for an exchange
carries its `request_id` (Envoy's `x-request-id`) and `trace_id`, from a context
variable the exchange sets once (every gRPC stream runs in its own task, so the value
is the stream's own, and background settlement work inherits it). `server.log_format`
chooses text lines or one JSON object per line."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping
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


def _suffix(request_id: str, trace_id: str) -> str:
    """The ids as a text line ends with them (`%(exchange)s`)."""
    parts = []
    if request_id:
        parts.append(f" request_id={request_id}")
    if trace_id:
        parts.append(f" trace_id={trace_id}")
    return "".join(parts)


class ExchangeFilter(logging.Filter):
    """Adds `request_id`, `trace_id` and, for text lines, `exchange` to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id, trace_id = EXCHANGE.get()
        record.request_id = request_id
        record.trace_id = trace_id
        record.exchange = _suffix(request_id, trace_id)
        return True


def _json_line(
    created: float, msecs: float, level: str, name: str, pid: object, message: str
) -> dict[str, object]:
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(msecs):03d}Z",
        "level": level,
        "logger": name,
        "pid": pid,
        "message": message,
    }


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, pid, message, the ids, any error."""

    def format(self, record: logging.LogRecord) -> str:
        line = _json_line(
            record.created,
            record.msecs,
            record.levelname,
            record.name,
            record.process,
            record.getMessage(),
        )
        for key in ("request_id", "trace_id"):
            value = getattr(record, key, "")
            if value:
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line).decode()


class TextFormatter(logging.Formatter):
    """`TEXT_FORMAT`'s formatter (a class of its own, so `line` knows it is this one)."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)


class ExchangeHandler(logging.StreamHandler):
    """`configure`'s stderr handler: what `line` may write to without a `LogRecord`."""


# The process id, read again after a fork (a worker's lines name the worker).
_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)
_TIME_FORMAT = logging.Formatter.default_time_format
# `line` takes a record's time as LogRecord does up to 3.12 (3.13 reads time_ns()).
_RECORD_CLOCK = sys.version_info < (3, 13)
# The last second `line` formatted, and its text (one strftime per second, not per line).
_second: tuple[int, str] = (-1, "")


def _asctime(formatter: logging.Formatter, created: float, msecs: float) -> str:
    """`Formatter.formatTime(record)` for a record created at `created`."""
    global _second
    converter = formatter.converter
    if converter is time.localtime and formatter.default_time_format == _TIME_FORMAT:
        second = int(created)  # localtime() floors, as int() does for a positive time
        if _second[0] != second:
            _second = (second, time.strftime(_TIME_FORMAT, converter(created)))
        text = _second[1]
    else:
        text = time.strftime(formatter.default_time_format, converter(created))
    msec_format = formatter.default_msec_format
    return msec_format % (text, msecs) if msec_format else text


def _fast_handler(logger: logging.Logger) -> ExchangeHandler | None:
    """The one handler a record of `logger` would reach, when it is `configure`'s own,
    as it set it up: then `line` may write what that handler would, without a record.
    None for anything else (a test's capture handler, a filter, another factory...)."""
    if logger.__class__ is not logging.Logger or logger.filters:
        return None
    if logging.getLogRecordFactory() is not logging.LogRecord or not logging.logProcesses:
        return None
    if not _RECORD_CLOCK:
        return None
    node: logging.Logger | None = logger
    while node is not None and not node.handlers:  # as `Logger.callHandlers` walks
        if not node.propagate:
            return None
        node = node.parent
    if node is None or node.parent is not None or len(node.handlers) != 1:
        return None  # the handlers are not the root's alone
    handler = node.handlers[0]
    if handler.__class__ is not ExchangeHandler or len(handler.filters) != 1:
        return None
    if handler.filters[0].__class__ is not ExchangeFilter:
        return None
    formatter = handler.formatter
    if formatter.__class__ is JsonFormatter:
        return handler
    if formatter.__class__ is not TextFormatter or formatter.datefmt is not None:
        return None
    style = formatter._style
    if style.__class__ is not logging.PercentStyle or style._fmt != TEXT_FORMAT:
        return None
    return handler


def line(logger: logging.Logger, level: int, msg: str, *args: object) -> None:
    """`logger.log(level, msg, *args)` for the once-per-exchange line, byte for byte,
    without the `LogRecord`, the caller lookup and the handler chain when the line goes
    to `configure`'s handler alone (the common case; ~11 -> ~4 us warm, and far less
    code touched per exchange). Anything else takes `logger.log`."""
    if not logger.isEnabledFor(level):
        return
    handler = _fast_handler(logger)
    if handler is None or level < handler.level:
        logger.log(level, msg, *args, stacklevel=2)
        return
    created = time.time()
    msecs = int((created - int(created)) * 1000) + 0.0  # as LogRecord computes it
    fill: object = args
    if len(args) == 1 and isinstance(args[0], Mapping) and args[0]:
        fill = args[0]  # as LogRecord: `log("%(a)s", {"a": 1})`
    message = str(msg) % fill if args else str(msg)
    request_id, trace_id = EXCHANGE.get()
    formatter = handler.formatter
    if formatter.__class__ is JsonFormatter:
        fields = _json_line(created, msecs, logging.getLevelName(level), logger.name, _pid,
                            message)  # fmt: skip
        if request_id:
            fields["request_id"] = request_id
        if trace_id:
            fields["trace_id"] = trace_id
        text = orjson.dumps(fields).decode()
    else:
        text = (
            f"{_asctime(formatter, created, msecs)} {logging.getLevelName(level)} "
            f"{logger.name}[{_pid}]: {message}{_suffix(request_id, trace_id)}"
        )
    handler.acquire()
    try:
        stream = handler.stream
        stream.write(text + handler.terminator)
        if stream and hasattr(stream, "flush"):
            stream.flush()
    except RecursionError:
        raise
    except Exception:  # as `StreamHandler.emit`: reported, never raised into the caller
        handler.handleError(logger.makeRecord(logger.name, level, "", 0, msg, args, sys.exc_info()))
    finally:
        handler.release()


def configure(level: str, log_format: str = "text") -> None:
    """The root logger: one stderr handler with the exchange filter, text or JSON."""
    handler = ExchangeHandler()
    handler.addFilter(ExchangeFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
