"""`streaming.on_block`, sans-I/O: what the exchange tells Envoy after it ended a stream
(guard block, oversized frame) while the provider is still sending. `drain` clears every
later chunk; `close` answers the next chunk with an ImmediateResponse, which Envoy turns
into a closed provider stream (tests/test_e2e_block.py shows that through Envoy)."""

from __future__ import annotations

import dataclasses
import json

from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingResponse

from extproc.config import Config, ProviderConfig, RouteConfig, StreamingConfig
from extproc.policy import Policy, RequestContext, Stage, StreamBlocked
from extproc.providers.base import StreamEvent
from tests.test_exchange import CHAT, CONFIG, Run, apply_body, body_msg, headers_msg, metadata

BLOCKED = b'data: {"choices":[{"index":0,"delta":{"content":"forbidden"}}]}\n\n'


def frame(word: str) -> bytes:
    return b'data: {"choices":[{"index":0,"delta":{"content":"%s "}}]}\n\n' % word.encode()


class Blocker(Stage):
    """Blocks the stream at the first frame that says `forbidden`."""

    class Filter:
        oldest_held = None  # passes every frame on

        def process(self, events: list[StreamEvent], end: bool) -> list[StreamEvent]:
            for e in events:
                if e.data and b"forbidden" in e.data:
                    raise StreamBlocked("Blocked by guard 'words'.", "content_blocked")
            return events

    def stream_filter(self, ctx: RequestContext):
        return self.Filter()


def config(on_block: str) -> Config:
    return dataclasses.replace(
        CONFIG, streaming=StreamingConfig(max_frame_bytes=4096, on_block=on_block)
    )


def started(on_block: str) -> Run:
    """An exchange whose response headers went out: body chunks come next."""
    run = Run(config(on_block))
    run.ex.policy = Policy(run.ex.policy.config, stages=(Blocker(),))
    run.request({**CHAT, "stream": True})
    run.send(headers_msg({":status": "200", "content-type": "text/event-stream"}, response=True))
    return run


def chunk(run: Run, data: bytes, end: bool = False) -> ProcessingResponse:
    return run.send(body_msg(data, end=end, response=True))


def test_default_is_drain():
    assert StreamingConfig().on_block == "drain"


def test_drain_clears_every_later_chunk_and_ends_cleanly():
    run = started("drain")
    client = apply_body(chunk(run, frame("one")), frame("one"))
    client += apply_body(chunk(run, BLOCKED), BLOCKED)
    assert b"content_blocked" in client and client.endswith(b"data: [DONE]\n\n")
    for word in ("two", "three"):
        resp = chunk(run, frame(word))
        assert resp.response_body.response.body_mutation.clear_body
    last = chunk(run, b"", end=True)
    assert last.response_body.response.body_mutation.clear_body
    assert "upstream_closed" not in metadata(last)
    assert run.metric("ai_gateway_upstream_closed_total", {"kind": "guard_blocked"}) == 0
    assert run.metric("ai_gateway_active_streams") == 0


def test_close_answers_the_next_chunk_with_an_immediate_response():
    run = started("close")
    client = apply_body(chunk(run, frame("one")), frame("one"))
    blocked = chunk(run, BLOCKED)
    client += apply_body(blocked, BLOCKED)  # the error event and [DONE] go out first
    assert b"content_blocked" in client and client.endswith(b"data: [DONE]\n\n")
    assert blocked.WhichOneof("response") == "response_body"

    closing = chunk(run, frame("two"))
    assert closing.WhichOneof("response") == "immediate_response"
    assert closing.immediate_response.details == "ai_gateway_upstream_closed"
    md = metadata(closing)  # the access log still gets the exchange's figures
    assert md["upstream_closed"] is True
    # Charged for what the provider generated up to the block (the blocked frame too).
    assert md["usage_estimated"] is True and md["completion_tokens"] == 2
    assert run.metric("ai_gateway_upstream_closed_total", {"kind": "guard_blocked"}) == 1
    assert run.metric("ai_gateway_errors_total", {"kind": "guard_blocked"}) == 1
    assert run.metric("ai_gateway_active_streams") == 0
    run.ex.close(1.0)  # Envoy then ends the ext_proc stream: settled once, not "aborted"
    assert run.metric("ai_gateway_errors_total", {"kind": "stream_aborted"}) == 0


def test_close_has_nothing_to_close_when_the_provider_ends_next():
    run = started("close")
    chunk(run, BLOCKED)
    last = chunk(run, b"", end=True)
    assert last.WhichOneof("response") == "response_body"
    assert last.response_body.response.body_mutation.clear_body
    assert run.metric("ai_gateway_upstream_closed_total", {"kind": "guard_blocked"}) == 0


def test_close_also_follows_a_stream_the_gateway_could_not_read():
    run = started("close")
    huge = b"data: {" + b"x" * 5000
    assert b"frame_too_large" in apply_body(chunk(run, huge), huge)
    assert chunk(run, b"more").WhichOneof("response") == "immediate_response"
    assert run.metric("ai_gateway_upstream_closed_total", {"kind": "frame_too_large"}) == 1


# -- a JSON-array stream (Gemini without alt=sse) blocked while a frame is held ----------

GEMINI = dataclasses.replace(
    CONFIG,
    providers={"g": ProviderConfig(name="g", url="http://127.0.0.1:1", format="gemini")},
    routes=(RouteConfig(name="g", prefix="/v1beta/", provider="g"),),
)
GEMINI_PATH = "/v1beta/models/gemini-2.5-flash:streamGenerateContent"


def element(word: str) -> bytes:
    return b'{"candidates":[{"content":{"parts":[{"text":"%s "}],"role":"model"}}]}' % (
        word.encode()
    )


class HoldThenBlock(Stage):
    """Holds every frame that says `hold` (as a mask guard holds a frame whose text
    may still turn into a match) and blocks at the first that says `forbidden`."""

    class Filter:
        def __init__(self) -> None:
            self.queue: list[StreamEvent] = []

        @property
        def oldest_held(self) -> StreamEvent | None:
            return self.queue[0] if self.queue else None

        def process(self, events: list[StreamEvent], end: bool) -> list[StreamEvent]:
            out = []
            for e in events:
                if e.data and b"forbidden" in e.data:
                    raise StreamBlocked("Blocked by guard 'words'.", "content_blocked")
                if self.queue or (e.data and b"hold" in e.data):
                    self.queue.append(e)
                else:
                    out.append(e)
            return out

    def stream_filter(self, ctx: RequestContext):
        return self.Filter()


def test_a_json_array_blocked_after_a_held_frame_stays_one_valid_array():
    """The error element must follow what the client really got: the held frame never
    went out, so the comma before it is the last byte sent (a second comma would make
    the array invalid JSON, which the client's parser rejects)."""
    run = Run(dataclasses.replace(GEMINI, streaming=config("drain").streaming))
    run.ex.policy = Policy(run.ex.policy.config, stages=(HoldThenBlock(),))
    run.request({"contents": [{"parts": [{"text": "hi"}]}]}, path=GEMINI_PATH, route="g")
    run.send(headers_msg({":status": "200", "content-type": "application/json"}, response=True))
    first = b"[" + element("one") + b",\r\n" + element("hold")
    second = b",\r\n" + element("forbidden") + b"]"
    client = apply_body(chunk(run, first), first)
    client += apply_body(chunk(run, second), second)
    array = json.loads(client)  # one valid JSON array
    assert array[0]["candidates"][0]["content"]["parts"][0]["text"] == "one "
    assert array[-1]["error"]["details"][0]["reason"] == "content_blocked"
    assert b"hold" not in client and b"forbidden" not in client
