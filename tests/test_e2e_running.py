"""Running it for real, through the real Envoy: several sidecar workers share the
streams, a policy change (a ConfigMap-style symlink swap) applies without breaking the
streams in flight, a broken change is refused, and SIGTERM lets open streams finish.

The policy lives in a directory laid out as the kubelet mounts a ConfigMap
(`policy.yaml -> ..data/policy.yaml`, `..data -> ..v1`), and updates swap `..data`
in one rename, exactly as a ConfigMap update does.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest
import yaml

from extproc.bootstrap import EXTPROC_CLUSTER
from extproc.dev.devstack import grpc_serving
from tests.conftest import (
    DEV_API_KEY,
    Stack,
    consecutive_free_ports,
    metric,
    sse_payloads,
    wait_for,
    write_config,
)
from tests.redis_server import RedisServer

AUTH = {"authorization": f"Bearer {DEV_API_KEY}"}  # the dev policy's consumer key
SEED = {
    "stream": True,
    "model": "gpt-3.5-turbo",
    "messages": [{"role": "user", "content": "Name my first repository."}],
}


class ConfigMapDir:
    """A policy file mounted the way the kubelet mounts a ConfigMap."""

    def __init__(self, root: Path, text: str) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.version = 0
        self.update(text)
        (root / "policy.yaml").symlink_to("..data/policy.yaml")

    @property
    def path(self) -> Path:
        return self.root / "policy.yaml"

    def text(self) -> str:
        return self.path.read_text()

    def update(self, text: str) -> None:
        """New timestamped directory, then one atomic rename of the `..data` link."""
        self.version += 1
        version = self.root / f"..v{self.version}"
        version.mkdir()
        (version / "policy.yaml").write_text(text)
        os.utime(version / "policy.yaml", (1, 1))  # older than the last: mtime proves nothing
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(version.name)
        os.replace(tmp, self.root / "..data")


def running_policy(directory: Path, workers: int, **sections) -> str:
    """The dev policy on fresh ports with `workers` consecutive gRPC ports."""
    config = yaml.safe_load(write_config(directory, **sections).read_text())
    port = consecutive_free_ports(workers)
    config["server"].update(grpc_listen=f"127.0.0.1:{port}", workers=workers)
    return yaml.safe_dump(config, sort_keys=False)


def healthy_workers(stack: Stack) -> int:
    """How many sidecar endpoints Envoy counts healthy (its gRPC health checks)."""
    clusters = httpx.get(f"{stack.admin_url}/clusters", timeout=5).text
    return sum(
        line.startswith(f"{EXTPROC_CLUSTER}::") and line.endswith("health_flags::healthy")
        for line in clusters.splitlines()
    )


def start(directory: Path, workers: int, **sections) -> tuple[Stack, ConfigMapDir]:
    """The stack, once Envoy sees every worker healthy.

    Envoy is ready after its first round of health checks, but a first check that
    timed out under load leaves that worker unhealthy for a while, and Envoy then
    sends every stream to the other one: tests that count streams per worker wait.
    """
    mount = ConfigMapDir(directory / "mount", running_policy(directory, workers, **sections))
    stack = Stack(mount.path, directory)
    stack.start()
    try:
        assert wait_for(lambda: healthy_workers(stack) == workers, timeout=30)
    except BaseException:
        stack.stop()
        raise
    return stack, mount


def reloads(stack: Stack, result: str) -> float:
    return metric(stack, "ai_gateway_config_reloads_total", result=result)


def worker_reloads(stack: Stack) -> list[int]:
    """Per supervised worker, how many times it applied the supervisor's snapshot.

    The supervisor counts a reload once it validated the file, then signals the
    workers, which apply it a moment later: a test that sends a request right
    after the count could still reach a worker on the old policy.
    """
    log = stack.log("sidecar")
    workers = len(stack.sidecar_addresses)
    return [
        len(re.findall(rf"worker {i}: (?:policy reloaded|keys re-read)", log))
        for i in range(workers)
    ]


def wait_reloaded(stack: Stack, successes: float, applied: list[int]) -> None:
    """Wait until the reload after `successes` is counted and, supervised, every
    worker applied it (a single worker applies it before it counts it)."""
    assert wait_for(lambda: reloads(stack, "success") == successes + 1, timeout=30)
    if len(applied) > 1:
        assert wait_for(
            lambda: all(n > a for n, a in zip(worker_reloads(stack), applied, strict=True)),
            timeout=30,
        ), (applied, worker_reloads(stack))


def change_policy(stack: Stack, mount: ConfigMapDir, edit: Callable[[dict], None]) -> None:
    """Apply an edit to the mounted policy and wait until the sidecar took it."""
    before, applied = reloads(stack, "success"), worker_reloads(stack)
    config = yaml.safe_load(mount.text())
    edit(config)
    mount.update(yaml.safe_dump(config, sort_keys=False))
    wait_reloaded(stack, before, applied)


def mock_request(stack: Stack, request_id: str) -> dict:
    def fetch():
        r = httpx.get(f"{stack.mock_url}/_mock/exchanges/{request_id}", timeout=5)
        return r.json() if r.status_code == 200 else None

    found = wait_for(fetch)
    assert found, f"the mock never saw {request_id}"
    body = orjson.loads(base64.b64decode(found["body_b64"]))
    return {"headers": found["headers"], "body": body}


def chat(stack: Stack, **headers: str) -> tuple[str, httpx.Response]:
    request_id = uuid.uuid4().hex
    r = httpx.post(
        f"{stack.base_url}/v1/chat/completions",
        json=SEED,
        headers={**AUTH, "x-mock-request-id": request_id, **headers},
        timeout=60,
    )
    return request_id, r


@dataclass
class Streamed:
    request_id: str
    status: int = 0
    body: bytes = b""
    error: str | None = None
    ended_after: bool = False  # ended after the event the test was waiting for


def open_streams(
    stack: Stack, count: int, tokens: int, delay_ms: int
) -> tuple[list[Streamed], threading.Barrier, threading.Event, Callable[[], None]]:
    """`count` slow streams; returns when every one has its first bytes.

    The test sets `event` once what it wanted to happen during the streams happened;
    each stream records whether it ended after that. `join()` waits for them all.
    """
    barrier = threading.Barrier(count + 1)
    event = threading.Event()
    results = [Streamed(uuid.uuid4().hex) for _ in range(count)]

    def run(result: Streamed) -> None:
        headers = {
            **AUTH,
            "x-mock-request-id": result.request_id,
            "x-mock-tokens": str(tokens),
            "x-mock-delay-ms": str(delay_ms),
        }
        waited = False
        try:
            with (
                httpx.Client(timeout=120) as client,
                client.stream(
                    "POST", f"{stack.base_url}/v1/chat/completions", json=SEED, headers=headers
                ) as r,
            ):
                result.status = r.status_code
                for chunk in r.iter_raw():
                    result.body += chunk
                    if not waited:
                        waited = True
                        barrier.wait(timeout=60)
        except Exception as exc:  # recorded: the test asserts on it
            result.error = repr(exc)
        finally:
            result.ended_after = event.is_set()
            if not waited:
                barrier.abort()

    pool = ThreadPoolExecutor(count)
    futures = [pool.submit(run, result) for result in results]
    barrier.wait(timeout=60)

    def join() -> None:
        for future in futures:
            future.result(timeout=120)
        pool.shutdown()

    return results, barrier, event, join


def assert_complete(result: Streamed, tokens: int) -> None:
    assert result.error is None, result.error
    assert result.status == 200
    payloads = [line[6:] for line in result.body.split(b"\n") if line.startswith(b"data: ")]
    assert payloads[-1] == b"[DONE]"
    chunks = [orjson.loads(p) for p in payloads[:-1]]
    assert all("error" not in c for c in chunks)
    content = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert len(content) == tokens
    # The client did not ask for usage: no usage chunk, no figure in any chunk.
    assert all(c["choices"] and c.get("usage") is None for c in chunks)


def worker_pids(stack: Stack) -> dict[int, int]:
    """Latest pid of each worker, from the supervisor's log."""
    pids: dict[int, int] = {}
    for index, pid in re.findall(r"worker (\d+) started \(pid (\d+)\)", stack.log("sidecar")):
        pids[int(index)] = int(pid)
    return pids


