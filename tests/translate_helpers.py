"""The harness the OpenAI-client translation tests share: the `openai` SDK talks to a
MockTransport that translates its request, lets a native upstream answer (the mock's
own bytes), and translates the answer back in the chunking a test chooses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import openai
import orjson
from openai.lib.streaming.chat import ChatCompletionStreamState

from extproc.providers import OpenAIChat
from extproc.translate.base import UpstreamRequest
from tests.providers_helpers import cut

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name three rivers."},
]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}

Handler = Callable[[UpstreamRequest], tuple[int, dict[str, str], list[bytes]]]


def translate_with(translator: Any, body: dict[str, Any]) -> tuple[UpstreamRequest, Any]:
    """The upstream request for an OpenAI chat `body`, and its JSON body."""
    info = OpenAIChat.parse_request(orjson.dumps(body))
    upstream = translator.request(info.body)
    return upstream, orjson.loads(upstream.body)


def openai_sdk(
    make: Callable[[], Any], answer: Handler, points: list[int] | None = None
) -> openai.OpenAI:
    """An SDK whose every request goes through a fresh `make()` translator."""

    def handler(request: httpx.Request) -> httpx.Response:
        upstream, _ = translate_with(make(), orjson.loads(request.content))
        status, headers, frames = answer(upstream)
        translator = make().response(upstream, created=7)
        if status != 200:
            error = translator.error(status, headers, b"".join(frames))
            return httpx.Response(error.status, headers=dict(error.headers), content=error.body)
        if not upstream.stream:
            body = translator.whole(b"".join(frames))
            return httpx.Response(200, headers={"content-type": "application/json"}, content=body)
        native = b"".join(frames)
        chunks = cut(native, points) if points is not None else frames
        out = b"".join(translator.feed(c) for c in chunks) + translator.finish()
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=out)

    return openai.OpenAI(
        api_key="k",
        base_url="http://gateway.test/v1",
        http_client=httpx.Client(transport=httpx.MockTransport(handler)),
        max_retries=0,
    )


def assembled(stream: Any) -> tuple[Any, list[Any]]:
    """The SDK's own assembly of a stream, and the chunks it read."""
    state = ChatCompletionStreamState()
    chunks = list(stream)
    for chunk in chunks:
        state.handle_chunk(chunk)
    return state.current_completion_snapshot, chunks
