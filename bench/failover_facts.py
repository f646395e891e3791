"""Envoy 1.40 facts the failover design relies on, checked against the real binary.

`python -m bench.failover_facts` starts a throwaway Envoy, a recording ext_proc
server (router-level and upstream-level filters, told apart by gRPC metadata) and
small HTTP upstreams with fixed behaviours, then prints what Envoy did per case.
The figures in docs/design.md ("Failover through Envoy") come from this script.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import httpx
import yaml
from aiohttp import web
from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from extproc.envoybin import envoy_binary

T = "type.googleapis.com/envoy."
LOG_LEVEL = "error"
BODY_PHASE_PATH = False  # the `body-path` case: set :path in the body phase too
MUTATION_RULES: dict = {"allow_all_routing": True}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- upstreams ------------------------------------------------------------------------


class Upstream:
    """An HTTP server answering per `mode`, recording what it received."""

    def __init__(self, name: str, mode: str) -> None:
        self.name, self.mode, self.port = name, mode, free_port()
        self.seen: list[dict[str, Any]] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(
            {
                "path": request.path_qs,
                "host": request.host,
                "body": body.decode(),
                **{k: v for k, v in request.headers.items() if k.lower().startswith("x-")},
            }
        )
        mode = self.mode
        if mode in ("503", "429", "529"):
            return web.json_response({"error": self.name}, status=int(mode))
        if mode == "silent":
            await asyncio.sleep(30)
        if mode == "reset":
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        resp = web.StreamResponse(status=200, headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(f"data: first from {self.name}\n\n".encode())
        if mode == "slow":  # a long answer: frames for longer than the per-try timeout
            for index in range(3):
                await asyncio.sleep(0.6)
                await resp.write(f"data: more {index}\n\n".encode())
        if mode == "cut":
            await asyncio.sleep(0.2)
            assert request.transport is not None
            request.transport.abort()
            return resp
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()


# -- the recording ext_proc server -------------------------------------------------------


def _set(key: str, value: str) -> HeaderValueOption:
    return HeaderValueOption(header=HeaderValue(key=key, raw_value=value.encode()))


class Recorder(pb_grpc.ExternalProcessorServicer):
    def __init__(self) -> None:
        self.streams: list[dict[str, Any]] = []

    async def Process(self, request_iterator, context):
        side = dict(context.invocation_metadata()).get("x-side", "?")
        record: dict[str, Any] = {"side": side, "phases": []}
        self.streams.append(record)
        async for req in request_iterator:
            kind = req.WhichOneof("request")
            record["phases"].append(kind)
            if kind == "request_headers":
                headers = {h.key: h.raw_value.decode() for h in req.request_headers.headers.headers}
                record["headers"] = headers
                attrs = req.attributes.get("envoy.filters.http.ext_proc")
                record["attrs"] = json.loads(
                    json.dumps({k: _plain(v) for k, v in (attrs.fields.items() if attrs else ())})
                )
                out = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
                if side == "up":
                    target = host_target(record["attrs"].get("xds.upstream_host_metadata", ""))
                    record["target"] = target
                    m = out.request_headers.response.header_mutation
                    m.set_headers.append(_set(":path", f"/rewritten/{target}"))
                    m.set_headers.append(_set("x-target-seen", target))
                    m.set_headers.append(_set(f"x-set-by-{target}", "1"))  # kept for later tries?
                    m.set_headers.append(
                        _set("x-attempt", headers.get("x-envoy-attempt-count", ""))
                    )
                    if headers.get("x-skip") == target:
                        record["skipped"] = True
                        yield pb.ProcessingResponse(
                            immediate_response=pb.ImmediateResponse(
                                status={"code": 503}, body=b"skipped", details="skip"
                            )
                        )
                        continue
                yield out
            elif kind == "request_body":
                out = pb.ProcessingResponse(request_body=pb.BodyResponse())
                if side == "up":
                    body = req.request_body.body + f" +{record.get('target')}".encode()
                    out.request_body.response.body_mutation.body = body
                    m = out.request_body.response.header_mutation
                    m.set_headers.append(_set("content-length", str(len(body))))
                    if BODY_PHASE_PATH:
                        m.set_headers.append(_set(":path", f"/from-body/{record.get('target')}"))
                yield out
            elif kind == "response_headers":
                headers = {
                    h.key: h.raw_value.decode() for h in req.response_headers.headers.headers
                }
                record["status"] = headers.get(":status")
                out = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
                if side == "up":
                    m = out.response_headers.response.header_mutation
                    m.set_headers.append(_set("x-answered-by", str(record.get("target"))))
                else:
                    record["downstream_seen"] = {
                        k: v for k, v in headers.items() if k.startswith("x-")
                    }
                yield out
            elif kind == "response_body":
                yield pb.ProcessingResponse(response_body=pb.BodyResponse())
            else:
                yield pb.ProcessingResponse(request_trailers=pb.TrailersResponse())


def host_target(text: str) -> str:
    """The attribute is the host's Metadata in protobuf text format."""
    from envoy.config.core.v3.base_pb2 import Metadata
    from google.protobuf import text_format

    meta = text_format.Parse(text, Metadata())
    fields = meta.filter_metadata["ai_gateway"].fields
    return fields["target"].string_value if "target" in fields else "?"


