"""AWS Signature Version 4 over the exact request that goes upstream (botocore's signer).

Sans-I/O: `sign` takes credentials and the final request (method, host, path with its
query, body bytes) and gives the headers to set; `verify` recomputes a received
signature with the same signer (the mock Bedrock provider uses it). Only `host`,
`x-amz-date` and (with session credentials) `x-amz-security-token` are signed: the
headers the gateway sets itself, so nothing Envoy adds on the way (`x-forwarded-*`,
`x-request-id`) can break a signature. The body's SHA-256 is in the signature itself;
no `x-amz-content-sha256` header is sent, as botocore sends none for bedrock-runtime.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials

BEDROCK_SERVICE = "bedrock"  # the signing name of bedrock-runtime
SIGV4_TIMESTAMP = "%Y%m%dT%H%M%SZ"
_AUTH = re.compile(
    r"AWS4-HMAC-SHA256 Credential=(?P<key>[^/,\s]+)/(?P<date>\d{8})/(?P<region>[^/]+)/"
    r"(?P<service>[^/]+)/aws4_request,\s*SignedHeaders=(?P<signed>[a-z0-9;-]+),\s*"
    r"Signature=(?P<signature>[0-9a-f]{64})$"
)


class _Signer(SigV4Auth):
    """botocore's SigV4 with the timestamp given (not read from the clock), so a
    signature can be recomputed for a request signed earlier."""

    def __init__(self, credentials: ReadOnlyCredentials, service: str, region: str) -> None:
        super().__init__(credentials, service, region)

    def sign_at(self, request: AWSRequest, timestamp: str) -> str:
        request.context["timestamp"] = timestamp
        canonical = self.canonical_request(request)
        return self.signature(self.string_to_sign(request, canonical), request)


def _request(method: str, host: str, path: str, body: bytes, headers: Mapping[str, str]):
    # The scheme only decides botocore's payload hashing, which is always on here.
    return AWSRequest(method=method, url=f"http://{host}{path}", data=body, headers=dict(headers))


def sign(
    credentials: ReadOnlyCredentials,
    region: str,
    service: str,
    method: str,
    host: str,
    path: str,
    body: bytes,
    now: datetime | None = None,
) -> dict[str, str]:
    """The headers that authorize this request: `authorization`, `x-amz-date`, and
    `x-amz-security-token` for session credentials."""
    timestamp = (now or datetime.now(UTC)).strftime(SIGV4_TIMESTAMP)
    headers = {"host": host, "x-amz-date": timestamp}
    if credentials.token:
        headers["x-amz-security-token"] = credentials.token
    signer = _Signer(credentials, service, region)
    request = _request(method, host, path, body, headers)
    signature = signer.sign_at(request, timestamp)
    scope = f"{credentials.access_key}/{timestamp[:8]}/{region}/{service}/aws4_request"
    signed = ";".join(sorted(headers))
    del headers["host"]  # Envoy sets it (the provider's authority)
    headers["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={scope}, SignedHeaders={signed}, Signature={signature}"
    )
    return headers


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    reason: str = ""


def verify(
    credentials: ReadOnlyCredentials,
    region: str,
    service: str,
    method: str,
    path: str,
    headers: Mapping[str, str],
    body: bytes,
) -> Verdict:
    """Does `headers["authorization"]` sign exactly this request with `credentials`?
    `headers` are the received ones (lower-case names)."""
    match = _AUTH.match(headers.get("authorization", ""))
    if match is None:
        return Verdict(False, "missing or malformed SigV4 Authorization header")
    if match["key"] != credentials.access_key:
        return Verdict(False, "The security token included in the request is invalid.")
    if (match["region"], match["service"]) != (region, service):
        return Verdict(False, f"Credential should be scoped to {region}/{service}")
    timestamp = headers.get("x-amz-date", "")
    if timestamp[:8] != match["date"]:
        return Verdict(False, "x-amz-date does not match the credential scope's date")
    signed = match["signed"].split(";")
    if "host" not in signed:
        return Verdict(False, "the host header must be signed")
    missing = [name for name in signed if name not in headers]
    if missing:
        return Verdict(False, f"signed header {missing[0]} is missing")
    content_hash = headers.get("x-amz-content-sha256")
    if content_hash is not None and content_hash != hashlib.sha256(body).hexdigest():
        return Verdict(False, "x-amz-content-sha256 does not match the body")
    if credentials.token and headers.get("x-amz-security-token") != credentials.token:
        return Verdict(False, "The security token included in the request is invalid.")
    request = _request(method, headers["host"], path, body, {n: headers[n] for n in signed})
    expected = _Signer(credentials, service, region).sign_at(request, timestamp)
    if not hmac.compare_digest(expected, match["signature"]):
        return Verdict(
            False,
            "The request signature we calculated does not match the signature you provided. "
            "Check your AWS Secret Access Key and signing method.",
        )
    return Verdict(True)
