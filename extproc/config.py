"""Policy file -> typed, validated config.

One YAML file drives the sidecar *and* the Envoy bootstrap it ships with, so a route
name means the same thing on both sides. Every error names the file, the key path
(`routes[1].provider`) and the reason, so an operator can fix a ConfigMap without
reading code.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import yaml

WIRE_FORMATS = ("openai",)
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class ConfigError(Exception):
    """One or more problems in a policy file; `problems` holds (key, reason) pairs."""

    def __init__(self, path: str, problems: list[tuple[str, str]]) -> None:
        self.path = path
        self.problems = problems
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        """One `FILE: key: reason` line per problem (`FILE: reason` for file-level ones)."""
        return [
            f"{self.path}: {key}: {reason}" if key else f"{self.path}: {reason}"
            for key, reason in self.problems
        ]


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    """An upstream LLM API. `url` is scheme://host[:port] (https means TLS with SNI)."""

    name: str
    url: str
    format: str = "openai"
    # Where the provider's own key comes from; never logged, never sent to clients.
    api_key_env: str | None = None
    api_key_file: str | None = None
    # CA bundle Envoy verifies an https provider with; None = the system bundle.
    ca_file: str | None = None

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "https"

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (443 if parts.scheme == "https" else 80)

    @property
    def cluster(self) -> str:
        """Envoy cluster name for this provider."""
        return f"provider_{self.name}"


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """A path prefix on the Envoy listener, served by one provider.

    `rewrite` replaces the matched prefix (Envoy `prefix_rewrite`), so the Gloo-style
    `/openai` route can land on the provider's `/v1/chat/completions`.
    """

    name: str
    prefix: str
    provider: str
    rewrite: str | None = None


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """The sidecar's own listeners."""

    grpc_listen: str = "127.0.0.1:50051"  # host:port or unix:/path
    metrics_listen: str = "127.0.0.1:9464"  # host:port for /metrics
    log_level: str = "info"


@dataclass(frozen=True, slots=True)
class EnvoyConfig:
    """What the shipped Envoy bootstrap is rendered with."""

    listen: str = "127.0.0.1:8080"
    admin: str = "127.0.0.1:9901"
    failure_mode_allow: bool = False  # fail closed: sidecar down -> 500, never unchecked traffic
    message_timeout_ms: int = 2000  # Envoy's 200 ms default is too short for big bodies
    max_request_bytes: int = 1 << 20  # larger request bodies get 413
    access_log: str = "/dev/stdout"


@dataclass(frozen=True, slots=True)
class StreamingConfig:
    """Limits and switches for response inspection."""

    max_frame_bytes: int = 1 << 20  # one SSE frame larger than this ends the stream
    ensure_usage: bool = True  # add stream_options.include_usage upstream, hide it from client
    max_json_response_bytes: int = 8 << 20  # non-streaming bodies kept for metering up to this


@dataclass(frozen=True, slots=True)
class Config:
    path: str
    server: ServerConfig = field(default_factory=ServerConfig)
    envoy: EnvoyConfig = field(default_factory=EnvoyConfig)
    streaming: StreamingConfig = field(default_factory=StreamingConfig)
    providers: dict[str, ProviderConfig] = field(default_factory=dict)
    routes: tuple[RouteConfig, ...] = ()

    def route(self, name: str) -> RouteConfig | None:
        for route in self.routes:
            if route.name == name:
                return route
        return None


# --------------------------------------------------------------------------- addresses
# Shared by the validator, the bootstrap renderer and the server, so that what the
# check accepts is exactly what gets rendered and bound.

UNIX_PREFIX = "unix:"
_UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the terminating NUL


def split_host_port(text: str) -> tuple[str, int]:
    """`127.0.0.1:8080` or `[::1]:8080` -> (ip, port); ValueError names what is wrong.

    Envoy listeners need IP literals (it does not resolve names for binds), so
    hostnames are refused here rather than by Envoy at start-up.
    """
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError("expected [ipv6]:port")
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise ValueError("expected host:port")
        if ":" in host:
            raise ValueError("write an IPv6 address in brackets: [addr]:port")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"host must be an IP address, got '{host}'") from None
    if text.startswith("[") and ip.version != 6:
        raise ValueError("only IPv6 addresses go in brackets")
    if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise ValueError(f"port must be 1-65535, got '{port}'")
    return str(ip), int(port)


def unix_socket_path(text: str) -> str | None:
    """The socket path of a `unix:/path` address, None for host:port."""
    return text[len(UNIX_PREFIX) :] if text.startswith(UNIX_PREFIX) else None