# ------------------------------------------------------------------ two workers


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, ConfigMapDir]]:
    stack, mount = start(tmp_path_factory.mktemp("two"), workers=2)
    try:
        yield stack, mount
    finally:
        stack.stop()


def test_two_workers_share_the_streams(two) -> None:
    stack, _ = two
    assert len(stack.sidecar_addresses) == 2
    # Each check has a 1 s deadline, which a loaded machine can miss: polled.
    assert wait_for(lambda: all(grpc_serving(a) for a in stack.sidecar_addresses))
    # `server.event_loop` defaults to uvloop: each worker says which loop it serves on.
    for index in (0, 1):
        assert re.search(rf"worker {index} of 2 listening on .* loop uvloop", stack.log("sidecar"))
    before = {w: metric(stack, "ai_gateway_worker_streams_total", worker=w) for w in "01"}
    requests = metric(stack, "ai_gateway_requests_total", route="v1", status="200")
    results, _, event, join = open_streams(stack, count=20, tokens=10, delay_ms=20)
    event.set()
    join()
    for result in results:
        assert_complete(result, tokens=10)
    after = {w: metric(stack, "ai_gateway_worker_streams_total", worker=w) for w in "01"}
    taken = {w: after[w] - before[w] for w in "01"}
    assert taken["0"] > 0 and taken["1"] > 0, taken  # Envoy spread them over both
    # One /metrics for both workers, and the sums are exact.
    assert taken["0"] + taken["1"] == 20
    assert wait_for(
        lambda: (
            metric(stack, "ai_gateway_requests_total", route="v1", status="200") == requests + 20
        )
    )
    assert wait_for(lambda: metric(stack, "ai_gateway_active_streams") == 0)


