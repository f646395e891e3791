"""A translated request to a provider with cloud credentials, through the real Envoy:
an unchanged OpenAI client reaches a Bedrock model whose provider signs with SigV4.
The signature must cover the translated path and body (the mock recomputes it with
botocore over the bytes it received and refuses a wrong one), never the client's."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import openai
import pytest
import yaml

from tests.conftest import DEV_API_KEY, Stack, mock_exchange, write_config

KEY_ID, SECRET, TOKEN = "AKIDTRANSLATEDE2E", "translated-e2e-secret", "translated-session-tok"
MESSAGES = [{"role": "user", "content": "Tell me about the weather in Paris."}]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    directory = tmp_path_factory.mktemp("translate-cloud")
    path = write_config(directory)
    config = yaml.safe_load(path.read_text())
    sigv4 = {"type": "aws_sigv4", "region": "us-east-1", "access_key_id_env": "GW_AK",
             "secret_access_key_env": "GW_SK", "session_token_env": "GW_ST"}  # fmt: skip
    mock = config["providers"]["mock"]["url"]
    config["providers"]["signed"] = {"url": mock, "format": "bedrock", "auth": sigv4}
    config["models"]["aliases"]["my-signed-nova"] = {
        "provider": "signed",
        "model": "amazon.nova-lite-v1:0",
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {
        "GW_AK": KEY_ID, "GW_SK": SECRET, "GW_ST": TOKEN,
        "MOCK_AWS_ACCESS_KEY_ID": KEY_ID, "MOCK_AWS_SECRET_ACCESS_KEY": SECRET,
        "MOCK_AWS_SESSION_TOKEN": TOKEN,
    }  # fmt: skip
    s = Stack(path, directory, env=env)
    s.start()
    try:
        yield s
    finally:
        s.stop()


def sdk(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=DEV_API_KEY, max_retries=0)


@pytest.mark.parametrize("stream", [True, False])
def test_a_translated_request_is_signed_over_the_bytes_that_go_upstream(stack, stream):
    rid = uuid.uuid4().hex
    answer = sdk(stack).chat.completions.create(
        model="my-signed-nova",
        messages=MESSAGES,
        stream=stream,
        extra_headers={"x-mock-request-id": rid},
    )
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in answer if c.choices)
    else:
        text = answer.choices[0].message.content
    assert text  # the mock checked the signature: a wrong one is a 403
    seen = mock_exchange(stack, rid)
    assert seen["status"] == 200
    assert seen["path"].startswith("/model/amazon.nova-lite-v1:0/converse")
    headers = seen["headers"]
    assert headers["authorization"].startswith(f"AWS4-HMAC-SHA256 Credential={KEY_ID}/")
    assert headers["x-amz-security-token"] == TOKEN
    assert DEV_API_KEY not in str(headers)
