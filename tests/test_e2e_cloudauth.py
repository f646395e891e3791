"""Cloud credentials through the real Envoy: the gateway signs Bedrock requests with
SigV4 (the mock recomputes the signature with botocore over the bytes it received),
and sets background-refreshed Google (Vertex) and Entra ID (Azure) tokens, fetched
from a local token endpoint. Client credentials never reach the provider; secrets and
tokens never reach the sidecar's log."""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Iterator

import boto3
import botocore.exceptions
import httpx
import pytest
import yaml

from tests.conftest import Stack, metric, mock_exchange, wait_for, write_config
from tests.token_server import TokenServer

GW_KEY_ID, GW_SECRET, GW_TOKEN = "AKIDGATEWAYE2E", "gateway-e2e-secret", "gateway-session-tok"
AZURE_SECRET = "azure-client-secret-e2e"
MODEL = "amazon.nova-lite-v1:0"
VERTEX_PATH = (
    "/v1/projects/gateway-test/locations/us-central1/publishers/google/models/"
    "gemini-2.5-flash:generateContent"
)
GEMINI_BODY = {"contents": [{"role": "user", "parts": [{"text": "hello"}]}]}
SECRETS = (GW_SECRET, GW_TOKEN, AZURE_SECRET, "PRIVATE KEY", "vertex-token-", "azure-token-")


class Cloud:
    def __init__(self, stack: Stack, google: TokenServer, entra: TokenServer) -> None:
        self.stack, self.google, self.entra = stack, google, entra


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    directory = tmp_path_factory.mktemp("cloudauth")
    google = TokenServer(directory)
    entra = TokenServer(directory, tls=True)
    # The first token lives 2 s, so the refresher must fetch a second one on its own.
    sa_file = google.google(directory, "vertex", [("vertex-token-1", 2), ("vertex-token-2", 3600)])
    down_file = google.google(directory, "down", [("vertex-down-token", 3600)])
    google.failing.add("down")  # until a test lets it answer
    entra.entra("tenant-e2e", AZURE_SECRET, [("azure-token-1", 3600)])
    path = write_config(directory)
    config = yaml.safe_load(path.read_text())
    mock = config["providers"]["mock"]["url"]
    sigv4 = {"type": "aws_sigv4", "region": "us-east-1", "access_key_id_env": "GW_AK",
             "secret_access_key_env": "GW_SK", "session_token_env": "GW_ST"}  # fmt: skip
    config["providers"].update(
        cb={"url": mock, "format": "bedrock", "auth": sigv4},
        cb_bad={"url": mock, "format": "bedrock",
                "auth": {**sigv4, "secret_access_key_env": "GW_BAD"}},
        cv={"url": mock, "format": "vertex",
            "auth": {"type": "gcp", "credentials_file": str(sa_file)}},
        cv_down={"url": mock, "format": "vertex",
                 "auth": {"type": "gcp", "credentials_file": str(down_file)}},
        ca={"url": mock, "format": "azure",
            "auth": {"type": "azure_entra", "tenant_id": "tenant-e2e", "client_id": "gw-app",
                     "client_secret_env": "GW_AZ", "authority_host": entra.url}},
        ca_none={"url": mock, "format": "azure",
                 "auth": {"type": "azure_entra", "tenant_id": "tenant-e2e", "client_id": "gw-app",
                          "client_secret_env": "GW_AZ_UNSET", "authority_host": entra.url}},
    )  # fmt: skip
    config["routes"] = [
        {"name": name, "prefix": f"/{name}/", "provider": name, "rewrite": "/", "auth": "off"}
        for name in ("cb", "cb_bad", "cv", "cv_down", "ca", "ca_none")
    ]
    config.pop("models", None)
    # A request guard that rewrites the body: the signature must cover the new bytes.
    falcon = {"name": "falcon", "keywords": ["project falcon"], "action": "mask",
              "phases": ["request"], "routes": ["cb"]}  # fmt: skip
    config["guards"] = {"rules": [falcon]}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {
        "GW_AK": GW_KEY_ID, "GW_SK": GW_SECRET, "GW_ST": GW_TOKEN, "GW_BAD": "not-the-secret",
        "GW_AZ": AZURE_SECRET, "REQUESTS_CA_BUNDLE": str(entra.ca),
        # The mock accepts Bedrock requests signed with these keys only.
        "MOCK_AWS_ACCESS_KEY_ID": GW_KEY_ID, "MOCK_AWS_SECRET_ACCESS_KEY": GW_SECRET,
        "MOCK_AWS_SESSION_TOKEN": GW_TOKEN,
    }  # fmt: skip
    stack = Stack(path, directory, env=env)
    stack.start()
    try:
        yield Cloud(stack, google, entra)
    finally:
        stack.stop()
        google.close()
        entra.close()