def _plain(value) -> Any:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(value)


# -- Envoy ------------------------------------------------------------------------------


def ext_proc(grpc_port: int, side: str, body_mode: str) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.ext_proc",
        "typed_config": {
            "@type": T + "extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": {
                "envoy_grpc": {"cluster_name": "extproc"},
                "initial_metadata": [{"key": "x-side", "value": side}],
            },
            "message_timeout": "2s",
            "processing_mode": {
                "request_header_mode": "SEND",
                "response_header_mode": "SEND",
                "request_body_mode": body_mode,
                "response_body_mode": "NONE",
                "request_trailer_mode": "SKIP",
                "response_trailer_mode": "SKIP",
            },
            "request_attributes": ["xds.upstream_host_metadata", "upstream.address"]
            if side == "up"
            else ["xds.route_name"],
            "mutation_rules": MUTATION_RULES,
        },
    }


def endpoint(up: Upstream, priority: int, weight: int | None = None) -> dict[str, Any]:
    ep: dict[str, Any] = {
        "endpoint": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": up.port}},
            "hostname": f"{up.name}.example",
        },
        "metadata": {"filter_metadata": {"ai_gateway": {"target": up.name}}},
    }
    if weight is not None:
        ep["load_balancing_weight"] = weight
    return {"priority": priority, "lb_endpoints": [ep]}


def bootstrap(
    listen: int, admin: int, grpc_port: int, endpoints: list[dict[str, Any]], retry: dict
) -> dict[str, Any]:
    upstream_filters = [
        ext_proc(grpc_port, "up", "BUFFERED"),
        {
            "name": "envoy.filters.http.upstream_codec",
            "typed_config": {
                "@type": T + "extensions.filters.http.upstream_codec.v3.UpstreamCodec"
            },
        },
    ]
    multi = {
        "name": "multi",
        "type": "STATIC",
        "connect_timeout": "1s",
        "lb_policy": "ROUND_ROBIN",
        "load_assignment": {"cluster_name": "multi", "endpoints": endpoints},
        "common_lb_config": {"healthy_panic_threshold": {"value": 0}},
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": T + "extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http_protocol_options": {}},
                "http_filters": upstream_filters,
            }
        },
    }
    extproc = {
        "name": "extproc",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": "extproc",
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {
                                        "address": "127.0.0.1",
                                        "port_value": grpc_port,
                                    }
                                }
                            }
                        }
                    ]
                }
            ],
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": T + "extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
    }
    route = {
        "match": {"prefix": "/"},
        "route": {"cluster": "multi", "timeout": "0s", "auto_host_rewrite": True, **retry},
    }
    hcm = {
        "@type": T + "extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "facts",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [route],
                    "include_request_attempt_count": True,
                    "include_attempt_count_in_response": True,
                }
            ]
        },
        "http_filters": [
            ext_proc(grpc_port, "down", "BUFFERED"),
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": T + "extensions.filters.http.router.v3.Router"},
            },
        ],
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [
                {
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [multi, extproc],
        },
    }


