"""Who may call (consumers: API keys, JWT) and what they may use (models: allow-lists,
aliases). Secrets are only *named* here (env var, file) or given as a SHA-256 digest; a
plain `value` is for local development."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, WithJsonSchema, WrapValidator

from extproc.config.base import Loc, Section, describe, fail, section, several
from extproc.config.failover import FailoverConfig, TargetConfig, check_targets
from extproc.config.types import (
    Bool,
    EnvName,
    Int,
    ModelNames,
    Name,
    Names,
    OptPath,
    OptStr,
    Str,
    checked,
    entries,
    expiry,
    finish,
    in_file,
    model_names,
    one_or_list,
    string,
    url,
)

if TYPE_CHECKING:
    from extproc.config.document import Config

JWT_ALGORITHMS = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
    "ES256", "ES384", "ES512", "EdDSA", "HS256", "HS384", "HS512",
)  # fmt: skip
DEFAULT_JWT_ALGORITHMS = ("RS256", "ES256", "EdDSA")
KEY_SOURCES = ("value", "sha256", "env", "file")
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


def sha256_hex(value: Any) -> str:
    digest = string(value).removeprefix("sha256:")
    if not _SHA256_HEX.fullmatch(digest):
        raise fail("expected the key's SHA-256 as 64 hex digits")
    return digest.lower()


@section
class ApiKeyConfig(Section):
    """One API key of a consumer, from exactly one source."""

    name: Name = ""
    """Shown in logs instead of the key; unset: `keyN` (its position)."""
    value: OptStr = Field(default=None, repr=False)
    """The key in clear: local development only."""
    sha256: checked(sha256_hex, str | None) = None
    """The key's SHA-256, 64 hex digits (`sha256:` prefix allowed)."""
    env: EnvName = None
    """An environment variable holding the key (or `sha256:<hex>`), read at load."""
    file: OptPath = None
    """A file holding the key (or `sha256:<hex>`), re-read when it changes."""
    disabled: Bool = False
    expires: Annotated[
        checked(expiry, float | None),
        WithJsonSchema({"type": "string", "format": "date-time"}),
    ] = None
    """A date (that day at 00:00 UTC) or an ISO 8601 date-time: the key is refused from
    then on (kept as Unix time)."""

    @classmethod
    def checks(cls, raw: dict[str, Any], refused: set[Any]) -> list[tuple[Loc, str]]:
        if sum(source in raw for source in KEY_SOURCES) != 1:
            return [((), "set exactly one of value, sha256, env, file")]
        return []


def _keys(value: Any, handler: Any) -> Any:
    """A list of keys; a key without a name is named by its position."""
    if not isinstance(value, list | tuple):
        raise fail(f"expected a list of keys, got {describe(value)}")
    found: list[tuple[Loc, str]] = []
    seen: set[Any] = set()
    named = []
    for index, raw in enumerate(value):
        if isinstance(raw, dict):
            raw = {"name": f"key{index}", **raw}
            if isinstance(raw["name"], str):
                if raw["name"] in seen:
                    found.append(((index, "name"), f"duplicate key name '{raw['name']}'"))
                seen.add(raw["name"])
        named.append(raw)
    return finish(handler, named, found, list(range(len(value))))


@section
class ConsumerConfig(Section):
    """A team, app or tenant, by name."""

    derived = ("name",)
    empty_ok = True

    name: Name
    keys: Annotated[tuple[ApiKeyConfig, ...], WrapValidator(_keys)] = ()
    """Each with `name` and exactly one of `sha256`, `env`, `file`, `value`; optional
    `disabled` and `expires` ([auth.md](auth.md#consumers-and-their-keys))."""
    models: ModelNames = None
    """The consumer's model allow-list (`*` wildcards); unset: any its routes allow."""
    teams: Names = ()
    """Teams the consumer belongs to (a team budget counts the spend of each member)."""
    disabled: Bool = False
    """Refuse every key of this consumer."""


