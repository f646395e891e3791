"""A tiny OpenAI-style provider whose behaviour a test switches while it runs: answer,
fail with a status (503, 429, 529), stay silent, or drop the connection before any
response. It counts what it received, so a test can tell "tried" from "skipped"."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Flaky:
    """`mode`: "ok", a status like "503", "silent" (never answers), "reset" (drops the
    connection before answering) or "cut" (drops it after the first frame)."""

    def __init__(self, name: str, mode: str = "ok") -> None:
        self.name = name
        self.mode = mode
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        flaky = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                with flaky.lock:
                    flaky.requests.append(
                        {
                            "path": self.path,
                            "headers": {k.lower(): v for k, v in self.headers.items()},
                            "body": body,
                        }
                    )
                # Envoy may give up on an attempt first (per-try timeout).
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    flaky.answer(self, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Flaky:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def count(self) -> int:
        with self.lock:
            return len(self.requests)

    def answer(self, handler: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        mode = self.mode
        if mode == "silent":
            time.sleep(30)
            return
        if mode == "reset":
            handler.connection.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            handler.close_connection = True
            handler.connection.close()
            return
        if mode == "cut":  # the first frame, then the connection drops mid-answer
            frame = b'data: {"choices":[{"index":0,"delta":{"content":"partial"}}]}\n\n'
            handler.send_response(200)
            handler.send_header("content-type", "text/event-stream")
            handler.send_header("transfer-encoding", "chunked")
            handler.end_headers()
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(frame), frame))
            handler.wfile.flush()
            time.sleep(0.2)
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_RDWR)
            return
        if mode != "ok":
            payload = json.dumps({"error": {"message": f"{self.name} says {mode}"}}).encode()
            self._send(handler, int(mode), "application/json", payload)
            return
        model = body.get("model", "")
        text = f"hello from {self.name}"
        if body.get("stream"):
            chunks = [
                {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
                {"choices": [{"index": 0, "delta": {"content": text}}]},
                {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
            ]
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
                chunks.append({"choices": [], "usage": usage})
            frames = b"".join(
                b"data: "
                + json.dumps(
                    {"id": "c1", "object": "chat.completion.chunk", "model": model, **c}
                ).encode()
                + b"\n\n"
                for c in chunks
            )
            self._send(handler, 200, "text/event-stream", frames + b"data: [DONE]\n\n")
            return
        payload = {
            "id": "c1",
            "object": "chat.completion",
            "created": 0,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
        }
        self._send(handler, 200, "application/json", json.dumps(payload).encode())

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, status: int, kind: str, payload: bytes) -> None:
        handler.send_response(status)
        handler.send_header("content-type", kind)
        handler.send_header("content-length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)