RETRY = {
    "retry_policy": {
        "retry_on": "5xx,reset,connect-failure,retriable-status-codes",
        "retriable_status_codes": [429, 529],
        "num_retries": 2,
        "per_try_timeout": "1s",
        "retry_priority": {
            "name": "envoy.retry_priorities.previous_priorities",
            "typed_config": {
                "@type": T + "extensions.retry.priority.previous_priorities.v3"
                ".PreviousPrioritiesConfig",
                "update_frequency": 1,
            },
        },
        "retry_host_predicate": [
            {
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": {
                    "@type": T + "extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
                },
            }
        ],
        "host_selection_retry_max_attempts": 5,
    }
}


async def case(
    title: str, modes: list[str], *, weights: bool = False, requests: int = 1, headers=None
) -> None:
    ups = [Upstream(f"u{i}", m) for i, m in enumerate(modes)]
    for u in ups:
        if u.mode != "down":  # "down": a port nobody listens on
            await u.start()
    rec = Recorder()
    server = grpc.aio.server()
    pb_grpc.add_ExternalProcessorServicer_to_server(rec, server)
    grpc_port = free_port()
    server.add_insecure_port(f"127.0.0.1:{grpc_port}")
    await server.start()
    listen, admin = free_port(), free_port()
    if weights:
        eps = [
            {
                "priority": 0,
                "lb_endpoints": [
                    endpoint(u, 0, w)["lb_endpoints"][0]
                    for u, w in zip(ups, (70, 30), strict=False)
                ],
            }
        ]
    else:
        eps = [endpoint(u, i) for i, u in enumerate(ups)]
    work = Path(tempfile.mkdtemp())
    (work / "envoy.yaml").write_text(
        yaml.safe_dump(bootstrap(listen, admin, grpc_port, eps, RETRY))
    )
    proc = subprocess.Popen(
        [
            str(envoy_binary()),
            "-c",
            str(work / "envoy.yaml"),
            "--use-dynamic-base-id",
            "--concurrency",
            "1",
            "--log-level",
            LOG_LEVEL,
        ],
    )
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            for _ in range(100):
                try:
                    if (await client.get(f"http://127.0.0.1:{admin}/ready")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
            print(f"== {title}: upstreams {modes}")
            answers: Counter[str] = Counter()
            for _ in range(requests):
                t0 = time.perf_counter()
                try:
                    r = await client.post(
                        f"http://127.0.0.1:{listen}/v1/chat", content=b"BODY", headers=headers
                    )
                    text, status = r.text, r.status_code
                    answers[r.headers.get("x-answered-by", "-")] += 1
                    attempts = r.headers.get("x-envoy-attempt-count")
                except httpx.HTTPError as exc:
                    text, status, attempts = repr(exc), "error", None
                took = time.perf_counter() - t0
            if requests > 1:
                print("  answered by:", dict(answers))
            else:
                print(f"  client: status={status} attempts={attempts} took={took:.2f}s")
                print(f"  client body: {text!r}")
                for u in ups:
                    for s in u.seen:
                        print(f"  {u.name} saw: {s}")
                for s in rec.streams:
                    extra = {
                        k: s.get(k) for k in ("target", "status", "skipped", "downstream_seen")
                    }
                    print(f"  ext_proc {s['side']}: {s['phases']} {extra}")
                    if s["side"] == "up" and s is rec.streams[1]:
                        print(f"    attrs: {s.get('attrs')}")
    finally:
        proc.terminate()
        proc.wait()
        await server.stop(0)


async def main() -> None:
    only = sys.argv[1:]
    cases = {
        "healthy": (["ok", "ok"], {}),
        "503": (["503", "ok"], {}),
        "429": (["429", "ok"], {}),
        "529": (["529", "ok"], {}),
        "unreachable": (["down", "ok"], {}),
        "reset": (["reset", "ok"], {}),
        "silent": (["silent", "ok"], {}),
        "cut": (["cut", "ok"], {}),
        "slow": (["slow", "ok"], {}),
        "body-path": (["ok", "ok"], {}),
        "all-fail": (["503", "429", "529"], {}),
        "skip": (["ok", "ok"], {"headers": {"x-skip": "u0"}}),
        "weights": (["ok", "ok"], {"weights": True, "requests": 1000}),
    }
    global BODY_PHASE_PATH
    for name, (modes, kw) in cases.items():
        if only and name not in only:
            continue
        BODY_PHASE_PATH = name == "body-path"
        await case(name, modes, **kw)


if __name__ == "__main__":
    asyncio.run(main())
