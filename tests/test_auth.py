"""Consumers and credentials without Envoy: API keys (hashed, constant-time), JWTs with
keys generated here, per-route modes, provider credentials, spoofed internal headers."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from typing import Any

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from extproc.config import ConfigError, parse_config
from extproc.metrics import Metrics
from extproc.policy import Policy, Shared, build_policy
from extproc.policy import auth as auth_module
from extproc.policy.auth import AuthStage, JwtVerifier, build, build_keystore
from extproc.policy.jwks import JwksCache, parse_jwks
from tests.test_exchange import CHAT, Run, headers_msg, metadata, stream_frames

BASE: dict[str, Any] = {
    "providers": {"mock": {"url": "http://127.0.0.1:1", "api_key_env": "MOCK_KEY"}},
    "routes": [
        {
            "name": "openai",
            "prefix": "/openai",
            "provider": "mock",
            "rewrite": "/v1/chat/completions",
        },
        {"name": "v1", "prefix": "/v1/", "provider": "mock"},
    ],
}
KEY = "sk-team-a-0123456789"
ENV = {"MOCK_KEY": "sk-provider-secret"}


def config_of(**sections: Any):
    return parse_config({**BASE, **sections}, "test.yaml")


def consumers(**extra: Any) -> dict[str, Any]:
    return {"team-a": {"keys": [{"name": "main", "value": KEY}], **extra}}


def run_policy(config, environ=ENV, shared=None) -> Run:
    run = Run(config)
    run.ex.policy = build_policy(config, shared or Shared(), environ)
    return run


def request_headers(run: Run, headers: dict[str, str], path="/v1/chat/completions", route="v1"):
    pairs = {":method": "POST", ":path": path, "content-type": "application/json", **headers}
    return run.send(headers_msg(pairs, route=route))


def sets_of(mutation) -> dict[str, str]:
    return {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}


def error_of(resp) -> dict[str, Any]:
    return orjson.loads(resp.immediate_response.body)["error"]


# --------------------------------------------------------------------------- config


def test_consumer_keys_parse_from_every_source():
    digest = hashlib.sha256(b"other-key").hexdigest()
    config = config_of(
        consumers={
            "a": {
                "keys": [
                    {"value": "k1"},
                    {"name": "hashed", "sha256": digest, "expires": "2030-01-01"},
                    {"name": "from-env", "env": "A_KEY", "disabled": True},
                    {"name": "from-file", "file": "/run/secrets/a"},
                ],
                "models": ["gpt-4o*"],
            }
        }
    )
    keys = config.consumers["a"].keys
    assert [k.name for k in keys] == ["key0", "hashed", "from-env", "from-file"]
    assert keys[1].sha256 == digest and keys[1].expires == 1893456000.0
    assert keys[2].disabled and config.consumers["a"].models == ("gpt-4o*",)
    assert "k1" not in repr(config)  # a plain key never shows in reprs (or logs of them)


@pytest.mark.parametrize(
    ("sections", "key", "reason"),
    [
        ({"consumers": {"a": {"keys": [{"value": "x", "env": "E"}]}}}, "consumers.a.keys[0]",
         "exactly one of"),
        ({"consumers": {"a": {"keys": [{"sha256": "abc"}]}}}, "consumers.a.keys[0].sha256",
         "64 hex"),
        ({"consumers": {"a": {"keys": [{"value": "x"}]}, "b": {"keys": [{"value": "x"}]}}},
         "consumers.b.keys[0]", "also given at consumers.a.keys[0]"),
        ({"consumers": {"a": {"keys": [{"value": "x", "expires": "soon"}]}}},
         "consumers.a.keys[0].expires", "ISO 8601"),
        ({"routes": [{"name": "v1", "prefix": "/v1/", "provider": "mock", "auth": "required"}]},
         "routes[0].auth", "no consumers"),
        ({"routes": [{"name": "v1", "prefix": "/v1/", "provider": "mock", "auth": "maybe"}]},
         "routes[0].auth", "unknown auth mode"),
        ({"auth": {"jwt": {"jwks_file": "/k.json", "algorithms": ["none"]}}},
         "auth.jwt.algorithms[0]", "never accepted"),
        ({"auth": {"jwt": {"jwks_file": "/k.json", "algorithms": ["RS256", "HS256"]}}},
         "auth.jwt.algorithms", "needs shared_secret_env"),
        ({"auth": {"jwt": {"jwks_url": "http://idp/jwks"}}}, "auth.jwt.jwks_url", "https://"),
        ({"auth": {"jwt": {"issuer": "x"}}}, "auth.jwt", "jwks_url or jwks_file"),
        ({"models": {"aliases": {"m": {"provider": "nope", "model": "x"}}}},
         "models.aliases.m.provider", "unknown provider 'nope'"),
        ({"models": {"catalog": ["a"]}, "consumers": {"c": {"models": ["b"]}}},
         "consumers.c.models", "unknown model 'b'"),
    ],
)  # fmt: skip
def test_config_errors_name_key_and_reason(sections, key, reason):
    with pytest.raises(ConfigError) as info:
        config_of(**sections)
    assert any(k == key and reason in r for k, r in info.value.problems), info.value.problems


def test_route_auth_defaults_and_bare_off():
    open_config = config_of()
    assert AuthStage(open_config, build_keystore({}, {}), None, {}).modes == {
        "openai": "off",
        "v1": "off",
    }
    routes = [{**BASE["routes"][0], "auth": False}, BASE["routes"][1]]  # YAML `auth: off`
    config = config_of(consumers=consumers(), routes=routes)
    stage = AuthStage(config, build_keystore(config.consumers, {}), None, {})
    assert stage.modes == {"openai": "off", "v1": "required"}


# --------------------------------------------------------------------------- API keys


def test_key_lookup_compares_digests_with_compare_digest(monkeypatch):
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth_module.hmac, "compare_digest", spy)
    store = build_keystore(config_of(consumers=consumers()).consumers, {})
    entry = store.lookup(KEY)
    assert entry is not None and entry.consumer == "team-a"
    digest = hashlib.sha256(KEY.encode()).digest()
    assert calls == [(digest, digest)]  # digests compared, never the key itself
    assert store.lookup("sk-wrong") is None


def test_keys_from_env_file_and_digests(tmp_path, caplog):
    key_file = tmp_path / "key"
    key_file.write_text("file-key\n")
    digest_file = tmp_path / "digest"
    digest_file.write_text("sha256:" + hashlib.sha256(b"digest-key").hexdigest())
    config = config_of(
        consumers={
            "a": {"keys": [{"env": "A_KEY"}, {"name": "f", "file": str(key_file)}]},
            "b": {"keys": [{"file": str(digest_file)}, {"name": "unset", "env": "NOT_SET"}]},
        }
    )
    with caplog.at_level(logging.WARNING):
        store = build_keystore(config.consumers, {"A_KEY": "env-key"})
    assert store.lookup("env-key").consumer == "a"
    assert store.lookup("file-key").name == "f"
    assert store.lookup("digest-key").consumer == "b"
    assert len(store) == 3
    assert "NOT_SET is not set" in caplog.text


def test_same_key_for_two_consumers_is_refused_for_both(caplog):
    config = config_of(consumers={"a": {"keys": [{"env": "K1"}]}, "b": {"keys": [{"env": "K2"}]}})
    with caplog.at_level(logging.ERROR):
        store = build_keystore(config.consumers, {"K1": "sk-shared-1", "K2": "sk-shared-1"})
    assert store.lookup("sk-shared-1") is None
    assert "refusing it for both" in caplog.text and "sk-shared-1" not in caplog.text


@pytest.mark.parametrize(
    "headers",
    [
        {"authorization": f"Bearer {KEY}"},
        {"authorization": f"bearer   {KEY}"},
        {"x-api-key": KEY},
        {"api-key": KEY},
        {"x-goog-api-key": KEY},
    ],
)
def test_key_accepted_from_each_header(headers):
    run = run_policy(config_of(consumers=consumers()))
    r1 = request_headers(run, headers)
    assert r1.WhichOneof("response") == "request_headers"
    mutation = r1.request_headers.response.header_mutation
    sets = sets_of(mutation)
    # The client's credential is gone, the provider's own key goes upstream instead.
    assert sets["authorization"] == "Bearer sk-provider-secret"
    assert sets["x-ai-gateway-consumer"] == "team-a"
    for name in headers:
        assert name == "authorization" or name in mutation.remove_headers
    r2 = run.send(_body({**CHAT, "stream": True}))
    assert metadata(r2)["consumer"] == "team-a"
    client = run.respond(stream_frames(2, usage=True))
    assert KEY not in str(metadata(run.last)) and "sk-provider-secret" not in str(run.last)
    assert b"sk-provider-secret" not in client
    assert (
        run.metric(
            "ai_gateway_tokens_total",
            {"model": "gpt-3.5-turbo", "consumer": "team-a", "kind": "completion"},
        )
        == 2
    )


def _body(obj):
    from tests.test_exchange import body_msg

    return body_msg(orjson.dumps(obj))


@pytest.mark.parametrize(
    ("headers", "code", "says"),
    [
        ({}, "missing_api_key", "Missing API key"),
        ({"authorization": "Basic dXNlcjpwYXNz"}, "missing_api_key", "Missing API key"),
        ({"authorization": "Bearer sk-wrong-key-123"}, "invalid_api_key", "Incorrect API key"),
        ({"x-api-key": "sk-wrong-key-123"}, "invalid_api_key", "Incorrect API key"),
    ],
)
def test_missing_or_wrong_key_is_401_with_challenge(headers, code, says):
    run = run_policy(config_of(consumers=consumers()))
    resp = request_headers(run, headers)
    imm = resp.immediate_response
    assert imm.status.code == 401
    assert sets_of(imm.headers)["www-authenticate"] == 'Bearer realm="ai-gateway"'
    error = error_of(resp)
    assert error["code"] == code and says in error["message"]
    assert "sk-wrong-key-123" not in imm.body.decode()
    run.ex.close(1.0)
    assert run.metric("ai_gateway_errors_total", {"kind": "auth"}) == 1


def test_disabled_and_expired_keys_are_refused():
    config = config_of(
        consumers={
            "a": {"keys": [{"name": "old", "value": "k-old", "expires": "2020-01-01T12:00:00Z"}]},
            "b": {"keys": [{"value": "k-off", "disabled": True}]},
            "c": {"keys": [{"value": "k-c"}], "disabled": True},
            "d": {"keys": [{"value": "k-later", "expires": "2100-01-01"}]},
        }
    )
    stage = AuthStage(config, build_keystore(config.consumers, {}), None, {})
    for key, says in [
        ("k-old", "expired at 2020-01-01T12:00:00Z"),
        ("k-off", "disabled"),
        ("k-c", "disabled"),
    ]:
        run = Run(config)
        run.ex.policy = Policy(config, stages=(stage,))
        resp = request_headers(run, {"authorization": f"Bearer {key}"})
        assert resp.immediate_response.status.code == 401
        assert says in error_of(resp)["message"]
    run = Run(config)
    run.ex.policy = Policy(config, stages=(stage,))
    assert request_headers(run, {"authorization": "Bearer k-later"}).HasField("request_headers")
    # The expiry is checked against the clock at request time.
    late = AuthStage(config, stage.keys, None, {}, clock=lambda: 4102444800.0)
    run = Run(config)
    run.ex.policy = Policy(config, stages=(late,))
    assert request_headers(run, {"authorization": "Bearer k-later"}).HasField("immediate_response")


def test_optional_and_off_routes():
    routes = [
        {**BASE["routes"][0], "auth": "off"},
        {**BASE["routes"][1], "auth": "optional"},
    ]
    config = config_of(consumers=consumers(), routes=routes)
    # optional: no key -> anonymous; a wrong key is still refused; a good one identifies.
    run = run_policy(config)
    assert request_headers(run, {}).HasField("request_headers")
    assert run.ex.consumer == ""
    run = run_policy(config)
    assert request_headers(run, {"x-api-key": "nope"}).immediate_response.status.code == 401
    run = run_policy(config)
    request_headers(run, {"x-api-key": KEY})
    assert run.ex.consumer == "team-a"
    # off: credentials are ignored (never checked) but still stripped.
    run = run_policy(config)
    r1 = request_headers(run, {"authorization": "Bearer junk"}, path="/openai", route="openai")
    assert run.ex.consumer == ""
    assert sets_of(r1.request_headers.response.header_mutation)["authorization"] == (
        "Bearer sk-provider-secret"
    )


def test_no_provider_key_means_client_credentials_are_only_removed():
    config = config_of(consumers=consumers())
    run = run_policy(config, environ={})
    r1 = request_headers(run, {"authorization": f"Bearer {KEY}", "api-key": KEY})
    mutation = r1.request_headers.response.header_mutation
    assert "authorization" not in sets_of(mutation)
    assert {"authorization", "api-key"} <= set(mutation.remove_headers)


def test_spoofed_internal_headers_are_dropped_and_route_cache_cleared():
    run = run_policy(config_of(consumers=consumers()))
    r1 = request_headers(
        run,
        {
            "authorization": f"Bearer {KEY}",
            "x-ai-gateway-consumer": "admin",
            "x-ai-gateway-provider": "expensive",
            "x-ai-gateway-model": "gpt-5",
        },
    )
    response = r1.request_headers.response
    assert response.clear_route_cache
    assert {"x-ai-gateway-provider", "x-ai-gateway-model"} <= set(
        response.header_mutation.remove_headers
    )
    assert sets_of(response.header_mutation)["x-ai-gateway-consumer"] == "team-a"
    assert run.ex.ctx.headers.get("x-ai-gateway-provider") is None


class AnthropicLike:
    """A wire format that carries keys the Anthropic way (what `credentials` asks of one)."""

    name = "anthropic"
    credential_headers = ("x-api-key",)

    @staticmethod
    def upstream_auth(key: str) -> list[tuple[str, str]]:
        return [("x-api-key", key)]


def test_provider_credential_follows_the_format():
    from extproc.config import ProviderConfig
    from extproc.policy import credentials
    from extproc.policy.stage import RequestContext

    provider = ProviderConfig(name="claude", url="https://api.anthropic.com", format="anthropic")
    ctx = RequestContext(
        route=config_of().routes[1],
        provider=provider,
        format=AnthropicLike,  # type: ignore[arg-type]
        method="POST",
        path="/v1/messages",
        upstream_path="/v1/messages",
        headers={"authorization": "Bearer client", "x-api-key": "client"},
    )
    credentials.apply(ctx, provider, AnthropicLike, "sk-ant-provider")
    assert ctx.upstream_headers == {
        "x-api-key": "sk-ant-provider",
        "anthropic-version": credentials.ANTHROPIC_VERSION,
    }
    assert ctx.remove_headers == ["authorization"]


# --------------------------------------------------------------------------- JWT

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()
ISSUER = "https://idp.test/"


def jwk_of(private_key, kid: str, alg: str | None = None) -> dict[str, Any]:
    if isinstance(private_key, rsa.RSAPrivateKey):
        data = orjson.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private_key.public_key()))
    elif isinstance(private_key, ec.EllipticCurvePrivateKey):
        data = orjson.loads(jwt.algorithms.ECAlgorithm.to_jwk(private_key.public_key()))
    else:
        data = orjson.loads(jwt.algorithms.OKPAlgorithm.to_jwk(private_key.public_key()))
    data["kid"] = kid
    if alg:
        data["alg"] = alg
    return data


def jwks_bytes(*keys: dict[str, Any]) -> bytes:
    return orjson.dumps({"keys": list(keys)})


def token(private_key, alg: str, kid: str | None, **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": ISSUER, "aud": "gateway", "sub": "team-a", "iat": now, "exp": now + 300}
    body.update(claims)
    body = {k: v for k, v in body.items() if v is not None}
    headers = {"kid": kid} if kid else {}
    return jwt.encode(body, private_key, algorithm=alg, headers=headers)


class Source:
    """A key set the test can change or break, read by JwksCache instead of HTTPS."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.down = False
        self.fetches = 0

    def __call__(self) -> bytes:
        from extproc.policy.jwks import JwksError

        self.fetches += 1
        if self.down:
            raise JwksError("connection refused")
        return self.data


