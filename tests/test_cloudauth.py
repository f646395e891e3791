"""Cloud credentials, in process: the SigV4 signer against botocore's own, the mock's
verifier refusing every tampered part, the refresher's schedule and retries, and
`finalize` setting (or refusing with 503) on the request context."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from pathlib import Path

import botocore.auth
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials

from extproc.cloudauth import CredentialsUnavailable, Fetched, Refresher, sigv4
from extproc.config import load_config
from extproc.policy import RequestContext, Shared, build_policy
from extproc.policy.credentials import finalize, wire_path
from extproc.policy.stage import Refusal
from extproc.providers import format_for

KEYS = ReadOnlyCredentials("AKIDGATEWAY", "gateway-secret-key", None)
SESSION = ReadOnlyCredentials("ASIAGATEWAY", "gateway-secret-key", "session-token-xyz")
WHEN = dt.datetime(2026, 12, 1, 11, 0, 0, tzinfo=dt.UTC)
PATH = "/model/amazon.nova-lite-v1%3A0/converse-stream"
BODY = b'{"messages":[{"role":"user","content":[{"text":"hi"}]}]}'


def received(headers: dict[str, str], host: str = "bedrock.local:8443") -> dict[str, str]:
    """What the provider gets: the gateway's headers plus Envoy's host and extras."""
    return {**headers, "host": host, "x-forwarded-proto": "http", "x-request-id": "r1"}


@pytest.mark.parametrize("credentials", [KEYS, SESSION])
def test_sign_equals_botocore_add_auth(credentials, monkeypatch) -> None:
    headers = sigv4.sign(credentials, "us-east-1", "bedrock", "POST", "h.example", PATH, BODY, WHEN)
    # botocore's own signer, fed the same headers at the same instant, says the same.
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: WHEN.replace(tzinfo=None))
    request = AWSRequest(method="POST", url=f"https://h.example{PATH}", data=BODY)
    SigV4Auth(credentials, "bedrock", "us-east-1").add_auth(request)
    assert headers["authorization"] == request.headers["Authorization"]
    assert headers["x-amz-date"] == "20261201T110000Z"
    assert headers.get("x-amz-security-token") == credentials.token
    assert "host" not in headers  # Envoy sets it


def test_verify_accepts_the_exact_request() -> None:
    headers = sigv4.sign(SESSION, "us-east-1", "bedrock", "POST", "bedrock.local:8443", PATH, BODY)
    got = sigv4.verify(SESSION, "us-east-1", "bedrock", "POST", PATH, received(headers), BODY)
    assert got.ok, got.reason


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"body": BODY + b" "}, "signature we calculated"),
        ({"path": PATH.replace("converse-stream", "converse")}, "signature we calculated"),
        ({"host": "other.local"}, "signature we calculated"),
        ({"method": "PUT"}, "signature we calculated"),
        ({"secret": "wrong"}, "signature we calculated"),
        ({"region": "eu-west-1"}, "Credential should be scoped to eu-west-1/bedrock"),
        ({"token": "stolen"}, "security token included in the request is invalid"),
        ({"drop": "x-amz-date"}, "x-amz-date does not match"),
        ({"drop": "authorization"}, "missing or malformed SigV4"),
    ],
)
def test_verify_refuses_any_change(change: dict, reason: str) -> None:
    headers = sigv4.sign(SESSION, "us-east-1", "bedrock", "POST", "bedrock.local:8443", PATH, BODY)
    got_headers = received(headers, change.get("host", "bedrock.local:8443"))
    got_headers.pop(change.get("drop", ""), None)
    if "token" in change:
        got_headers["x-amz-security-token"] = change["token"]
    secret = change.get("secret", SESSION.secret_key)
    verdict = sigv4.verify(
        ReadOnlyCredentials(SESSION.access_key, secret, SESSION.token),
        change.get("region", "us-east-1"),
        "bedrock",
        change.get("method", "POST"),
        change.get("path", PATH),
        got_headers,
        change.get("body", BODY),
    )
    assert not verdict.ok
    assert reason in verdict.reason


# -------------------------------------------------------------------- refresher


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_refresher_value_and_schedule() -> None:
    clock = FakeClock()
    refresher = Refresher("provider p (gcp)", lambda: Fetched("t", clock.now + 3600), clock=clock)
    with pytest.raises(CredentialsUnavailable, match="not fetched yet"):
        refresher.value()
    assert asyncio.run(refresher.refresh())
    assert refresher.value() == "t"
    assert refresher.next_delay() == 2700  # an hour's token: refreshed 15 minutes early
    refresher.current = Fetched("t", clock.now + 2)
    assert refresher.next_delay() == 1.5  # a short one: a quarter of its life early
    clock.now += 2
    with pytest.raises(CredentialsUnavailable, match="expired"):
        refresher.value()


def test_refresher_retries_failures_and_logs_why(caplog) -> None:
    answers: list = [OSError("token endpoint said 500"), OSError("again"), "tok-2"]
    calls: list[float] = []

    def fetch() -> Fetched:
        calls.append(1)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return Fetched(answer, None)

    async def run() -> str:
        refresher = Refresher("provider p (gcp)", fetch, min_wait_s=0.01)
        refresher.start()
        while refresher.current is None:
            await asyncio.sleep(0.01)
        refresher.close()
        return refresher.value()

    with caplog.at_level(logging.WARNING, "extproc.cloudauth"):
        assert asyncio.run(run()) == "tok-2"
    assert len(calls) == 3
    failures = [r.getMessage() for r in caplog.records if "refresh failed" in r.getMessage()]
    assert len(failures) == 2
    assert "no credentials yet: its requests get 503" in failures[0]
    assert "OSError: token endpoint said 500" in failures[0]


# -------------------------------------------------------------------- finalize


POLICY = """\
providers:
  bedrock:
    url: http://127.0.0.1:9
    format: bedrock
    auth: {type: aws_sigv4, region: us-east-1, access_key_id_env: GW_AK,
           secret_access_key_env: GW_SK}