def bedrock(cloud: Cloud, route: str, request_id: str):
    """boto3 with FAKE client credentials (it signs with them; the gateway must not)."""
    client = boto3.client(
        "bedrock-runtime",
        region_name="us-east-1",
        endpoint_url=f"{cloud.stack.base_url}/{route}",
        aws_access_key_id="AKIDCLIENTFAKE",
        aws_secret_access_key="client-fake-secret",
        aws_session_token="client-fake-session",
    )
    client.meta.events.register(
        "before-send.bedrock-runtime.*",
        lambda request, **_: request.headers.update({"x-mock-request-id": request_id}),
    )
    return client


MESSAGES = [{"role": "user", "content": [{"text": "hello there"}]}]


def assert_gateway_signed(cloud: Cloud, request_id: str) -> None:
    seen = mock_exchange(cloud.stack, request_id)["headers"]
    assert seen["authorization"].startswith(f"AWS4-HMAC-SHA256 Credential={GW_KEY_ID}/")
    assert seen["x-amz-security-token"] == GW_TOKEN  # never the client's
    assert "client-fake" not in str(seen) and "AKIDCLIENTFAKE" not in str(seen)


def test_converse_is_re_signed_by_the_gateway(cloud: Cloud) -> None:
    request_id = str(uuid.uuid4())
    answer = bedrock(cloud, "cb", request_id).converse(modelId=MODEL, messages=MESSAGES)
    assert answer["output"]["message"]["content"][0]["text"]
    assert answer["usage"]["outputTokens"] > 0
    assert_gateway_signed(cloud, request_id)


def test_converse_stream_is_re_signed_by_the_gateway(cloud: Cloud) -> None:
    request_id = str(uuid.uuid4())
    answer = bedrock(cloud, "cb", request_id).converse_stream(modelId=MODEL, messages=MESSAGES)
    events = list(answer["stream"])
    text = "".join(
        e["contentBlockDelta"]["delta"].get("text", "") for e in events if "contentBlockDelta" in e
    )
    assert text and events[-1]["metadata"]["usage"]["outputTokens"] > 0
    assert_gateway_signed(cloud, request_id)


def test_the_signature_covers_the_body_a_guard_rewrote(cloud: Cloud) -> None:
    request_id = str(uuid.uuid4())
    secret = [{"role": "user", "content": [{"text": "tell me about project falcon"}]}]
    answer = bedrock(cloud, "cb", request_id).converse(modelId=MODEL, messages=secret)
    assert answer["usage"]["outputTokens"] > 0  # the mock verified the signature
    seen = mock_exchange(cloud.stack, request_id)
    body = base64.b64decode(seen["body_b64"])
    assert b"project falcon" not in body and b"<KEYWORD>" in body
    assert_gateway_signed(cloud, request_id)