def _algorithms(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not value:
        raise fail(f"expected a non-empty list of algorithms, got {describe(value)}")
    found: list[tuple[Loc, str]] = []
    for index, item in enumerate(value):
        if isinstance(item, str) and item.lower() == "none":
            found.append(((index,), "unsigned tokens ('none') are never accepted"))
        elif not isinstance(item, str) or item not in JWT_ALGORITHMS:
            try:
                string(item)
                reason = f"unknown algorithm {item!r} (known: {', '.join(JWT_ALGORITHMS)})"
            except Exception as exc:
                reason = str(exc)
            found.append(((index,), reason))
    if found:
        raise several(found)
    return tuple(value)


def _audience(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple):
        raise fail(f"expected a string or a list of strings, got {describe(value)}")
    return model_names(value)


def _https_url(value: Any) -> str:
    parts = url(("https",), "an https:// URL")(value)
    del parts
    return value


@section
class JwtConfig(Section):
    """Bearer JWTs: signature (JWKS, or an HMAC secret), issuer, audience, exp/nbf
    ([auth.md](auth.md#jwt))."""

    jwks_url: checked(_https_url, str | None) = None
    """The key set, `https://` only, fetched in the background."""
    jwks_file: OptPath = None
    """The key set from a file, re-read in the background when it changes."""
    jwks_ca_file: OptPath = None
    """CA bundle for `jwks_url`; none: the system bundle."""
    jwks_refresh_seconds: Int(1, 86_400) = 300
    issuer: OptStr = None
    """`iss` must match."""
    audience: Annotated[checked(_audience, tuple[str, ...]), one_or_list({"type": "string"})] = ()
    """`aud` must contain one of these (a string or a list)."""
    algorithms: checked(_algorithms, tuple[Literal[JWT_ALGORITHMS], ...]) = (  # type: ignore[valid-type]
        DEFAULT_JWT_ALGORITHMS
    )
    """Accepted algorithms; HS256/384/512 only with a shared secret (never a JWKS key).
    Unset: RS256, ES256, EdDSA, plus HS256 when a shared secret is set (HS256 alone
    without a key set)."""
    shared_secret_env: EnvName = None
    """The HMAC secret (at least 32 bytes), from an environment variable."""
    shared_secret_file: OptPath = None
    """The HMAC secret from a file."""
    leeway_seconds: Int(0, 600) = 30
    """Clock skew allowed for `exp`, `nbf`, `iat`."""
    consumer_claim: Str = "sub"
    """The claim naming the consumer."""
    models_claim: OptStr = None
    """A claim listing (or space-separating) the models the caller may use."""
    team_claim: OptStr = None
    """A claim naming the caller's team (a string, or a list of them), for team budgets;
    it replaces the `teams` of the consumer's entry."""
    known_consumers_only: Bool = False
    """`true`: a token naming a consumer not under `consumers` gets 403."""

    @classmethod
    def prepare(cls, raw: dict[str, Any]) -> dict[str, Any]:
        if "algorithms" not in raw:
            raw = {**raw, "algorithms": list(_default_algorithms(raw))}
        return raw

    @classmethod
    def checks(cls, raw: dict[str, Any], refused: set[Any]) -> list[tuple[Loc, str]]:
        found: list[tuple[Loc, str]] = []
        secret = "shared_secret_env" in raw or "shared_secret_file" in raw
        jwks = "jwks_url" in raw or "jwks_file" in raw
        if "shared_secret_env" in raw and "shared_secret_file" in raw:
            found.append(((), "set shared_secret_env or shared_secret_file, not both"))
        if "jwks_url" in raw and "jwks_file" in raw:
            found.append(((), "set jwks_url or jwks_file, not both"))
        if "jwks_ca_file" in raw and "jwks_url" not in raw:
            found.append((("jwks_ca_file",), "only meaningful with jwks_url"))
        written = raw.get("algorithms")
        if isinstance(written, list) and written:
            algorithms = [a for a in written if isinstance(a, str) and a in JWT_ALGORITHMS]
        else:
            algorithms = list(_default_algorithms(raw))
        hmac = [a for a in algorithms if a.startswith("HS")]
        if hmac and not secret:
            found.append(
                (
                    ("algorithms",),
                    f"{hmac[0]} needs shared_secret_env or shared_secret_file "
                    "(a JWKS key is never used as an HMAC secret)",
                )
            )
        if secret and not hmac and "algorithms" in raw:
            found.append(((), "a shared secret is set but no HS256/384/512 is in algorithms"))
        if len(hmac) < len(algorithms) and not jwks:
            found.append(((), "set jwks_url or jwks_file for the public-key algorithms"))
        return found


def _default_algorithms(raw: dict[str, Any]) -> tuple[str, ...]:
    secret = "shared_secret_env" in raw or "shared_secret_file" in raw
    if "jwks_url" not in raw and "jwks_file" not in raw:
        return ("HS256",) if secret else DEFAULT_JWT_ALGORITHMS
    return DEFAULT_JWT_ALGORITHMS + (("HS256",) if secret else ())


def _realm(value: Any) -> str:
    if '"' in string(value):
        raise fail("must not contain '\"'")
    return value


@section
class AuthConfig(Section):
    """Realm and JWT."""

    empty_ok = True

    realm: checked(_realm) = "ai-gateway"
    """`WWW-Authenticate: Bearer realm="..."`."""
    jwt: JwtConfig | None = None


@section
class AliasConfig(Section):
    """A model name clients send, served as `model` by `provider`, or by one of
    `targets` (tried in order, or spread by weight: [failover.md](failover.md))."""

    derived = ("name",)

    name: Str
    provider: OptStr = None
    """The provider that serves the alias (with `model`), unless `targets` is set."""
    model: OptStr = None
    """The model id sent to `provider`."""
    targets: tuple[TargetConfig, ...] = ()
    """Instead of `provider`/`model`: up to four `{provider, model, weight?}`."""

    @classmethod
    def checks(cls, raw: dict[str, Any], refused: set[Any]) -> list[tuple[Loc, str]]:
        return check_targets(raw)

    @property
    def weighted(self) -> bool:
        return bool(self.targets) and self.targets[0].weight is not None


_MODEL_LIST = {"type": "array", "items": {"type": "string"}}


def _catalog(value: Any) -> Any:
    """A list (every provider) or provider -> list."""
    if isinstance(value, list | tuple):
        return {"*": value}
    if not isinstance(value, dict):
        raise fail(f"expected a list of models or provider -> list, got {describe(value)}")
    return {str(key): names for key, names in value.items()}


@section
class ModelsConfig(Section):
    """Names clients may send ([models.md](models.md))."""

    empty_ok = True

    aliases: Annotated[
        dict[str, AliasConfig],
        entries("a mapping", AliasConfig, string),
        in_file(lambda value: value or {}),  # `aliases: []` (or empty) means none
    ] = Field(default_factory=dict)
    """`name: {provider: P, model: M}`: the body is rewritten to `M`, and the request
    re-routed when `P` is not the route's provider."""
    catalog: Annotated[
        dict[str, Annotated[tuple[str, ...], in_file(model_names)]],
        in_file(_catalog),
        WithJsonSchema(
            {"anyOf": [_MODEL_LIST, {"type": "object", "additionalProperties": _MODEL_LIST}]}
        ),
    ] = Field(default_factory=dict)
    """Model ids each provider serves as is, by provider name (`"*"`: every provider not
    named; a plain list means `"*"`). A provider with a catalog refuses other names that
    are not aliases with 404 model_not_found; one without takes any name as sent."""
    default: OptStr = None
    """The model when a request names none."""
    failover: FailoverConfig = Field(default_factory=FailoverConfig)
    """Attempts of aliases with `targets` ([failover.md](failover.md))."""

    @classmethod
    def checks(cls, raw: dict[str, Any], refused: set[Any]) -> list[tuple[Loc, str]]:
        aliases = raw.get("aliases")
        catalog = raw.get("catalog")
        if not isinstance(aliases, dict):
            return []
        catalog = {"*": catalog} if isinstance(catalog, list) else catalog
        found: list[tuple[Loc, str]] = []
        for provider, names in catalog.items() if isinstance(catalog, dict) else ():
            written = {n for n in names if isinstance(n, str)} if isinstance(names, list) else set()
            for model in sorted(written & set(aliases)):
                found.append((("catalog", str(provider)), f"'{model}' is also an alias"))
        return found

    def catalog_of(self, provider: str) -> tuple[str, ...] | None:
        """The names `provider` serves as is; None when it takes any name."""
        return self.catalog.get(provider, self.catalog.get("*"))


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
        return "*" in name or not closed or name in models.aliases or name in cataloged

    for index, route in enumerate(config.routes):
        if route.auth in ("required", "optional") and not can_authenticate:
            problems.append(
                (
                    f"routes[{index}].auth",
                    f"'{route.auth}' but no consumers with keys and no auth.jwt are configured",
                )
            )
        for model in route.models or ():
            if not known(model):
                problems.append((f"routes[{index}].models", f"unknown model '{model}'"))
        if route.default_model and not known(route.default_model):
            problems.append(
                (f"routes[{index}].default_model", f"unknown model '{route.default_model}'")
            )
    for consumer_name, consumer in config.consumers.items():
        for model in consumer.models or ():
            if not known(model):
                problems.append(
                    (
                        f"consumers.{consumer_name}.models",
                        f"unknown model '{model}' (not an alias nor in models.catalog)",
                    )
                )
    if models.default and not known(models.default):
        problems.append(("models.default", f"unknown model '{models.default}'"))
    return problems
