"""Rate limits: requests and tokens per window, counted in-process or in Redis."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field

from extproc.config.base import Loc, Section, describe, fail, section, several
from extproc.config.types import (
    EnvName,
    Int,
    Name,
    Names,
    Optional,
    OptPath,
    OptStr,
    Str,
    checked,
    choice,
    listed,
    name_list,
    one_or_list,
    url,
)

if TYPE_CHECKING:
    from extproc.config.document import Config

RATE_LIMIT_STORES = ("local", "redis")
LIMIT_KEYS = ("consumer", "model", "route", "client_ip")
TOKEN_COUNTS = ("total", "input", "output")
FAILURE_MODES = ("open", "closed")
WINDOW_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_WINDOW_SECONDS = 366 * 86400
_WINDOW_PART = re.compile(r"(\d+)([A-Za-z]*)")


def window_seconds(value: Any) -> int:
    """`30s`, `1m`, `1h30m`, `7d` -> seconds (seconds to days)."""
    hint = "expected a duration like '30s', '1m', '1h30m' or '1d'"
    if isinstance(value, bool) or not isinstance(value, str):
        raise fail(f"{hint}, got {describe(value)}")
    text = value.strip()
    total, pos = 0, 0
    for part in _WINDOW_PART.finditer(text):
        if part.start() != pos:
            break
        number, unit = part.groups()
        if not unit:
            raise fail(f"{number!r} has no unit (s, m, h or d): {hint}")
        if unit not in WINDOW_UNITS:
            raise fail(f"unknown unit '{unit}' in {describe(value)} (known: s, m, h, d)")
        total += int(number) * WINDOW_UNITS[unit]
        pos = part.end()
    if pos == 0 or pos != len(text):
        raise fail(f"{hint}, got {describe(value)}")
    if total == 0:
        raise fail(f"a zero window can never admit anything, got {describe(value)}")
    if total > MAX_WINDOW_SECONDS:
        raise fail(f"at most 366d, got {describe(value)}")
    return total


def _window(value: Any) -> str:
    window_seconds(value)
    return value.strip()


def _limit_keys(value: Any) -> tuple[str, ...]:
    names = name_list(value)
    listed = isinstance(value, list | tuple)
    bad = [
        ((index,) if listed else (), f"unknown key '{key}' (known: {', '.join(LIMIT_KEYS)})")
        for index, key in enumerate(names)
        if key not in LIMIT_KEYS
    ]
    if bad:
        raise several(bad)
    return names


@section
class LimitMatch(Section):
    """Which requests a limit applies to (each list empty: every request)."""

    consumers: Names = ()
    models: Names = ()
    """Exact names, or a prefix ending in `*`."""
    routes: Names = ()


@section
class LimitConfig(Section):
    """One rate limit: `requests` and/or `tokens` per `window`, one bucket per distinct
    value of the `by` keys, applied to requests that `match` (unset: every request)."""

    name: Name
    requests: Optional(Int(), "an integer") = None
    tokens: Optional(Int(), "an integer") = None
    count: choice(TOKEN_COUNTS, "token count") = "total"
    """Which tokens a token limit counts."""
    window: checked(_window)
    """`30s`, `1m`, `1h30m`, `7d` (at most 366d)."""
    by: Annotated[
        checked(_limit_keys, tuple[Literal[LIMIT_KEYS], ...]),  # type: ignore[valid-type]
        one_or_list({"enum": list(LIMIT_KEYS), "type": "string"}),
    ] = ()
    """One bucket per distinct value of these."""
    match: LimitMatch = Field(default_factory=LimitMatch)

    @classmethod
    def checks(cls, raw: dict[str, Any], refused: set[Any]) -> list[tuple[Loc, str]]:
        found: list[tuple[Loc, str]] = []
        if "requests" not in raw and "tokens" not in raw:
            found.append(((), "set requests, tokens or both (how much per window)"))
        if "count" in raw.keys() - refused and "tokens" not in raw:
            found.append((("count",), "only meaningful with tokens"))
        return found

    @property
    def window_seconds(self) -> int:
        return window_seconds(self.window)


def _redis_url(value: Any) -> str:
    parts = url(
        ("redis", "rediss", "unix"),
        "redis://host:port[/db], rediss://... or unix:///path",
        "use username and password_env",
    )(value)
    if parts.scheme == "unix":
        if not parts.path.startswith("/"):
            raise fail("expected unix:///absolute/path.sock")
    elif parts.path not in ("", "/") and not parts.path[1:].isdigit():
        raise fail(f"the path is the database number (/0), got '{parts.path}'")
    if parts.query or parts.fragment:
        raise fail("no query or fragment: use the redis: keys for options")
    return value


@section
class RedisConfig(Section):
    """Where replicas share their counters. The password never sits in the URL."""

    url: checked(_redis_url)
    """`redis://host:port[/db]`, `rediss://...` (TLS) or `unix:///path`."""
    username: OptStr = None
    password_env: EnvName = None
    password_file: OptPath = None
    key_prefix: Str = "ai-gateway:ratelimit:"
    timeout_ms: Int(1, 60_000) = 200
    retry_interval_ms: Int(10, 600_000) = 1000
    max_connections: Int(1, 10_000) = 64
    """Per sidecar process: pipelines sent in parallel."""
    max_pending: Int(1, 10_000_000) = 10_000
    """Checks queued for the store; beyond: 503, never admitted."""
    failure_mode: choice(FAILURE_MODES, "failure mode") = "open"
    """`open`: admit unchecked while Redis is down; `closed`: 503."""
    lease_seconds: Int(1, 3600) = 30
    """A worker's reservations outlive it by this much, then another settles them."""

    @classmethod
    def checks(cls, raw: dict[str, Any], refused: set[Any]) -> list[tuple[Loc, str]]:
        if "password_env" in raw and "password_file" in raw:
            return [((), "set password_env or password_file, not both")]
        return []