def test_policy_change_during_20_open_streams(two) -> None:
    """None of the open streams breaks; they finish under the policy they started
    with (usage requested upstream, metered exactly); new requests get the new one."""
    stack, mount = two
    estimated = metric(stack, "ai_gateway_usage_estimated_total", model="gpt-3.5-turbo")
    results, _, changed, join = open_streams(stack, count=20, tokens=120, delay_ms=50)
    change_policy(stack, mount, lambda c: c["streaming"].update(ensure_usage=False))
    changed.set()
    new_id, r = chat(stack)  # after the change
    assert r.status_code == 200
    assert "stream_options" not in mock_request(stack, new_id)["body"]
    join()
    for result in results:
        assert_complete(result, tokens=120)
        assert result.ended_after, "a stream ended before the policy changed"
        sent = mock_request(stack, result.request_id)["body"]
        assert sent["stream_options"] == {"include_usage": True}  # the old policy
    # Only the new request lacked provider usage; the 20 were metered exactly.
    assert wait_for(
        lambda: (
            metric(stack, "ai_gateway_usage_estimated_total", model="gpt-3.5-turbo")
            == estimated + 1
        )
    )
    change_policy(stack, mount, lambda c: c["streaming"].update(ensure_usage=True))


def test_invalid_change_is_refused_and_the_old_policy_stays(two) -> None:
    stack, mount = two
    good = mount.text()
    failures = reloads(stack, "failure")
    restarts = metric(stack, "ai_gateway_worker_restarts_total")
    mount.update(good.replace("ensure_usage: true", "ensure_usage: maybe"))
    try:
        assert wait_for(lambda: reloads(stack, "failure") == failures + 1, timeout=30)
        # Counted, then logged: the lines may come a moment after the count.
        refused = f"{mount.path}: streaming.ensure_usage: expected true or false"
        assert wait_for(lambda: refused in stack.log("sidecar")), stack.log("sidecar")[-2000:]
        assert "keeping the previous policy" in stack.log("sidecar")
        # A worker that dies now comes back with the last good policy, not the file.
        os.kill(worker_pids(stack)[1], signal.SIGKILL)
        assert wait_for(
            lambda: metric(stack, "ai_gateway_worker_restarts_total") == restarts + 1, timeout=30
        )
        stack.wait_sidecar(deadline=time.monotonic() + 30)
        before = metric(stack, "ai_gateway_worker_streams_total", worker="1")

        def restarted_worker_took_one() -> bool:
            request_id, r = chat(stack)
            assert r.status_code == 200
            sent = mock_request(stack, request_id)["body"]
            assert sent["stream_options"] == {"include_usage": True}  # the last good policy
            return metric(stack, "ai_gateway_worker_streams_total", worker="1") > before

        assert wait_for(restarted_worker_took_one, timeout=30)
        assert reloads(stack, "failure") == failures + 1  # reported once, not every poll
    finally:
        successes, applied = reloads(stack, "success"), worker_reloads(stack)
        mount.update(good)
        wait_reloaded(stack, successes, applied)


def test_rotated_key_file_is_read_again(tmp_path: Path, two) -> None:
    """A provider key in its own file (a mounted Secret) is re-read when it changes."""
    stack, mount = two
    key = ConfigMapDir(tmp_path / "secret", "key-one\n")
    change_policy(stack, mount, lambda c: c["providers"]["mock"].update(api_key_file=str(key.path)))
    request_id, _ = chat(stack)
    assert mock_request(stack, request_id)["headers"]["authorization"] == "Bearer key-one"
    before, applied = reloads(stack, "success"), worker_reloads(stack)
    key.update("key-two\n")
    wait_reloaded(stack, before, applied)
    for _ in range(4):  # both workers
        request_id, _ = chat(stack)
        assert mock_request(stack, request_id)["headers"]["authorization"] == "Bearer key-two"
    change_policy(stack, mount, lambda c: c["providers"]["mock"].pop("api_key_file"))


