"""Field types: each an `Annotated` type whose check says what was expected.

Integers and booleans are strict (YAML `true` is not 1, `'5'` is not 5); strings must
not be empty; an explicit `null` is refused wherever a value is expected.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, date, datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BeforeValidator,
    Field,
    Strict,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    WrapValidator,
)

from extproc.config.base import LOADING, Loc, describe, fail, problems_of, several, unknown_key
from extproc.netaddr import UNIX_PATH_MAX, is_ip_literal, split_host_port, unix_socket_path

Check = Callable[[Any], Any]


def in_file(check: Check) -> BeforeValidator:
    """Run `check` (which raises `fail(...)` or returns the value to keep) on what a file
    says; values built in code get pydantic's type check alone."""

    def run(value: Any, info: ValidationInfo) -> Any:
        return check(value) if info.context and info.context.get(LOADING) else value

    return BeforeValidator(run)


def checked(check: Check, base: Any = str, **schema: Any) -> Any:
    """`base`, checked by `check` when it comes from a file."""
    return Annotated[base, in_file(check), Field(**schema)]


def Int(minimum: int = 1, maximum: int | None = None) -> Any:
    return Annotated[int, Strict(), Field(ge=minimum, le=maximum)]


def Optional(kind: Any, expected: str) -> Any:
    """`kind` or unset (None) in code; in a file, left out or given (never `null`)."""

    def not_null(value: Any) -> Any:
        if value is None:
            raise fail(f"expected {expected}, got null (empty)")
        return value

    return Annotated[kind | None, in_file(not_null)]


Bool = Annotated[bool, Strict()]


def string(value: Any) -> str:
    if not isinstance(value, str):
        raise fail(f"expected a string, got {describe(value)}")
    if not value.strip():
        raise fail("must not be empty")
    return value


Str = checked(string)
OptStr = checked(string, str | None)


def choice(options: tuple[str, ...], what: str = "value") -> Any:
    def check(value: Any) -> str:
        if string(value) not in options:
            raise fail(f"unknown {what} {value!r} (known: {', '.join(options)})")
        return value

    return Annotated[Literal[options], in_file(check)]  # type: ignore[valid-type]


def matching(pattern: str, hint: str) -> Check:
    compiled = re.compile(pattern)

    def check(value: Any) -> str:
        if not compiled.fullmatch(string(value)):
            raise fail(f"{hint}, got {describe(value)}")
        return value

    return check


NAME = r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}"
name = matching(NAME, "expected a name of letters, digits, '_', '-'")
env_name = matching(r"[A-Za-z_][A-Za-z0-9_]*", "expected an environment variable name")
Name = checked(name, pattern=NAME)
EnvName = checked(env_name, str | None)


def absolute_path(value: Any) -> str:
    if not string(value).startswith("/"):
        raise fail(f"expected an absolute file path, got {describe(value)}")
    return value


AbsPath = checked(absolute_path)
OptPath = checked(absolute_path, str | None)


def url_path(value: Any) -> str:
    """A request path prefix as Envoy matches it: starts with '/', no query or spaces."""
    if not string(value).startswith("/"):
        raise fail(f"must start with '/', got {describe(value)}")
    if any(c in value for c in "?# \t"):
        raise fail(f"must be a plain path (no '?', '#', spaces), got {describe(value)}")
    return value


UrlPath = checked(url_path)


def listen_address(value: Any) -> str:
    string(value)
    try:
        split_host_port(value)
    except ValueError as exc:
        raise fail(f"expected ip:port (e.g. '127.0.0.1:8080'): {exc}") from None
    return value


_DNS_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_DNS_NAME = re.compile(rf"(?=.{{1,253}}$){_DNS_LABEL}(\.{_DNS_LABEL})*")


def target_address(value: Any) -> str:
    """host:port that Envoy connects to: an IP literal or a DNS name (resolved by Envoy)."""
    host, sep, port = string(value).rpartition(":")
    if value.startswith("[") or is_ip_literal(host):
        return listen_address(value)
    if not sep or not _DNS_NAME.fullmatch(host):
        raise fail(f"expected host:port with an IP or a lowercase DNS name, got {describe(value)}")
    if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise fail(f"port must be 1-65535, got '{port}'")
    return value


def grpc_address(value: Any) -> str:
    """host:port, or unix:/abs/path (one sidecar per socket, no TCP port to pick)."""
    path = unix_socket_path(string(value))
    if path is None:
        return listen_address(value)
    if not path.startswith("/"):
        raise fail(f"unix socket path must be absolute (unix:/path), got {value!r}")
    if len(path.encode()) > UNIX_PATH_MAX:
        raise fail(f"unix socket path is longer than {UNIX_PATH_MAX} bytes")
    return value


ListenAddress = checked(listen_address)