def test_a_wrong_gateway_secret_gets_the_providers_403(cloud: Cloud) -> None:
    with pytest.raises(botocore.exceptions.ClientError) as info:
        bedrock(cloud, "cb_bad", str(uuid.uuid4())).converse(modelId=MODEL, messages=MESSAGES)
    error = info.value.response
    assert error["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert error["Error"]["Code"] == "InvalidSignatureException"
    assert "signature we calculated does not match" in error["Error"]["Message"]


def test_vertex_gets_the_refreshed_token(cloud: Cloud) -> None:
    # The 2 s token is replaced in the background, before it expires: no request waits.
    assert wait_for(lambda: cloud.google.calls.get("vertex", 0) >= 2, timeout=20)
    assert cloud.google.served["vertex"][:2] == ["vertex-token-1", "vertex-token-2"]
    request_id = str(uuid.uuid4())
    response = httpx.post(
        f"{cloud.stack.base_url}/cv{VERTEX_PATH}",
        json=GEMINI_BODY,
        headers={"authorization": "Bearer client-own-key", "x-mock-request-id": request_id},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert mock_exchange(cloud.stack, request_id)["headers"]["authorization"] == (
        "Bearer vertex-token-2"
    )
    refreshes = "ai_gateway_cloud_credentials_refresh_total"
    assert metric(cloud.stack, refreshes, provider="cv", result="ok") >= 2
    expiry = "ai_gateway_cloud_credentials_expiry_timestamp_seconds"
    assert metric(cloud.stack, expiry, provider="cv") > time.time() + 3000  # the hour token


def test_no_token_yet_is_503_then_the_retry_recovers(cloud: Cloud) -> None:
    failed = "provider cv_down (gcp): credentials refresh failed"
    assert wait_for(lambda: failed in cloud.stack.log("sidecar"), timeout=30)
    url = f"{cloud.stack.base_url}/cv_down{VERTEX_PATH}"
    refused = httpx.post(url, json=GEMINI_BODY, timeout=30)
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "5"
    error = refused.json()["error"]  # in the route's own (Gemini) error shape
    assert error["status"] == "UNAVAILABLE"
    assert error["details"][0]["reason"] == "credentials_unavailable"
    assert "no credentials for provider 'cv_down'" in error["message"]
    log = cloud.stack.log("sidecar")
    assert "no credentials yet: its requests get 503" in log
    assert "internal_failure" in log  # the endpoint's own answer, as the reason
    assert "provider cv_down: request refused with 503, no credentials: RefreshError" in log
    refreshes = "ai_gateway_cloud_credentials_refresh_total"
    assert metric(cloud.stack, refreshes, provider="cv_down", result="error") >= 1
    assert metric(cloud.stack, "ai_gateway_errors_total", kind="credentials_unavailable") >= 1
    calls = cloud.google.calls["down"]
    cloud.google.failing.discard("down")
    assert wait_for(lambda: cloud.google.served.get("down"), timeout=40)
    assert cloud.google.calls["down"] > calls  # retried on its own
    request_id = str(uuid.uuid4())
    ok = httpx.post(url, json=GEMINI_BODY, headers={"x-mock-request-id": request_id}, timeout=30)
    assert ok.status_code == 200, ok.text
    seen = mock_exchange(cloud.stack, request_id)["headers"]["authorization"]
    assert seen == "Bearer vertex-down-token"


def test_azure_gets_an_entra_token(cloud: Cloud) -> None:
    request_id = str(uuid.uuid4())
    response = httpx.post(
        f"{cloud.stack.base_url}/ca/openai/deployments/gpt-4o-mini/chat/completions"
        "?api-version=2024-10-21",
        json={"messages": [{"role": "user", "content": "hi"}]},
        headers={"api-key": "client-own-azure-key", "x-mock-request-id": request_id},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    seen = mock_exchange(cloud.stack, request_id)["headers"]
    assert seen["authorization"] == "Bearer azure-token-1"
    assert "api-key" not in seen  # the client's key never goes upstream
    assert cloud.entra.calls["tenant-e2e"] == 1


def test_an_unset_secret_is_503_in_openai_shape(cloud: Cloud) -> None:
    response = httpx.post(
        f"{cloud.stack.base_url}/ca_none/openai/deployments/gpt-4o-mini/chat/completions"
        "?api-version=2024-10-21",
        json={"messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "credentials_unavailable"
    assert error["message"] == (
        "The gateway has no credentials for provider 'ca_none' yet; retry shortly."
    )
    log = cloud.stack.log("sidecar")
    assert "provider ca_none: the client secret (GW_AZ_UNSET) is not set" in log


def test_secrets_and_tokens_never_reach_the_log(cloud: Cloud) -> None:
    test_converse_is_re_signed_by_the_gateway(cloud)  # something signed, to be sure
    log = cloud.stack.log("sidecar")
    assert "credentials fetched" in log  # the log does speak of credentials
    for secret in SECRETS:
        assert secret not in log, secret
