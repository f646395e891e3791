"""Provider `auth:` blocks (cloud credentials): the valid shapes load, and every
mistake is refused at start with the file, the key path and a reason."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from extproc.config import ConfigError, load_config

ROUTES = """\
routes:
  - {name: r, prefix: /r/, provider: p, rewrite: /}
"""


def load(tmp_path: Path, provider: str):
    path = tmp_path / "policy.yaml"
    body = textwrap.indent(textwrap.dedent(provider), "    ")
    path.write_text(f"providers:\n  p:\n{body.rstrip()}\n{ROUTES}")
    return str(path), lambda: load_config(str(path))


def problems(tmp_path: Path, provider: str) -> list[tuple[str, str]]:
    path, run = load(tmp_path, provider)
    with pytest.raises(ConfigError) as info:
        run()
    assert info.value.path == path
    return info.value.problems


@pytest.mark.parametrize(
    ("provider", "expected"),
    [
        (
            """\
            url: https://bedrock-runtime.us-east-1.amazonaws.com
            format: bedrock
            auth: {type: aws_sigv4, region: us-east-1, access_key_id_env: AK,
                   secret_access_key_env: SK, session_token_env: ST}
            """,
            ("aws_sigv4", "us-east-1", "AK", "SK", "ST", False),
        ),
        (
            """\
            url: https://bedrock-runtime.eu-west-1.amazonaws.com
            format: bedrock
            auth: {type: aws_sigv4, region: eu-west-1, chain: true}
            """,
            ("aws_sigv4", "eu-west-1", None, None, None, True),
        ),
    ],
)
def test_aws_shapes_load(tmp_path: Path, provider: str, expected: tuple) -> None:
    _, run = load(tmp_path, provider)
    auth = run().providers["p"].auth
    got = (auth.type, auth.region, auth.access_key_id_env, auth.secret_access_key_env,
           auth.session_token_env, auth.chain)  # fmt: skip
    assert got == expected


def test_gcp_and_azure_shapes_load(tmp_path: Path) -> None:
    _, run = load(
        tmp_path,
        """\
        url: https://us-central1-aiplatform.googleapis.com
        format: vertex
        auth: {type: gcp, credentials_file: /secrets/sa.json}
        """,
    )
    auth = run().providers["p"].auth
    assert (auth.type, auth.credentials_file, auth.adc) == ("gcp", "/secrets/sa.json", False)
    _, run = load(
        tmp_path,
        """\
        url: https://my.openai.azure.com
        format: azure
        auth: {type: azure_entra, tenant_id: t, client_id: c, client_secret_env: AZ_SECRET}
        """,
    )
    auth = run().providers["p"].auth
    assert (auth.tenant_id, auth.client_id, auth.client_secret_env) == ("t", "c", "AZ_SECRET")


BEDROCK = "url: http://127.0.0.1:9000\nformat: bedrock\n"


@pytest.mark.parametrize(
    ("provider", "key", "reason"),
    [
        (BEDROCK + "auth: {type: aws, region: us-east-1, chain: true}", "providers.p.auth.type",
         "unknown auth type 'aws' (known: aws_sigv4, gcp, azure_entra)"),
        (BEDROCK + "auth: {type: aws_sigv4, chain: true}", "providers.p.auth.region",
         "required key is missing"),
        (BEDROCK + "auth: {type: aws_sigv4, region: 'us east', chain: true}",
         "providers.p.auth.region", "expected an AWS region like 'us-east-1', got 'us east'"),
        (BEDROCK + "auth: {type: aws_sigv4, region: us-east-1}", "providers.p.auth",
         "set access_key_id_env and secret_access_key_env (or _file), or chain: true"),
        (BEDROCK + "auth: {type: aws_sigv4, region: us-east-1, access_key_id_env: AK}",
         "providers.p.auth",
         "static keys need secret_access_key_env or secret_access_key_file too"),
        (BEDROCK + "auth: {type: aws_sigv4, region: us-east-1, session_token_env: T}",
         "providers.p.auth",
         "static keys need access_key_id_env or access_key_id_file too"),
        (BEDROCK + "auth: {type: aws_sigv4, region: us-east-1, chain: true, access_key_id_env: A}",
         "providers.p.auth", "set static keys or chain: true, not both"),
        (BEDROCK + "auth: {type: aws_sigv4, region: us-east-1, chain: true, adc: true}",
         "providers.p.auth.adc", "only meaningful for type gcp"),
        (BEDROCK + "auth: {type: aws_sigv4, region: us-east-1, chain: true, regoin: x}",
         "providers.p.auth.regoin", "unknown key 'regoin' (did you mean 'region'?)"),
        (BEDROCK + "auth: {type: aws_sigv4, region: us-east-1, chain: 'yes'}",
         "providers.p.auth.chain", "expected true or false, got 'yes'"),
        (BEDROCK + "auth: {type: aws_sigv4, region: us-east-1, access_key_id_env: A, "
         "secret_access_key_env: S, secret_access_key_file: /s}", "providers.p.auth",
         "set secret_access_key_env or secret_access_key_file, not both"),
        (BEDROCK + "api_key_env: K\nauth: {type: aws_sigv4, region: us-east-1, chain: true}",
         "providers.p", "set auth or api_key_env, not both"),
        ("url: http://127.0.0.1:9000\nformat: openai\n"
         "auth: {type: aws_sigv4, region: us-east-1, chain: true}",
         "providers.p.auth.type", "aws_sigv4 needs format: bedrock (got openai)"),
        ("url: http://h\nformat: vertex\nauth: {type: gcp}", "providers.p.auth",
         "set credentials_file or adc: true (one of them)"),
        ("url: http://h\nformat: vertex\nauth: {type: gcp, adc: true, credentials_file: /k}",
         "providers.p.auth", "set credentials_file or adc: true (one of them)"),
        ("url: http://h\nformat: vertex\nauth: {type: gcp, credentials_file: sa.json}",
         "providers.p.auth.credentials_file", "expected an absolute file path, got 'sa.json'"),
        ("url: http://h\nformat: gemini\nauth: {type: gcp, adc: true}",
         "providers.p.auth.type", "gcp needs format: vertex (got gemini)"),
        ("url: http://h\nformat: azure\nauth: {type: azure_entra, client_secret_env: S}",
         "providers.p.auth.tenant_id", "required with a client secret"),
        ("url: http://h\nformat: azure\nauth: {type: azure_entra}", "providers.p.auth",
         "set client_secret_env (or _file) or chain: true (one of them)"),
        ("url: http://h\nformat: azure\nauth: {type: azure_entra, chain: true, "
         "authority_host: http://login.example}", "providers.p.auth.authority_host",
         "expected an https:// URL, got 'http://login.example'"),
        ("url: http://h\nformat: azure\nauth: {type: azure_entra, chain: true, region: x}",
         "providers.p.auth.region", "only meaningful for type aws_sigv4"),
    ],
)  # fmt: skip
def test_bad_auth_names_key_and_reason(tmp_path: Path, provider: str, key: str, reason: str):
    assert (key, reason) in problems(tmp_path, provider)


def test_auth_files_are_watched_for_rotation(tmp_path: Path) -> None:
    from extproc.reload import referenced_files

    _, run = load(
        tmp_path,
        """\
        url: https://my.openai.azure.com
        format: azure
        auth: {type: azure_entra, tenant_id: t, client_id: c, client_secret_file: /s/az}
        """,
    )
    assert "/s/az" in referenced_files(run())  # a rotated secret reloads the policy
