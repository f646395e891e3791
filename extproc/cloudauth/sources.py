"""The blocking fetches behind each `Refresher`, one per SDK: google-auth (service
account key or ADC), azure-identity (client secret or DefaultAzureCredential),
botocore's default credential chain. Each returns a `Fetched`; the SDKs are imported
only when a policy uses them. Every network call has a timeout: a fetch runs in a
thread that must end."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from datetime import UTC
from typing import Any

from extproc.cloudauth.refresher import Fetched
from extproc.config.cloud import AZURE_SCOPE, GCP_SCOPE, CloudAuthConfig

FETCH_TIMEOUT_S = 10.0


class NoCredentials(Exception):
    """A chain found nothing to use (no env, file, role...)."""


def google_fetch(auth: CloudAuthConfig) -> Callable[[], Fetched]:
    """An access token for a service-account key file or ADC, scope cloud-platform."""
    scopes = [auth.scope or GCP_SCOPE]
    made: list[Any] = []

    def fetch() -> Fetched:
        import google.auth
        from google.auth.transport.requests import Request
        from google.oauth2 import service_account

        if not made:  # reading the file or finding ADC is blocking too: here, once
            if auth.credentials_file:
                made.append(_google_file(auth.credentials_file, scopes, service_account))
            else:
                made.append(google.auth.default(scopes=scopes)[0])
        credentials = made[0]
        credentials.refresh(functools.partial(Request(), timeout=FETCH_TIMEOUT_S))
        expiry = credentials.expiry  # naive UTC (google-auth's convention)
        expires = expiry.replace(tzinfo=UTC).timestamp() if expiry is not None else None
        return Fetched(credentials.token, expires)

    return fetch


def _google_file(path: str, scopes: list[str], service_account: Any) -> Any:
    import json

    import google.auth

    with open(path, encoding="utf-8") as f:
        info = json.load(f)
    if info.get("type") == "service_account":
        return service_account.Credentials.from_service_account_info(info, scopes=scopes)
    return google.auth.load_credentials_from_dict(info, scopes=scopes)[0]  # user, external


def azure_fetch(auth: CloudAuthConfig, secret: str | None) -> Callable[[], Fetched]:
    """An Entra ID token for Azure OpenAI (scope cognitiveservices .default)."""
    scope = auth.scope or AZURE_SCOPE
    made: list[Any] = []

    def fetch() -> Fetched:
        from azure.identity import ClientSecretCredential, DefaultAzureCredential

        if not made:
            extra: dict[str, Any] = {"connection_timeout": FETCH_TIMEOUT_S, "retry_total": 1}
            if auth.authority_host:  # trusted as configured: no discovery on the public cloud
                extra["authority"] = auth.authority_host
                extra["disable_instance_discovery"] = True
            if secret is not None:
                assert auth.tenant_id and auth.client_id
                made.append(ClientSecretCredential(auth.tenant_id, auth.client_id, secret, **extra))
            else:
                if auth.client_id:  # a user-assigned managed identity, or workload identity's
                    extra["managed_identity_client_id"] = auth.client_id
                if auth.tenant_id:
                    extra["workload_identity_tenant_id"] = auth.tenant_id
                made.append(DefaultAzureCredential(**extra))
        token = made[0].get_token(scope)
        return Fetched(token.token, float(token.expires_on))

    return fetch


def aws_chain_fetch(auth: CloudAuthConfig) -> Callable[[], Fetched]:
    """Frozen keys from botocore's default chain; refreshable ones (roles) carry their
    expiry, and botocore renews them inside `get_frozen_credentials` (in this thread)."""
    made: list[Any] = []

    def fetch() -> Fetched:
        import botocore.session
        from botocore.credentials import RefreshableCredentials

        if not made or not isinstance(made[0], RefreshableCredentials):
            # Static keys (env, shared files) are looked up again: a rotated file counts.
            session = botocore.session.Session(profile=auth.profile)
            made[:] = [session.get_credentials()]
        credentials = made[0]
        if credentials is None:
            raise NoCredentials(
                "no AWS credentials in botocore's chain (environment, shared files, "
                "container or instance role)"
            )
        frozen = credentials.get_frozen_credentials()
        expiry = getattr(credentials, "_expiry_time", None)
        return Fetched(frozen, expiry.timestamp() if expiry is not None else None)

    return fetch


def read_secret(env: str | None, path: str | None, environ: Mapping[str, str]) -> str | None:
    """A secret from the environment or a file (None when unset or unreadable)."""
    if env:
        return environ.get(env) or None
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                return f.read().strip() or None
        except OSError:
            return None
    return None
