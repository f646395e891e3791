"""Policy file -> typed, validated config.

One YAML file drives the sidecar *and* the Envoy bootstrap it ships with, so a route
name means the same thing on both sides. Every error names the file, the key path
(`routes[1].provider`) and the reason, so an operator can fix a ConfigMap without
reading code.
"""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any
from urllib.parse import urlsplit

import yaml

# Provider API shapes (config `format`); extproc.providers.FAMILIES maps each to its decoders.
WIRE_FORMATS = ("openai", "azure", "anthropic", "gemini", "vertex", "bedrock")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
ON_BLOCK_MODES = ("drain", "close")  # streaming.on_block


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
    # Who may call (None: `required` when consumers or auth.jwt exist, else `off`).
    auth: str | None = None
    models: tuple[str, ...] | None = None  # allow-list on this route; None = any
    default_model: str | None = None  # when the client sends none (else models.default)
    # Upstream paths (exact, or a prefix ending in '*') passed through uninspected:
    # not metered, guarded or limited. Any other path that is not a model API is 404.
    passthrough_paths: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """The sidecar's own listeners."""

    grpc_listen: str = "127.0.0.1:50051"  # host:port or unix:/path
    metrics_listen: str = "127.0.0.1:9464"  # host:port for /metrics
    log_level: str = "info"
    # Processes serving ext_proc, each on its own listener (see worker_addresses): one
    # Python process handles a few thousand messages a second, one per core scales it.
    workers: int = 1
    # SIGTERM: refuse new streams, give open ones this long to finish, then exit.
    shutdown_grace_seconds: int = 30


@dataclass(frozen=True, slots=True)
class EnvoyConfig:
    """What the shipped Envoy bootstrap is rendered with."""

    listen: str = "127.0.0.1:8080"
    admin: str = "127.0.0.1:9901"
    failure_mode_allow: bool = False  # fail closed: sidecar down -> 500, never unchecked traffic
    message_timeout_ms: int = 2000  # Envoy's 200 ms default is too short for big bodies
    max_request_bytes: int = 1 << 20  # larger request bodies get 413
    access_log: str = "/dev/stdout"
    # Where Envoy reaches the sidecar, when not beside it on server.grpc_listen: host:port
    # with an IP or a DNS name (a headless Service: one endpoint per pod and worker port).
    sidecar_address: str | None = None


@dataclass(frozen=True, slots=True)
class StreamingConfig:
    """Limits and switches for response inspection."""

    max_frame_bytes: int = 1 << 20  # one SSE frame larger than this ends the stream
    ensure_usage: bool = True  # add stream_options.include_usage upstream, hide it from client
    max_json_response_bytes: int = 8 << 20  # non-streaming bodies kept for metering up to this
    # After the gateway ended a stream (guard block, oversized frame, undecodable
    # stream), what to do with the provider still sending: `drain` clears the rest
    # (the client's HTTP stream ends cleanly, but only when the provider finishes);
    # `close` stops the provider at its next chunk (Envoy resets the client's stream
    # after the error event: HTTP/1 closes the connection, HTTP/2 sends RST_STREAM).
    on_block: str = "drain"


@dataclass(frozen=True, slots=True)
class LimitConfig:
    """One rate limit: `requests` and/or `tokens` per `window_seconds`, one bucket per
    distinct value of the `by` keys, applied to requests that pass the `match_*` filters
    (empty = every request)."""

    name: str
    window_seconds: int
    window: str  # as written (`1m`), for messages
    requests: int | None = None
    tokens: int | None = None
    count: str = "total"  # which tokens a token limit counts: total, input or output
    by: tuple[str, ...] = ()  # consumer, model, route, client_ip
    match_consumers: tuple[str, ...] = ()
    match_models: tuple[str, ...] = ()  # exact names, or a prefix ending in '*'
    match_routes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RedisConfig:
    """Where replicas share their counters. The password never sits in the URL."""

    url: str
    username: str | None = None
    password_env: str | None = None
    password_file: str | None = None
    key_prefix: str = "ai-gateway:ratelimit:"
    timeout_ms: int = 200
    retry_interval_ms: int = 1000
    max_connections: int = 64  # per sidecar process: pipelines sent in parallel
    max_pending: int = 10_000  # checks queued for the store; beyond: 503, never admitted
    failure_mode: str = "open"  # open: admit unchecked while Redis is down; closed: 503


@dataclass(frozen=True, slots=True)
class RateLimitsConfig:
    limits: tuple[LimitConfig, ...]
    store: str = "local"  # local (one process) or redis (replicas, workers)
    redis: RedisConfig | None = None
    # Output tokens reserved for a request that names no max_tokens.
    default_max_output_tokens: int = 1024


@dataclass(frozen=True, slots=True)
class GuardPatternConfig:
    """An operator's RE2 pattern; `name` upper-cased is its type (`<EMPLOYEE_ID>`)."""

    name: str
    regex: str
    mask_token: str | None = None  # overrides the guard's mask_token for this pattern
    max_length: int | None = None  # longest match, when RE2 syntax hides it from us


@dataclass(frozen=True, slots=True)
class GuardRejectConfig:
    """What a client gets when a reject guard fires (never the matched text)."""

    status: int = 403
    message: str | None = None  # None: "Request (Response) blocked by guard 'NAME'."
    code: str = "guard_blocked"


@dataclass(frozen=True, slots=True)
class GuardWebhookConfig:
    """An external checker: http(s)://... gets JSON, grpc(s)://host:port the gRPC form."""

    url: str
    timeout_ms: int = 500
    failure: str = "closed"  # closed: refuse (503) when it fails; open: let it through
    api_key_env: str | None = None  # sent as `authorization: Bearer ...`


@dataclass(frozen=True, slots=True)
class GuardConfig:
    """One guard: what to look for, what to do, where (phase, route, consumer)."""

    name: str
    action: str = "mask"  # mask | reject | log
    phases: tuple[str, ...] = ("request", "response")
    detectors: tuple[str, ...] = ()  # built-in names, aliases expanded
    patterns: tuple[GuardPatternConfig, ...] = ()
    keywords: tuple[str, ...] = ()
    case_sensitive: bool = False  # for keywords
    mask_token: str = "<{type}>"
    reject: GuardRejectConfig = field(default_factory=GuardRejectConfig)
    routes: tuple[str, ...] = ()  # empty: every route
    consumers: tuple[str, ...] = ()  # empty: everyone (anonymous included)
    except_consumers: tuple[str, ...] = ()
    webhook: GuardWebhookConfig | None = None


