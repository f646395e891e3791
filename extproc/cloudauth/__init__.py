"""Cloud credentials for upstream requests: AWS SigV4 (Bedrock), Google OAuth tokens
(Vertex AI), Entra ID tokens (Azure OpenAI), per provider `auth:` block.

`build` turns a policy into a `CloudAuth` (provider name -> `Authorizer`) when it loads.
Credentials that expire live in a `Refresher` kept in `Shared`, so a reload that keeps
a provider's `auth` (and its secret) keeps its token; a reload that drops it stops its
refresher. The request path only calls `Authorizer.headers` on what was fetched: it
never waits on a token endpoint. Secrets and tokens are never logged.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from botocore.credentials import ReadOnlyCredentials

from extproc.cloudauth import sigv4, sources
from extproc.cloudauth.refresher import CredentialsUnavailable, Fetched, Refresher
from extproc.config import Config, ProviderConfig
from extproc.config.cloud import CloudAuthConfig

if TYPE_CHECKING:
    from extproc.policy import Shared

__all__ = [
    "CloudAuth",
    "CredentialsUnavailable",
    "Fetched",
    "Refresher",
    "authority",
    "build",
]

log = logging.getLogger("extproc.cloudauth")
# The SDKs log requests and token answers at DEBUG/INFO (signed headers, session
# tokens, token endpoints' replies): never below WARNING, whatever server.log_level.
for _sdk in ("botocore", "google.auth"):
    logging.getLogger(_sdk).setLevel(logging.WARNING)
# azure-identity warns a page per failed attempt; the refresher's own line says it once.
for _sdk in ("azure", "msal"):
    logging.getLogger(_sdk).setLevel(logging.ERROR)


class Authorizer(Protocol):
    def headers(self, method: str, host: str, path: str, body: bytes) -> dict[str, str]:
        """The headers that authorize this exact request; CredentialsUnavailable when
        there is nothing to authorize it with."""
        ...

    def start(self) -> None: ...


@dataclass(slots=True)
class Static:
    """Credentials read when the policy loaded (static AWS keys): nothing to refresh."""

    credentials: Any
    missing: str = ""

    def value(self) -> Any:
        if self.credentials is None:
            raise CredentialsUnavailable(self.missing)
        return self.credentials

    def start(self) -> None:
        pass


@dataclass(slots=True)
class SigV4:
    source: Static | Refresher
    region: str
    service: str

    def headers(self, method: str, host: str, path: str, body: bytes) -> dict[str, str]:
        credentials = self.source.value()
        return sigv4.sign(credentials, self.region, self.service, method, host, path, body)

    def start(self) -> None:
        self.source.start()


@dataclass(slots=True)
class Bearer:
    source: Refresher

    def headers(self, method: str, host: str, path: str, body: bytes) -> dict[str, str]:
        return {"authorization": f"Bearer {self.source.value()}"}

    def start(self) -> None:
        self.source.start()


@dataclass(slots=True)
class CloudAuth:
    """The policy's authorizers by provider name (empty: no provider has `auth`)."""

    by_provider: dict[str, Authorizer] = field(default_factory=dict)

    def get(self, provider: str) -> Authorizer | None:
        return self.by_provider.get(provider)

    def start(self) -> None:
        for authorizer in self.by_provider.values():
            authorizer.start()


def authority(provider: ProviderConfig) -> str:
    """The Host the provider receives: Envoy rewrites it to this (`host_rewrite_literal`)."""
    host = f"[{provider.host}]" if ":" in provider.host else provider.host
    default = 443 if provider.tls else 80
    return host if provider.port == default else f"{host}:{provider.port}"


def build(config: Config, shared: Shared, environ: Mapping[str, str]) -> CloudAuth:
    """Authorizers for every provider with `auth`; refreshers no longer named are
    stopped. Started at once when an event loop runs (the worker), else on first use."""
    made: dict[str, Authorizer] = {}
    kept: dict[tuple, Refresher] = {}
    for name, provider in config.providers.items():
        if provider.auth is not None:
            made[name] = _authorizer(name, provider.auth, shared, environ, kept)
    for key, refresher in list(shared.cloud_auth.items()):
        if key not in kept:
            refresher.close()
            del shared.cloud_auth[key]
    shared.cloud_auth.update(kept)
    cloud = CloudAuth(made)
    cloud.start()
    return cloud


def _authorizer(
    name: str,
    auth: CloudAuthConfig,
    shared: Shared,
    environ: Mapping[str, str],
    kept: dict[tuple, Refresher],
) -> Authorizer:
    def refresher(material: bytes, fetch: Any) -> Refresher:
        key = (name, auth, hashlib.sha256(material).digest())
        held = shared.cloud_auth.get(key) or Refresher(
            f"provider {name} ({auth.type})", fetch, metrics=shared.metrics, label=name
        )
        kept[key] = held
        return held

    if auth.type == "aws_sigv4":
        assert auth.region is not None
        service = auth.service or sigv4.BEDROCK_SERVICE
        if auth.chain:
            return SigV4(refresher(b"", sources.aws_chain_fetch(auth)), auth.region, service)
        return SigV4(_static_aws(name, auth, environ), auth.region, service)
    if auth.type == "gcp":
        material = b""
        if auth.credentials_file:  # a rotated key file makes a new refresher
            try:
                with open(auth.credentials_file, "rb") as f:
                    material = f.read()
            except OSError:
                pass  # the fetch says why
        return Bearer(refresher(material, sources.google_fetch(auth)))
    secret = sources.read_secret(auth.client_secret_env, auth.client_secret_file, environ)
    if secret is None and not auth.chain:
        where = auth.client_secret_env or auth.client_secret_file
        missing = f"the client secret ({where}) is not set"
        log.warning("provider %s: %s: its requests get 503", name, missing)
        return Bearer(refresher(b"\0missing", _failing(missing)))
    material = (secret or "").encode()
    return Bearer(refresher(material, sources.azure_fetch(auth, secret)))


def _failing(reason: str) -> Any:
    def fetch() -> Fetched:
        raise CredentialsUnavailable(reason)

    return fetch


def _static_aws(name: str, auth: CloudAuthConfig, environ: Mapping[str, str]) -> Static:
    key_id = sources.read_secret(auth.access_key_id_env, auth.access_key_id_file, environ)
    secret = sources.read_secret(auth.secret_access_key_env, auth.secret_access_key_file, environ)
    token = sources.read_secret(auth.session_token_env, auth.session_token_file, environ)
    absent = [
        where
        for value, where in (
            (key_id, auth.access_key_id_env or auth.access_key_id_file),
            (secret, auth.secret_access_key_env or auth.secret_access_key_file),
        )
        if value is None
    ]
    if (auth.session_token_env or auth.session_token_file) and token is None:
        absent.append(auth.session_token_env or auth.session_token_file)
    if absent:
        missing = f"AWS keys not set: {', '.join(str(a) for a in absent)}"
        log.warning("provider %s: %s: its requests get 503", name, missing)
        return Static(None, missing)
    return Static(ReadOnlyCredentials(key_id, secret, token))
