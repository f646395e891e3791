"""A light OpenAI-compatible streaming provider for the benchmark.

The mock in `extproc.dev.mock` is built for fidelity (exchange log, knobs, hashing,
aiohttp); here the provider must cost so little that it is never the bottleneck, and
must stamp every frame with the CLOCK_MONOTONIC time it was written, so the client can
measure per-chunk latency across processes. So: a bare asyncio HTTP/1.1 protocol,
frames from precomputed templates, one timer callback per frame (no task per stream).

Frames look like the real API's `chat.completion.chunk` (key order, `"usage":null` on
each chunk and a final usage chunk when `stream_options.include_usage` is true, then
`[DONE]`), plus one extra key at the end: `"bench_t":<monotonic ns>`.

Per request headers: `x-bench-shape: gapped|coalesced`, `x-bench-frames: N` (content
frames), `x-bench-gap-ms: G`. Gapped: one write per frame, G ms apart; coalesced: all
frames in one write. Faults (bench/soak.py): `x-bench-status: 5xx` answers that status
with an OpenAI-style error; `x-bench-cut-after: K` closes the connection after K frames
(gapped streams), with no end marker.

`POST /v1/messages` answers an Anthropic Messages stream of the same words instead (the
`translated` setup: the sidecar translates it for an OpenAI client), each content
delta's stamp in its text (`" word bench_t=<ns>"`), the only place that survives the
translation.

Run: `python -m bench.provider --port 9000 [--frames 64] [--gap-ms 5]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import signal
import time

import orjson

TS_KEY = b',"bench_t":'
_VOCAB = (
    "gateway", "stream", "token", "river", "lantern", "orbit", "maple", "quartz",
    "signal", "harbor", "meadow", "pixel", "cobalt", "ember", "falcon", "garden",
)  # fmt: skip
_MAX_HEAD = 64 * 1024
_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"content-type: text/event-stream; charset=utf-8\r\n"
    b"transfer-encoding: chunked\r\n"
    b"cache-control: no-cache, must-revalidate\r\n"
    b"openai-processing-ms: 12\r\n"
    b"\r\n"
)


def _plain(status: int, body: bytes, ctype: bytes = b"text/plain") -> bytes:
    reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found"}.get(status, b"Error")
    return b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s" % (
        status,
        reason,
        ctype,
        len(body),
        body,
    )


_templates: dict[tuple[str, bool, int], list[bytes]] = {}


def frame_templates(model: str, include_usage: bool, frames: int) -> list[bytes]:
    """Every frame's bytes up to the timestamp (append `%d}\\n\\n`); `[DONE]` last, whole."""
    key = (model, include_usage, frames)
    cached = _templates.get(key)
    if cached is not None:
        return cached
    head = {
        "id": "chatcmpl-BenchBenchBenchBenchBenchBen",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": model,
        "system_fingerprint": "fp_bench0000",
    }

    def chunk(delta: dict, finish: str | None) -> bytes:
        obj = {**head, "choices": [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        ]}  # fmt: skip
        if include_usage:
            obj["usage"] = None
        return b"data: " + orjson.dumps(obj)[:-1] + TS_KEY

    out = [chunk({"role": "assistant", "content": "", "refusal": None}, None)]
    words = itertools.cycle(_VOCAB)
    out += [chunk({"content": " " + next(words)}, None) for _ in range(frames)]
    out.append(chunk({}, "stop"))
    if include_usage:
        usage = {
            "prompt_tokens": 24,
            "completion_tokens": frames,
            "total_tokens": 24 + frames,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }
        out.append(b"data: " + orjson.dumps({**head, "choices": [], "usage": usage})[:-1] + TS_KEY)
    out.append(b"data: [DONE]\n\n")
    _templates[key] = out
    return out


# A native frame ends with its stamp and `}`; an Anthropic one (translated setup) with a
# stamp inside a string (the content deltas: in the text, which is all that the
# translation to OpenAI chunks carries through), then `"}}`.
STAMP = b"%d}\n\n"
ANTHROPIC_STAMP = b'%d"}}\n\n'
_anthropic: dict[tuple[str, int], list[bytes]] = {}