# ------------------------------------------------------------------ shutdown


def test_sigterm_lets_open_streams_finish(tmp_path: Path) -> None:
    stack, _ = start(tmp_path, workers=2)
    try:
        results, _, stopped, join = open_streams(stack, count=6, tokens=60, delay_ms=50)
        sidecar = stack.procs["sidecar"]
        sidecar.send_signal(signal.SIGTERM)
        stopped.set()
        join()
        for result in results:
            assert_complete(result, tokens=60)
        assert sidecar.wait(timeout=60) == 0
        log = stack.log("sidecar")
        assert "refusing new streams" in log and "cut at the end" not in log
        # Gone now: new requests fail closed, with Envoy's JSON error.
        _, r = chat(stack)
        assert r.status_code == 500 and r.json()["error"]["code"] == "gateway_error"
    finally:
        stack.stop()


def test_grace_period_bounds_the_shutdown(tmp_path: Path) -> None:
    """A single worker (no supervisor): streams longer than the grace period are ended
    by the gateway before it goes, with the format's error event and `[DONE]` (issue 17
    item 5), not left truncated."""
    stack, _ = start(tmp_path, workers=1, server={"shutdown_grace_seconds": 1})
    try:
        results, _, stopped, join = open_streams(stack, count=2, tokens=400, delay_ms=50)
        sidecar = stack.procs["sidecar"]
        sidecar.send_signal(signal.SIGTERM)
        stopped.set()
        assert sidecar.wait(timeout=30) == 0
        join()
        for result in results:  # ended early, but cleanly: the last event is the error
            payloads = [p for p in sse_payloads(result.body) if p.strip()]
            assert payloads[-1] == b"[DONE]", result.body[-300:]
            error = orjson.loads(payloads[-2])["error"]
            assert error["code"] == "gateway_shutdown" and "shutting down" in error["message"]
            assert len(payloads) < 400  # it did not run to its end
        assert "ending 2 streams with an error event" in stack.log("sidecar")
    finally:
        stack.stop()


def test_single_worker_watches_its_own_policy(tmp_path: Path) -> None:
    stack, mount = start(tmp_path, workers=1)
    try:
        request_id, _ = chat(stack)
        assert mock_request(stack, request_id)["body"]["stream_options"] == {"include_usage": True}
        change_policy(stack, mount, lambda c: c["streaming"].update(ensure_usage=False))
        request_id, _ = chat(stack)
        assert "stream_options" not in mock_request(stack, request_id)["body"]
        failures = reloads(stack, "failure")
        mount.update("routes: [")
        assert wait_for(lambda: reloads(stack, "failure") == failures + 1, timeout=30)
        # Counted, then logged: the line may come a moment after the count.
        assert wait_for(lambda: f"{mount.path}: line 1" in stack.log("sidecar"))
        request_id, _ = chat(stack)
        assert "stream_options" not in mock_request(stack, request_id)["body"]
    finally:
        stack.stop()


def test_two_workers_keep_one_limit(tmp_path: Path) -> None:
    """Workers count against one shared store (Redis), so a request limit is exact
    across them, and both workers take streams while it holds."""
    redis = RedisServer(tmp_path / "redis").start()
    try:
        limits = {
            "store": "redis",
            "redis": {"url": redis.url, "timeout_ms": 5000},
            "limits": [
                {"name": "shared", "requests": 7, "window": "1d", "match": {"routes": ["v1"]}}
            ],
        }
        (tmp_path / "stack").mkdir()
        stack, _ = start(tmp_path / "stack", workers=2, rate_limits=limits)
        try:
            before = {w: metric(stack, "ai_gateway_worker_streams_total", worker=w) for w in "01"}
            with ThreadPoolExecutor(20) as pool:
                statuses = list(pool.map(lambda _: chat(stack)[1].status_code, range(20)))
            assert statuses.count(200) == 7, statuses
            assert statuses.count(429) == 13, statuses
            taken = {
                w: metric(stack, "ai_gateway_worker_streams_total", worker=w) - before[w]
                for w in "01"
            }
            assert taken["0"] > 0 and taken["1"] > 0, taken
        finally:
            stack.stop()
    finally:
        redis.stop()