@dataclass(frozen=True, slots=True)
class GuardsConfig:
    rules: tuple[GuardConfig, ...] = ()
    # Streams: the most text held back per channel while it could still become a
    # match (a PEM private key is the longest built-in, about 12 000 characters).
    max_holdback_chars: int = 16384
    # Per request (prompt texts) and per response frame: a request whose texts sum to
    # more characters, or whose scan takes longer, is refused with `scan_budget_status`
    # (413 or 400, code guard_budget_exceeded) instead of stalling the worker's other
    # streams. A 1 MiB body (the default envoy.max_request_bytes) holds at most 1 Mi
    # characters: 2 Mi never refuse such a body on size. Every built-in detector at
    # once costs 0.2-0.9 µs per character on ordinary or numeric text (dates) and
    # 2-4 µs on the worst input measured, `4 4 4 ...` (bench/adversarial_bench.py):
    # 1 s admits any ordinary 1 MiB prompt and refuses the hostile one, below Envoy's
    # 2 s message timeout so the refusal arrives before Envoy gives up.
    scan_budget_chars: int = 2 << 20
    scan_budget_ms: int = 1000
    scan_budget_status: int = 413


# ------------------------------------------------------------------ consumers, auth, models
# Who may call (consumers: API keys, JWT) and what they may use (models: allow-lists,
# aliases). Secrets are only *named* here (env var, file) or given as a SHA-256 digest;
# a plain `value` is for local development.

AUTH_MODES = ("required", "optional", "off")
# Headers the sidecar sets for Envoy (route choice, ratelimit descriptors); a client's
# copies are stripped, and Envoy removes them before the request goes upstream.
INTERNAL_HEADER_PREFIX = "x-ai-gateway-"
PROVIDER_HEADER = "x-ai-gateway-provider"
CONSUMER_HEADER = "x-ai-gateway-consumer"
MODEL_HEADER = "x-ai-gateway-model"
INTERNAL_HEADERS = (PROVIDER_HEADER, CONSUMER_HEADER, MODEL_HEADER)
JWT_ALGORITHMS = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
    "ES256", "ES384", "ES512", "EdDSA", "HS256", "HS384", "HS512",
)  # fmt: skip
DEFAULT_JWT_ALGORITHMS = ("RS256", "ES256", "EdDSA")


@dataclass(frozen=True, slots=True)
class ApiKeyConfig:
    """One API key of a consumer, from exactly one source. `value` is the key in clear
    (local development only); `sha256` its hex digest; `env`/`file` name where the key
    (or `sha256:<hex>`) is read when the policy loads."""

    name: str  # shown in logs instead of the key
    value: str | None = field(default=None, repr=False)
    sha256: str | None = None
    env: str | None = None
    file: str | None = None
    disabled: bool = False
    expires: float | None = None  # Unix time; the key is refused from then on


@dataclass(frozen=True, slots=True)
class ConsumerConfig:
    """A team, app or tenant. `models` None = any model its routes allow."""

    name: str
    keys: tuple[ApiKeyConfig, ...] = ()
    models: tuple[str, ...] | None = None
    disabled: bool = False


@dataclass(frozen=True, slots=True)
class JwtConfig:
    """Bearer JWTs: signature (JWKS, or an HMAC secret), issuer, audience, exp/nbf."""

    jwks_url: str | None = None  # https://, fetched in the background
    jwks_file: str | None = None  # re-read in the background when it changes
    jwks_ca_file: str | None = None  # CA bundle for jwks_url; None = system bundle
    jwks_refresh_seconds: int = 300
    issuer: str | None = None
    audience: tuple[str, ...] = ()
    algorithms: tuple[str, ...] = DEFAULT_JWT_ALGORITHMS
    # HS256/384/512 only with a configured shared secret (never a JWKS key).
    shared_secret_env: str | None = None
    shared_secret_file: str | None = None
    leeway_seconds: int = 30
    consumer_claim: str = "sub"  # names the consumer
    models_claim: str | None = None  # list (or space-separated string) of allowed models
    known_consumers_only: bool = False  # refuse tokens naming a consumer not in `consumers`


@dataclass(frozen=True, slots=True)
class AuthConfig:
    realm: str = "ai-gateway"  # WWW-Authenticate: Bearer realm="..."
    jwt: JwtConfig | None = None


@dataclass(frozen=True, slots=True)
class AliasConfig:
    """A model name clients send, served as `model` by `provider`."""

    name: str
    provider: str
    model: str


@dataclass(frozen=True, slots=True)
class ModelsConfig:
    aliases: dict[str, AliasConfig] = field(default_factory=dict)
    # Model ids each provider serves as is, by provider name ("*": every provider not
    # named). A provider with a catalog refuses other names that are not aliases with
    # 404 model_not_found; one without takes any name as sent.
    catalog: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def catalog_of(self, provider: str) -> tuple[str, ...] | None:
        """The names `provider` serves as is; None when it takes any name."""
        return self.catalog.get(provider, self.catalog.get("*"))

    default: str | None = None  # when the client sends no model