def anthropic_templates(model: str, frames: int) -> list[bytes]:
    """An Anthropic Messages stream, every frame up to its stamp (append
    `ANTHROPIC_STAMP`); `message_stop` last, whole. The stamps outside the content
    deltas sit in fields the translation drops."""
    key = (model, frames)
    cached = _anthropic.get(key)
    if cached is not None:
        return cached

    def frame(name: str, data: bytes) -> bytes:
        return b"event: " + name.encode() + b"\ndata: " + data

    message = {
        "id": "msg_BenchBenchBenchBenchBench",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 24, "output_tokens": 1},
    }
    start = orjson.dumps({"type": "message_start", "message": message})
    out = [
        frame("message_start", start[:-2] + b',"bench":"t='),
        frame(
            "content_block_start",
            b'{"type":"content_block_start","index":0,"content_block":'
            b'{"type":"text","text":"","bench":"t=',
        ),
    ]
    words = itertools.cycle(_VOCAB)
    for _ in range(frames):
        text = orjson.dumps(" " + next(words) + " bench_t=")[:-1]
        out.append(
            frame(
                "content_block_delta",
                b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":'
                + text,
            )
        )
    out.append(frame("content_block_stop", b'{"type":"content_block_stop","index":0,"x":{"t":"'))
    out.append(
        frame(
            "message_delta",
            b'{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},'
            b'"usage":{"output_tokens":%d,"t":"' % frames,
        )
    )
    out.append(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
    _anthropic[key] = out
    return out


def _chunked(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


class _Conn(asyncio.Protocol):
    """One client connection (Envoy's upstream pool): keep-alive, one request at a time."""

    def __init__(self, server: Provider) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.busy = False
        self.timer: asyncio.TimerHandle | None = None
        self.pending: list[bytes] = []
        self.index = 0
        self.gap = 0.0
        self.cut_after = 0
        self.stamp = STAMP

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._next_request()

    def _next_request(self) -> None:
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > _MAX_HEAD:
                self._close(_plain(400, b"header too large"))
            return
        lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
        try:
            method, target, _ = lines[0].split(" ", 2)
        except ValueError:
            self._close(_plain(400, b"bad request line"))
            return
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        start = end + 4
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = self._dechunk(start)
            if body is None:
                return
            body, consumed = body
        else:
            length = int(headers.get("content-length", "0") or 0)
            if len(buf) - start < length:
                return
            body, consumed = bytes(buf[start : start + length]), start + length
        del buf[:consumed]
        self._handle(method, target, headers, body)

    def _dechunk(self, pos: int) -> tuple[bytes, int] | None:
        buf, parts = self.buf, []
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            size = int(bytes(buf[pos:eol]).split(b";", 1)[0], 16)
            pos = eol + 2
            if size == 0:
                end = buf.find(b"\r\n", pos)  # no trailers expected
                return (b"".join(parts), end + 2) if end >= 0 else None
            if len(buf) < pos + size + 2:
                return None
            parts.append(bytes(buf[pos : pos + size]))
            pos += size + 2

    def _handle(self, method: str, target: str, headers: dict[str, str], body: bytes) -> None:
        path = target.split("?", 1)[0]
        if method == "GET" and path == "/healthz":
            self._write(_plain(200, b"ok"))
            return self._done()
        anthropic = path == "/v1/messages"
        if method != "POST" or not (anthropic or path.endswith("/chat/completions")):
            self._write(_plain(404, b'{"error":{"message":"not found"}}', b"application/json"))
            return self._done()
        try:
            request = orjson.loads(body)
            model = str(request["model"])
            options = request.get("stream_options") or {}
            include_usage = options.get("include_usage") is True
            stream = request.get("stream") is True
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            self._write(_plain(400, b'{"error":{"message":"bad json"}}', b"application/json"))
            return self._done()
        if not stream:
            self._write(
                _plain(400, b'{"error":{"message":"bench streams only"}}', b"application/json")
            )
            return self._done()
        fail = headers.get("x-bench-status")
        if fail:
            error = b'{"error":{"message":"bench failure","type":"server_error","code":null}}'
            self._write(_plain(int(fail), error, b"application/json"))
            return self._done()
        self.cut_after = int(headers.get("x-bench-cut-after", "0") or 0)
        frames = int(headers.get("x-bench-frames", self.server.frames))
        gap = float(headers.get("x-bench-gap-ms", self.server.gap_ms)) / 1000.0
        if anthropic:
            self.pending = anthropic_templates(model, frames)
            self.stamp = ANTHROPIC_STAMP
        else:
            self.pending = frame_templates(model, include_usage, frames)
            self.stamp = STAMP
        self.server.requests += 1
        self.busy = True
        if headers.get("x-bench-shape", "gapped") == "coalesced":
            stamp = self.stamp % time.monotonic_ns()
            body_out = b"".join(t + stamp for t in self.pending[:-1]) + self.pending[-1]
            self._write(_SSE_HEAD + _chunked(body_out) + b"0\r\n\r\n")
            self._done()
        else:
            self.index = 0
            self.gap = gap
            self._send_frame(_SSE_HEAD)

    def _send_frame(self, prefix: bytes = b"") -> None:
        self.timer = None
        if self.transport is None:
            return
        template = self.pending[self.index]
        self.index += 1
        if self.cut_after and self.index > self.cut_after:
            if self.transport is not None:
                self.transport.close()  # mid-stream: no last chunk, no [DONE]
            return
        last = self.index == len(self.pending)
        if last:  # [DONE], no timestamp
            self._write(prefix + _chunked(template) + b"0\r\n\r\n")
            self._done()
            return
        payload = template + self.stamp % time.monotonic_ns()
        self._write(prefix + _chunked(payload))
        self.timer = asyncio.get_running_loop().call_later(self.gap, self._send_frame)

    def _write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def _close(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)
            self.transport.close()

    def _done(self) -> None:
        self.busy = False
        if self.buf:
            self._next_request()


class Provider:
    def __init__(self, frames: int, gap_ms: float) -> None:
        self.frames = frames
        self.gap_ms = gap_ms
        self.requests = 0


async def serve(host: str, port: int, frames: int, gap_ms: float) -> None:
    loop = asyncio.get_running_loop()
    provider = Provider(frames, gap_ms)
    server = await loop.create_server(lambda: _Conn(provider), host, port, backlog=1024)
    bound = server.sockets[0].getsockname()[1]
    print(f"bench provider listening on http://{host}:{bound}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    print(f"bench provider served {provider.requests} streams", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.provider", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--frames", type=int, default=64, help="content frames per stream")
    parser.add_argument("--gap-ms", type=float, default=5.0, help="pause between frames")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port, args.frames, args.gap_ms))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
