"""What one failed attempt costs the client: time to first token through the real Envoy
for an alias whose first target answers 503 at once (the next target answers), against
the same alias with a healthy first target, and a plain alias (no targets: no
upstream filter) for the cost of the per-attempt filter itself.

    .venv/bin/python bench/failover_bench.py             # 300 streams per case (~1 min)
    .venv/bin/python bench/failover_bench.py --quick     # 40 per case

Both aliases end on the dev mock provider (streaming, 12 tokens); the failing target
is a tiny local server answering 503 (so its own cost is near nothing: the figure is
the gateway's). Sequential requests, so the numbers are latencies, not throughput.
`failures_to_skip` is set high so the failing target keeps being tried. Printed, and
written to bench/results/failover.json.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from extproc.dev.devstack import Stack  # noqa: E402

KEY = "my-secret-key"  # config/dev.yaml's consumer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Unavailable(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        body = b'{"error":{"message":"overloaded"}}'
        self.send_response(503)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _policy(workdir: Path, failing_url: str) -> Path:
    config = yaml.safe_load((REPO / "config" / "dev.yaml").read_text())
    config["server"].update(
        grpc_listen=f"127.0.0.1:{_free_port()}", metrics_listen=f"127.0.0.1:{_free_port()}"
    )
    config["envoy"].update(
        listen=f"127.0.0.1:{_free_port()}",
        admin=f"127.0.0.1:{_free_port()}",
        access_log=str(workdir / "access.log"),
    )
    mock_url = config["providers"]["mock"]["url"]
    new_url = f"http://127.0.0.1:{_free_port()}"
    for provider in config["providers"].values():
        if provider.get("url") == mock_url:
            provider["url"] = new_url
    config["providers"]["failing"] = {"url": failing_url}
    config["models"]["aliases"].update(
        {
            "plain": {"provider": "mock", "model": "gpt-4o-mini"},  # no failover machinery
            "healthy": {"targets": [{"provider": "mock", "model": "gpt-4o-mini"}]},
            "failover": {
                "targets": [
                    {"provider": "failing", "model": "gpt-4o-mini"},
                    {"provider": "mock", "model": "gpt-4o-mini"},
                ]
            },
        }
    )
    config["models"]["failover"] = {"failures_to_skip": 1000}
    path = workdir / "policy.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _ttft(client: httpx.Client, model: str) -> float:
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    start = time.perf_counter()
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, response.read()
        lines = response.iter_lines()
        for line in lines:
            compact = line.replace(" ", "")
            if '"content":"' in compact and '"content":""' not in compact:
                first = time.perf_counter() - start
                for _ in lines:  # the rest of the stream
                    pass
                return first
    raise RuntimeError("no content in the stream")


def _quantiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return {"p50_ms": statistics.median(ordered) * 1000, "p99_ms": p99 * 1000}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--requests", type=int, default=None)
    args = parser.parse_args()
    count = args.requests or (40 if args.quick else 300)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        stack = Stack(_policy(workdir, f"http://127.0.0.1:{server.server_address[1]}"), workdir)
        stack.start()
        try:
            headers = {"authorization": f"Bearer {KEY}"}
            with httpx.Client(base_url=stack.base_url, headers=headers, timeout=30) as client:
                for model in ("plain", "healthy", "failover"):
                    for _ in range(10):  # warm connections and caches
                        _ttft(client, model)
                    results[model] = _quantiles([_ttft(client, model) for _ in range(count)])
        except AssertionError:
            print(stack.log("sidecar")[-2000:], file=sys.stderr)
            raise
        finally:
            stack.stop()
            server.shutdown()
    extra = {k: results["failover"][k] - results["healthy"][k] for k in ("p50_ms", "p99_ms")}
    upstream = {k: results["healthy"][k] - results["plain"][k] for k in ("p50_ms", "p99_ms")}
    print(f"time to first token, {count} sequential streams per case (ms):")
    rows = (
        *results.items(),
        ("the attempt filter adds", upstream),
        ("a failed attempt adds", extra),
    )
    for name, figures in rows:
        print(f"  {name:<24} p50 {figures['p50_ms']:7.2f}   p99 {figures['p99_ms']:7.2f}")
    out = REPO / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "failover.json").write_text(json.dumps({"requests": count, **results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