JWT_SECTION = {
    "jwks_file": "/unused/jwks.json",
    "issuer": ISSUER,
    "audience": "gateway",
    "models_claim": "models",
}


def jwt_stage(source: Source, metrics: Metrics | None = None, secret: bytes | None = None,
              **jwt_extra: Any) -> tuple[AuthStage, JwksCache]:  # fmt: skip
    config = config_of(consumers=consumers(), auth={"jwt": {**JWT_SECTION, **jwt_extra}})
    cache = JwksCache(fetch=source, metrics=metrics)
    cache.load_now()
    verifier = JwtVerifier(config.auth.jwt, cache, secret)
    return AuthStage(config, build_keystore(config.consumers, {}), verifier, {}), cache


def call(stage: AuthStage, credential: str):
    run = Run(stage_config := config_of(consumers=consumers()))
    run.ex.policy = Policy(stage_config, stages=(stage,))
    resp = request_headers(run, {"authorization": f"Bearer {credential}"})
    return run, resp


@pytest.mark.parametrize(("key", "alg"), [(RSA_KEY, "RS256"), (EC_KEY, "ES256"), (ED_KEY, "EdDSA")])
def test_jwt_signed_with_each_algorithm_names_the_consumer(key, alg):
    source = Source(jwks_bytes(jwk_of(RSA_KEY, "r1"), jwk_of(EC_KEY, "e1"), jwk_of(ED_KEY, "d1")))
    stage, _ = jwt_stage(source)
    kid = {"RS256": "r1", "ES256": "e1", "EdDSA": "d1"}[alg]
    run, resp = call(stage, token(key, alg, kid, sub="robot-7", models=["gpt-4o-mini"]))
    assert resp.HasField("request_headers"), resp
    assert run.ex.consumer == "robot-7"
    assert run.ex.ctx.claims["models"] == ["gpt-4o-mini"]
    assert run.ex.ctx.metadata["auth"] == "jwt"


