"""Provider credentials on the upstream request.

Clients authenticate to the gateway, never to the provider: whatever credential the
client sent is removed, and the provider's own key is set in the header its wire format
expects (`Authorization: Bearer` for OpenAI, `x-api-key` + `anthropic-version` for
Anthropic, `api-key` for Azure, `x-goog-api-key` for Gemini). The format decides
through `upstream_auth`/`credential_headers` when it defines them; Bearer otherwise.
Keys live in memory only: never logged, never in metadata, never sent to a client.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from extproc.config import Config, ProviderConfig
from extproc.policy.stage import RequestContext

log = logging.getLogger("extproc.policy.credentials")

# Where any client SDK puts a key: OpenAI (and JWTs), Anthropic, Azure, Gemini.
CLIENT_CREDENTIAL_HEADERS = ("authorization", "x-api-key", "api-key", "x-goog-api-key")
ANTHROPIC_VERSION = "2023-06-01"  # sent when neither the client nor the format set one


def credential_headers(fmt: Any) -> tuple[str, ...]:
    """Every request header that may carry a credential for this route's format."""
    extra = getattr(fmt, "credential_headers", ())
    return CLIENT_CREDENTIAL_HEADERS + tuple(h for h in extra if h not in CLIENT_CREDENTIAL_HEADERS)


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
    for name in (*credential_headers(fmt), *previous):
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