@dataclass(frozen=True, slots=True)
class Config:
    path: str
    server: ServerConfig = field(default_factory=ServerConfig)
    envoy: EnvoyConfig = field(default_factory=EnvoyConfig)
    streaming: StreamingConfig = field(default_factory=StreamingConfig)
    providers: dict[str, ProviderConfig] = field(default_factory=dict)
    routes: tuple[RouteConfig, ...] = ()
    consumers: dict[str, ConsumerConfig] = field(default_factory=dict)
    auth: AuthConfig = field(default_factory=AuthConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    rate_limits: RateLimitsConfig | None = None
    guards: GuardsConfig = field(default_factory=GuardsConfig)

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


MAX_WORKERS = 256


def worker_addresses(address: str, workers: int) -> list[str]:
    """Where each of `workers` processes listens (or is reached), in worker order.

    One worker keeps `address` as is. N workers take N consecutive ports starting at
    the given one (`h:50051` -> `h:50051` .. `h:50051+N-1`), or N numbered sockets
    (`unix:/run/x.sock` -> `unix:/run/x.sock.0` .. `.N-1`). Envoy keeps one HTTP/2
    connection per worker thread per endpoint, so each process must be an endpoint.
    """
    if workers <= 1:
        return [address]
    path = unix_socket_path(address)
    if path is not None:
        return [f"{UNIX_PREFIX}{path}.{index}" for index in range(workers)]
    host, _, port = address.rpartition(":")
    return [f"{host}:{int(port) + index}" for index in range(workers)]


# Checks of settings that hold only within one process, for a run with `workers`
# processes; each returns (key, reason) pairs. The rate-limit store registers one: an
# in-process store cannot keep one limit across workers, so it refuses workers > 1.
WorkerCheck = Callable[["Config", int], list[tuple[str, str]]]
WORKER_CHECKS: list[WorkerCheck] = []


def check_workers(config: Config, workers: int) -> list[tuple[str, str]]:
    """Problems with running `config` in `workers` processes (`server.workers` or --workers)."""
    problems: list[tuple[str, str]] = []
    if workers > 1:
        for key, address in (
            ("server.grpc_listen", config.server.grpc_listen),
            ("envoy.sidecar_address", config.envoy.sidecar_address),
        ):
            if address is None:
                continue
            last = worker_addresses(address, workers)[-1]
            path = unix_socket_path(last)
            if path is None and int(last.rpartition(":")[2]) > 65535:
                problems.append(
                    (key, f"{workers} workers need ports up to {last.rpartition(':')[2]}")
                )
            elif path is not None and len(path.encode()) > _UNIX_PATH_MAX:
                problems.append(
                    (key, f"worker socket {path} is longer than {_UNIX_PATH_MAX} bytes")
                )
    for check in WORKER_CHECKS:
        problems += check(config, workers)
    return problems


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


_DNS_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_DNS_NAME = re.compile(rf"(?=.{{1,253}}$){_DNS_LABEL}(\.{_DNS_LABEL})*")


def target_address(value: Any, key: str, problems: Problems) -> Any:
    """host:port that Envoy connects to: an IP literal or a DNS name (resolved by Envoy)."""
    if string(value, key, problems) is INVALID:
        return INVALID
    host, sep, port = value.rpartition(":")
    if value.startswith("[") or _is_ip_literal(host):
        return listen_address(value, key, problems)
    if not sep or not _DNS_NAME.fullmatch(host):
        return problems.add(
            key, f"expected host:port with an IP or a lowercase DNS name, got {describe(value)}"
        )
    if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        return problems.add(key, f"port must be 1-65535, got '{port}'")
    return value


def _is_ip_literal(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


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
    "workers": integer(1, MAX_WORKERS),
    "shutdown_grace_seconds": integer(0, 3600),
}
_ENVOY_FIELDS: dict[str, Field] = {
    "listen": listen_address,
    "admin": listen_address,
    "failure_mode_allow": boolean,
    "message_timeout_ms": integer(1, 3_600_000),
    # Envoy's per_connection_buffer_limit_bytes is a uint32.
    "max_request_bytes": integer(1, 2**32 - 1),
    "access_log": absolute_path,
    "sidecar_address": target_address,
}
_STREAMING_FIELDS: dict[str, Field] = {
    "max_frame_bytes": integer(),
    "ensure_usage": boolean,
    "max_json_response_bytes": integer(),
    "on_block": choice(ON_BLOCK_MODES, "on_block mode"),
}
_PROVIDER_FIELDS: dict[str, Field] = {
    "url": provider_url,
    "format": choice(WIRE_FORMATS, "format"),
    "api_key_env": env_name,
    "api_key_file": absolute_path,
    "ca_file": absolute_path,
}


def passthrough_paths(value: Any, key: str, problems: Problems) -> Any:
    """Upstream paths, each '/...' exact or ending in '*' for a prefix."""
    names = name_list(value, key, problems)
    if names is INVALID:
        return INVALID
    for index, item in enumerate(names):
        sub = f"{key}[{index}]" if isinstance(value, list) else key
        if url_path(item, sub, problems) is INVALID:
            return INVALID
        if "*" in item[:-1] or "%" in item:
            return problems.add(
                sub, f"a '*' may only end the path, and no '%' encoding, got {describe(item)}"
            )
    return names


_ROUTE_FIELDS: dict[str, Field] = {
    "name": name_field,
    "prefix": url_path,
    "provider": string,
    "rewrite": url_path,
    "passthrough_paths": passthrough_paths,
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


# --------------------------------------------------------------------------- rate limits

RATE_LIMIT_STORES = ("local", "redis")
LIMIT_KEYS = ("consumer", "model", "route", "client_ip")
TOKEN_COUNTS = ("total", "input", "output")
FAILURE_MODES = ("open", "closed")
WINDOW_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_WINDOW_SECONDS = 366 * 86400
_WINDOW_PART = re.compile(r"(\d+)([A-Za-z]*)")


def window_field(value: Any, key: str, problems: Problems) -> Any:
    """`30s`, `1m`, `1h30m`, `7d` -> seconds (seconds to days)."""
    hint = "expected a duration like '30s', '1m', '1h30m' or '1d'"
    if isinstance(value, bool) or not isinstance(value, str):
        return problems.add(key, f"{hint}, got {describe(value)}")
    text = value.strip()
    total, pos = 0, 0
    for part in _WINDOW_PART.finditer(text):
        if part.start() != pos:
            break
        number, unit = part.groups()
        if not unit:
            return problems.add(key, f"{number!r} has no unit (s, m, h or d): {hint}")
        if unit not in WINDOW_UNITS:
            return problems.add(
                key, f"unknown unit '{unit}' in {describe(value)} (known: s, m, h, d)"
            )
        total += int(number) * WINDOW_UNITS[unit]
        pos = part.end()
    if pos == 0 or pos != len(text):
        return problems.add(key, f"{hint}, got {describe(value)}")
    if total == 0:
        return problems.add(key, f"a zero window can never admit anything, got {describe(value)}")
    if total > MAX_WINDOW_SECONDS:
        return problems.add(key, f"at most 366d, got {describe(value)}")
    return total


def name_list(value: Any, key: str, problems: Problems) -> Any:
    """One name or a list of names (no duplicates)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        return problems.add(key, f"expected a name or a non-empty list, got {describe(value)}")
    out: list[str] = []
    for index, item in enumerate(items):
        sub = f"{key}[{index}]" if isinstance(value, list) else key
        if string(item, sub, problems) is INVALID:
            return INVALID
        if item in out:
            return problems.add(sub, f"'{item}' is listed twice")
        out.append(item)
    return tuple(out)


def redis_url(value: Any, key: str, problems: Problems) -> Any:
    if string(value, key, problems) is INVALID:
        return INVALID
    parts = urlsplit(value)
    if parts.scheme not in ("redis", "rediss", "unix"):
        return problems.add(
            key,
            f"expected redis://host:port[/db], rediss://... or unix:///path, got {describe(value)}",
        )
    if parts.username or parts.password:
        return problems.add(
            key, "credentials do not belong in the URL; use username and password_env"
        )
    if parts.scheme == "unix":
        if not parts.path.startswith("/"):
            return problems.add(key, "expected unix:///absolute/path.sock")
    else:
        if not parts.hostname:
            return problems.add(key, f"URL has no host: {describe(value)}")
        try:
            parts.port  # noqa: B018 - urlsplit checks the port lazily
        except ValueError:
            return problems.add(key, f"URL has an invalid port: {describe(value)}")
        if parts.path not in ("", "/") and not parts.path[1:].isdigit():
            return problems.add(key, f"the path is the database number (/0), got '{parts.path}'")
    if parts.query or parts.fragment:
        return problems.add(key, "no query or fragment: use the redis: keys for options")
    return value


_LIMIT_FIELDS: dict[str, Field] = {
    "name": name_field,
    "requests": integer(),
    "tokens": integer(),
    "count": choice(TOKEN_COUNTS, "token count"),
    "window": window_field,
    "by": name_list,
    "match": lambda value, key, problems: (
        fields(
            value, key, problems, {"consumers": name_list, "models": name_list, "routes": name_list}
        )
        or INVALID
    ),
}
_REDIS_FIELDS: dict[str, Field] = {
    "url": redis_url,
    "username": string,
    "password_env": env_name,
    "password_file": absolute_path,
    "key_prefix": string,
    "timeout_ms": integer(1, 60_000),
    "retry_interval_ms": integer(10, 600_000),
    "max_connections": integer(1, 10_000),
    "max_pending": integer(1, 10_000_000),
    "failure_mode": choice(FAILURE_MODES, "failure mode"),
}
_RATE_LIMITS_FIELDS: dict[str, Field] = {
    "store": choice(RATE_LIMIT_STORES, "store"),
    "redis": lambda value, key, problems: (
        fields(value, key, problems, _REDIS_FIELDS, required=("url",)) or INVALID
    ),
    "default_max_output_tokens": integer(),
    "limits": lambda value, key, problems: value,  # checked below, with the document
}


def _declared_names(document: dict[str, Any], section: str) -> list[str] | None:
    """Names a section declares (None when it is absent or broken: reported there)."""
    raw = document.get(section)
    if section == "routes":
        if not isinstance(raw, list):
            return None
        return [str(r["name"]) for r in raw if isinstance(r, dict) and "name" in r]
    return [str(name) for name in raw] if isinstance(raw, dict) else None


def _parse_limit(
    raw: Any, key: str, problems: Problems, document: dict[str, Any]
) -> LimitConfig | None:
    got = fields(raw, key, problems, _LIMIT_FIELDS, required=("name", "window"))
    if got is None:
        return None
    if "requests" not in got and "tokens" not in got and not {"requests", "tokens"} & set(raw):
        problems.add(key, "set requests, tokens or both (how much per window)")
    if "count" in got and "tokens" not in raw:
        problems.add(join(key, "count"), "only meaningful with tokens")
    for index, name in enumerate(got.get("by", ())):
        if name not in LIMIT_KEYS:
            where = f"{key}.by[{index}]" if isinstance(raw.get("by"), list) else f"{key}.by"
            problems.add(where, f"unknown key '{name}' (known: {', '.join(LIMIT_KEYS)})")
    match = got.get("match", {})
    consumers = _declared_names(document, "consumers")
    for index, name in enumerate(match.get("consumers", ())):
        if consumers is None or name not in consumers:
            known = ", ".join(consumers) if consumers else "none: there is no consumers: section"
            problems.add(
                f"{key}.match.consumers[{index}]", f"unknown consumer '{name}' (known: {known})"
            )
    routes = _declared_names(document, "routes")
    for index, name in enumerate(match.get("routes", ())):
        if routes is not None and name not in routes:
            problems.add(
                f"{key}.match.routes[{index}]",
                f"unknown route '{name}' (known: {', '.join(routes) or 'none'})",
            )
    if not {"name", "window"} <= got.keys() or not ({"requests", "tokens"} & got.keys()):
        return None
    return LimitConfig(
        name=got["name"],
        window_seconds=got["window"],
        window=raw["window"].strip(),
        requests=got.get("requests"),
        tokens=got.get("tokens"),
        count=got.get("count", "total"),
        by=got.get("by", ()),
        match_consumers=match.get("consumers", ()),
        match_models=match.get("models", ()),
        match_routes=match.get("routes", ()),
    )


def parse_rate_limits(value: Any, key: str, problems: Problems, document: dict[str, Any]) -> Any:
    got = fields(value, key, problems, _RATE_LIMITS_FIELDS, required=("limits",))
    if got is None:
        return INVALID
    store = got.get("store", "local")
    redis_raw = value.get("redis") if isinstance(value, dict) else None
    if store == "redis" and redis_raw is None:
        problems.add(join(key, "redis"), "store: redis needs a redis: section with a url")
    if store == "local" and redis_raw is not None and "store" not in value:
        problems.add(
            join(key, "store"), "a redis: section is set but store is local; set store: redis"
        )
    redis = None
    if isinstance(got.get("redis"), dict) and "url" in got["redis"]:
        if "password_env" in got["redis"] and "password_file" in got["redis"]:
            problems.add(join(key, "redis"), "set password_env or password_file, not both")
        redis = RedisConfig(**got["redis"])
    raw_limits = value.get("limits")
    limits: list[LimitConfig] = []
    if "limits" in value:
        if not isinstance(raw_limits, list) or not raw_limits:
            problems.add(
                join(key, "limits"),
                f"expected a non-empty list of limits, got {describe(raw_limits)}",
            )
        else:
            names: dict[str, int] = {}
            for index, raw in enumerate(raw_limits):
                sub = f"{key}.limits[{index}]"
                limit = _parse_limit(raw, sub, problems, document)
                name = raw.get("name") if isinstance(raw, dict) else None
                if isinstance(name, str) and name in names:
                    problems.add(
                        f"{sub}.name",
                        f"duplicate limit name '{name}' (also {key}.limits[{names[name]}])",
                    )
                elif isinstance(name, str):
                    names[name] = index
                if limit is not None:
                    limits.append(limit)
    return RateLimitsConfig(
        limits=tuple(limits),
        store=store,
        redis=redis,
        default_max_output_tokens=got.get("default_max_output_tokens", 1024),
    )


def _rate_limit_workers(config: Config, workers: int) -> list[tuple[str, str]]:
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


WORKER_CHECKS.append(_rate_limit_workers)


# --------------------------------------------------------------------------- guards

GUARD_ACTIONS = ("mask", "reject", "log")
GUARD_PHASES = ("request", "response")
_GUARD_CODE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _phases(value: Any, key: str, problems: Problems) -> Any:
    got = name_list(value, key, problems)
    if got is INVALID:
        return INVALID
    for name in got:
        if name not in GUARD_PHASES:
            return problems.add(key, f"unknown phase '{name}' (known: {', '.join(GUARD_PHASES)})")
    return got


def _mask_token(value: Any, key: str, problems: Problems) -> Any:
    if not isinstance(value, str):
        return problems.add(key, f"expected a string (may be empty), got {describe(value)}")
    if len(value) > 200:
        return problems.add(key, "longer than 200 characters")
    return value


def _keywords(value: Any, key: str, problems: Problems) -> Any:
    if not isinstance(value, list) or not value:
        return problems.add(key, f"expected a non-empty list of strings, got {describe(value)}")
    for index, item in enumerate(value):
        if string(item, f"{key}[{index}]", problems) is INVALID:
            return INVALID
    return tuple(dict.fromkeys(value))


def _detector_names(value: Any, key: str, problems: Problems) -> Any:
    from extproc.policy.guards.detectors import BUILTIN_NAMES, expand  # lazy: no cycle

    got = name_list(value, key, problems)
    if got is INVALID:
        return INVALID
    for index, name in enumerate(got):
        if name not in BUILTIN_NAMES:
            where = f"{key}[{index}]" if isinstance(value, list) else key
            return problems.add(
                where,
                unknown_key(name, dict.fromkeys(BUILTIN_NAMES)).replace(
                    "unknown key", "unknown detector"
                ),
            )
    return tuple(expand(got))


def _guard_code(value: Any, key: str, problems: Problems) -> Any:
    if string(value, key, problems) is INVALID:
        return INVALID
    if not _GUARD_CODE.fullmatch(value):
        return problems.add(key, f"expected letters, digits, '_', '.', '-', got {describe(value)}")
    return value


def _webhook_url(value: Any, key: str, problems: Problems) -> Any:
    if string(value, key, problems) is INVALID:
        return INVALID
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https", "grpc", "grpcs") or not parts.hostname:
        return problems.add(
            key,
            f"expected http(s)://host[:port]/path or grpc(s)://host:port, got {describe(value)}",
        )
    try:
        port = parts.port
    except ValueError:
        return problems.add(key, f"URL has an invalid port: {describe(value)}")
    if parts.scheme.startswith("grpc") and (port is None or parts.path not in ("", "/")):
        return problems.add(key, "a grpc(s):// URL is host:port only (the service is fixed)")
    if parts.username or parts.password:
        return problems.add(key, "credentials do not belong in the URL; use api_key_env")
    return value


_GUARD_REJECT_FIELDS: dict[str, Field] = {
    "status": integer(400, 599),
    "message": string,
    "code": _guard_code,
}
_GUARD_WEBHOOK_FIELDS: dict[str, Field] = {
    "url": _webhook_url,
    "timeout_ms": integer(1, 60_000),
    "failure": choice(("open", "closed"), "failure mode"),
    "api_key_env": env_name,
}
_GUARD_PATTERN_FIELDS: dict[str, Field] = {
    "name": name_field,
    "regex": string,
    "mask_token": _mask_token,
    "max_length": integer(1, 1 << 20),
}


def _guard_pattern(raw: Any, key: str, problems: Problems) -> GuardPatternConfig | None:
    from extproc.policy.guards.detectors import PatternError, compile_re2  # lazy: no cycle

    got = fields(raw, key, problems, _GUARD_PATTERN_FIELDS, required=("name", "regex"))
    if got is None or not {"name", "regex"} <= got.keys():
        return None
    try:
        regex = compile_re2(got["regex"])
        if regex.fullmatch("") is not None:
            raise PatternError("it matches the empty string")
    except PatternError as exc:
        problems.add(join(key, "regex"), str(exc))
        return None
    return GuardPatternConfig(**got)


def _guard_patterns(value: Any, key: str, problems: Problems) -> Any:
    if not isinstance(value, list) or not value:
        return problems.add(key, f"expected a non-empty list of patterns, got {describe(value)}")
    out = []
    for index, raw in enumerate(value):
        pattern = _guard_pattern(raw, f"{key}[{index}]", problems)
        if pattern is not None:
            out.append(pattern)
    return tuple(out) if len(out) == len(value) else INVALID


def _sub(table: dict[str, Field], required: tuple = ()) -> Field:
    def parse(value: Any, key: str, problems: Problems) -> Any:
        got = fields(value, key, problems, table, required=required)
        return INVALID if got is None or not set(required) <= got.keys() else got

    return parse


_GUARD_FIELDS: dict[str, Field] = {
    "name": name_field,
    "action": choice(GUARD_ACTIONS, "action"),
    "phases": _phases,
    "detectors": _detector_names,
    "patterns": _guard_patterns,
    "keywords": _keywords,
    "case_sensitive": boolean,
    "mask_token": _mask_token,
    "reject": _sub(_GUARD_REJECT_FIELDS),
    "routes": name_list,
    "consumers": name_list,
    "except_consumers": name_list,
    "webhook": _sub(_GUARD_WEBHOOK_FIELDS, required=("url",)),
}


def _guard(raw: Any, key: str, problems: Problems, document: dict[str, Any]) -> Any:
    got = fields(raw, key, problems, _GUARD_FIELDS, required=("name",))
    if got is None:
        return None
    finds = [name for name in ("detectors", "patterns", "keywords") if name in raw]
    if "webhook" in raw:
        if finds:
            problems.add(key, f"a webhook guard does its own detection; remove {', '.join(finds)}")
        if "action" in raw:
            problems.add(join(key, "action"), "a webhook decides the action (pass, mask, reject)")
        if "response" in got.get("phases", ()):
            problems.add(
                join(key, "phases"),
                "a webhook guard checks requests only (a call per streamed chunk would stall "
                "the stream)",
            )
        got.setdefault("phases", ("request",))
    elif not finds:
        problems.add(key, "set detectors, patterns, keywords or webhook (what to look for)")
    if "case_sensitive" in raw and "keywords" not in raw:
        problems.add(join(key, "case_sensitive"), "only meaningful with keywords")
    routes = _declared_names(document, "routes")
    for index, name in enumerate(got.get("routes", ())):
        if routes is not None and name not in routes:
            problems.add(
                f"{key}.routes[{index}]",
                f"unknown route '{name}' (known: {', '.join(routes) or 'none'})",
            )
    consumers = _declared_names(document, "consumers")
    for field_name in ("consumers", "except_consumers"):
        for index, name in enumerate(got.get(field_name, ())):
            if consumers is None or name not in consumers:
                known = (
                    ", ".join(consumers) if consumers else "none: there is no consumers: section"
                )
                problems.add(
                    f"{key}.{field_name}[{index}]", f"unknown consumer '{name}' (known: {known})"
                )
    if "consumers" in got and "except_consumers" in got:
        problems.add(key, "set consumers or except_consumers, not both")
    if "name" not in got:
        return None
    if "reject" in got:
        got["reject"] = GuardRejectConfig(**got["reject"])
    if "webhook" in got:
        got["webhook"] = GuardWebhookConfig(**got["webhook"])
    return GuardConfig(**got)


def parse_guards(value: Any, key: str, problems: Problems, document: dict[str, Any]) -> Any:
    got = fields(
        value,
        key,
        problems,
        {
            "rules": lambda v, k, p: v,
            "max_holdback_chars": integer(64, 1 << 20),
            "scan_budget_chars": integer(1024, 1 << 30),
            "scan_budget_ms": integer(1, 60_000),
            "scan_budget_status": _budget_status,
        },
        required=("rules",),
    )
    if got is None:
        return INVALID
    raw_rules = value.get("rules")
    if "rules" in value and (not isinstance(raw_rules, list) or not raw_rules):
        problems.add(
            join(key, "rules"), f"expected a non-empty list of guards, got {describe(raw_rules)}"
        )
        return INVALID
    rules: list[GuardConfig] = []
    names: dict[str, int] = {}
    for index, raw in enumerate(raw_rules or ()):
        sub = f"{key}.rules[{index}]"
        guard = _guard(raw, sub, problems, document)
        if guard is None:
            continue
        if guard.name in names:
            problems.add(
                f"{sub}.name",
                f"duplicate guard name '{guard.name}' (also {key}.rules[{names[guard.name]}])",
            )
        names[guard.name] = index
        rules.append(guard)
    got.pop("rules", None)
    return GuardsConfig(rules=tuple(rules), **got)


def _budget_status(value: Any, key: str, problems: Problems) -> Any:
    """413 (too large to check) or 400 (a bad request): what a client can act on."""
    if isinstance(value, bool) or value not in (400, 413):
        return problems.add(key, f"expected 413 or 400, got {describe(value)}")
    return value


# ------------------------------------------------------------------ consumers, auth, models
# Parsers for the sections above; route fields `auth`, `models`, `default_model`.

_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


def _model_names(value: Any, key: str, problems: Problems) -> Any:
    """A list of model names; `*` matches any run of characters (`gpt-4o*`)."""
    if not isinstance(value, list):
        return problems.add(key, f"expected a list of model names, got {describe(value)}")
    out: list[str] = []
    for index, item in enumerate(value):
        if string(item, f"{key}[{index}]", problems) is not INVALID:
            out.append(item)
    return tuple(out)


def _expiry(value: Any, key: str, problems: Problems) -> Any:
    """A date (`2026-01-31`: that day at 00:00 UTC) or an ISO 8601 date-time."""
    when = value
    if isinstance(value, str):
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            return problems.add(
                key, f"expected an ISO 8601 date or date-time, got {describe(value)}"
            )
    if isinstance(when, datetime):
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return when.timestamp()
    if isinstance(when, date):
        return datetime(when.year, when.month, when.day, tzinfo=UTC).timestamp()
    return problems.add(key, f"expected an ISO 8601 date or date-time, got {describe(value)}")


def _sha256_hex(value: Any, key: str, problems: Problems) -> Any:
    if string(value, key, problems) is INVALID:
        return INVALID
    digest = value.removeprefix("sha256:")
    if not _SHA256_HEX.fullmatch(digest):
        return problems.add(key, "expected the key's SHA-256 as 64 hex digits")
    return digest.lower()


def _https_url(value: Any, key: str, problems: Problems) -> Any:
    if string(value, key, problems) is INVALID:
        return INVALID
    parts = urlsplit(value)
    if parts.scheme != "https" or not parts.hostname:
        return problems.add(key, f"expected an https:// URL, got {describe(value)}")
    return value


def _audience(value: Any, key: str, problems: Problems) -> Any:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        return problems.add(key, f"expected a string or a list of strings, got {describe(value)}")
    return _model_names(value, key, problems)


def _algorithms(value: Any, key: str, problems: Problems) -> Any:
    if not isinstance(value, list) or not value:
        return problems.add(key, f"expected a non-empty list of algorithms, got {describe(value)}")
    out: list[str] = []
    for index, item in enumerate(value):
        sub = f"{key}[{index}]"
        if isinstance(item, str) and item.lower() == "none":
            problems.add(sub, "unsigned tokens ('none') are never accepted")
        elif choice(JWT_ALGORITHMS, "algorithm")(item, sub, problems) is not INVALID:
            out.append(item)
    return tuple(out)


_KEY_SOURCES = ("value", "sha256", "env", "file")
_KEY_FIELDS: dict[str, Field] = {
    "name": name_field,
    "value": string,
    "sha256": _sha256_hex,
    "env": env_name,
    "file": absolute_path,
    "disabled": boolean,
    "expires": _expiry,
}
_CONSUMER_FIELDS: dict[str, Field] = {
    "keys": lambda value, key, problems: value,  # checked by _consumer_keys
    "models": _model_names,
    "disabled": boolean,
}
_JWT_FIELDS: dict[str, Field] = {
    "jwks_url": _https_url,
    "jwks_file": absolute_path,
    "jwks_ca_file": absolute_path,
    "jwks_refresh_seconds": integer(1, 86_400),
    "issuer": string,
    "audience": _audience,
    "algorithms": _algorithms,
    "shared_secret_env": env_name,
    "shared_secret_file": absolute_path,
    "leeway_seconds": integer(0, 600),
    "consumer_claim": string,
    "models_claim": string,
    "known_consumers_only": boolean,
}


def _consumer_keys(value: Any, key: str, problems: Problems) -> tuple[ApiKeyConfig, ...]:
    if not isinstance(value, list):
        problems.add(key, f"expected a list of keys, got {describe(value)}")
        return ()
    out: list[ApiKeyConfig] = []
    names: set[str] = set()
    for index, raw in enumerate(value):
        sub = f"{key}[{index}]"
        got = fields(raw, sub, problems, _KEY_FIELDS)
        if got is None:
            continue
        sources = [s for s in _KEY_SOURCES if s in raw]
        if len(sources) != 1:
            problems.add(sub, "set exactly one of value, sha256, env, file")
            continue
        if sources[0] not in got:  # its own error is already recorded
            continue
        got.setdefault("name", f"key{index}")
        if got["name"] in names:
            problems.add(f"{sub}.name", f"duplicate key name '{got['name']}'")
        names.add(got["name"])
        out.append(ApiKeyConfig(**got))
    return tuple(out)


def parse_consumers(value: Any, key: str, problems: Problems, document: dict[str, Any]) -> Any:
    if not isinstance(value, dict):
        return problems.add(
            key, f"expected a mapping of consumer name -> settings, got {describe(value)}"
        )
    out: dict[str, ConsumerConfig] = {}
    seen: dict[tuple[str, str], str] = {}  # (kind, key material) -> where, for duplicates
    for name, raw in value.items():
        sub = join(key, name)
        if name_field(name, sub, problems) is INVALID:
            continue
        if raw is None:
            raw = {}
        got = fields(raw, sub, problems, _CONSUMER_FIELDS)
        if got is None:
            continue
        keys = _consumer_keys(got.pop("keys", []), join(sub, "keys"), problems)
        for index, api_key in enumerate(keys):
            if api_key.value is not None:
                digest = hashlib.sha256(api_key.value.encode()).hexdigest()
            else:
                digest = api_key.sha256 or ""
            for material in (("digest", digest), ("env", api_key.env), ("file", api_key.file)):
                if not material[1]:
                    continue
                where = f"{sub}.keys[{index}]"
                if material in seen:
                    problems.add(where, f"the same key is also given at {seen[material]}")
                seen.setdefault(material, where)  # type: ignore[arg-type]
        out[name] = ConsumerConfig(name=name, keys=keys, **got)
    return out


def parse_auth(value: Any, key: str, problems: Problems, document: dict[str, Any]) -> Any:
    if value is None:
        return AuthConfig()
    got = fields(value, key, problems, {"realm": string, "jwt": lambda v, k, p: v})
    if got is None:
        return INVALID
    raw_jwt = got.pop("jwt", None)
    if "realm" in got and '"' in got["realm"]:
        problems.add(join(key, "realm"), "must not contain '\"'")
    if raw_jwt is None:
        return AuthConfig(**got)
    sub = join(key, "jwt")
    jwt = fields(raw_jwt, sub, problems, _JWT_FIELDS)
    if jwt is None:
        return INVALID
    secret = "shared_secret_env" in raw_jwt or "shared_secret_file" in raw_jwt
    if "shared_secret_env" in raw_jwt and "shared_secret_file" in raw_jwt:
        problems.add(sub, "set shared_secret_env or shared_secret_file, not both")
    if "jwks_url" in raw_jwt and "jwks_file" in raw_jwt:
        problems.add(sub, "set jwks_url or jwks_file, not both")
    if "jwks_ca_file" in raw_jwt and "jwks_url" not in raw_jwt:
        problems.add(join(sub, "jwks_ca_file"), "only meaningful with jwks_url")
    algorithms = jwt.get("algorithms")
    if algorithms is None:
        algorithms = DEFAULT_JWT_ALGORITHMS + (("HS256",) if secret else ())
        if "jwks_url" not in raw_jwt and "jwks_file" not in raw_jwt:
            algorithms = ("HS256",) if secret else DEFAULT_JWT_ALGORITHMS
        jwt["algorithms"] = algorithms
    hmac_algs = [a for a in algorithms if a.startswith("HS")]
    if hmac_algs and not secret:
        problems.add(
            join(sub, "algorithms"),
            f"{hmac_algs[0]} needs shared_secret_env or shared_secret_file "
            "(a JWKS key is never used as an HMAC secret)",
        )
    if secret and not hmac_algs and "algorithms" in raw_jwt:
        problems.add(sub, "a shared secret is set but no HS256/384/512 is in algorithms")
    has_jwks = "jwks_url" in raw_jwt or "jwks_file" in raw_jwt
    if len(hmac_algs) < len(algorithms) and not has_jwks:
        problems.add(sub, "set jwks_url or jwks_file for the public-key algorithms")
    return AuthConfig(jwt=JwtConfig(**jwt), **got)


def parse_models(value: Any, key: str, problems: Problems, document: dict[str, Any]) -> Any:
    if value is None:
        return ModelsConfig()
    table: dict[str, Field] = {
        "aliases": lambda v, k, p: v,
        "catalog": lambda v, k, p: v,  # checked below: a list or provider -> list
        "default": string,
    }
    got = fields(value, key, problems, table)
    if got is None:
        return INVALID
    declared = document.get("providers")
    providers = declared if isinstance(declared, dict) else None
    aliases: dict[str, AliasConfig] = {}
    raw_aliases = got.pop("aliases", None) or {}
    if not isinstance(raw_aliases, dict):
        problems.add(join(key, "aliases"), f"expected a mapping, got {describe(raw_aliases)}")
        raw_aliases = {}
    for name, raw in raw_aliases.items():
        sub = join(join(key, "aliases"), name)
        if string(name, sub, problems) is INVALID:
            continue
        alias = fields(
            raw, sub, problems, {"provider": string, "model": string}, ("provider", "model")
        )
        if alias is None or len(alias) != 2:
            continue
        if providers is not None and alias["provider"] not in providers:
            known = ", ".join(map(str, providers)) or "none"
            problems.add(
                join(sub, "provider"), f"unknown provider '{alias['provider']}' (known: {known})"
            )
            continue
        aliases[name] = AliasConfig(name=name, **alias)
    raw_catalog = got.pop("catalog", None)
    catalog: dict[str, tuple[str, ...]] = {}
    sub = join(key, "catalog")
    if isinstance(raw_catalog, list):
        names = _model_names(raw_catalog, sub, problems)
        if names is not INVALID:
            catalog["*"] = names
    elif isinstance(raw_catalog, dict):
        for provider, raw in raw_catalog.items():
            if provider != "*" and providers is not None and provider not in providers:
                problems.add(join(sub, provider), f"unknown provider '{provider}'")
                continue
            names = _model_names(raw, join(sub, provider), problems)
            if names is not INVALID:
                catalog[str(provider)] = names
    elif raw_catalog is not None:
        problems.add(
            sub, f"expected a list of models or provider -> list, got {describe(raw_catalog)}"
        )
    for provider, names in catalog.items():
        for name in set(names) & set(aliases):
            problems.add(join(sub, provider), f"'{name}' is also an alias")
    return ModelsConfig(aliases=aliases, catalog=catalog, **got)


def check_access(config: Config) -> list[tuple[str, str]]:
    """Cross-section checks: routes that require auth can authenticate someone, and every
    model named in an allow-list or default exists when the catalog is closed."""
    problems: list[tuple[str, str]] = []
    can_authenticate = bool(config.consumers) or config.auth.jwt is not None
    models = config.models

    closed = models.catalog and (
        "*" in models.catalog or all(p in models.catalog for p in config.providers)
    )
    cataloged = {name for names in models.catalog.values() for name in names}

    def known(name: str) -> bool:
        if "*" in name or not closed:
            return True
        return name in models.aliases or name in cataloged

    for index, route in enumerate(config.routes):
        if route.auth in ("required", "optional") and not can_authenticate:
            problems.append(
                (
                    f"routes[{index}].auth",
                    f"'{route.auth}' but no consumers with keys and no auth.jwt are configured",
                )
            )
        for name in route.models or ():
            if not known(name):
                problems.append((f"routes[{index}].models", f"unknown model '{name}'"))
        if route.default_model and not known(route.default_model):
            problems.append(
                (f"routes[{index}].default_model", f"unknown model '{route.default_model}'")
            )
    for name, consumer in config.consumers.items():
        for model in consumer.models or ():
            if not known(model):
                problems.append(
                    (
                        f"consumers.{name}.models",
                        f"unknown model '{model}' (not an alias nor in models.catalog)",
                    )
                )
    if models.default and not known(models.default):
        problems.append(("models.default", f"unknown model '{models.default}'"))
    return problems


def _auth_mode(value: Any, key: str, problems: Problems) -> Any:
    """required, optional or off (YAML 1.1 reads a bare `off` as false: take it as off)."""
    if value is False:
        return "off"
    return choice(AUTH_MODES, "auth mode")(value, key, problems)


_ROUTE_FIELDS.update({"auth": _auth_mode, "models": _model_names, "default_model": string})


# Top-level sections: name -> (parser, required). A new policy section is one entry
# here plus a field on Config.
_SECTIONS: dict[str, tuple[Section, bool]] = {
    "server": (section(ServerConfig, _SERVER_FIELDS), False),
    "envoy": (section(EnvoyConfig, _ENVOY_FIELDS), False),
    "streaming": (section(StreamingConfig, _STREAMING_FIELDS), False),
    "providers": (parse_providers, True),
    "routes": (parse_routes, True),
    "consumers": (parse_consumers, False),
    "auth": (parse_auth, False),
    "models": (parse_models, False),
    "rate_limits": (parse_rate_limits, False),
    "guards": (parse_guards, False),
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
    config = Config(path=path, **parsed)
    late = check_access(config) + check_workers(config, config.server.workers)
    if late:
        raise ConfigError(path, late)
    return config


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


def load_config(path: str, data: bytes | None = None) -> Config:
    """Read and validate one policy file; raise ConfigError naming file, key and reason.

    `data` is the file's content when the caller has read it already (the reloader
    validates exactly the bytes it fingerprinted); errors still name `path`.
    """
    try:
        if data is None:
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