def _refused(stage: AuthStage, credential: str, status: int = 401) -> dict[str, Any]:
    _, resp = call(stage, credential)
    imm = resp.immediate_response
    assert imm.status.code == status, resp
    assert credential not in imm.body.decode()  # the token is never echoed
    if status == 401:
        assert sets_of(imm.headers)["www-authenticate"].startswith('Bearer realm="ai-gateway"')
    return error_of(resp)


def test_jwt_failures_say_why_without_echoing_the_token():
    source = Source(jwks_bytes(jwk_of(RSA_KEY, "r1"), jwk_of(EC_KEY, "e1")))
    stage, _ = jwt_stage(source)
    now = int(time.time())
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cases = [
        (token(RSA_KEY, "RS256", "r1", exp=now - 3600), "has expired", "token_expired"),
        (token(RSA_KEY, "RS256", "r1", nbf=now + 3600), "not valid yet", "invalid_token"),
        (token(RSA_KEY, "RS256", "r1", iss="https://evil/"), "issuer", "invalid_token"),
        (token(RSA_KEY, "RS256", "r1", aud="someone-else"), "aud", "invalid_token"),
        (token(RSA_KEY, "RS256", "r1", exp=None), "no 'exp' claim", "invalid_token"),
        (token(RSA_KEY, "RS256", "r1", sub=None), "no 'sub' claim", "invalid_token"),
        (token(other, "RS256", "r1"), "signature does not verify", "invalid_token"),
        (token(other, "RS256", "unknown-kid"), "not in the gateway's key set", "invalid_token"),
        ("eyJub3QganNvbg.e30.c2ln", "malformed", "invalid_token"),  # header is not JSON
        ("eyJhbGciOiJSUzI1NiJ9.@@@.c2ln", "malformed", "invalid_token"),  # bad base64
    ]
    for credential, says, code in cases:
        error = _refused(stage, credential)
        assert says in error["message"], (says, error)
        assert error["code"] == code


