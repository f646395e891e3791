"""A provider's cloud credentials (`providers.NAME.auth`): AWS SigV4 for Bedrock, Google
OAuth tokens for Vertex AI, Entra ID tokens for Azure OpenAI.

One flat section with a `type`: which keys belong to which type is checked between
keys (as `jwt:` does for its sources), so a wrong key is named with the reason.
Secrets are never written here, only where they are read from (env names, files).
"""

from __future__ import annotations

from typing import Any

from extproc.config.base import Loc, Section, describe, fail, section
from extproc.config.types import Bool, EnvName, OptPath, OptStr, checked, choice, string, url

AUTH_TYPES = ("aws_sigv4", "gcp", "azure_entra")
# The wire format each credential type signs for.
AUTH_FORMATS = {"aws_sigv4": ("bedrock",), "gcp": ("vertex",), "azure_entra": ("azure",)}
AWS_STATIC = (
    "access_key_id_env",
    "access_key_id_file",
    "secret_access_key_env",
    "secret_access_key_file",
    "session_token_env",
    "session_token_file",
)
_KEYS = {
    "aws_sigv4": {"region", "service", "chain", "profile", *AWS_STATIC},
    "gcp": {"credentials_file", "adc", "scope"},
    "azure_entra": {
        "tenant_id",
        "client_id",
        "client_secret_env",
        "client_secret_file",
        "authority_host",
        "chain",
        "scope",
    },
}
GCP_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
AZURE_SCOPE = "https://cognitiveservices.azure.com/.default"
_https = url(("https",), "an https:// URL")


def _authority_host(value: Any) -> str:
    _https(value)
    return value


def _region(value: Any) -> str:
    if not all(c.isalnum() or c == "-" for c in string(value)):
        raise fail(f"expected an AWS region like 'us-east-1', got {describe(value)}")
    return value


@section
class CloudAuthConfig(Section):
    """Cloud credentials the gateway signs or authorizes upstream requests with
    ([providers.md](providers.md#cloud-credentials)); the client's own are removed."""

    type: choice(AUTH_TYPES, "auth type")
    """`aws_sigv4` (Bedrock), `gcp` (Vertex AI) or `azure_entra` (Azure OpenAI)."""
    region: checked(_region, str | None) = None
    """aws_sigv4: the region signed for (`us-east-1`); required."""
    service: OptStr = None
    """aws_sigv4: the signing name; unset: `bedrock` (what `bedrock-runtime` signs as)."""
    access_key_id_env: EnvName = None
    """aws_sigv4: a static access key id, from an environment variable."""
    access_key_id_file: OptPath = None
    """aws_sigv4: the same, from a file."""
    secret_access_key_env: EnvName = None
    """aws_sigv4: its secret access key, from an environment variable."""
    secret_access_key_file: OptPath = None
    """aws_sigv4: the same, from a file."""
    session_token_env: EnvName = None
    """aws_sigv4: a session token for temporary keys (sent as `x-amz-security-token`)."""
    session_token_file: OptPath = None
    """aws_sigv4: the same, from a file."""
    profile: OptStr = None
    """aws_sigv4 with `chain`: the shared-config profile; unset: the default chain's."""
    chain: Bool = False
    """aws_sigv4: botocore's default chain (env, shared files, container or instance
    role), refreshed in the background. azure_entra: `DefaultAzureCredential`
    (environment, workload identity, managed identity)."""
    credentials_file: OptPath = None
    """gcp: a service-account key file (or any google-auth credentials file)."""
    adc: Bool = False
    """gcp: Application Default Credentials (`GOOGLE_APPLICATION_CREDENTIALS`, gcloud,
    the metadata server)."""
    scope: OptStr = None
    """gcp, azure_entra: the OAuth scope; unset: cloud-platform /
    `https://cognitiveservices.azure.com/.default`."""
    tenant_id: OptStr = None
    """azure_entra: the directory (tenant) of the app registration (with `chain`: of the
    workload identity)."""
    client_id: OptStr = None
    """azure_entra: the app registration's client id (with `chain`: a user-assigned
    managed identity's or the workload identity's)."""
    client_secret_env: EnvName = None
    """azure_entra: its client secret, from an environment variable."""
    client_secret_file: OptPath = None
    """azure_entra: the same, from a file."""
    authority_host: checked(_authority_host, str | None) = None
    """azure_entra: the Entra ID host (sovereign clouds); unset: login.microsoftonline.com."""

    @classmethod
    def checks(cls, raw: dict[str, Any], refused: set[Any]) -> list[tuple[Loc, str]]:
        kind = raw.get("type")
        if kind not in AUTH_TYPES or "type" in refused:
            return []  # the type itself is reported
        found: list[tuple[Loc, str]] = []
        for key in raw:
            if key != "type" and key not in _KEYS[kind]:
                owners = [t for t, keys in _KEYS.items() if key in keys]
                if owners:
                    found.append(((key,), f"only meaningful for type {' or '.join(owners)}"))
        for stem in ("access_key_id", "secret_access_key", "session_token", "client_secret"):
            if {f"{stem}_env", f"{stem}_file"} <= raw.keys():
                found.append(((), f"set {stem}_env or {stem}_file, not both"))
        chain = raw.get("chain") is True
        if kind == "aws_sigv4":
            if "region" not in raw:
                found.append((("region",), "required key is missing"))
            has_id = "access_key_id_env" in raw or "access_key_id_file" in raw
            has_secret = "secret_access_key_env" in raw or "secret_access_key_file" in raw
            static = [k for k in AWS_STATIC if k in raw]
            if chain and static:
                found.append(((), "set static keys or chain: true, not both"))
            elif not chain and not static:
                found.append(((), "set access_key_id_env and secret_access_key_env (or _file), "
                                   "or chain: true"))  # fmt: skip
            elif static and not (has_id and has_secret):
                missing = "secret_access_key" if has_id else "access_key_id"
                found.append(((), f"static keys need {missing}_env or {missing}_file too"))
            if "profile" in raw and not chain:
                found.append((("profile",), "only meaningful with chain: true"))
        elif kind == "gcp":
            adc = raw.get("adc") is True
            if adc == ("credentials_file" in raw):
                found.append(((), "set credentials_file or adc: true (one of them)"))
        else:
            secret = "client_secret_env" in raw or "client_secret_file" in raw
            if chain == secret:
                found.append(((), "set client_secret_env (or _file) or chain: true (one of them)"))
            if secret:
                found += [((k,), "required with a client secret") for k in
                          ("tenant_id", "client_id") if k not in raw]  # fmt: skip
        return found


def provider_checks(raw: dict[str, Any], refused: set[Any]) -> list[tuple[Loc, str]]:
    """Between a provider's keys: `auth` replaces a static key, and fits the format."""
    auth = raw.get("auth")
    if not isinstance(auth, dict) or "auth" in refused:
        return []
    found: list[tuple[Loc, str]] = []
    static = [k for k in ("api_key_env", "api_key_file") if k in raw]
    if static:
        found.append(((), f"set auth or {static[0]}, not both"))
    formats = AUTH_FORMATS.get(auth.get("type"), ())
    fmt = raw.get("format", "openai")
    if formats and fmt not in formats and "format" not in refused:
        found.append((("auth", "type"), f"{auth['type']} needs format: {formats[0]} (got {fmt})"))
    return found