def url(
    schemes: tuple[str, ...], hint: str, creds: str = "use api_key_env"
) -> Callable[[Any], Any]:
    """A URL check: one of `schemes`, a host, a valid port, no credentials."""

    def check(value: Any) -> Any:
        parts = urlsplit(string(value))
        if parts.scheme not in schemes:
            raise fail(f"expected {hint}, got {describe(value)}")
        if parts.scheme != "unix":
            if not parts.hostname:
                raise fail(f"URL has no host: {describe(value)}")
            try:
                parts.port  # noqa: B018 - urlsplit checks the port lazily
            except ValueError:
                raise fail(f"URL has an invalid port: {describe(value)}") from None
        if parts.username or parts.password:
            raise fail(f"credentials do not belong in the URL; {creds}")
        return parts

    return check


def checked_items(value: Any, items: Sequence[Any], check: Check) -> Iterator[tuple[Loc, Any]]:
    """The items of a one-or-list `value`, each with where it stands (its index; none
    when written as one), after `check`: a refusal is reported at that place."""
    for index, item in enumerate(items):
        at: Loc = (index,) if isinstance(value, list | tuple) else ()
        try:
            check(item)
        except Exception as exc:
            raise several([(at, str(exc))]) from None
        yield at, item


def name_list(value: Any) -> tuple[str, ...]:
    """One name or a list of names (no duplicates)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items:
        raise fail(f"expected a name or a non-empty list, got {describe(value)}")
    out: list[str] = []
    for at, item in checked_items(value, items, string):
        if item in out:
            raise several([(at, f"'{item}' is listed twice")])
        out.append(item)
    return tuple(out)


def one_or_list(items: dict[str, Any]) -> WithJsonSchema:
    """The schema of a value written as one item or a list of them."""
    return WithJsonSchema({"anyOf": [items, {"type": "array", "items": items}]})


Names = Annotated[checked(name_list, tuple[str, ...]), one_or_list({"type": "string"})]


def model_names(value: Any) -> tuple[str, ...]:
    """A list of model names; `*` matches any run of characters (`gpt-4o*`)."""
    if not isinstance(value, list | tuple):
        raise fail(f"expected a list of model names, got {describe(value)}")
    bad = []
    for index, item in enumerate(value):
        try:
            string(item)
        except Exception as exc:
            bad.append(((index,), str(exc)))
    if bad:
        raise several(bad)
    return tuple(value)


ModelNames = checked(model_names, tuple[str, ...] | None)


def expiry(value: Any) -> float:
    """A date (`2026-01-31`: that day at 00:00 UTC) or an ISO 8601 date-time."""
    when = value
    if isinstance(value, str):
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            raise fail(f"expected an ISO 8601 date or date-time, got {describe(value)}") from None
    if isinstance(when, datetime):
        return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
    if isinstance(when, date):
        return datetime(when.year, when.month, when.day, tzinfo=UTC).timestamp()
    if isinstance(value, float) and value is when:  # already a timestamp (built in code)
        return value
    raise fail(f"expected an ISO 8601 date or date-time, got {describe(value)}")


def entries(
    expected: str, model: Any, check: Callable[[Any], Any] | None = None, empty_ok: bool = False
) -> WrapValidator:
    """A mapping of name -> `model` settings: each entry's `name` is its key (checked by
    `check`), and every entry's problems are reported, not just the first."""

    def wrap(value: Any, handler: Any) -> Any:
        if not isinstance(value, dict):
            raise fail(f"expected {expected}, got {describe(value)}")
        found: list[tuple[Loc, str]] = []
        good: dict[Any, Any] = {}
        for key, raw in value.items():
            try:
                if check is not None:
                    check(key)
            except Exception as exc:
                found.append(((str(key),), str(exc)))
                continue
            if isinstance(raw, dict) and "name" in raw:
                known = [f for f in model.__pydantic_fields__ if f not in model.derived]
                found.append(((str(key), "name"), unknown_key("name", known)))
                raw = {k: v for k, v in raw.items() if k != "name"}
            if raw is None and empty_ok:
                raw = {}
            good[key] = {"name": key, **raw} if isinstance(raw, dict) else raw
        return finish(handler, good, found, list(value))

    return WrapValidator(wrap)


def finish(handler: Any, value: Any, found: list[tuple[Loc, str]], order: list[Any]) -> Any:
    """Validate `value`; raise its problems together with those already `found`, in the
    order of the entries (`order`: the keys as written)."""
    result = None
    try:
        result = handler(value)
    except ValidationError as exc:
        found = found + problems_of(exc)
    if found:
        rank = {key: index for index, key in enumerate(order)}
        raise several(sorted(found, key=lambda item: rank.get(item[0][0], -1) if item[0] else -1))
    return result


def listed(expected: str) -> BeforeValidator:
    """A list field that must be a non-empty list (`expected` says of what)."""

    def check(value: Any) -> Any:
        if not isinstance(value, list | tuple) or not value:
            raise fail(f"expected {expected}, got {describe(value)}")
        return value

    return in_file(check)
