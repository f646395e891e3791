"""`streaming.meter_off_path: auto` through the real Envoy: a stream that is only metered
is read by the observing ext_proc filter (Envoy never waits for it) and still meters
the provider's usage and settles the token limit exactly; a guarded stream, or one
whose usage is hidden from the client, stays synchronous."""

from __future__ import annotations

import json
import os
import re
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
import yaml

from extproc.bootstrap import EXTPROC_FILTER, NOT_FOUND_ROUTE, render_bootstrap
from extproc.bootstrap.common import OBSERVER_FILTER
from extproc.config import parse_config
from tests.conftest import Stack, loopback_sections, metric, sse_payloads, wait_for
from tests.test_bootstrap import hcm_of, validate

CARD = "4111 1111 1111 1111"
ROUTES = [
    {"name": name, "prefix": f"/{name}", "provider": "mock", "rewrite": "/v1/chat/completions"}
    for name in ("meter", "guarded")
]
POLICY = {
    "streaming": {"meter_off_path": "auto"},
    "routes": ROUTES,
    "guards": {"rules": [{"name": "pii", "detectors": ["credit_card"], "routes": ["guarded"]}]},
    "rate_limits": {
        "limits": [
            {
                "name": "meter-tokens",
                "tokens": 1_000_000,
                "window": "1d",
                "match": {"routes": ["meter"]},
            }
        ]
    },
}


