"""Metering off path without gRPC: the synchronous exchange and its observer fed the
messages Envoy sends each of them (`extproc.exchange.offpath`)."""

from __future__ import annotations

import asyncio
import dataclasses

import orjson
import pytest
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode

from extproc.exchange import Exchange, offpath
from extproc.h2stream import EOF
from extproc.headers import EXCHANGE_HEADER
from extproc.metrics import Metrics
from extproc.policy import Policy
from tests.test_exchange import CHAT, CONFIG, body_msg, headers_msg, stream_frames

AUTO = dataclasses.replace(
    CONFIG, streaming=dataclasses.replace(CONFIG.streaming, meter_off_path="auto")
)
SSE = {":status": "200", "content-type": "text/event-stream"}


class FakeContext:
    """What `observe` reads: the messages Envoy sent the observing stream, then EOF."""

    def __init__(self, messages: list) -> None:
        self.messages = list(messages)
        self.reads = 0

    async def read(self):
        self.reads += 1
        return self.messages.pop(0) if self.messages else EOF


def tokens(metrics: Metrics, kind: str) -> float:
    labels = {"model": "gpt-3.5-turbo", "consumer": "anonymous", "kind": kind}
    return metrics.registry.get_sample_value("ai_gateway_tokens_total", labels) or 0.0


def requests(metrics: Metrics) -> float:
    labels = {"route": "v1", "model": "gpt-3.5-turbo", "status": "200"}
    return metrics.registry.get_sample_value("ai_gateway_requests_total", labels) or 0.0


async def synchronous_part(ex: Exchange, body: dict) -> tuple[str, object]:
    """Request headers and body, then response headers; the token and the last answer."""
    path = {":method": "POST", ":path": "/v1/chat/completions", "content-type": "application/json"}
    ex.handle(headers_msg(path, route="v1"), 0.01)
    answer = await ex.on_request_body(orjson.dumps(body), 0.02)
    mutation = answer.request_body.response.header_mutation
    token = next(
        (
            h.header.raw_value.decode()
            for h in mutation.set_headers
            if h.header.key == EXCHANGE_HEADER
        ),
        "",
    )
    return token, ex.handle(headers_msg(SSE, response=True), 0.03)


def observed(token: str, frames: list[bytes]) -> FakeContext:
    chunks = [body_msg(f, end=False, response=True) for f in frames]
    return FakeContext([headers_msg({EXCHANGE_HEADER: token}), *chunks])


