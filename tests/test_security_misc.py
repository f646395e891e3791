"""Secrets in the wrong places and attacker-sized input, without Envoy (issue 16 items
6 and 7), plus the direct tests of two auth checks that nothing else pinned: a disabled
consumer authenticating with a valid JWT, and an HS secret shorter than 32 bytes."""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any

import jwt
import orjson
import pytest

from extproc.config import parse_config
from extproc.errors import shown
from extproc.labels import OTHER, MetricLabels
from extproc.policy import Policy
from extproc.policy.auth import (
    MIN_HMAC_SECRET_BYTES,
    AuthStage,
    JwtVerifier,
    build_keystore,
    read_secret,
)
from extproc.policy.credentials import strip_query_credentials
from tests.test_auth import (
    BASE,
    ISSUER,
    JWT_SECTION,
    RSA_KEY,
    Source,
    config_of,
    consumers,
    error_of,
    jwk_of,
    jwks_bytes,
    request_headers,
    run_policy,
    sets_of,
    token,
)
from tests.test_exchange import CHAT, Run, body_msg

# -- query credentials, cookies -----------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "clean"),
    [
        ("/v1beta/models/g:generate?alt=sse&key=AIza", "/v1beta/models/g:generate?alt=sse"),
        ("/v1/chat/completions?api_key=sk-1", "/v1/chat/completions"),
        ("/v1/x?KEY=a&Api-Key=b&APIKEY=c&access_token=d&token=e&keep=1", "/v1/x?keep=1"),
        ("/v1/x?api%5Fkey=a&%6Bey=b&a=1", "/v1/x?a=1"),  # percent-encoded names
        ("/v1/x?key", "/v1/x"),  # a bare name is still removed
        ("/v1/x?monkey=1&keys=2", "/v1/x?monkey=1&keys=2"),  # only whole names
        ("/v1/x", "/v1/x"),
    ],
)  # fmt: skip
def test_credential_query_parameters_are_stripped(path, clean):
    assert strip_query_credentials(path) == clean


def test_query_key_cookie_and_proxy_credentials_never_go_upstream(caplog):
    config = config_of(consumers=consumers())
    run = run_policy(config)
    path = "/v1/chat/completions?alt=sse&key=AIza-client-secret"
    headers = {
        "authorization": "Bearer sk-team-a-0123456789",
        "cookie": "session=browser-secret",
        "proxy-authorization": "Basic cHJveHk6c2VjcmV0",
    }
    with caplog.at_level(logging.INFO):
        r1 = request_headers(run, headers, path=path)
        mutation = r1.request_headers.response.header_mutation
        assert sets_of(mutation)[":path"] == "/v1/chat/completions?alt=sse"
        assert {"cookie", "proxy-authorization"} <= set(mutation.remove_headers)
        run.send(body_msg(orjson.dumps({**CHAT, "model": "nope" * 3})))
        run.ex.close(run.t)
    assert "AIza-client-secret" not in caplog.text


def test_a_refused_request_logs_its_path_without_the_query_key(caplog):
    run = run_policy(config_of(consumers=consumers()))
    with caplog.at_level(logging.WARNING):
        resp = request_headers(run, {}, path="/v1/chat/completions?api_key=sk-in-query")
    assert resp.immediate_response.status.code == 401
    assert "refused" in caplog.text and "sk-in-query" not in caplog.text


# -- attacker-sized input in error messages -----------------------------------------------


def test_shown_is_bounded_and_printable():
    assert shown("gpt-4o") == "gpt-4o"
    long = shown("A" * 10_000)
    assert len(long) < 100 and "10000 characters" in long
    assert shown('x"\r\nSet-Cookie: a=b') == 'x"??Set-Cookie: a=b'


def _stage(config, secret: bytes | None = None) -> AuthStage:
    verifier = JwtVerifier(config.auth.jwt, _cache(), secret)
    return AuthStage(config, build_keystore(config.consumers, {}), verifier, {})


def _cache():
    from extproc.policy.jwks import JwksCache

    cache = JwksCache(fetch=Source(jwks_bytes(jwk_of(RSA_KEY, "r1"))))
    cache.load_now()
    return cache


def _call(stage: AuthStage, config, credential: str):
    run = Run(config)
    run.ex.policy = Policy(config, stages=(stage,))
    return request_headers(run, {"authorization": f"Bearer {credential}"})


def _forged_alg(alg: str) -> str:
    import base64

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    return f"{b64(orjson.dumps({'alg': alg, 'kid': 'r1'}))}.{b64(b'{}')}.c2ln"


