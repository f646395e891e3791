"""Providers (upstream LLM APIs, by name) and routes (path prefixes on the listener)."""

from __future__ import annotations

from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from extproc.config.base import Loc, Section, describe, fail, section, several
from extproc.config.cloud import CloudAuthConfig, provider_checks
from extproc.config.failover import ProviderLimitsConfig
from extproc.config.types import (
    EnvName,
    ModelNames,
    Name,
    Optional,
    OptPath,
    OptStr,
    Str,
    checked,
    checked_items,
    choice,
    in_file,
    name_list,
    one_or_list,
    string,
    url,
    url_path,
)

# Provider API shapes (config `format`); extproc.providers.FAMILIES maps each to its decoders.
WIRE_FORMATS = ("openai", "azure", "anthropic", "gemini", "vertex", "bedrock")
AUTH_MODES = ("required", "optional", "off")
_http_url = url(("http", "https"), "an http:// or https:// URL")


def provider_url(value: Any) -> str:
    parts = _http_url(value)
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise fail("expected scheme://host[:port] only; map paths with a route's rewrite")
    return value


@section
class ProviderConfig(Section):
    """An upstream LLM API, by name."""

    derived = ("name",)

    name: Name
    url: checked(provider_url)
    """`scheme://host[:port]`, no path. `https` means TLS with SNI, checked against the
    system CA bundle (or `ca_file`)."""
    format: choice(WIRE_FORMATS, "format") = "openai"
    """Wire format ([providers.md](providers.md))."""
    api_key_env: EnvName = None
    """Where the provider's key is read when the policy loads; attached upstream, never
    logged or sent to clients ([auth.md](auth.md#provider-credentials))."""
    api_key_file: OptPath = None
    """The same, from a file (a mounted Secret); re-read when it changes."""
    ca_file: OptPath = None
    """CA bundle Envoy verifies an `https` provider with; none: the system bundle."""
    auth: CloudAuthConfig | None = None
    """Cloud credentials instead of a static key: AWS SigV4, Google or Entra ID tokens
    ([providers.md](providers.md#cloud-credentials))."""
    # Where a request translated from another API goes (docs/translation.md).
    project: OptStr = None
    """`vertex`: the Google Cloud project of the path an OpenAI client's request is sent
    to (`/v1/projects/{project}/locations/{location}/publishers/google/models/...`);
    with `location`, aliases on this provider are served to OpenAI clients."""
    location: OptStr = None
    """`vertex`: the region of that path (`us-central1`, `global`)."""
    api_version: OptStr = None
    """`azure`: the `api-version` of an OpenAI client's request sent to a deployment
    (`/openai/deployments/{model}/chat/completions`); unset: 2024-10-21."""
    limits: Optional(ProviderLimitsConfig, "a mapping") = None
    """This provider's own quota: alias targets on it are skipped while it is used
    up ([failover.md](failover.md#provider-quotas))."""

    @classmethod
    def checks(cls, raw: dict[str, Any], refused: set[Any]) -> list[tuple[Loc, str]]:
        if "url" not in raw or "url" in refused:
            return []  # an entry without a usable url is reported for that alone
        found: list[tuple[Loc, str]] = []
        if {"api_key_env", "api_key_file"} <= raw.keys() - refused:
            found.append(((), "set api_key_env or api_key_file, not both"))
        if "ca_file" in raw and "ca_file" not in refused and not raw["url"].startswith("https:"):
            found.append((("ca_file",), "only meaningful for an https:// url"))
        fmt = raw.get("format", "openai")
        for key, wanted in (
            ("project", "vertex"),
            ("location", "vertex"),
            ("api_version", "azure"),
        ):
            if key in raw and key not in refused and fmt != wanted:
                found.append(((key,), f"only meaningful for format: {wanted}"))
        if fmt == "vertex" and len({"project", "location"} & (raw.keys() - refused)) == 1:
            found.append(((), "set project and location together"))
        return found + provider_checks(raw, refused)

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


def _passthrough(value: Any) -> tuple[str, ...]:
    """Upstream paths, each '/...' exact or ending in '*' for a prefix."""
    names = name_list(value)
    for at, item in checked_items(value, names, url_path):
        if "*" in item[:-1] or "%" in item:
            raise several(
                [(at, f"a '*' may only end the path, and no '%' encoding, got {describe(item)}")]
            )
    return names


def auth_mode(value: Any) -> Any:
    """required, optional or off (YAML 1.1 reads a bare `off` as false: take it as off)."""
    if value is False:
        return "off"
    if string(value) not in AUTH_MODES:
        raise fail(f"unknown auth mode {value!r} (known: {', '.join(AUTH_MODES)})")
    return value


@section
class RouteConfig(Section):
    """A path prefix on the Envoy listener, served by one provider. Routes match top to
    bottom, the first match wins; any other path gets a 404 JSON error."""

    name: Name
    """Unique; appears in metrics and access logs."""
    prefix: checked(url_path)
    """A prefix ending in `/` matches any path starting with it; any other prefix matches
    itself and paths below it (`/openai`, `/openai/x`, not `/openaix`)."""
    provider: Str
    """A name under `providers`."""
    rewrite: checked(url_path, str | None) = None
    """Replaces the matched prefix before the request goes upstream (Envoy
    `prefix_rewrite`), so `/openai` can land on the provider's `/v1/chat/completions`."""
    passthrough_paths: Annotated[
        checked(_passthrough, tuple[str, ...]), one_or_list({"type": "string"})
    ] = ()
    """Upstream paths (exact, or a prefix ending in `*`) passed through uninspected: not
    metered, guarded or limited. Any other path that is not a model API is 404."""
    auth: Annotated[Literal[AUTH_MODES] | None, in_file(auth_mode)] = None  # type: ignore[valid-type]
    """Who may call: `required`, `optional` or `off`; unset: `required` when `consumers`
    or `auth.jwt` exist, else `off` ([auth.md](auth.md#per-route-auth))."""
    models: ModelNames = None
    """The route's model allow-list (`*` wildcards); unset: any
    ([models.md](models.md))."""
    default_model: OptStr = None
    """The model when a request names none; unset: `models.default`."""


def route_covers(earlier: str, later: str) -> bool:
    """True if every path the `later` prefix matches is taken by `earlier` first.

    Mirrors how the bootstrap matches: a prefix ending in '/' is a plain prefix; any
    other prefix matches itself and paths below it (`/openai`, `/openai/x`, not
    `/openaix`), which is Envoy's `path_separated_prefix`.
    """
    if earlier.endswith("/"):
        return later.startswith(earlier)
    return later == earlier or later.startswith(earlier + "/")
