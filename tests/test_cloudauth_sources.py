"""The SDK fetches behind each refresher, against local stand-ins (the network is
closed): botocore's chain with a `credential_process` profile (refreshable keys with
an expiry), google-auth with a generated service-account key and a local token
endpoint, azure-identity against a local Entra ID endpoint over TLS."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import sys
from pathlib import Path

import botocore.credentials
import pytest

from extproc.cloudauth import CredentialsUnavailable, Refresher, sigv4, sources
from extproc.config import load_config
from extproc.config.cloud import CloudAuthConfig
from extproc.policy import RequestContext, Shared, build_policy
from extproc.policy.credentials import finalize
from extproc.providers import format_for
from tests.token_server import TokenServer

PROCESS = """\
import datetime, json, pathlib, sys
counter = pathlib.Path(sys.argv[1])
n = int(counter.read_text()) + 1 if counter.exists() else 1
counter.write_text(str(n))
expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=20)
print(json.dumps({"Version": 1, "AccessKeyId": f"ASIAROLE{n}",
                  "SecretAccessKey": f"role-secret-{n}", "SessionToken": f"role-session-{n}",
                  "Expiration": expires.isoformat()}))
"""


@pytest.fixture
def aws_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A shared config whose profile `gw` gets keys from a process (as a role does:
    temporary keys with an expiry), counting its runs."""
    script, counter = tmp_path / "creds.py", tmp_path / "runs"
    script.write_text(PROCESS)
    config = tmp_path / "aws_config"
    config.write_text(f"[profile gw]\ncredential_process = {sys.executable} {script} {counter}\n")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return counter


