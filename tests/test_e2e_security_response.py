"""The fifth response review through the real Envoy, where its chunking matters: a
provider that writes a frame which hides text from the SDK in the same write as the
first half of a card number (Envoy hands both to the sidecar in one chunk, the chunk
the guards' pre-check once let through), and one whose event line names another type
than its data. The provider is a scripted stand-in on a free port; the clients are
the real `openai` and `anthropic` SDKs."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import anthropic
import httpx
import httpx2
import openai
import pytest

from extproc.dev.devstack import Stack
from tests.conftest import DEV_API_KEY, free_port, start_stack
from tests.test_security_response import MESSAGE
from tests.test_security_response import aev as anthropic_event

CARD = "4111 1111 1111 1111"
HEAD = (
    b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini",'
    b'"choices":['
)


def chat(choice: bytes) -> bytes:
    return HEAD + choice + b'],"usage":null}\n\n'


def text(value: bytes, after: bytes = b"") -> bytes:
    return chat(b'{"index":0,"delta":{"content":"' + value + b'"}' + after + b"}")


DELTA = {"type": "content_block_delta", "index": 0,
         "delta": {"type": "text_delta", "text": f"card {CARD} ok"}}  # fmt: skip

# Each script: the writes the provider makes, a pause between them.
SCRIPTS = {
    "hidden-index": [
        chat(b'{"index":0,"delta":{"role":"assistant","content":""}}'),
        text(b"4111 1111 1111") + text(b" ok!", b',"index":1'),  # one write: one chunk
        text(b" 1111"),
        chat(b'{"index":0,"delta":{},"finish_reason":"stop"}') + b"data: [DONE]\n\n",
    ],
    "disguised-delta": [
        anthropic_event(b"message_start", {"type": "message_start", "message": MESSAGE})
        + anthropic_event(
            b"content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        anthropic_event(b"message_stop", DELTA),  # the SDK reads a text delta
        anthropic_event(b"message_stop", {"type": "message_stop"}),
    ],
}


class Scripted(BaseHTTPRequestHandler):
    """Answers every POST with the script its `x-script` header names."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        writes = SCRIPTS[self.headers["x-script"]]
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for data in writes:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
            time.sleep(0.05)  # apart: Envoy reads each write as a chunk of its own
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Scripted)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    s = None
    try:
        s = start_stack(
            tmp_path_factory.mktemp("resp"),
            providers={"scripted": {"url": url, "format": "openai"}},
            routes=[{"name": "v1", "prefix": "/v1/", "provider": "scripted"}],
            models={"catalog": {"scripted": ["gpt-4o-mini", "claude-test-model"]}},
            guards={"rules": [{"name": "pii", "detectors": ["credit_card"]}]},
        )
        yield s
    finally:
        if s is not None:
            s.stop()
        server.shutdown()
        server.server_close()


def test_text_hidden_from_the_sdk_cannot_carry_a_card_past_the_guards(stack: Stack) -> None:
    client = openai.OpenAI(
        api_key=DEV_API_KEY,
        base_url=f"{stack.base_url}/v1",
        default_headers={"x-script": "hidden-index"},
        max_retries=0,
    )
    shown = ""
    for chunk in client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
    ):
        for choice in chunk.choices:
            if choice.index == 0 and choice.delta.content:
                shown += choice.delta.content
    assert "4111" not in shown and "<CREDIT_CARD>" in shown, shown


def test_an_event_named_for_another_type_ends_the_stream_cleanly(stack: Stack) -> None:
    raw = httpx.post(
        f"{stack.base_url}/v1/messages",
        headers={"authorization": f"Bearer {DEV_API_KEY}", "x-script": "disguised-delta"},
        json={
            "model": "claude-test-model",
            "max_tokens": 10,
            "stream": True,
            "messages": [{"role": "user", "content": "hi"}],
        },
        timeout=30,
    )
    assert raw.status_code == 200 and CARD.encode() not in raw.content
    assert raw.content.rstrip().endswith(b'the gateway ended the stream."}}')
    assert b"event: error" in raw.content
    sdk = anthropic.Anthropic(
        api_key=DEV_API_KEY,
        base_url=stack.base_url,
        default_headers={"x-script": "disguised-delta"},
        http_client=httpx2.Client(timeout=30),
        max_retries=0,
    )
    request = {"model": "claude-test-model", "max_tokens": 10,
               "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
    with pytest.raises(anthropic.APIStatusError, match="another type"):  # noqa: SIM117
        with sdk.messages.stream(**request) as stream:
            for _ in stream.text_stream:
                pass