async def test_a_metered_stream_is_settled_by_its_observer_once():
    metrics = Metrics()
    ex = Exchange(Policy(AUTO), metrics, now=0.0)
    token, answer = await synchronous_part(
        ex, {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    )
    assert token and token in offpath.REGISTRY
    assert answer.mode_override.response_body_mode == ProcessingMode.NONE
    context = observed(token, stream_frames(3, usage=True))
    first = context.messages.pop(0)
    await offpath.observe(first, context, lambda: 0.5, lambda ex: None)
    assert ex.closed and ex.usage.completion_tokens == 3 and not ex.usage.estimated
    assert tokens(metrics, "prompt") == 11 and tokens(metrics, "completion") == 3
    ex.close(0.6)  # the synchronous stream ends after: nothing settles twice
    assert requests(metrics) == 1
    assert token not in offpath.REGISTRY


async def test_hidden_usage_keeps_the_stream_synchronous():
    """The gateway asked for usage the client did not: its chunk must be hidden."""
    ex = Exchange(Policy(AUTO), Metrics(), now=0.0)
    token, answer = await synchronous_part(ex, {**CHAT, "stream": True})
    assert token == "" and ex.off_path is None
    assert not answer.HasField("mode_override")


async def test_off_is_the_default():
    ex = Exchange(Policy(CONFIG), Metrics(), now=0.0)
    token, answer = await synchronous_part(
        ex, {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    )
    assert token == "" and not answer.HasField("mode_override")


async def test_an_observer_with_an_unknown_token_leaves_at_once():
    context = observed("not-a-token", stream_frames(3, usage=True))
    first = context.messages.pop(0)
    await offpath.observe(first, context, lambda: 0.5, lambda ex: None)
    assert context.reads == 0


async def test_an_upstream_error_keeps_the_stream_synchronous_and_sends_the_observer_away():
    ex = Exchange(Policy(AUTO), Metrics(), now=0.0)
    path = {":method": "POST", ":path": "/v1/chat/completions", "content-type": "application/json"}
    ex.handle(headers_msg(path, route="v1"), 0.01)
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    await ex.on_request_body(orjson.dumps(body), 0.02)
    token = ex.off_path.token
    ex.handle(headers_msg({":status": "503"}, response=True), 0.03)
    assert ex.off_path is None and token not in offpath.REGISTRY
    context = observed(token, stream_frames(3, usage=True))
    await offpath.observe(context.messages.pop(0), context, lambda: 0.5, lambda ex: None)
    assert context.reads == 0


async def test_an_observer_that_never_comes_settles_the_exchange_as_cut_short(monkeypatch):
    monkeypatch.setattr(offpath, "ORPHAN_S", 0.01)
    metrics = Metrics()
    ex = Exchange(Policy(AUTO), metrics, now=0.0)
    token, _ = await synchronous_part(
        ex, {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    )
    ex.close(0.5)  # the synchronous stream ended; no observer attached
    assert not ex.closed
    await asyncio.sleep(0.05)
    assert ex.closed and ex.usage.estimated
    kind = {"kind": "off_path_unobserved"}
    assert metrics.registry.get_sample_value("ai_gateway_errors_total", kind) == 1
    assert token not in offpath.REGISTRY


@pytest.fixture(autouse=True)
def _clean_registry():
    yield
    offpath.REGISTRY.clear()


async def test_the_token_names_the_worker_that_holds_the_exchange():
    """`i.` + 144 random bits: the bootstrap runs only worker i's observing filter for it."""
    offpath.set_worker(3)
    try:
        ex = Exchange(Policy(AUTO), Metrics(), now=0.0)
        token, _ = await synchronous_part(
            ex, {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
        )
    finally:
        offpath.set_worker(0)
    index, dot, rest = token.partition(".")
    assert (index, dot) == ("3", ".") and len(rest) == 24 and "." not in rest
    assert offpath.REGISTRY[token].exchange is ex


class Slot:
    """The admission slot a synchronous stream hands over: how often it was released."""

    def __init__(self) -> None:
        self.released = 0

    def release(self) -> None:
        self.released += 1


async def test_the_observer_gives_back_the_slot_of_the_stream_that_ended_before_it():
    """The synchronous stream ends at its response headers: the exchange keeps its
    admission slot while the observer meters it, and gives it back once, at its end."""
    ex = Exchange(Policy(AUTO), Metrics(), now=0.0)
    token, _ = await synchronous_part(
        ex, {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    )
    slot = Slot()
    ex.close(0.04)
    assert offpath.keep_slot(ex, slot.release) and slot.released == 0
    context = observed(token, stream_frames(3, usage=True))
    await offpath.observe(context.messages.pop(0), context, lambda: 0.5, lambda ex: None)
    assert ex.closed and ex.usage.completion_tokens == 3 and slot.released == 1
    assert not offpath.keep_slot(ex, slot.release)  # done: the caller releases it


async def test_a_slot_is_not_kept_for_an_exchange_that_is_done_or_synchronous():
    ex = Exchange(Policy(AUTO), Metrics(), now=0.0)
    token, _ = await synchronous_part(
        ex, {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    )
    context = observed(token, stream_frames(3, usage=True))
    await offpath.observe(context.messages.pop(0), context, lambda: 0.5, lambda ex: None)
    ex.close(0.6)  # the observer settled it first
    assert not offpath.keep_slot(ex, Slot().release)
    hidden = Exchange(Policy(AUTO), Metrics(), now=0.0)
    await synchronous_part(hidden, {**CHAT, "stream": True})  # usage hidden: synchronous
    assert not offpath.keep_slot(hidden, Slot().release)


async def test_an_orphan_gives_back_its_slot(monkeypatch):
    monkeypatch.setattr(offpath, "ORPHAN_S", 0.01)
    ex = Exchange(Policy(AUTO), Metrics(), now=0.0)
    await synchronous_part(ex, {**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    slot = Slot()
    ex.close(0.5)
    assert offpath.keep_slot(ex, slot.release)
    await asyncio.sleep(0.05)
    assert ex.closed and slot.released == 1


async def test_the_observers_last_answer_carries_no_figures_a_synchronous_one_does():
    """Envoy reads no answer of the observer, so its end builds no metadata; the same
    stream kept synchronous (usage hidden) still hands Envoy the final figures."""
    frames = stream_frames(3, usage=True)
    ex = Exchange(Policy(AUTO), Metrics(), now=0.0)
    token, _ = await synchronous_part(
        ex, {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    )
    assert offpath.observed(ex)
    answers = [ex.body.feed(ex, f, i == len(frames) - 1, 0.5) for i, f in enumerate(frames)]
    assert ex.closed and ex.usage.completion_tokens == 3
    assert not any(a.HasField("dynamic_metadata") for a in answers)
    ex.close(0.6)

    kept = Exchange(Policy(AUTO), Metrics(), now=0.0)
    token, _ = await synchronous_part(kept, {**CHAT, "stream": True})
    assert token == "" and not offpath.observed(kept)
    last = [kept.body.feed(kept, f, i == len(frames) - 1, 0.5) for i, f in enumerate(frames)][-1]
    figures = last.dynamic_metadata.fields["ai_gateway"].struct_value.fields
    assert figures["completion_tokens"].number_value == 3