def test_expired_within_leeway_is_accepted():
    stage, _ = jwt_stage(Source(jwks_bytes(jwk_of(RSA_KEY, "r1"))))
    _, resp = call(stage, token(RSA_KEY, "RS256", "r1", exp=int(time.time()) - 5))
    assert resp.HasField("request_headers")


def test_alg_none_and_key_type_confusion_are_refused():
    public_pem = RSA_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    source = Source(jwks_bytes(jwk_of(RSA_KEY, "r1"), jwk_of(EC_KEY, "e1")))
    stage, _ = jwt_stage(source)
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": "gateway", "sub": "team-a", "exp": now + 300}
    unsigned = jwt.encode(claims, None, algorithm="none", headers={"kid": "r1"})
    assert "alg 'none'" in _refused(stage, unsigned)["message"]
    # HS256 "signed" with the RSA public key: the classic confusion. No secret is
    # configured, so HS256 is not accepted at all.
    forged = _hmac_token(claims, public_pem, "r1")
    assert "HS256 is not accepted" in _refused(stage, forged)["message"]
    # RS256 claimed, but the kid points at an EC key: the key type must fit the alg.
    assert "no signing key of the type" in _refused(stage, token(RSA_KEY, "RS256", "e1"))["message"]
    # With a shared secret configured, the public key still never verifies an HS token.
    secret = b"s" * 32
    stage, _ = jwt_stage(source, secret=secret, algorithms=["RS256", "HS256"],
                         shared_secret_env="JWT_SECRET")  # fmt: skip
    assert "signature does not verify" in _refused(stage, forged)["message"]
    good = jwt.encode(claims, secret, algorithm="HS256")
    _, resp = call(stage, good)
    assert resp.HasField("request_headers")