def test_aws_chain_keys_expire_and_are_renewed_in_the_fetch(
    aws_profile: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    auth = CloudAuthConfig(type="aws_sigv4", region="us-east-1", chain=True, profile="gw")
    refresher = Refresher("provider b (aws_sigv4)", sources.aws_chain_fetch(auth))
    assert asyncio.run(refresher.refresh())
    first = refresher.value()
    assert (first.access_key, first.token) == ("ASIAROLE1", "role-session-1")
    expires = refresher.current.expires_at
    left = expires - dt.datetime.now(dt.UTC).timestamp()
    assert 1100 < left <= 1200  # the process's Expiration, 20 minutes out
    assert refresher.next_delay() == pytest.approx(left - 300, abs=5)  # 5 min before
    # Ten minutes on, inside botocore's refresh window: the background fetch renews them.
    monkeypatch.setattr(
        botocore.credentials.RefreshableCredentials, "_seconds_remaining", lambda self: 600
    )
    assert asyncio.run(refresher.refresh())
    assert refresher.value().access_key == "ASIAROLE2"
    assert aws_profile.read_text() == "2"


def test_aws_chain_signs_without_running_the_chain_per_request(
    aws_profile: Path, tmp_path: Path
) -> None:
    (tmp_path / "p.yaml").write_text(
        "providers:\n  b: {url: 'http://127.0.0.1:9', format: bedrock,\n"
        "      auth: {type: aws_sigv4, region: us-east-1, chain: true, profile: gw}}\n"
        "routes:\n  - {name: b, prefix: /b/, provider: b, rewrite: /}\n"
    )
    config = load_config(str(tmp_path / "p.yaml"))
    path = "/model/m/converse"

    async def run() -> list[dict[str, str]]:
        policy = build_policy(config, Shared(), {})  # starts the refresher (a loop runs)
        while not aws_profile.exists():
            await asyncio.sleep(0.01)
        while policy.cloud.get("b").source.current is None:
            await asyncio.sleep(0.01)
        out = []
        for _ in range(3):
            ctx = RequestContext(
                route=config.routes[0], provider=config.providers["b"],
                format=format_for("bedrock"), method="POST", path="/b" + path,
                upstream_path=path, headers={},
            )  # fmt: skip
            finalize(policy.cloud, ctx, b"{}")
            out.append(ctx.upstream_headers)
        policy.cloud.get("b").source.close()
        return out

    signed = asyncio.run(run())
    assert aws_profile.read_text() == "1"  # three requests, one run of the process
    keys = botocore.credentials.ReadOnlyCredentials("ASIAROLE1", "role-secret-1", "role-session-1")
    for headers in signed:
        seen = {**headers, "host": "127.0.0.1:9"}
        verdict = sigv4.verify(keys, "us-east-1", "bedrock", "POST", path, seen, b"{}")
        assert verdict.ok, verdict.reason


def test_aws_chain_with_nothing_found_says_so(aws_profile: Path) -> None:
    # The default profile: no keys in env or files, no instance role to ask.
    auth = CloudAuthConfig(type="aws_sigv4", region="us-east-1", chain=True)
    refresher = Refresher("provider b (aws_sigv4)", sources.aws_chain_fetch(auth))
    assert not asyncio.run(refresher.refresh())
    with pytest.raises(CredentialsUnavailable, match=r"NoCredentials: no AWS credentials in"):
        refresher.value()


def test_google_token_from_a_generated_service_account(tmp_path: Path) -> None:
    server = TokenServer(tmp_path)
    try:
        key_file = server.google(tmp_path, "sa", [("ya29.first", 3600)])
        auth = CloudAuthConfig(type="gcp", credentials_file=str(key_file))
        fetched = sources.google_fetch(auth)()
        assert fetched.value == "ya29.first"  # the endpoint checked the assertion's RS256
        assert fetched.expires_at - dt.datetime.now(dt.UTC).timestamp() > 3500
        # A key the endpoint does not know: google-auth's RefreshError, with the reason.
        other = server.google(tmp_path, "other", [("never", 3600)])
        server.public_keys["other"] = server.public_keys["sa"]
        refresher = Refresher("provider v (gcp)", sources.google_fetch(
            CloudAuthConfig(type="gcp", credentials_file=str(other))))  # fmt: skip
        assert not asyncio.run(refresher.refresh())
        assert "RefreshError" in refresher.last_error and "Invalid JWT" in refresher.last_error
    finally:
        server.close()


def test_azure_entra_token_and_a_wrong_secret(tmp_path: Path, monkeypatch, caplog) -> None:
    server = TokenServer(tmp_path, tls=True)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(server.ca))
    try:
        server.entra("tenant-a", "right-secret-value", [("azure-tok", 3600)])
        auth = CloudAuthConfig(
            type="azure_entra", tenant_id="tenant-a", client_id="app",
            client_secret_env="S", authority_host=server.url,
        )  # fmt: skip
        refresher = Refresher("provider a (azure_entra)", sources.azure_fetch(auth, "wrong-one"))
        with caplog.at_level(logging.DEBUG):
            fetched = sources.azure_fetch(auth, "right-secret-value")()
            assert fetched.value == "azure-tok"
            assert fetched.expires_at - dt.datetime.now(dt.UTC).timestamp() > 3500
            assert not asyncio.run(refresher.refresh())
            refresher._log_failure(1, 1.0)
        assert "AADSTS7000215" in refresher.last_error
        assert "provider a (azure_entra): credentials refresh failed" in caplog.text
        assert "wrong-one" not in caplog.text and "right-secret-value" not in caplog.text
        assert "azure-tok" not in caplog.text  # the SDK's own DEBUG lines are held back
    finally:
        server.close()


def test_service_account_file_content_is_part_of_the_refreshers_identity(
    tmp_path: Path,
) -> None:
    key = tmp_path / "sa.json"
    key.write_text(json.dumps({"type": "service_account"}))
    (tmp_path / "p.yaml").write_text(
        "providers:\n  v: {url: 'http://127.0.0.1:9', format: vertex,\n"
        f"      auth: {{type: gcp, credentials_file: {key}}}}}\n"
        "routes:\n  - {name: v, prefix: /v/, provider: v, rewrite: /}\n"
    )
    shared = Shared()
    build_policy(load_config(str(tmp_path / "p.yaml")), shared, {})
    (before,) = shared.cloud_auth.values()
    build_policy(load_config(str(tmp_path / "p.yaml")), shared, {})
    assert list(shared.cloud_auth.values()) == [before]  # same file: same token
    key.write_text(json.dumps({"type": "service_account", "rotated": True}))
    build_policy(load_config(str(tmp_path / "p.yaml")), shared, {})
    (after,) = shared.cloud_auth.values()
    assert after is not before  # a rotated key: a new refresher, the old one dropped