# --------------------------------------------------------------------------- validation
# A field parser takes (raw value, dotted key, problems) and returns the typed value
# or INVALID after recording why. Sections are tables of field parsers; a new policy
# section (auth, guards, limits) is one more table or function in _SECTIONS.

INVALID: Any = object()


class Problems:
    """Collects (key, reason) pairs so one run reports everything that is wrong."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, key: str, reason: str) -> Any:
        self.items.append((key, reason))
        return INVALID


Field = Callable[[Any, str, Problems], Any]
# A section parser gets the whole document too, to check names it refers to.
Section = Callable[[Any, str, Problems, dict[str, Any]], Any]


def describe(value: Any) -> str:
    """A value as the YAML author wrote it, for error messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null (empty)"
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def join(parent: str, name: Any) -> str:
    return f"{parent}.{name}" if parent else str(name)


def unknown_key(name: Any, known: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.6)
    if close:
        return f"unknown key '{name}' (did you mean '{close[0]}'?)"
    return f"unknown key '{name}' (known: {', '.join(known)})"


def fields(
    value: Any, key: str, problems: Problems, table: Mapping[str, Field], required: tuple = ()
) -> dict[str, Any] | None:
    """Check a mapping against a field table; return the valid fields, None if not a mapping."""
    if not isinstance(value, dict):
        problems.add(key, f"expected a mapping, got {describe(value)}")
        return None
    out: dict[str, Any] = {}
    for name, raw in value.items():
        sub = join(key, name)
        if name not in table:
            problems.add(sub, unknown_key(name, table))
            continue
        parsed = table[name](raw, sub, problems)
        if parsed is not INVALID:
            out[name] = parsed
    for name in required:
        if name not in value:
            problems.add(join(key, name), "required key is missing")
    return out


def integer(minimum: int = 1, maximum: int | None = None) -> Field:
    def parse(value: Any, key: str, problems: Problems) -> Any:
        if isinstance(value, bool) or not isinstance(value, int):
            return problems.add(key, f"expected an integer, got {describe(value)}")
        if value < minimum:
            if minimum == 1:
                return problems.add(key, f"expected a positive integer, got {value}")
            return problems.add(key, f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            return problems.add(key, f"must be at most {maximum}, got {value}")
        return value

    return parse


def boolean(value: Any, key: str, problems: Problems) -> Any:
    if not isinstance(value, bool):
        return problems.add(key, f"expected true or false, got {describe(value)}")
    return value


def string(value: Any, key: str, problems: Problems) -> Any:
    if not isinstance(value, str):
        return problems.add(key, f"expected a string, got {describe(value)}")
    if not value.strip():
        return problems.add(key, "must not be empty")
    return value


def choice(options: tuple[str, ...], what: str = "value") -> Field:
    def parse(value: Any, key: str, problems: Problems) -> Any:
        if string(value, key, problems) is INVALID:
            return INVALID
        if value not in options:
            return problems.add(key, f"unknown {what} {value!r} (known: {', '.join(options)})")
        return value

    return parse


def matching(pattern: str, hint: str) -> Field:
    compiled = re.compile(pattern)

    def parse(value: Any, key: str, problems: Problems) -> Any:
        if string(value, key, problems) is INVALID:
            return INVALID
        if not compiled.fullmatch(value):
            return problems.add(key, f"{hint}, got {describe(value)}")
        return value

    return parse


name_field = matching(
    r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}", "expected a name of letters, digits, '_', '-'"
)
env_name = matching(r"[A-Za-z_][A-Za-z0-9_]*", "expected an environment variable name")


def absolute_path(value: Any, key: str, problems: Problems) -> Any:
    if string(value, key, problems) is INVALID:
        return INVALID
    if not value.startswith("/"):
        return problems.add(key, f"expected an absolute file path, got {describe(value)}")
    return value


def url_path(value: Any, key: str, problems: Problems) -> Any:
    """A request path prefix as Envoy matches it: starts with '/', no query or spaces."""
    if string(value, key, problems) is INVALID:
        return INVALID
    if not value.startswith("/"):
        return problems.add(key, f"must start with '/', got {describe(value)}")
    if any(c in value for c in "?# \t"):
        return problems.add(
            key, f"must be a plain path (no '?', '#', spaces), got {describe(value)}"
        )
    return value