def _hmac_token(claims: dict[str, Any], secret: bytes, kid: str) -> str:
    """An HS256 token made by hand (pyjwt refuses to use a PEM key as an HMAC secret)."""
    import base64

    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    head = b64(orjson.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}))
    body = b64(orjson.dumps(claims))
    sig = b64(hmac.new(secret, head + b"." + body, hashlib.sha256).digest())
    return (head + b"." + body + b"." + sig).decode()


def test_consumer_rules_for_jwt_callers():
    source = Source(jwks_bytes(jwk_of(RSA_KEY, "r1")))
    stage, _ = jwt_stage(source, known_consumers_only=True)
    error = _refused(stage, token(RSA_KEY, "RS256", "r1", sub="stranger"), status=403)
    assert error["code"] == "consumer_not_allowed" and "stranger" in error["message"]
    _, resp = call(stage, token(RSA_KEY, "RS256", "r1", sub="team-a"))
    assert resp.HasField("request_headers")
    # An API key still works beside JWTs.
    _, resp = call(stage, KEY)
    assert resp.HasField("request_headers")


def test_jwks_rotation_and_outage_keep_serving(caplog):
    metrics = Metrics()
    source = Source(jwks_bytes(jwk_of(RSA_KEY, "r1")))
    stage, cache = jwt_stage(source, metrics)
    _, resp = call(stage, token(RSA_KEY, "RS256", "r1"))
    assert resp.HasField("request_headers")
    # The endpoint goes down: the cached key keeps working, a metric and a log say so.
    source.down = True
    with caplog.at_level(logging.WARNING):
        assert asyncio.run(cache.refresh()) is False
    assert "keeping 1 cached signing keys: connection refused" in caplog.text
    sample = metrics.registry.get_sample_value
    assert sample("ai_gateway_jwks_refresh_total", {"source": "custom", "result": "error"}) == 1
    assert sample("ai_gateway_jwks_stale", {"source": "custom"}) == 1
    _, resp = call(stage, token(RSA_KEY, "RS256", "r1"))
    assert resp.HasField("request_headers")
    # Rotation: a new key set replaces the old one once fetched (in the background).
    new_key = ec.generate_private_key(ec.SECP256R1())
    source.down = False
    source.data = jwks_bytes(jwk_of(new_key, "e2", "ES256"))
    assert asyncio.run(cache.refresh()) is True
    assert sample("ai_gateway_jwks_stale", {"source": "custom"}) == 0
    assert sample("ai_gateway_jwks_keys", {"source": "custom"}) == 1
    _, resp = call(stage, token(new_key, "ES256", "e2"))
    assert resp.HasField("request_headers")
    assert (
        "not in the gateway's key set" in _refused(stage, token(RSA_KEY, "RS256", "r1"))["message"]
    )


