"""JWT signing keys (JWKS) from a file or an HTTPS URL, kept fresh in the background.

The request path only reads the cache: a fetch never delays a request. A background
task refreshes every `refresh_seconds` (sooner when a token names an unknown `kid`,
which is how a rotation shows up), and a failed refresh keeps the keys it had, says
so in a log line and in `ai_gateway_jwks_refresh_total{result="error"}` /
`ai_gateway_jwks_stale`. The cache lives in `Shared`, so a policy reload keeps it.

Only asymmetric keys are taken from a key set (RSA, EC, OKP): an HMAC secret is
configured on its own, so a public key can never be used as an HMAC secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import ssl
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt
import orjson

log = logging.getLogger("extproc.policy.jwks")

MAX_JWKS_BYTES = 1 << 20
FETCH_TIMEOUT_S = 5.0
# A token with an unknown kid wakes the refresher, at most this often.
MIN_WAKE_INTERVAL_S = 10.0
# After a failed refresh, try again this soon (never later than the normal interval).
RETRY_S = 15.0

# JWK key type (and curves) each algorithm may be verified with: a token whose alg does
# not fit the key's type is refused (key-type confusion).
KEY_TYPES = {
    **{alg: ("RSA", None) for alg in ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")},
    "ES256": ("EC", ("P-256",)),
    "ES384": ("EC", ("P-384",)),
    "ES512": ("EC", ("P-521",)),
    "EdDSA": ("OKP", ("Ed25519", "Ed448")),
}


class JwksError(Exception):
    """A key set could not be read or holds no usable signing key."""


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str | None
    kty: str
    crv: str | None
    alg: str | None  # the JWK's own `alg`, when it pins one
    key: Any  # a cryptography public key

    def fits(self, alg: str) -> bool:
        kty, curves = KEY_TYPES.get(alg, ("", None))
        if self.kty != kty or (self.alg is not None and self.alg != alg):
            return False
        return curves is None or self.crv in curves


def parse_jwks(data: bytes) -> list[SigningKey]:
    """The usable signing keys of a JWKS document; JwksError when there are none."""
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise JwksError(f"not JSON: {exc}") from None
    entries = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise JwksError("expected a JSON object with a 'keys' list")
    keys: list[SigningKey] = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            continue
        kty = entry.get("kty")
        if kty not in ("RSA", "EC", "OKP") or entry.get("use", "sig") != "sig":
            continue  # symmetric keys and encryption keys are never signing keys here
        if "d" in entry:
            log.warning("JWKS key %d holds a private key; ignoring it", index)
            continue
        try:
            parsed = jwt.PyJWK(entry)
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError) as exc:
            log.warning("JWKS key %d ignored: %s", index, exc)
            continue
        kid = entry.get("kid")
        alg = entry.get("alg")
        keys.append(
            SigningKey(
                kid=kid if isinstance(kid, str) else None,
                kty=kty,
                crv=entry.get("crv"),
                alg=alg if isinstance(alg, str) else None,
                key=parsed.key,
            )
        )
    if not keys:
        raise JwksError("no usable signing key (RSA, EC or OKP with use 'sig')")
    return keys


def fetch_url(url: str, ca_file: str | None) -> bytes:
    """GET a key set over HTTPS, verifying the server (blocking: run it in a thread)."""
    context = ssl.create_default_context(cafile=ca_file)
    request = urllib.request.Request(url, headers={"accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT_S, context=context) as resp:
            data = resp.read(MAX_JWKS_BYTES + 1)
    except OSError as exc:  # URLError, HTTPError, TLS and socket errors
        raise JwksError(str(getattr(exc, "reason", None) or exc)) from None
    if len(data) > MAX_JWKS_BYTES:
        raise JwksError(f"larger than {MAX_JWKS_BYTES} bytes")
    return data


def read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_JWKS_BYTES + 1)
    except OSError as exc:
        raise JwksError(exc.strerror or str(exc)) from None
    if len(data) > MAX_JWKS_BYTES:
        raise JwksError(f"larger than {MAX_JWKS_BYTES} bytes")
    return data


class JwksCache:
    """The current keys of one key set, and the task that keeps them fresh."""

    def __init__(
        self,
        *,
        url: str | None = None,
        path: str | None = None,
        ca_file: str | None = None,
        refresh_seconds: float = 300.0,
        metrics: Any = None,
        fetch: Callable[[], bytes] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        assert url or path or fetch
        self.source = url or path or "custom"
        self.refresh_seconds = refresh_seconds
        self._fetch = fetch or (
            (lambda: fetch_url(url, ca_file)) if url else (lambda: read_file(path or ""))
        )
        self._clock = clock
        self._metrics = metrics
        self._by_kid: dict[str | None, list[SigningKey]] = {}
        self.keys: tuple[SigningKey, ...] = ()
        self.version = 0  # bumped whenever the keys change (verified tokens are re-checked)
        self.stale = False  # the last refresh failed; the keys are older ones
        self.last_error = ""
        self._digest = b""
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._last_refresh = float("-inf")

    # -- the request path (reads only) -------------------------------------------

    def candidates(self, kid: str | None, alg: str) -> list[SigningKey]:
        """Keys that may verify a token with this kid and alg (no kid: every key of the
        right type)."""
        pool = self._by_kid.get(kid, ()) if kid is not None else self.keys
        return [k for k in pool if k.fits(alg)]

    def knows(self, kid: str) -> bool:
        return kid in self._by_kid

    def wake(self) -> None:
        """A token names a kid we do not have: refresh soon (rate-limited), in the
        background. The token at hand is refused; its retry will find the new key."""
        if self._wake is not None and self._clock() - self._last_refresh >= MIN_WAKE_INTERVAL_S:
            self._wake.set()

    # -- loading -------------------------------------------------------------------

    def load_now(self) -> bool:
        """One blocking load, for start-up (before any request): True when it worked."""
        try:
            data = self._fetch()
        except JwksError as exc:
            self._failed(str(exc))
            return False
        return self._apply(data)

    def _apply(self, data: bytes) -> bool:
        self._last_refresh = self._clock()
        digest = hashlib.sha256(data).digest()
        if digest == self._digest:  # unchanged: nothing to parse
            self._succeeded(changed=False)
            return True
        try:
            keys = parse_jwks(data)
        except JwksError as exc:
            self._failed(str(exc))
            return False
        by_kid: dict[str | None, list[SigningKey]] = {}
        for key in keys:
            by_kid.setdefault(key.kid, []).append(key)
        # One assignment each: a request never sees half a key set.
        self._by_kid = by_kid
        self.keys = tuple(keys)
        self.version += 1
        self._digest = digest
        self._succeeded(changed=True)
        return True

    def _succeeded(self, *, changed: bool) -> None:
        if changed or self.stale:
            log.info("JWKS %s: %d signing keys loaded", self.source, len(self.keys))
        self.stale = False
        self.last_error = ""
        m = self._metrics
        if m is not None:
            m.jwks_refresh.labels(self.source, "ok").inc()
            m.jwks_keys.labels(self.source).set(len(self.keys))
            m.jwks_stale.labels(self.source).set(0)
            m.jwks_last_success.labels(self.source).set(time.time())

    def _failed(self, reason: str) -> None:
        self._last_refresh = self._clock()
        self.stale = bool(self.keys)
        self.last_error = reason
        log.warning(
            "JWKS refresh from %s failed, keeping %d cached signing keys: %s",
            self.source,
            len(self.keys),
            reason,
        )
        m = self._metrics
        if m is not None:
            m.jwks_refresh.labels(self.source, "error").inc()
            m.jwks_stale.labels(self.source).set(1)

    # -- the background task ---------------------------------------------------------

    def start(self) -> None:
        """Start the refresher if an event loop runs in this thread (idempotent)."""
        if self._task is not None and not self._task.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._wake = asyncio.Event()
        self._task = loop.create_task(self._run(), name=f"jwks-refresh {self.source}")

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def refresh(self) -> bool:
        try:
            data = await asyncio.to_thread(self._fetch)
        except JwksError as exc:
            self._failed(str(exc))
            return False
        return self._apply(data)

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            delay = self.refresh_seconds
            if self.stale or not self.keys:
                delay = min(delay, RETRY_S)
            since = self._clock() - self._last_refresh
            if since < delay:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay - since)
            self._wake.clear()
            try:
                await self.refresh()
            except Exception:  # never let the refresher die: the keys must stay fresh
                log.exception("JWKS refresh from %s crashed", self.source)
                self._last_refresh = self._clock()

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
