"""The `x-mock-*` request headers, parsed in one place into one `Knobs` record.

Every knob is a request header so it passes through Envoy untouched. A malformed
value is a 400 naming the header (`param`) with code `invalid_mock_header`, in the
route's own error shape. docs/mock-provider.md lists them all; `KNOB_HEADERS` is
the list a test checks that page against.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from extproc.dev.mock.errors import MockError

DEFAULT_TOKENS = 12

KNOB_HEADERS = (
    "x-mock-tokens",
    "x-mock-delay-ms",
    "x-mock-split",
    "x-mock-status",
    "x-mock-retry-after",
    "x-mock-cut-after",
    "x-mock-cut-mode",
    "x-mock-gzip",
    "x-mock-no-usage",
    "x-mock-line-ending",
    "x-mock-request-id",
    "x-mock-tool-call",
    "x-mock-cached-tokens",
    "x-mock-reasoning-tokens",
    "x-mock-text",
)

LINE_ENDINGS = {"lf": b"\n", "crlf": b"\r\n", "cr": b"\r"}
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


@dataclass(frozen=True, slots=True)
class MockOptions:
    """Knobs that change what the mock generates (the bytes of the body)."""

    tokens: int = DEFAULT_TOKENS
    tool_call: bool = False
    no_usage: bool = False
    line_ending: bytes = b"\n"
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    text: str | None = None  # the answer, word by word, instead of generated words


DEFAULT_OPTIONS = MockOptions()


@dataclass(frozen=True, slots=True)
class WireKnobs:
    """Knobs that change how the body travels (timing, cuts, encoding), not its bytes."""

    delay_s: float = 0.0
    split: tuple[int, ...] | Literal["all"] | None = None
    status: int | None = None
    retry_after: int | None = None  # seconds, sent as Retry-After with `status`
    cut_after: int | None = None
    cut_mode: Literal["reset", "close"] = "reset"
    gzip: bool = False
    request_id: str | None = None


@dataclass(frozen=True, slots=True)
class Knobs:
    """Every knob of one request: what to generate and how to send it."""

    options: MockOptions = DEFAULT_OPTIONS
    wire: WireKnobs = WireKnobs()


def _knob_error(name: str, value: str, expected: str) -> MockError:
    return MockError(
        400,
        f"Invalid mock header {name}: {value!r} (expected {expected}).",
        param=name,
        code="invalid_mock_header",
    )


def _int_knob(h: Mapping[str, str], name: str, minimum: int = 0) -> int | None:
    raw = h.get(name)
    if raw is None:
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        raise _knob_error(name, raw, f"an integer >= {minimum}") from None
    if value < minimum:
        raise _knob_error(name, raw, f"an integer >= {minimum}")
    return value


def _bool_knob(h: Mapping[str, str], name: str) -> bool:
    raw = h.get(name)
    if raw is None:
        return False
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise _knob_error(name, raw, "1 or 0")


def _delay_ms(h: Mapping[str, str], default: float) -> float:
    raw = h.get("x-mock-delay-ms")
    if raw is None:
        return default
    try:
        delay = float(raw.strip())
    except ValueError:
        raise _knob_error("x-mock-delay-ms", raw, "milliseconds >= 0") from None
    if not delay >= 0 or delay == float("inf"):
        raise _knob_error("x-mock-delay-ms", raw, "milliseconds >= 0")
    return delay


def _split(h: Mapping[str, str]) -> tuple[int, ...] | Literal["all"] | None:
    raw = h.get("x-mock-split")
    if raw is None:
        return None
    if raw.strip().lower() == "all":
        return "all"
    try:
        offsets = [int(p) for p in raw.split(",") if p.strip()]
    except ValueError:
        raise _knob_error("x-mock-split", raw, "'all' or byte offsets 1,2,3") from None
    if any(o < 0 for o in offsets):
        raise _knob_error("x-mock-split", raw, "non-negative byte offsets")
    return tuple(sorted(set(offsets)))


def parse_knobs(
    headers: Mapping[str, str],
    *,
    default_delay_ms: float = 0.0,
    default_tokens: int | None = None,
    line_ending: bytes = b"\n",
) -> Knobs:
    """Read the `x-mock-*` request headers; raise MockError (400) on a malformed one.

    The defaults are the server's (`--delay-ms`, `--tokens`) and the format's own
    line ending (Gemini's is CRLF), each used when its header is absent."""
    h = {k.lower(): v for k, v in headers.items()}

    tokens = _int_knob(h, "x-mock-tokens")
    if tokens is None:
        tokens = DEFAULT_TOKENS if default_tokens is None else default_tokens

    status = _int_knob(h, "x-mock-status")
    if status is not None and not 400 <= status <= 599:
        raise _knob_error("x-mock-status", h["x-mock-status"], "a status in 400-599")

    cut_mode = h.get("x-mock-cut-mode", "reset").strip().lower()
    if cut_mode not in ("reset", "close"):
        raise _knob_error("x-mock-cut-mode", cut_mode, "reset or close")

    ending = h.get("x-mock-line-ending")
    if ending is not None:
        ending = ending.strip().lower()
        if ending not in LINE_ENDINGS:
            raise _knob_error("x-mock-line-ending", ending, "lf, crlf or cr")

    options = MockOptions(
        tokens=tokens,
        tool_call=_bool_knob(h, "x-mock-tool-call"),
        no_usage=_bool_knob(h, "x-mock-no-usage"),
        line_ending=line_ending if ending is None else LINE_ENDINGS[ending],
        cached_tokens=_int_knob(h, "x-mock-cached-tokens") or 0,
        reasoning_tokens=_int_knob(h, "x-mock-reasoning-tokens") or 0,
        text=h.get("x-mock-text"),
    )
    wire = WireKnobs(
        delay_s=_delay_ms(h, default_delay_ms) / 1000.0,
        split=_split(h),
        status=status,
        retry_after=_int_knob(h, "x-mock-retry-after"),
        cut_after=_int_knob(h, "x-mock-cut-after"),
        cut_mode=cut_mode,  # type: ignore[arg-type]
        gzip=_bool_knob(h, "x-mock-gzip"),
        request_id=h.get("x-mock-request-id"),
    )
    return Knobs(options, wire)