def test_no_keys_yet_is_503_not_a_bad_token():
    source = Source(b"")
    source.down = True
    stage, _ = jwt_stage(source)
    error = _refused(stage, token(RSA_KEY, "RS256", "r1"), status=503)
    assert error["code"] == "jwks_unavailable"


def test_background_refresher_fetches_off_the_request_path():
    """No fetch happens while a request is checked; the task picks up a rotation."""
    source = Source(jwks_bytes(jwk_of(RSA_KEY, "r1")))
    stage, cache = jwt_stage(source)
    cache.refresh_seconds = 0.05
    new_key = ed25519.Ed25519PrivateKey.generate()

    async def scenario() -> bool:
        cache.start()
        fetches = source.fetches
        stage.verifier.verify(token(RSA_KEY, "RS256", "r1"))
        assert source.fetches == fetches  # verification never fetches
        source.data = jwks_bytes(jwk_of(new_key, "d2"))
        for _ in range(400):
            if cache.knows("d2"):
                break
            await asyncio.sleep(0.025)
        cache.close()
        return cache.knows("d2")

    assert asyncio.run(scenario())


def test_jwks_parsing_skips_what_is_not_a_signing_key():
    good = jwk_of(RSA_KEY, "r1")
    data = jwks_bytes(
        {"kty": "oct", "k": "c2VjcmV0", "kid": "sym"},  # symmetric: never from a JWKS
        {**jwk_of(EC_KEY, "enc"), "use": "enc"},
        {"kty": "RSA", "kid": "broken", "n": "??", "e": "AQAB"},
        good,
    )
    keys = parse_jwks(data)
    assert [k.kid for k in keys] == ["r1"]