def listen_address(value: Any, key: str, problems: Problems) -> Any:
    if string(value, key, problems) is INVALID:
        return INVALID
    try:
        split_host_port(value)
    except ValueError as exc:
        return problems.add(key, f"expected ip:port (e.g. '127.0.0.1:8080'): {exc}")
    return value


def grpc_address(value: Any, key: str, problems: Problems) -> Any:
    """host:port, or unix:/abs/path (one sidecar per socket, no TCP port to pick)."""
    if string(value, key, problems) is INVALID:
        return INVALID
    path = unix_socket_path(value)
    if path is None:
        return listen_address(value, key, problems)
    if not path.startswith("/"):
        return problems.add(key, f"unix socket path must be absolute (unix:/path), got {value!r}")
    if len(path.encode()) > _UNIX_PATH_MAX:
        return problems.add(key, f"unix socket path is longer than {_UNIX_PATH_MAX} bytes")
    return value


def provider_url(value: Any, key: str, problems: Problems) -> Any:
    if string(value, key, problems) is INVALID:
        return INVALID
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https"):
        return problems.add(key, f"expected an http:// or https:// URL, got {describe(value)}")
    if not parts.hostname:
        return problems.add(key, f"URL has no host: {describe(value)}")
    try:
        parts.port  # noqa: B018 - urlsplit checks the port lazily
    except ValueError:
        return problems.add(key, f"URL has an invalid port: {describe(value)}")
    if parts.username or parts.password:
        return problems.add(key, "credentials do not belong in the URL; use api_key_env")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return problems.add(
            key, "expected scheme://host[:port] only; map paths with a route's rewrite"
        )
    return value


def section(cls: type, table: Mapping[str, Field]) -> Section:
    """A section that is a flat mapping of fields onto a dataclass with defaults."""

    def parse(value: Any, key: str, problems: Problems, document: dict[str, Any]) -> Any:
        if value is None:  # `server:` with nothing under it: all defaults
            return cls()
        got = fields(value, key, problems, table)
        return INVALID if got is None else cls(**got)

    return parse


_SERVER_FIELDS: dict[str, Field] = {
    "grpc_listen": grpc_address,
    "metrics_listen": listen_address,
    "log_level": choice(LOG_LEVELS, "log level"),
}
_ENVOY_FIELDS: dict[str, Field] = {
    "listen": listen_address,
    "admin": listen_address,
    "failure_mode_allow": boolean,
    "message_timeout_ms": integer(1, 3_600_000),
    # Envoy's per_connection_buffer_limit_bytes is a uint32.
    "max_request_bytes": integer(1, 2**32 - 1),
    "access_log": absolute_path,
}
_STREAMING_FIELDS: dict[str, Field] = {
    "max_frame_bytes": integer(),
    "ensure_usage": boolean,
    "max_json_response_bytes": integer(),
}
_PROVIDER_FIELDS: dict[str, Field] = {
    "url": provider_url,
    "format": choice(WIRE_FORMATS, "format"),
    "api_key_env": env_name,
    "api_key_file": absolute_path,
    "ca_file": absolute_path,
}
_ROUTE_FIELDS: dict[str, Field] = {
    "name": name_field,
    "prefix": url_path,
    "provider": string,
    "rewrite": url_path,
}


def parse_providers(value: Any, key: str, problems: Problems, document: dict[str, Any]) -> Any:
    if not isinstance(value, dict):
        return problems.add(
            key, f"expected a mapping of provider name -> settings, got {describe(value)}"
        )
    if not value:
        return problems.add(key, "expected at least one provider")
    out: dict[str, ProviderConfig] = {}
    for name, raw in value.items():
        sub = join(key, name)
        if name_field(name, sub, problems) is INVALID:
            continue
        got = fields(raw, sub, problems, _PROVIDER_FIELDS, required=("url",))
        if got is None or "url" not in got:
            continue
        if "api_key_env" in got and "api_key_file" in got:
            problems.add(sub, "set api_key_env or api_key_file, not both")
        if "ca_file" in got and urlsplit(got["url"]).scheme != "https":
            problems.add(join(sub, "ca_file"), "only meaningful for an https:// url")
        out[name] = ProviderConfig(name=name, **got)
    return out


def route_covers(earlier: str, later: str) -> bool:
    """True if every path the `later` prefix matches is taken by `earlier` first.

    Mirrors how the bootstrap matches: a prefix ending in '/' is a plain prefix; any
    other prefix matches itself and paths below it (`/openai`, `/openai/x`, not
    `/openaix`), which is Envoy's `path_separated_prefix`.
    """
    if earlier.endswith("/"):
        return later.startswith(earlier)
    return later == earlier or later.startswith(earlier + "/")