def write_policy(directory: Path, **server: object) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    policy = {
        **loopback_sections(directory, **server),
        **POLICY,
    }
    path = directory / "policy.yaml"
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def offpath(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    directory = tmp_path_factory.mktemp("offpath")
    stack = Stack(write_policy(directory), directory)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


def bootstrap_of(**sections: dict) -> dict:
    policy = {
        "providers": {"mock": {"url": "http://127.0.0.1:9000"}},
        "routes": [{"name": "v1", "prefix": "/v1/", "provider": "mock"}],
        **sections,
    }
    return render_bootstrap(parse_config(policy))


def filters(bootstrap: dict) -> list[str]:
    return [f["name"] for f in hcm_of(bootstrap)["http_filters"]]


def test_observer_filter_follows_the_synchronous_one_only_when_it_can_work(tmp_path):
    """Rendered after the synchronous filter (it then sees the exchange token that
    filter's body answer set), valid for the real Envoy; absent when off (the default)
    and when the two streams of an exchange could reach different sidecar processes
    behind one address (a DNS name). Several workers: tests/test_e2e_offpath_workers.py."""
    on = bootstrap_of(streaming={"meter_off_path": "auto"})
    names = filters(on)
    assert names.index(OBSERVER_FILTER) == names.index(EXTPROC_FILTER) + 1
    wrapped = hcm_of(on)["http_filters"][names.index(OBSERVER_FILTER)]["typed_config"]
    observer = wrapped["extension_config"]["typed_config"]  # run for tokens of worker 0
    assert observer["observability_mode"] is True
    assert observer["processing_mode"]["response_body_mode"] == "STREAMED"
    (not_found,) = [
        r
        for r in hcm_of(on)["route_config"]["virtual_hosts"][0]["routes"]
        if r["name"] == NOT_FOUND_ROUTE
    ]
    assert not_found["typed_per_filter_config"][OBSERVER_FILTER]["disabled"] is True
    path = tmp_path / "on.yaml"
    path.write_text(yaml.safe_dump(on))
    validate(path)
    assert OBSERVER_FILTER not in filters(bootstrap_of())
    dns = bootstrap_of(
        streaming={"meter_off_path": "auto"},
        envoy={"sidecar_address": "extproc.example.svc:50051"},
    )
    assert OBSERVER_FILTER not in filters(dns)


def envoy_stat(stack: Stack, name: str) -> int:
    text = httpx.get(f"{stack.admin_url}/stats?filter=^{re.escape(name)}$", timeout=5).text
    return int(text.split(":")[-1]) if text.strip() else 0


SYNC = "http.ai_gateway.ext_proc.stream_msgs_sent"
OBSERVED = "http.ai_gateway.ext_proc.observer.stream_msgs_sent"


def chat(usage: bool, text: str | None = None, tokens: int = 24) -> tuple[dict, dict]:
    body: dict = {
        "model": "gpt-4o-mini",
        "stream": True,
        "messages": [{"role": "user", "content": "Tell me a story, please."}],
    }
    if usage:
        body["stream_options"] = {"include_usage": True}
    headers = {"x-mock-tokens": str(tokens), "x-request-id": uuid.uuid4().hex}
    if text is not None:
        headers["x-mock-text"] = text
    return body, headers


def usage_of(content: bytes) -> dict | None:
    for payload in sse_payloads(content):
        if payload.startswith(b"{") and b'"usage":{' in payload:
            return orjson.loads(payload)["usage"]
    return None


def text_of(content: bytes) -> str:
    out = []
    for payload in sse_payloads(content):
        if payload.startswith(b"{"):
            for choice in orjson.loads(payload).get("choices") or ():
                out.append(choice.get("delta", {}).get("content") or "")
    return "".join(out)


def tokens(stack: Stack, kind: str) -> float:
    return metric(stack, "ai_gateway_tokens_total", model="gpt-4o-mini", kind=kind)


def settled(stack: Stack) -> float:
    """Tokens the route's token limit charged at the end of its exchanges."""
    return metric(stack, "ai_gateway_ratelimit_tokens_total", limit="meter-tokens", phase="settled")


def test_metered_stream_runs_off_path_and_meters_exactly(offpath):
    """The synchronous filter gets no response chunk (3 messages per exchange: request
    headers, request body, response headers); the observer gets them all, and the
    metrics, the sidecar's log line and the token limit carry the provider's usage."""
    sync_before, observed_before = envoy_stat(offpath, SYNC), envoy_stat(offpath, OBSERVED)
    prompt_before, completion_before = tokens(offpath, "prompt"), tokens(offpath, "completion")
    settled_before = settled(offpath)
    used = []
    request_ids = []
    with httpx.Client(base_url=offpath.base_url, timeout=30) as client:
        for n in range(4):
            body, headers = chat(usage=True, tokens=10 + 7 * n)
            reply = client.post("/meter", json=body, headers=headers)
            assert reply.status_code == 200
            assert reply.content.rstrip().endswith(b"data: [DONE]")
            usage = usage_of(reply.content)
            assert usage is not None and usage["completion_tokens"] == 10 + 7 * n
            used.append(usage)
            request_ids.append(headers["x-request-id"])
    want_prompt = sum(u["prompt_tokens"] for u in used)
    want_completion = sum(u["completion_tokens"] for u in used)
    assert wait_for(lambda: tokens(offpath, "completion") - completion_before == want_completion)
    assert tokens(offpath, "prompt") - prompt_before == want_prompt
    want_total = sum(u["total_tokens"] for u in used)
    assert wait_for(lambda: settled(offpath) - settled_before == want_total)
    assert envoy_stat(offpath, SYNC) - sync_before == 3 * len(used)
    # Request headers plus at least one chunk each went to the observer.
    assert envoy_stat(offpath, OBSERVED) - observed_before >= 2 * len(used)
    # The sidecar's own line (joined to the access log on request_id) has the figures.
    log = offpath.log("sidecar")
    for rid, usage in zip(request_ids, used, strict=True):
        line = next(line for line in log.splitlines() if rid in line and "exchange route" in line)
        assert f"completion={usage['completion_tokens']} " in line
        assert "estimated=False" in line


def test_stream_reaches_the_client_while_the_sidecar_is_stopped(offpath):
    """Envoy never waits for the observer: with the sidecar process stopped after the
    response headers, the whole stream still arrives. Resumed within the observer's
    `deferred_close_timeout`, the sidecar reads the queued chunks and meters them
    exactly. The access log line has who and what, but not the tokens: the observer's
    answers never reach Envoy (the sidecar's log line and metrics have them)."""
    completion_before = tokens(offpath, "completion")
    body, headers = chat(usage=True, tokens=15)
    headers["x-mock-delay-ms"] = "5"
    sidecar = offpath.procs["sidecar"].pid
    try:
        with httpx.stream(
            "POST", f"{offpath.base_url}/meter", json=body, headers=headers, timeout=30
        ) as reply:
            chunks = reply.iter_raw()
            first = next(chunks)
            os.kill(sidecar, signal.SIGSTOP)
            rest = b"".join(chunks)
    finally:
        os.kill(sidecar, signal.SIGCONT)
    assert reply.status_code == 200
    assert rest.rstrip().endswith(b"data: [DONE]")
    usage = usage_of(first + rest)
    assert usage is not None and usage["completion_tokens"] == 15
    assert wait_for(lambda: tokens(offpath, "completion") - completion_before == 15)
    rid = headers["x-request-id"]

    def logged() -> dict | None:
        for line in (offpath.workdir / "access.log").read_text().splitlines():
            entry = json.loads(line)
            if entry["request_id"] == rid:
                return entry
        return None

    entry = wait_for(logged)
    assert entry["route"] == "meter" and entry["model"] == "gpt-4o-mini"
    assert entry["completion_tokens"] is None


def test_not_found_route_opens_no_observer(offpath):
    """The catch-all 404 disables both ext_proc filters per route."""
    started = "http.ai_gateway.ext_proc.observer.streams_started"
    before = envoy_stat(offpath, started)
    reply = httpx.post(f"{offpath.base_url}/nowhere", json={}, timeout=30)
    assert reply.status_code == 404
    assert envoy_stat(offpath, started) == before


def test_a_request_no_worker_claims_opens_no_observer(offpath):
    """No token (not a stream; a stream whose usage is hidden): the observing filter's
    matcher skips it, so no observing stream opens at all."""
    before = envoy_stat(offpath, "http.ai_gateway.ext_proc.observer.streams_started")
    body, headers = chat(usage=False)
    reply = httpx.post(f"{offpath.base_url}/meter", json=body, headers=headers, timeout=30)
    assert reply.status_code == 200 and usage_of(reply.content) is None
    body["stream"] = False
    reply = httpx.post(f"{offpath.base_url}/meter", json=body, headers=headers, timeout=30)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 24
    assert envoy_stat(offpath, "http.ai_gateway.ext_proc.observer.streams_started") == before


def test_guarded_route_stays_synchronous_and_masks(offpath):
    """A response guard needs each chunk before the client: the synchronous filter gets
    them and the card number arrives masked."""
    sync_before = envoy_stat(offpath, SYNC)
    body, headers = chat(usage=True, text=f"my card is {CARD} thanks")
    reply = httpx.post(f"{offpath.base_url}/guarded", json=body, headers=headers, timeout=30)
    assert reply.status_code == 200
    text = text_of(reply.content)
    assert CARD not in text and "my card is" in text
    assert envoy_stat(offpath, SYNC) - sync_before > 3


def test_hidden_usage_stays_synchronous(offpath):
    """The client did not ask for usage: the gateway asked the provider and hides the
    usage chunk, which needs the synchronous filter; the usage is still metered."""
    sync_before = envoy_stat(offpath, SYNC)
    completion_before = tokens(offpath, "completion")
    body, headers = chat(usage=False, tokens=17)
    reply = httpx.post(f"{offpath.base_url}/meter", json=body, headers=headers, timeout=30)
    assert reply.status_code == 200
    assert usage_of(reply.content) is None
    assert envoy_stat(offpath, SYNC) - sync_before > 3
    assert wait_for(lambda: tokens(offpath, "completion") - completion_before == 17)


def test_the_synchronous_stream_ends_at_the_response_headers(offpath):
    """Off path Envoy sends the synchronous stream nothing after the response headers,
    so the sidecar ends it there: while the answer still streams (its tokens not yet
    settled) Envoy has one gRPC stream open to the sidecar, the observer's, not two."""
    active = "cluster.extproc.upstream_rq_active"
    completion_before = tokens(offpath, "completion")
    body, headers = chat(usage=True, tokens=8)
    headers["x-mock-delay-ms"] = "400"

    def only_the_observer_open() -> bool:
        unsettled = tokens(offpath, "completion") == completion_before
        streams = envoy_stat(offpath, active)
        return streams == 1 and unsettled and tokens(offpath, "completion") == completion_before

    with httpx.stream(
        "POST", f"{offpath.base_url}/meter", json=body, headers=headers, timeout=30
    ) as reply:
        chunks = reply.iter_raw()
        first = next(chunks)
        assert wait_for(only_the_observer_open)
        rest = b"".join(chunks)
    usage = usage_of(first + rest)
    assert usage is not None and usage["completion_tokens"] == 8
    assert wait_for(lambda: tokens(offpath, "completion") - completion_before == 8)
    assert wait_for(lambda: envoy_stat(offpath, active) == 0)


def test_an_off_path_exchange_keeps_its_admission_slot_until_it_is_settled(tmp_path):
    """Its synchronous stream ended at the response headers, yet the exchange still
    counts against `server.max_open_streams` while its observer meters it: with one
    slot, a second request is shed (503 `overloaded`) until the first one settled."""
    stack = Stack(write_policy(tmp_path, max_open_streams=1, max_queue_delay_ms=0), tmp_path)
    stack.start()
    try:
        active = "cluster.extproc.upstream_rq_active"
        body, headers = chat(usage=True, tokens=8)
        headers["x-mock-delay-ms"] = "400"
        with httpx.stream(
            "POST", f"{stack.base_url}/meter", json=body, headers=headers, timeout=30
        ) as reply:
            chunks = reply.iter_raw()
            first = next(chunks)
            assert wait_for(lambda: envoy_stat(stack, active) == 1)  # the observer's alone
            second, second_headers = chat(usage=True)
            shed = httpx.post(
                f"{stack.base_url}/meter", json=second, headers=second_headers, timeout=30
            )
            first_id = headers["x-request-id"]
            settled_lines = [
                line
                for line in stack.log("sidecar").splitlines()
                if first_id in line and "exchange route" in line
            ]
            if not settled_lines:  # the first one was open all along: no slot was free
                assert shed.status_code == 503, shed.text
                assert shed.json()["error"]["code"] == "overloaded"
            rest = b"".join(chunks)
        assert usage_of(first + rest)["completion_tokens"] == 8
        assert wait_for(lambda: tokens(stack, "completion") >= 8)
        later, later_headers = chat(usage=True, tokens=5)
        reply = httpx.post(f"{stack.base_url}/meter", json=later, headers=later_headers, timeout=30)
        assert reply.status_code == 200, reply.text  # the slot was given back
        assert usage_of(reply.content)["completion_tokens"] == 5
    finally:
        stack.stop()
