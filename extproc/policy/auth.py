"""Who is calling: API keys and JWTs, per route `required`, `optional` or `off`.

Runs first, at request headers (no body needed, nothing to wait on). It also owns the
request's credentials: client credential headers are stripped, the provider's own key
is set (see `credentials`), and the internal `x-ai-gateway-*` headers a client sent are
dropped (with the route cache cleared, since Envoy matched routes on them).

API keys are kept as SHA-256 digests, indexed by an HMAC of the digest under a random
per-process key: the dict lookup then compares values no caller can predict or steer,
so its timing says nothing about stored keys, and the match is confirmed with
`hmac.compare_digest`. Plain keys from the policy file (dev), env vars and files are
hashed when the policy loads and not kept.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jwt

from extproc.config import Config, ConsumerConfig, JwtConfig
from extproc.errors import shown
from extproc.headers import CONSUMER_HEADER, INTERNAL_HEADER_PREFIX
from extproc.policy import credentials
from extproc.policy.jwks import JwksCache
from extproc.policy.stage import Refusal, RequestContext, Stage

if TYPE_CHECKING:
    from extproc.policy import Shared

log = logging.getLogger("extproc.policy.auth")

MIN_HMAC_SECRET_BYTES = 32  # RFC 7518: an HS256 key at least as long as the hash
# Verified tokens remembered until they expire or the key set changes: a client reuses
# its token for many requests, and a signature check costs 100-170 us.
MAX_VERIFIED_TOKENS = 4096


class AuthFailure(Exception):
    """Why a credential was refused: said to the client (never the credential itself)."""

    def __init__(self, message: str, code: str, status: int = 401) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status


# --------------------------------------------------------------------------- API keys


@dataclass(frozen=True, slots=True)
class KeyEntry:
    consumer: str
    name: str
    digest: bytes  # SHA-256 of the key
    disabled: bool
    expires: float | None


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class KeyStore:
    """Consumer keys by digest; lookups in constant time with respect to the stored keys."""

    def __init__(self) -> None:
        self._index_key = os.urandom(32)
        self._by_index: dict[bytes, KeyEntry] = {}

    def __len__(self) -> int:
        return len(self._by_index)

    def _index(self, digest: bytes) -> bytes:
        return hmac.new(self._index_key, digest, hashlib.sha256).digest()

    def add(self, entry: KeyEntry) -> KeyEntry | None:
        """Store `entry`; return the entry already holding the same key, if any."""
        index = self._index(entry.digest)
        other = self._by_index.get(index)
        if other is None:
            self._by_index[index] = entry
        return other

    def remove(self, digest: bytes) -> None:
        self._by_index.pop(self._index(digest), None)

    def lookup(self, key: str) -> KeyEntry | None:
        digest = key_digest(key)
        entry = self._by_index.get(self._index(digest))
        if entry is None or not hmac.compare_digest(entry.digest, digest):
            return None
        return entry


def _key_material(text: str) -> bytes:
    """A key read from env or a file: `sha256:<hex>` is a digest, anything else the key."""
    text = text.strip()
    if text.startswith("sha256:"):
        return bytes.fromhex(text[len("sha256:") :])
    return key_digest(text)


def build_keystore(consumers: Mapping[str, ConsumerConfig], environ: Mapping[str, str]) -> KeyStore:
    """Every consumer key, hashed; a key that cannot be read is skipped with a warning,
    and a key given to two consumers is refused for both (ambiguous identity)."""
    store = KeyStore()
    clashes: list[bytes] = []
    for consumer in consumers.values():
        for spec in consumer.keys:
            where = f"consumers.{consumer.name}.keys.{spec.name}"
            try:
                if spec.value is not None:
                    digest = key_digest(spec.value)
                elif spec.sha256 is not None:
                    digest = bytes.fromhex(spec.sha256)
                elif spec.env is not None:
                    text = environ.get(spec.env, "")
                    if not text.strip():
                        log.warning("%s: environment variable %s is not set", where, spec.env)
                        continue
                    digest = _key_material(text)
                else:
                    digest = _key_material(Path(spec.file or "").read_text())
            except OSError as exc:
                log.warning("%s: cannot read %s: %s", where, spec.file, exc.strerror)
                continue
            except ValueError:
                log.warning("%s: 'sha256:' must be followed by 64 hex digits", where)
                continue
            entry = KeyEntry(
                consumer=consumer.name,
                name=spec.name,
                digest=digest,
                disabled=spec.disabled or consumer.disabled,
                expires=spec.expires,
            )
            other = store.add(entry)
            if other is not None and other.consumer != consumer.name:
                log.error(
                    "%s: the same key also belongs to consumer %s; refusing it for both",
                    where,
                    other.consumer,
                )
                clashes.append(digest)
    for digest in clashes:
        store.remove(digest)
    return store


# --------------------------------------------------------------------------- JWT

_JWT_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "the token has expired"),
    (jwt.ImmatureSignatureError, "the token is not valid yet (nbf/iat in the future)"),
    (jwt.InvalidAudienceError, "the token is not meant for this gateway (aud)"),
    (jwt.InvalidIssuerError, "the token's issuer is not accepted (iss)"),
    (jwt.InvalidSignatureError, "the token's signature does not verify"),
    (jwt.InvalidAlgorithmError, "the token's algorithm is not accepted"),
    (jwt.DecodeError, "the token is malformed"),
)


# errors_total{kind}: refused credentials, a known caller refused, keys not loaded yet.
_KINDS = {401: "auth", 403: "auth_denied", 503: "auth_unavailable"}


def looks_like_jwt(token: str) -> bool:
    return token.startswith("eyJ") and token.count(".") == 2


class JwtVerifier:
    """Signature, algorithm/key-type match, iss, aud, exp, nbf (with leeway)."""

    def __init__(
        self,
        config: JwtConfig,
        cache: JwksCache | None,
        secret: bytes | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.cache = cache
        self.secret = secret
        self.clock = clock
        # token -> (claims, valid from, valid until, key set version)
        self._verified: dict[str, tuple[dict[str, Any], float, float, int]] = {}
        self.algorithms = frozenset(config.algorithms)
        self._options: dict[str, Any] = {
            "require": ["exp"],
            "verify_aud": bool(config.audience),
            "verify_iss": config.issuer is not None,
        }

    def verify(self, token: str) -> dict[str, Any]:
        """The token's claims (a copy), or AuthFailure saying why not."""
        version = self.cache.version if self.cache is not None else 0
        hit = self._verified.get(token)
        if hit is not None:
            claims, valid_from, valid_until, seen = hit
            if seen == version and valid_from <= self.clock() < valid_until:
                return dict(claims)
            del self._verified[token]  # expired, or the keys changed: check again
        claims = self._verify(token)
        leeway = self.config.leeway_seconds
        nbf = claims.get("nbf")
        valid_from = float(nbf) - leeway if isinstance(nbf, int | float) else float("-inf")
        if len(self._verified) >= MAX_VERIFIED_TOKENS:
            del self._verified[next(iter(self._verified))]  # the oldest
        self._verified[token] = (claims, valid_from, float(claims["exp"]) + leeway, version)
        return dict(claims)

    def _verify(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthFailure("Invalid token: the token is malformed.", "invalid_token") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg.lower() == "none":
            raise AuthFailure(
                "Invalid token: unsigned tokens (alg 'none') are not accepted.", "invalid_token"
            )
        if alg not in self.algorithms:
            raise AuthFailure(
                f"Invalid token: the algorithm {shown(alg)} is not accepted.", "invalid_token"
            )
        if alg.startswith("HS"):
            if not self.secret:
                raise AuthFailure(
                    f"Invalid token: the algorithm {shown(alg)} is not accepted.", "invalid_token"
                )
            keys: list[Any] = [self.secret]
        else:
            keys = self._public_keys(header.get("kid"), alg)
        failure: AuthFailure | None = None
        for key in keys:
            try:
                return jwt.decode(
                    token,
                    key,
                    algorithms=[alg],
                    audience=list(self.config.audience) or None,
                    issuer=self.config.issuer,
                    leeway=self.config.leeway_seconds,
                    options=self._options,  # type: ignore[arg-type]
                )
            except jwt.InvalidSignatureError:
                failure = AuthFailure(
                    "Invalid token: the token's signature does not verify.", "invalid_token"
                )
            except jwt.PyJWTError as exc:
                raise AuthFailure(f"Invalid token: {_reason(exc)}.", _code(exc)) from None
        raise failure or AuthFailure("Invalid token: no key to verify it with.", "invalid_token")

    def _public_keys(self, kid: Any, alg: str) -> list[Any]:
        cache = self.cache
        if cache is None or not cache.keys:
            raise AuthFailure(
                "The gateway has no signing keys to verify tokens with yet; try again shortly.",
                "jwks_unavailable",
                status=503,
            )
        if kid is not None and not isinstance(kid, str):
            raise AuthFailure("Invalid token: the token is malformed (kid).", "invalid_token")
        if kid is not None and not cache.knows(kid):
            cache.wake()  # maybe a rotation: fetch the new set in the background
            raise AuthFailure(
                "Invalid token: its signing key (kid) is not in the gateway's key set.",
                "invalid_token",
            )
        keys = [k.key for k in cache.candidates(kid, alg)]
        if not keys:
            raise AuthFailure(
                f"Invalid token: no signing key of the type {shown(alg)} needs.", "invalid_token"
            )
        return keys


def _reason(exc: Exception) -> str:
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"the token has no '{exc.claim}' claim"
    for kind, reason in _JWT_REASONS:
        if isinstance(exc, kind):
            return reason
    return "the token is not valid"


def _code(exc: Exception) -> str:
    return "token_expired" if isinstance(exc, jwt.ExpiredSignatureError) else "invalid_token"


def read_secret(config: JwtConfig, environ: Mapping[str, str]) -> bytes | None:
    secret = None
    if config.shared_secret_env:
        secret = environ.get(config.shared_secret_env, "").strip() or None
        if secret is None:
            log.warning("auth.jwt: %s is not set; HS tokens are refused", config.shared_secret_env)
    elif config.shared_secret_file:
        try:
            secret = Path(config.shared_secret_file).read_text().strip() or None
        except OSError as exc:
            log.warning("auth.jwt: cannot read shared_secret_file: %s", exc.strerror)
    if secret is not None and len(secret.encode()) < MIN_HMAC_SECRET_BYTES:
        log.error(
            "auth.jwt: the shared secret is shorter than %d bytes; HS tokens are refused",
            MIN_HMAC_SECRET_BYTES,
        )
        return None
    return secret.encode() if secret else None


# --------------------------------------------------------------------------- the stage


def find_credential(headers: Mapping[str, str]) -> str | None:
    """The client's key or token: `Authorization: Bearer`, then `x-api-key` (Anthropic
    SDKs), `api-key` (Azure SDKs), `x-goog-api-key` (Gemini SDKs). A key in the query
    string is not taken: it would travel on to the provider and into access logs."""
    auth = headers.get("authorization")
    if auth:
        scheme, _, token = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    for name in ("x-api-key", "api-key", "x-goog-api-key"):
        value = headers.get(name, "").strip()
        if value:
            return value
    return None


class AuthStage(Stage):
    name = "auth"

    def __init__(
        self,
        config: Config,
        keys: KeyStore,
        verifier: JwtVerifier | None,
        provider_keys: Mapping[str, str],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.consumers = config.consumers
        self.keys = keys
        self.verifier = verifier
        self.jwt = config.auth.jwt
        self.provider_keys = provider_keys
        self.clock = clock
        default = "required" if (config.consumers or config.auth.jwt) else "off"
        self.modes = {route.name: route.auth or default for route in config.routes}
        self.challenge = f'Bearer realm="{config.auth.realm}"'

    def on_request_headers(self, ctx: RequestContext) -> None:
        if self.verifier is not None and self.verifier.cache is not None:
            self.verifier.cache.start()  # first hook in the event loop: start refreshing
        headers = ctx.headers
        spoofed = [name for name in headers if name.startswith(INTERNAL_HEADER_PREFIX)]
        for name in spoofed:
            del headers[name]  # no later stage may trust them either
        if self.modes.get(ctx.route.name, "off") != "off":
            self._authenticate(ctx)
        credentials.apply(ctx, ctx.provider, ctx.format, self.provider_keys.get(ctx.provider.name))
        if ctx.consumer:
            ctx.upstream_headers[CONSUMER_HEADER] = ctx.consumer
        if spoofed:
            ctx.remove_headers.extend(n for n in spoofed if n not in ctx.upstream_headers)
            # Envoy picked the route with the client's headers; make it pick again.
            ctx.clear_route_cache = True

    def _authenticate(self, ctx: RequestContext) -> None:
        token = find_credential(ctx.headers)
        try:
            if token is None:
                if self.modes[ctx.route.name] == "required":
                    raise AuthFailure(
                        "Missing API key: send it as 'Authorization: Bearer <key>' "
                        "(or in an 'x-api-key' or 'api-key' header).",
                        "missing_api_key",
                    )
                return
            if self.verifier is not None and looks_like_jwt(token):
                entry = self.keys.lookup(token) if len(self.keys) else None
                if entry is None:
                    self._accept_jwt(ctx, self.verifier.verify(token))
                    return
            else:
                entry = self.keys.lookup(token)
            self._accept_key(ctx, entry)
        except AuthFailure as failure:
            raise self._refusal(failure) from None

    def _accept_key(self, ctx: RequestContext, entry: KeyEntry | None) -> None:
        if entry is None:
            raise AuthFailure("Incorrect API key provided.", "invalid_api_key")
        if entry.disabled:
            raise AuthFailure("This API key is disabled.", "invalid_api_key")
        if entry.expires is not None and self.clock() >= entry.expires:
            when = datetime.fromtimestamp(entry.expires, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            raise AuthFailure(f"This API key expired at {when}.", "invalid_api_key")
        ctx.consumer = entry.consumer
        ctx.metadata["auth"] = "api_key"

    def _accept_jwt(self, ctx: RequestContext, claims: dict[str, Any]) -> None:
        assert self.jwt is not None
        name = claims.get(self.jwt.consumer_claim)
        if not isinstance(name, str) or not name:
            raise AuthFailure(
                f"Invalid token: the token has no '{self.jwt.consumer_claim}' claim "
                "naming the consumer.",
                "invalid_token",
            )
        consumer = self.consumers.get(name)
        if consumer is None and self.jwt.known_consumers_only:
            raise AuthFailure(
                f"The consumer '{shown(name)}' is not allowed to use this gateway.",
                "consumer_not_allowed",
                status=403,
            )
        if consumer is not None and consumer.disabled:
            raise AuthFailure(f"The consumer '{shown(name)}' is disabled.", "invalid_token")
        ctx.consumer = name
        ctx.claims = claims
        ctx.metadata["auth"] = "jwt"

    def _refusal(self, failure: AuthFailure) -> Refusal:
        headers = {}
        if failure.status == 401:
            challenge = self.challenge
            if failure.code in ("invalid_token", "token_expired"):
                description = failure.message.replace('"', "'")
                challenge += f', error="invalid_token", error_description="{description}"'
            headers["www-authenticate"] = challenge
        elif failure.status == 503:
            headers["retry-after"] = "5"
        kind = _KINDS.get(failure.status, "auth")
        return Refusal(failure.status, failure.message, failure.code, kind=kind, headers=headers)


def build(config: Config, shared: Shared, environ: Mapping[str, str]) -> AuthStage:
    """Always a stage: even with no consumers it strips spoofed internal headers and
    client credentials, and sets the provider's key."""
    keys = build_keystore(config.consumers, environ)
    verifier = None
    jwt_config = config.auth.jwt
    if jwt_config is not None:
        cache = None
        if jwt_config.jwks_url or jwt_config.jwks_file:
            cache = shared_jwks(shared, jwt_config)
        verifier = JwtVerifier(jwt_config, cache, read_secret(jwt_config, environ))
    return AuthStage(config, keys, verifier, credentials.provider_keys(config, environ))


def shared_jwks(shared: Shared, config: JwtConfig) -> JwksCache:
    """One cache per key set and process, kept across reloads; loaded once at start-up
    (blocking, before requests), then refreshed in the background."""
    source = (config.jwks_url, config.jwks_file, config.jwks_ca_file)
    cache = shared.jwks.get(source)
    if cache is None:
        cache = JwksCache(
            url=config.jwks_url,
            path=config.jwks_file,
            ca_file=config.jwks_ca_file,
            refresh_seconds=config.jwks_refresh_seconds,
            metrics=shared.metrics,
        )
        cache.load_now()  # kept only once loaded: a failed start-up load is retried
        shared.jwks[source] = cache
    cache.refresh_seconds = config.jwks_refresh_seconds
    cache.start()
    return cache
