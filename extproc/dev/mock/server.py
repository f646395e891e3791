"""The mock as an aiohttp app: one route per served path, each bound to a
`MockFormat`; knobs, `x-mock-status`, validation, then the format's frames sent with
the wire knobs. Also `/v1/models`, `/healthz` and the exchange log.

Run it: `python -m extproc.dev.mock --host 127.0.0.1 --port 9000 [--delay-ms 20]
[--tokens 12]`; in process: `create_app(...)`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from aiohttp import web

from extproc.dev.mock.anthropic import ANTHROPIC
from extproc.dev.mock.base import JSON_CONTENT_TYPE, MockFormat
from extproc.dev.mock.bedrock import BEDROCK
from extproc.dev.mock.errors import MockError, status_error
from extproc.dev.mock.gemini import GEMINI, VERTEX
from extproc.dev.mock.knobs import DEFAULT_TOKENS, parse_knobs
from extproc.dev.mock.openai_chat import AZURE_CHAT, CHAT
from extproc.dev.mock.openai_responses import RESPONSES
from extproc.dev.mock.recording import ExchangeLog
from extproc.dev.mock.wire import NOTE, SPLIT_PAUSE_S, gzip_pieces, log, send, split_at

# (id, created, owned_by), the shape and values of OpenAI's /v1/models.
MODELS: tuple[tuple[str, int, str], ...] = (
    ("gpt-3.5-turbo", 1677610602, "openai"),
    ("gpt-4o-mini", 1721172741, "system"),
    ("gpt-4o", 1715367049, "system"),
    ("gpt-4.1-mini", 1744318173, "system"),
    ("text-embedding-3-small", 1705948997, "system"),
)

# Path -> format. Azure: deployment paths (?api-version=...) and the v1 API; Gemini
# API (`/v1beta/models/{model}:streamGenerateContent`) and Vertex AI.
ROUTES: tuple[tuple[str, MockFormat], ...] = (
    ("/v1/chat/completions", CHAT),
    ("/v1/responses", RESPONSES),
    ("/v1/messages", ANTHROPIC),
    ("/openai/deployments/{deployment}/chat/completions", AZURE_CHAT),
    ("/openai/v1/chat/completions", AZURE_CHAT),
    ("/openai/v1/responses", RESPONSES),
    ("/{version:v1|v1beta|v1alpha}/models/{action}", GEMINI),
    (
        "/{version:v1|v1beta1}/projects/{project}/locations/{location}/publishers/google"
        "/models/{action}",
        VERTEX,
    ),
    ("/model/{model_id}/converse", BEDROCK),
    ("/model/{model_id}/converse-stream", BEDROCK),
)


class _MockProvider:
    """Route handlers plus the exchange log."""

    def __init__(self, default_delay_ms: float, default_tokens: int | None) -> None:
        self.default_delay_ms = default_delay_ms
        self.default_tokens = default_tokens
        self.log = ExchangeLog()

    def _json(
        self,
        request: web.Request,
        body: bytes,
        payload: Any,
        status: int = 200,
        headers: Mapping[str, str] | None = None,
    ) -> web.Response:
        data = orjson.dumps(payload)
        self.log.record(request, body, data, status)
        return web.Response(
            body=data, status=status, content_type=JSON_CONTENT_TYPE, headers=headers
        )

    def _error(
        self,
        request: web.Request,
        body: bytes,
        fmt: MockFormat,
        err: MockError,
        retry_after: int | None = None,
    ) -> web.Response:
        data, headers = fmt.error(err)
        if retry_after is not None:
            headers = {**(headers or {}), "retry-after": str(retry_after)}
        self.log.record(request, body, data, err.status)
        return web.Response(
            body=data, status=err.status, content_type=JSON_CONTENT_TYPE, headers=headers
        )

    def handler(self, fmt: MockFormat) -> Any:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await self._serve(request, fmt)

        return handle

    async def _serve(self, request: web.Request, fmt: MockFormat) -> web.StreamResponse:
        """One answer in format `fmt`: knobs, `x-mock-status`, validation, then the
        frames its job builds, sent with the wire knobs (split, delay, gzip, cut)."""
        body = await request.read()
        path = request.raw_path
        if fmt.authorize is not None:
            headers = {name.lower(): value for name, value in request.headers.items()}
            refused = fmt.authorize(request.method, path, headers, body)
            if refused is not None:
                NOTE.set(refused.message[:60])
                return self._error(request, body, fmt, refused)
        try:
            knobs = parse_knobs(
                request.headers,
                default_delay_ms=self.default_delay_ms,
                default_tokens=self.default_tokens,
                line_ending=fmt.line_ending,
            )
        except MockError as e:
            return self._error(request, body, fmt, e)
        wire = knobs.wire
        if wire.status is not None:
            NOTE.set("x-mock-status")
            err = status_error(fmt.name, wire.status, fmt.model_hint(body, path))
            return self._error(request, body, fmt, err, wire.retry_after)
        try:
            job = fmt.job(body, path, knobs.options)
        except MockError as e:
            NOTE.set(e.message[:60])
            return self._error(request, body, fmt, e)

        frames = job.frames
        sent = b"".join(frames)
        exchange = self.log.record(request, body, sent, 200)
        exchange.bytes_written, exchange.completed = 0, False  # `send` tracks it
        NOTE.set(f"stream={job.stream} model={job.model} bytes={len(sent)}")

        if wire.split == "all":
            pieces = [sent]
        elif wire.split is not None:
            pieces = split_at(sent, wire.split)
        else:
            pieces = frames
        pause = wire.delay_s
        if wire.split is not None and pause < SPLIT_PAUSE_S:
            pause = SPLIT_PAUSE_S
        if not job.stream and wire.delay_s:
            # A non-streamed answer takes about as long as the stream would have.
            await asyncio.sleep(wire.delay_s * max(1, job.tokens))
        on_wire = gzip_pieces(pieces) if wire.gzip else pieces

        response = web.StreamResponse(status=200)
        response.content_type = JSON_CONTENT_TYPE
        if job.stream:
            response.headers["Content-Type"] = job.content_type
            response.enable_chunked_encoding()
        else:
            response.content_length = sum(len(p) for p in on_wire)
        if wire.gzip:
            response.headers["Content-Encoding"] = "gzip"
        response.headers.update(fmt.request_id(hashlib.sha256(body).hexdigest()))
        return await send(request, response, on_wire, pause, wire, exchange)

    async def models(self, request: web.Request) -> web.Response:
        data = [
            {"id": mid, "object": "model", "created": created, "owned_by": owner}
            for mid, created, owner in MODELS
        ]
        return self._json(request, b"", {"object": "list", "data": data})

    async def model(self, request: web.Request) -> web.Response:
        wanted = request.match_info["model"]
        for mid, created, owner in MODELS:
            if mid == wanted:
                obj = {"id": mid, "object": "model", "created": created, "owned_by": owner}
                return self._json(request, b"", obj)
        err = MockError(
            404,
            f"The model '{wanted}' does not exist",
            param="model",
            code="model_not_found",
        )
        return self._json(request, b"", err.payload(), 404)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def not_found(self, request: web.Request) -> web.Response:
        body = await request.read()
        err = MockError(404, f"Invalid URL ({request.method} {request.path})")
        return self._json(request, body, err.payload(), 404)


@web.middleware
async def _log_requests(request: web.Request, handler: Any) -> web.StreamResponse:
    """One INFO line per request (aiohttp's own access log is off)."""
    start = time.perf_counter()
    status = 500
    NOTE.set("")
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as e:
        status = e.status
        raise
    finally:
        if not request.path.startswith("/_mock") and request.path != "/healthz":
            log.info(
                "%s %s -> %d in %.1f ms %s",
                request.method,
                request.path_qs,
                status,
                (time.perf_counter() - start) * 1000,
                NOTE.get(),
            )


def create_app(default_delay_ms: float = 0, default_tokens: int | None = None) -> web.Application:
    """The mock as an aiohttp app (tests run it in process; `serve` runs it standalone)."""
    provider = _MockProvider(default_delay_ms, default_tokens)
    app = web.Application(middlewares=[_log_requests], client_max_size=64 * 1024 * 1024)
    for path, fmt in ROUTES:
        app.router.add_post(path, provider.handler(fmt))
    app.router.add_get("/v1/models", provider.models)
    app.router.add_get("/v1/models/{model}", provider.model)
    app.router.add_get("/healthz", provider.healthz)
    provider.log.add_routes(app)
    app.router.add_route("*", "/{tail:.*}", provider.not_found)
    return app


async def serve(
    host: str = "127.0.0.1",
    port: int = 9000,
    *,
    default_delay_ms: float = 0,
    default_tokens: int | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until `stop` is set, or until SIGTERM/SIGINT when `stop` is not given."""
    runner = web.AppRunner(
        create_app(default_delay_ms, default_tokens), access_log=None, shutdown_timeout=2.0
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1] if runner.addresses else port
        print(f"mockprovider listening on http://{host}:{bound}", flush=True)
        if stop is None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("mockprovider shutting down")
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m extproc.dev.mock",
        description="Mock LLM provider: every wire format the gateway reads (see "
        "docs/mock-provider.md for the x-mock-* header knobs).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000, help="0 picks a free port")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="pause between frames")
    parser.add_argument("--tokens", type=int, default=None, help=f"default {DEFAULT_TOKENS}")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    if args.delay_ms < 0 or (args.tokens is not None and args.tokens < 0):
        parser.error("--delay-ms and --tokens must be >= 0")
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        asyncio.run(
            serve(
                args.host,
                args.port,
                default_delay_ms=args.delay_ms,
                default_tokens=args.tokens,
            )
        )
    except OSError as e:
        log.error("cannot listen on %s:%s: %s", args.host, args.port, e)
        return 1
    return 0