@section
class RateLimitsConfig(Section):
    """Requests and tokens ([rate-limits.md](rate-limits.md#reference))."""

    store: choice(RATE_LIMIT_STORES, "store") = "local"
    """`local` (this process) or `redis` (shared by replicas and workers)."""
    redis: Optional(RedisConfig, "a mapping") = None
    default_max_output_tokens: Int() = 1024
    """Output tokens reserved for a request that names no `max_tokens`."""
    limits: Annotated[tuple[LimitConfig, ...], listed("a non-empty list of limits")]

    @classmethod
    def checks(cls, raw: dict[str, Any], refused: set[Any]) -> list[tuple[Loc, str]]:
        found: list[tuple[Loc, str]] = []
        store = raw.get("store", "local")
        if store == "redis" and raw.get("redis") is None:
            found.append((("redis",), "store: redis needs a redis: section with a url"))
        if raw.get("redis") is not None and "store" not in raw:
            found.append(
                (("store",), "a redis: section is set but store is local; set store: redis")
            )
        names: dict[str, int] = {}
        limits = raw.get("limits")
        for index, limit in enumerate(limits if isinstance(limits, list) else ()):
            name = limit.get("name") if isinstance(limit, dict) else None
            if isinstance(name, str) and name in names:
                found.append(
                    (
                        ("limits", index, "name"),
                        f"duplicate limit name '{name}' (also rate_limits.limits[{names[name]}])",
                    )
                )
            elif isinstance(name, str):
                names[name] = index
        return found


def rate_limit_workers(config: Config, workers: int) -> list[tuple[str, str]]:
    """The in-process store counts per process: N workers would allow N x every limit."""
    limits = config.rate_limits
    if limits is None or limits.store != "local" or workers <= 1:
        return []
    return [
        (
            "rate_limits.store",
            f"the in-process store counts in each process, so {workers} workers would "
            f"admit {workers}x every limit; use store: redis (with a redis: section) "
            "or run one worker",
        )
    ]