def parse_routes(value: Any, key: str, problems: Problems, document: dict[str, Any]) -> Any:
    if not isinstance(value, list):
        return problems.add(key, f"expected a list of routes, got {describe(value)}")
    if not value:
        return problems.add(key, "expected at least one route")
    # Names as declared, valid or not: a broken provider is reported once, under providers.
    declared = document.get("providers")
    providers = [str(name) for name in declared] if isinstance(declared, dict) else None
    if not providers:  # missing, not a mapping or empty: already reported
        providers = None
    routes: list[tuple[int, RouteConfig]] = []
    names: dict[str, int] = {}
    for index, raw in enumerate(value):
        sub = f"{key}[{index}]"
        got = fields(raw, sub, problems, _ROUTE_FIELDS, required=("name", "prefix", "provider"))
        if got is None:
            continue
        name = got.get("name")
        if name in names:
            problems.add(
                f"{sub}.name", f"duplicate route name '{name}' (also {key}[{names[name]}])"
            )
        elif name is not None:
            names[name] = index
        provider = got.get("provider")
        if providers is not None and provider is not None and provider not in providers:
            known = ", ".join(providers) or "none"
            problems.add(f"{sub}.provider", f"unknown provider '{provider}' (known: {known})")
        if {"name", "prefix", "provider"} <= got.keys():
            routes.append((index, RouteConfig(**got)))
    for position, (index, route) in enumerate(routes):
        for earlier_index, earlier in routes[:position]:
            if route_covers(earlier.prefix, route.prefix):
                problems.add(
                    f"{key}[{index}].prefix",
                    f"unreachable: {key}[{earlier_index}] ('{earlier.name}', prefix "
                    f"'{earlier.prefix}') comes first and matches every path of '{route.prefix}'",
                )
                break
    return tuple(route for _, route in routes)


# Top-level sections: name -> (parser, required). A new policy section is one entry
# here plus a field on Config.
_SECTIONS: dict[str, tuple[Section, bool]] = {
    "server": (section(ServerConfig, _SERVER_FIELDS), False),
    "envoy": (section(EnvoyConfig, _ENVOY_FIELDS), False),
    "streaming": (section(StreamingConfig, _STREAMING_FIELDS), False),
    "providers": (parse_providers, True),
    "routes": (parse_routes, True),
}


def parse_config(document: Any, path: str = "<config>") -> Config:
    """Validate an already-loaded YAML document; raise ConfigError listing every problem."""
    problems = Problems()
    if document is None:
        raise ConfigError(
            path, [("", "file is empty; expected a mapping with providers and routes")]
        )
    if not isinstance(document, dict):
        reason = (
            f"expected a mapping at the top level (providers:, routes:), got {describe(document)}"
        )
        raise ConfigError(path, [("", reason)])
    for name in document:
        if name not in _SECTIONS:
            problems.add(str(name), unknown_key(name, _SECTIONS))
    parsed: dict[str, Any] = {}
    for name, (parse, required) in _SECTIONS.items():
        if name in document:
            result = parse(document[name], name, problems, document)
            if result is not INVALID:
                parsed[name] = result
        elif required:
            problems.add(name, "required section is missing")
    if problems.items:
        raise ConfigError(path, problems.items)
    return Config(path=path, **parsed)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one,
    which hides a second `routes:` pasted into a ConfigMap)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[tuple[str, str], int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            ident = (key_node.tag, key_node.value)
            if ident in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key '{key_node.value}' (first on line {seen[ident]})",
                    key_node.start_mark,
                )
            seen[ident] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _yaml_problem(exc: yaml.YAMLError) -> tuple[str, str]:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    reason = f"invalid YAML: {problem}" + (f" ({context})" if context else "")
    if mark is None:
        return "", reason
    return f"line {mark.line + 1}, column {mark.column + 1}", reason


def load_config(path: str) -> Config:
    """Read and validate one policy file; raise ConfigError naming file, key and reason."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ConfigError(path, [("", "file not found")]) from None
    except IsADirectoryError:
        raise ConfigError(path, [("", "is a directory, expected a YAML file")]) from None
    except OSError as exc:
        raise ConfigError(path, [("", f"cannot read file: {exc.strerror or exc}")]) from None
    try:
        document = yaml.load(data, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(path, [_yaml_problem(exc)]) from None
    return parse_config(document, path)
