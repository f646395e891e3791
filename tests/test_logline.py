"""`logcontext.line`, the per-exchange log line without a `LogRecord`: what it writes is
what `logging` writes through `configure`'s handler, byte for byte, and anything but
that handler alone gets the line through `logging` as before."""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Iterator

import orjson
import pytest

from extproc import logcontext
from extproc.exchange import Exchange
from extproc.metrics import Metrics
from extproc.policy import Policy
from tests.test_exchange import CONFIG

MESSAGE = (
    "exchange route=%s consumer=%s model=%s status=%s prompt=%d completion=%d "
    "estimated=%s duration_ms=%.1f%s"
)
ARGS = ("bench", "-", "gpt-4o-mini", "200", 61, 64, False, 12.3456, " error=stream_aborted")
IDS = [
    ("", ""),
    ("req-1", ""),
    ("", "ab" * 16),
    ("req-1", "4bf92f3577b34da6a3ce929d0e0e4736"),
    ("x trace_id=forged\nnext", ""),  # quoted by set_exchange
    ("ünïcode-\u00e9-\u2028", ""),
    ("a" * 300, "ab" * 16),
]
TIMES = [1764640000.0, 1764640000.9995, 1764640001.0004, 1764643599.5, 1.25]


@pytest.fixture
def configured() -> Iterator[io.StringIO]:
    """A stream for `configure` (pytest's own capture handlers are set aside by it); the
    root's handlers and level, and the exchange's ids, are restored afterwards."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    ids = logcontext.EXCHANGE.set(("", ""))
    yield io.StringIO()
    logcontext.EXCHANGE.reset(ids)
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def configure(out: io.StringIO, level: str, log_format: str = "text") -> None:
    """`logcontext.configure`, its handler writing to `out` rather than stderr."""
    logcontext.configure(level, log_format)
    logging.getLogger().handlers[0].setStream(out)


def _both(
    out: io.StringIO, logger: logging.Logger, level: int, msg: str, args: tuple, at: float
) -> tuple[str, str]:
    """The line as `logging` writes it, and as `line` does, at the same instant."""
    real = time.time
    time.time = lambda: at  # LogRecord and `line` both read time.time()
    try:
        out.seek(0)
        out.truncate()
        logger.log(level, msg, *args)
        standard = out.getvalue()
        out.seek(0)
        out.truncate()
        logcontext.line(logger, level, msg, *args)
        fast = out.getvalue()
    finally:
        time.time = real
    return standard, fast


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_the_line_is_what_logging_writes(configured: io.StringIO, log_format: str) -> None:
    configure(configured, "info", log_format)
    root = logging.getLogger()
    assert logcontext._fast_handler(logging.getLogger("extproc.exchange")) is root.handlers[0]
    logger = logging.getLogger("extproc.exchange")
    cases = [
        (MESSAGE, ARGS),
        ("plain, no arguments %s", ()),
        ("a %(name)s mapping", ({"name": "single"},)),
        ("percent %% and %r", ("repr'd\n",)),
    ]
    for request_id, trace_id in IDS:
        logcontext.set_exchange(request_id, trace_id)
        for msg, args in cases:
            for at in TIMES:
                for level in (logging.INFO, logging.WARNING):
                    standard, fast = _both(configured, logger, level, msg, args, at)
                    assert standard and fast == standard
                    assert fast.count("\n") == 1
    if log_format == "json":
        assert orjson.loads(fast)["level"] == "WARNING"


def test_a_changed_time_converter_is_followed(
    configured: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(configured, "info")
    logger = logging.getLogger("extproc.exchange")
    formatter = logging.getLogger().handlers[0].formatter
    for converter, msec_format in ((time.gmtime, "%s.%03d"), (time.localtime, None)):
        monkeypatch.setattr(formatter, "converter", converter)
        monkeypatch.setattr(formatter, "default_msec_format", msec_format)
        for at in TIMES:
            standard, fast = _both(configured, logger, logging.INFO, MESSAGE, ARGS, at)
            assert fast == standard


def test_a_line_below_the_level_is_not_written(configured: io.StringIO) -> None:
    configure(configured, "warning")
    logger = logging.getLogger("extproc.exchange")
    logcontext.line(logger, logging.INFO, MESSAGE, *ARGS)
    assert configured.getvalue() == ""
    logging.getLogger().handlers[0].setLevel(logging.ERROR)
    logcontext.line(logger, logging.WARNING, MESSAGE, *ARGS)
    assert configured.getvalue() == ""
    logging.disable(logging.CRITICAL)
    try:
        logcontext.line(logger, logging.CRITICAL, MESSAGE, *ARGS)
    finally:
        logging.disable(logging.NOTSET)
    assert configured.getvalue() == ""


def test_any_other_handler_chain_gets_the_record(
    configured: io.StringIO, caplog: pytest.LogCaptureFixture
) -> None:
    """With a capture handler beside it (pytest's, an operator's), a logger filter, or a
    handler of the logger's own, the line goes through `logging`: each handler gets a
    record naming the caller, as `logger.info` there would."""
    configure(configured, "info")
    logger = logging.getLogger("extproc.exchange")
    ours = logging.getLogger().handlers[0]
    logging.getLogger().addHandler(caplog.handler)
    assert logcontext._fast_handler(logger) is None
    with caplog.at_level(logging.INFO):
        logcontext.line(logger, logging.INFO, MESSAGE, *ARGS)
    (record,) = [r for r in caplog.records if r.name == "extproc.exchange"]
    assert record.getMessage() == MESSAGE % ARGS
    assert record.funcName == "test_any_other_handler_chain_gets_the_record"
    assert record.filename == "test_logline.py"
    assert configured.getvalue().rstrip("\n").endswith(MESSAGE % ARGS)
    logging.getLogger().removeHandler(caplog.handler)
    assert logcontext._fast_handler(logger) is ours
    for spoil in ("filter", "handler", "formatter", "no-propagate"):
        child = logging.getLogger(f"extproc.test_logline.{spoil}")
        seen: list[logging.LogRecord] = []
        extra = logging.NullHandler()
        formatter = ours.formatter
        if spoil == "filter":
            child.addFilter(lambda record, seen=seen: seen.append(record) or True)
        elif spoil == "handler":
            child.addHandler(extra)
        elif spoil == "no-propagate":
            child.propagate = False
        else:
            ours.setFormatter(logging.Formatter(logcontext.TEXT_FORMAT + " custom"))
        try:
            assert logcontext._fast_handler(child) is None
            logcontext.line(child, logging.INFO, MESSAGE, *ARGS)
        finally:
            child.filters.clear()
            child.removeHandler(extra)
            child.propagate = True
            ours.setFormatter(formatter)
        if spoil == "filter":
            assert [r.getMessage() for r in seen] == [MESSAGE % ARGS]
        if spoil == "formatter":
            assert configured.getvalue().endswith(" custom\n")


def test_a_failing_stream_is_reported_not_raised(
    configured: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(configured, "info")
    handler = logging.getLogger().handlers[0]
    reported: list[logging.LogRecord] = []
    monkeypatch.setattr(handler, "handleError", reported.append)

    class Broken(io.StringIO):
        def write(self, text: str) -> int:
            raise OSError("disk full")

    handler.stream = Broken()
    logcontext.line(logging.getLogger("extproc.exchange"), logging.INFO, MESSAGE, *ARGS)
    assert [r.getMessage() for r in reported] == [MESSAGE % ARGS]


def test_settlement_writes_the_exchange_line_through_it(configured: io.StringIO) -> None:
    configure(configured, "info")
    logcontext.set_exchange("req-7", "")
    ex = Exchange(Policy(CONFIG), Metrics(), now=0.0)
    ex.close(0.0125)
    written = configured.getvalue()
    assert written.count("\n") == 1
    assert written.endswith(
        "INFO extproc.exchange["
        f"{os.getpid()}]: exchange route=unknown consumer=- model=unknown status=none "
        "prompt=0 completion=0 estimated=False duration_ms=12.5 request_id=req-7\n"
    )