routes:
  - {name: bedrock, prefix: /bedrock/, provider: bedrock, rewrite: /}
"""


def _ctx(config, path: str) -> RequestContext:
    route = config.routes[0]
    return RequestContext(
        route=route,
        provider=config.providers["bedrock"],
        format=format_for("bedrock"),
        method="POST",
        path=path,
        upstream_path=path,
        headers={},
    )


def test_finalize_signs_the_wire_path_and_body(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(POLICY)
    config = load_config(str(tmp_path / "p.yaml"))
    env = {"GW_AK": "AKIDGATEWAY", "GW_SK": "gateway-secret-key"}
    policy = build_policy(config, Shared(), env)
    ctx = _ctx(config, "/bedrock" + PATH)
    ctx.remove_headers.append("authorization")  # an earlier step's: the signature wins
    assert wire_path(ctx) == PATH  # the route's rewrite, still percent-encoded
    finalize(policy.cloud, ctx, BODY)
    assert "authorization" not in ctx.remove_headers
    verdict = sigv4.verify(
        KEYS, "us-east-1", "bedrock", "POST", PATH, received(ctx.upstream_headers, "127.0.0.1:9"),
        BODY,
    )  # fmt: skip
    assert verdict.ok, verdict.reason


def test_finalize_without_keys_is_503_and_says_why(tmp_path: Path, caplog) -> None:
    (tmp_path / "p.yaml").write_text(POLICY)
    config = load_config(str(tmp_path / "p.yaml"))
    with caplog.at_level(logging.WARNING):
        policy = build_policy(config, Shared(), {"GW_AK": "AKIDGATEWAY"})
        with pytest.raises(Refusal) as info:
            finalize(policy.cloud, _ctx(config, "/bedrock" + PATH), BODY)
    assert (info.value.status, info.value.code) == (503, "credentials_unavailable")
    assert info.value.headers == {"retry-after": "5"}
    assert "AWS keys not set: GW_SK" in caplog.text
    assert "AKIDGATEWAY" not in caplog.text  # a key id is read, never logged


def test_reload_keeps_a_refresher_and_stops_a_dropped_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role to ask
    policy_file = tmp_path / "p.yaml"
    chain = POLICY.replace(
        "access_key_id_env: GW_AK,\n           secret_access_key_env: GW_SK", "chain: true"
    )
    policy_file.write_text(chain)
    shared = Shared()

    async def run() -> None:
        first = build_policy(load_config(str(policy_file)), shared, {})
        (refresher,) = shared.cloud_auth.values()
        assert refresher.running  # started with the policy
        build_policy(load_config(str(policy_file)), shared, {})
        assert list(shared.cloud_auth.values()) == [refresher]  # the same, still running
        assert refresher.running
        policy_file.write_text(POLICY)  # static keys now: the chain's refresher stops
        build_policy(load_config(str(policy_file)), shared, {})
        await asyncio.sleep(0)
        assert not shared.cloud_auth
        assert not refresher.running
        assert first.cloud is not None
        policy_file.write_text(chain)  # and back: a new refresher, stopped at shutdown
        build_policy(load_config(str(policy_file)), shared, {})
        (again,) = shared.cloud_auth.values()
        assert again is not refresher and again.running
        await shared.aclose()
        await asyncio.sleep(0)
        assert not again.running

    asyncio.run(run())


def test_a_clients_own_sigv4_headers_are_stripped(tmp_path: Path) -> None:
    from extproc.policy import credentials

    (tmp_path / "p.yaml").write_text(POLICY)
    config = load_config(str(tmp_path / "p.yaml"))
    ctx = _ctx(config, "/bedrock" + PATH)
    client = sigv4.sign(
        ReadOnlyCredentials("AKIDCLIENT", "client-secret", "client-token"),
        "us-east-1", "bedrock", "POST", "localhost:8080", PATH, BODY,
    )  # fmt: skip
    ctx.headers.update({**client, "x-amz-content-sha256": "UNSIGNED-PAYLOAD"})
    credentials.apply(ctx, ctx.provider, ctx.format, None)
    assert set(ctx.remove_headers) >= {
        "authorization", "x-amz-date", "x-amz-security-token", "x-amz-content-sha256"
    }  # fmt: skip
    assert not ctx.upstream_headers  # the gateway's own come with the body (finalize)
