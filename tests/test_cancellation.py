"""A hang-up at any point of an exchange settles cleanly (issue 17 item 3): a property
test over the cancellation point. A fake Envoy feeds the real servicer one exchange
(rate limited on a real Redis) and goes away at a random step: before the headers,
while the request body waits on Redis, between chunks, during settlement, or with a
write failing under the servicer (`StreamEnded`). Whatever the step: nothing is
logged as an error or counted internal, no reservation stays outstanding, no stream
stays active."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.config import parse_config
from extproc.h2stream import EOF, StreamEnded
from extproc.metrics import Metrics
from extproc.policy import Shared, build_policy
from extproc.server import ExternalProcessor
from tests.redis_server import RedisServer
from tests.test_exchange import CHAT, body_msg, headers_msg, stream_frames
from tests.test_ratelimit import document

FRAMES = stream_frames(6, usage=True)
MESSAGES = [
    headers_msg(
        {":method": "POST", ":path": "/v1/chat/completions", "content-type": "application/json"},
        route="v1",
    ),
    body_msg(orjson.dumps({**CHAT, "stream": True, "max_tokens": 50})),
    headers_msg({":status": "200", "content-type": "text/event-stream"}, response=True),
    *(body_msg(f, end=False, response=True) for f in FRAMES),
    body_msg(b"", end=True, response=True),
]


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


class FakeEnvoy:
    """The servicer's side of one `Process` stream, going away at step `at`."""

    def __init__(self, how: str, at: int) -> None:
        self.how = how
        self.at = at
        self.reads = 0
        self.written: list[object] = []

    async def read(self):
        step = self.reads
        self.reads += 1
        if self.how == "hangup" and step == self.at:
            asyncio.current_task().cancel()  # what the transport does when the peer goes
            await asyncio.sleep(0)
        if step >= len(MESSAGES):
            return EOF
        return MESSAGES[step]

    async def write(self, response) -> None:
        if self.how == "write_fails" and len(self.written) == self.at:
            raise StreamEnded("stream reset")
        self.written.append(response)

    def invocation_metadata(self) -> tuple:
        return ()  # Envoy sent no `traceparent` in the call's metadata


class Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def one_exchange(url: str, how: str, at: int) -> None:
    limits = {
        "store": "redis",
        "redis": {
            "url": url,
            "failure_mode": "closed",
            "timeout_ms": 10_000,
            "key_prefix": f"cancel{uuid.uuid4().hex}:",
        },
        "limits": [
            {"name": "tok", "tokens": 1_000_000, "window": "1d", "by": "consumer"},
            {"name": "req", "requests": 1_000_000, "window": "1d"},
        ],
    }
    config = parse_config(document(limits))
    metrics = Metrics()
    shared = Shared(metrics)
    processor = ExternalProcessor(build_policy(config, shared, {}), metrics)
    store = shared.ratelimit_redis.store
    errors = Errors()
    logging.getLogger().addHandler(errors)
    try:
        envoy = FakeEnvoy(how, at)
        task = asyncio.ensure_future(processor.Process(envoy))
        if how == "outside":  # the cancellation lands wherever the servicer waits
            for _ in range(at):
                await asyncio.sleep(0)
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for _ in range(500):  # settlement beside the stream, refunds of orphaned acquires
            if not processor._background and not store._orphans:
                break
            await asyncio.sleep(0.01)
        assert not errors.records, [r.getMessage() for r in errors.records]
        sample = metrics.registry.get_sample_value
        assert not sample("ai_gateway_errors_total", {"kind": "internal"})
        assert sample("ai_gateway_active_streams") == 0
        assert await store.outstanding() == 0
        assert store.open_leases == 0
        if how == "none":  # the control: a whole exchange is metered
            assert len(envoy.written) == len(MESSAGES)
            assert sample("ai_gateway_ratelimit_tokens_total", {"limit": "tok", "phase": "settled"})
    finally:
        logging.getLogger().removeHandler(errors)
        await store.close()
        await shared.aclose()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    how=st.sampled_from(["hangup", "write_fails", "outside"]),
    at=st.integers(0, 40),
)
def test_a_hangup_at_any_step_settles_cleanly(redis_server, how, at):
    asyncio.run(one_exchange(redis_server.url, how, at))


def test_the_control_exchange_runs_whole(redis_server):
    asyncio.run(one_exchange(redis_server.url, "none", 0))
