"""Provider credentials on the upstream request.

Clients authenticate to the gateway, never to the provider: whatever credential the
client sent is removed, and the provider's own key is set in the header its wire format
expects (`Authorization: Bearer` for OpenAI, `x-api-key` + `anthropic-version` for
Anthropic, `api-key` for Azure, `x-goog-api-key` for Gemini). The format decides
through `upstream_auth`/`credential_headers` when it defines them; Bearer otherwise.
Keys live in memory only: never logged, never in metadata, never sent to a client.

Credentials in other places are removed too: `cookie` and `proxy-authorization` never
reach a provider, and query parameters that carry a key (`?key=` from Gemini clients,
`?api_key=`...) are stripped from the path before it goes upstream or into a log
(stripped, not refused: the gateway sets its own provider key anyway, and a Gemini
SDK that puts its key in the query keeps working).

A provider with an `auth:` block (cloud credentials, `extproc.cloudauth`) gets no key
here: `finalize`, the last step of the request-body phase, signs the exact request
that goes upstream (AWS SigV4) or sets a background-refreshed OAuth token. The
client's own SigV4 headers (boto3 signs with whatever it has) are stripped like any
client credential.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_plus

from extproc.config import Config, ProviderConfig
from extproc.failover.plan import FAILOVER_HEADER
from extproc.policy.stage import Refusal, RequestContext

if TYPE_CHECKING:
    from extproc.cloudauth import CloudAuth

log = logging.getLogger("extproc.policy.credentials")

# Where any client SDK puts a key: OpenAI (and JWTs), Anthropic, Azure, Gemini.
CLIENT_CREDENTIAL_HEADERS = ("authorization", "x-api-key", "api-key", "x-goog-api-key")
# Never forwarded, whatever the format: browser sessions, proxy credentials.
STRIPPED_HEADERS = ("cookie", "proxy-authorization")
# A client's own SigV4 headers (the Authorization itself is a credential header above).
AMZ_HEADERS = ("x-amz-date", "x-amz-security-token", "x-amz-content-sha256")
# Query parameter names that carry a credential (compared decoded, case-insensitively).
QUERY_CREDENTIALS = frozenset({"api_key", "key", "api-key", "apikey", "access_token", "token"})
ANTHROPIC_VERSION = "2023-06-01"  # sent when neither the client nor the format set one


def credential_headers(fmt: Any) -> tuple[str, ...]:
    """Every request header that may carry a credential for this route's format."""
    extra = getattr(fmt, "credential_headers", ())
    return CLIENT_CREDENTIAL_HEADERS + tuple(h for h in extra if h not in CLIENT_CREDENTIAL_HEADERS)


def strip_query_credentials(path: str) -> str:
    """`path` without its credential-carrying query parameters (the same string when it
    has none). Names are percent- and plus-decoded and lowercased before comparing, so
    `?KEY=`, `?api%5Fkey=` and `?api+key`-style spellings cannot slip through."""
    head, sep, query = path.partition("?")
    if not sep:
        return path
    params = query.split("&")
    kept = [p for p in params if not _carries_credential(p)]
    if len(kept) == len(params):
        return path
    return f"{head}?{'&'.join(kept)}" if kept else head


def _carries_credential(param: str) -> bool:
    # Some frameworks also split the query on `;` (`?alt=sse;key=...`): each piece counts.
    return any(_names_credential(piece) for piece in param.split(";"))


def _names_credential(param: str) -> bool:
    name = param.partition("=")[0]
    if "%" in name or "+" in name:
        name = unquote_plus(name)
    return name.strip().lower() in QUERY_CREDENTIALS


def provider_headers(
    provider: ProviderConfig, fmt: Any, key: str | None, client_headers: dict[str, str]
) -> dict[str, str]:
    """The headers that carry `provider`'s key upstream (empty without a key)."""
    if not key:
        return {}
    make = getattr(fmt, "upstream_auth", None)
    pairs = make(key) if make is not None else [("authorization", f"Bearer {key}")]
    headers = {name.lower(): value for name, value in pairs}
    if "anthropic" in provider.format and "anthropic-version" not in client_headers:
        headers.setdefault("anthropic-version", ANTHROPIC_VERSION)
    return headers


def apply(
    ctx: RequestContext,
    provider: ProviderConfig,
    fmt: Any,
    key: str | None,
    previous: Iterable[str] = (),
) -> None:
    """Strip the client's credential headers (and `previous`, what an earlier provider
    choice set) and set `provider`'s own."""
    sets = provider_headers(provider, fmt, key, ctx.headers)
    ctx.upstream_headers.update(sets)
    for name in (*credential_headers(fmt), *STRIPPED_HEADERS, *AMZ_HEADERS, *previous):
        if name in sets or name in ctx.remove_headers:
            continue
        if name in ctx.headers or name in previous:
            ctx.remove_headers.append(name)


def provider_keys(config: Config, environ: Mapping[str, str]) -> dict[str, str]:
    """Provider credentials, read at load time (never on the request path)."""
    keys: dict[str, str] = {}
    for name, provider in config.providers.items():
        key = environ.get(provider.api_key_env) if provider.api_key_env else None
        if not key and provider.api_key_file:
            try:
                key = Path(provider.api_key_file).read_text().strip()
            except OSError as exc:
                log.warning("provider %s: cannot read api_key_file: %s", name, exc.strerror)
        if key:
            keys[name] = key
    return keys


def wire_path(ctx: RequestContext) -> str:
    """The path (percent-encoded, with its query) as the provider receives it: the
    client's path, or a `:path` a stage set in this phase, with the route's prefix
    rewrite applied, as Envoy's router does. SigV4 signs this exact string."""
    path = ctx.upstream_headers.get(":path") or ctx.path
    route = ctx.route
    if ctx.translator is not None:  # the whole upstream path: its route rewrites nothing
        return path
    if route.rewrite is not None and path.startswith(route.prefix):
        path = route.rewrite + path[len(route.prefix) :]
    return path


def finalize(cloud: CloudAuth | None, ctx: RequestContext, body: bytes) -> None:
    """Authorize the upstream request of a provider with `auth:`, with the bytes that go
    upstream: called once, at the very end of the request-body phase, so every rewrite
    of path or body comes before it. No credential fetched yet: 503, and a log line
    saying why (never a fetch here: refreshers run in the background)."""
    provider = ctx.provider
    if cloud is None or provider.auth is None:
        return
    if FAILOVER_HEADER in ctx.upstream_headers:
        return  # an alias's targets: the upstream filter authorizes each attempt
    authorizer = cloud.get(provider.name)
    if authorizer is None:
        return
    from extproc.cloudauth import CredentialsUnavailable, authority

    authorizer.start()  # a no-op once running (a policy built outside the loop: now)
    try:
        headers = authorizer.headers(ctx.method, authority(provider), wire_path(ctx), body)
    except CredentialsUnavailable as exc:
        log.warning("provider %s: request refused with 503, no credentials: %s", provider.name, exc)
        raise Refusal(
            503,
            f"The gateway has no credentials for provider '{provider.name}' yet; retry shortly.",
            "credentials_unavailable",
            kind="credentials_unavailable",
            headers={"retry-after": "5"},
        ) from None
    ctx.upstream_headers.update(headers)
    ctx.remove_headers[:] = [n for n in ctx.remove_headers if n not in headers]
