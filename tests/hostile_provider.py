"""A provider stand-in as lax as real provider stacks get: the worst case for a gateway.

It serves a chat completion on any path that *decodes* to one (percent-decoding,
merged slashes, dot segments, `;` parameters, a trailing slash, any case, backslashes:
what WSGI, Starlette and Go muxes variously do), whatever the method, and reads JSON
keeping the *first* of duplicate keys (the opposite of the gateway's parser). Whatever
it acted on is recorded, so a test can ask: did anything the policy never checked get
through?

    python tests/hostile_provider.py --port 9100

GET /_hostile/log returns every request seen (raw path, decoded path, method, headers,
the model and user texts it acted on, the raw body); DELETE /_hostile/log clears it.
"""

from __future__ import annotations

import argparse
import json
import posixpath
import time
from typing import Any
from urllib.parse import unquote

from aiohttp import web

_LOG: list[dict[str, Any]] = []


def decode_path(raw: str) -> str:
    """The most forgiving reading of a request path a provider framework might make."""
    path = raw.split("?", 1)[0].split("#", 1)[0]
    for _ in range(3):  # double encoding too
        path = unquote(path)
    path = path.replace("\\", "/")
    path = "/".join(segment.split(";", 1)[0] for segment in path.split("/"))
    path = posixpath.normpath("/" + path.lstrip("/"))
    return path.lower().rstrip("/")


def first_key_wins(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        out.setdefault(key, value)
    return out


def _texts(value: Any) -> list[str]:
    """Every string anywhere in the request: what a provider could read as text."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [t for item in value for t in _texts(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _texts(item)]
    return []


async def any_path(request: web.Request) -> web.StreamResponse:
    raw_body = await request.read()
    decoded = decode_path(request.raw_path)
    entry: dict[str, Any] = {
        "method": request.method,
        "raw_path": request.raw_path,
        "path": decoded,
        "headers": {k.lower(): v for k, v in request.headers.items()},
        "raw_body": raw_body.decode("utf-8", "replace"),
        "served": False,
    }
    _LOG.append(entry)
    if not decoded.endswith("/chat/completions"):
        return web.json_response({"error": {"message": "not found"}}, status=404)
    try:
        body = json.loads(raw_body or b"{}", object_pairs_hook=first_key_wins)
    except ValueError:
        return web.json_response({"error": {"message": "bad json"}}, status=400)
    model = body.get("model", "")
    entry.update(served=True, model=model, texts=_texts(body.get("messages", [])))
    text = "hostile says hi"
    usage = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
    if not body.get("stream"):
        return web.json_response(
            {
                "id": "chatcmpl-hostile",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage,
            }
        )
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    base = {"id": "chatcmpl-hostile", "object": "chat.completion.chunk", "model": model}
    chunks = [
        {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": text}}]},
        {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
    ]
    if (body.get("stream_options") or {}).get("include_usage"):
        chunks.append({**base, "choices": [], "usage": usage})
    for chunk in chunks:
        await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def log_view(request: web.Request) -> web.Response:
    if request.method == "DELETE":
        _LOG.clear()
    return web.json_response(_LOG)


def app() -> web.Application:
    application = web.Application(client_max_size=8 * 1024 * 1024)
    application.router.add_route("*", "/_hostile/log", log_view)
    application.router.add_route("*", "/{tail:.*}", any_path)
    return application


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(app(), host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