def test_build_reads_secrets_at_load_and_always_builds_a_stage(tmp_path):
    jwks = tmp_path / "jwks.json"
    jwks.write_bytes(jwks_bytes(jwk_of(RSA_KEY, "r1")))
    config = config_of(auth={"jwt": {**JWT_SECTION, "jwks_file": str(jwks)}})
    shared = Shared()
    stage = build(config, shared, {})
    assert stage.verifier is not None and stage.verifier.cache.keys
    # A reload keeps the same cache (and its keys).
    assert build(config, shared, {}).verifier.cache is stage.verifier.cache
    assert isinstance(build(config_of(), Shared(), {}), AuthStage)


def test_verified_tokens_are_remembered_until_exp_or_a_key_change(monkeypatch):
    source = Source(jwks_bytes(jwk_of(RSA_KEY, "r1")))
    stage, cache = jwt_stage(source)
    verifier = stage.verifier
    now = [time.time()]
    verifier.clock = lambda: now[0]
    decodes = []
    real = jwt.decode
    monkeypatch.setattr(
        auth_module.jwt, "decode", lambda *a, **k: decodes.append(1) or real(*a, **k)
    )
    credential = token(RSA_KEY, "RS256", "r1", exp=int(now[0]) + 60)
    for _ in range(3):
        assert verifier.verify(credential)["sub"] == "team-a"
    assert len(decodes) == 1  # one signature check for three requests
    verifier.verify(credential)["sub"] = "mallory"  # callers get copies
    assert verifier.verify(credential)["sub"] == "team-a"
    # A changed key set means every remembered token is checked again.
    source.data = jwks_bytes(jwk_of(RSA_KEY, "r1"), jwk_of(EC_KEY, "e1"))
    assert asyncio.run(cache.refresh())
    verifier.verify(credential)
    assert len(decodes) == 2
    # Past exp (+ leeway) the remembered entry is dropped: the token is checked in full
    # again (where pyjwt, on its own clock, refuses an expired token).
    now[0] += 60 + 30 + 1
    verifier.verify(credential)
    assert len(decodes) == 3