def test_a_10kb_jwt_alg_is_not_reflected():
    config = config_of(consumers=consumers(), auth={"jwt": JWT_SECTION})
    stage = _stage(config)
    alg = "X" * 10_000
    resp = _call(stage, config, _forged_alg(alg))
    imm = resp.immediate_response
    assert imm.status.code == 401
    assert "is not accepted" in error_of(resp)["message"]
    assert len(imm.body) < 600 and alg[:200] not in imm.body.decode()
    assert len(sets_of(imm.headers)["www-authenticate"]) < 600


def test_a_5000_character_model_name_is_not_reflected():
    doc = {**BASE, "models": {"catalog": {"mock": ["gpt-4o-mini"]}}}
    run = run_policy(parse_config(doc, "test.yaml"))
    request_headers(run, {})
    resp = run.send(body_msg(orjson.dumps({**CHAT, "model": "m" * 5000})))
    assert resp.immediate_response.status.code == 404
    assert len(resp.immediate_response.body) < 600


# -- the two auth checks a deletion must break ---------------------------------------------


def test_a_disabled_consumer_is_refused_even_with_a_valid_jwt():
    config = config_of(consumers=consumers(disabled=True), auth={"jwt": JWT_SECTION})
    stage = _stage(config)
    resp = _call(stage, config, token(RSA_KEY, "RS256", "r1", sub="team-a"))
    assert resp.immediate_response.status.code == 401
    error = error_of(resp)
    assert error["code"] == "invalid_token" and "team-a' is disabled" in error["message"]
    # The same token for a consumer that is not disabled passes: the check is the flag.
    enabled = config_of(consumers=consumers(), auth={"jwt": JWT_SECTION})
    assert _call(_stage(enabled), enabled, token(RSA_KEY, "RS256", "r1", sub="team-a")).HasField(
        "request_headers"
    )


def _hs_config() -> Any:
    section = {**JWT_SECTION, "algorithms": ["RS256", "HS256"], "shared_secret_env": "JWT_SECRET"}
    return config_of(consumers=consumers(), auth={"jwt": section})


def _hs_token(secret: str) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": "gateway", "sub": "team-a", "exp": now + 300}
    with warnings.catch_warnings():  # pyjwt warns about the short key: the point here
        warnings.simplefilter("ignore")
        return jwt.encode(claims, secret.encode(), algorithm="HS256")


def test_an_hs_secret_shorter_than_32_bytes_is_refused(caplog):
    config = _hs_config()
    short = "s" * (MIN_HMAC_SECRET_BYTES - 1)
    with caplog.at_level(logging.ERROR):
        assert read_secret(config.auth.jwt, {"JWT_SECRET": short}) is None
    assert "shorter than 32 bytes" in caplog.text
    stage = _stage(config, read_secret(config.auth.jwt, {"JWT_SECRET": short}))
    resp = _call(stage, config, _hs_token(short))
    assert resp.immediate_response.status.code == 401
    assert "HS256 is not accepted" in error_of(resp)["message"]
    # Exactly 32 bytes is enough: the boundary is the RFC's, not an off-by-one.
    enough = "s" * MIN_HMAC_SECRET_BYTES
    stage = _stage(config, read_secret(config.auth.jwt, {"JWT_SECRET": enough}))
    assert _call(stage, config, _hs_token(enough)).HasField("request_headers")


# -- metric labels ------------------------------------------------------------------------


def test_label_values_come_from_the_policy_and_unknown_ones_are_other():
    doc = {
        **BASE,
        "models": {
            "aliases": {"fast": {"provider": "mock", "model": "gpt-4o-mini"}},
            "catalog": {"mock": ["gpt-4o"]},
        },
        "consumers": consumers(),
    }
    labels = MetricLabels.of(parse_config(doc, "test.yaml"))
    assert [labels.model(m) for m in ("fast", "gpt-4o-mini", "gpt-4o")] == [
        "fast",
        "gpt-4o-mini",
        "gpt-4o",
    ]
    assert {labels.model(f"made-up-{i}") for i in range(200)} == {OTHER}
    assert labels.model("m" * 5000) == OTHER
    assert labels.consumer("team-a") == "team-a" and labels.consumer("stranger") == OTHER


def test_a_policy_that_cannot_list_its_models_learns_a_bounded_few():
    labels = MetricLabels.of(config_of(), learn=5)  # no catalog: any name is served
    assert labels.open_providers == {"mock"}
    assert labels.model("refused-by-the-provider", learn=False) == OTHER  # not learned
    seen = {labels.model(f"model-{i}") for i in range(200)}
    assert len(seen) == 6 and OTHER in seen
    assert labels.model("model-0", learn=False) == "model-0"  # a learned name stays
    fresh = MetricLabels.of(config_of(), learn=5)
    assert fresh.model("x" * 5000) == OTHER  # never a long one, even with room
    assert fresh.model("bad\nname") == OTHER
    assert fresh.model("gpt-4o") == "gpt-4o"
