"""OpenAI Responses API: typed SSE events, usage from `response.completed`, texts in
deltas and in the whole-text repeats, errors as the openai SDK sees them."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from extproc.providers import openai_responses
from extproc.providers.openai_responses import OpenAIResponses, OpenAIResponsesStream
from tests.providers_helpers import (
    CARD,
    MASK,
    REPLAY,
    cut,
    cuts,
    final_texts,
    mask_cards,
    out_of,
    raw_of,
    replay,
    rewrite_all,
    running_texts,
    usage_tuple,
)

RESP_ID = "resp_0a1b2c3d4e5f"
MSG_ID = "msg_0a1b2c3d4e5f"
RS_ID = "rs_0a1b2c3d4e5f"
FC_ID = "fc_0a1b2c3d4e5f"
TEXT_PIECES = ["Your card ", f"is {CARD}", "."]
TEXT = "".join(TEXT_PIECES)
ARGS_PIECES = ['{"city":', '"Paris"}']
USAGE = {
    "input_tokens": 36,
    "input_tokens_details": {"cached_tokens": 16},
    "output_tokens": 27,
    "output_tokens_details": {"reasoning_tokens": 9},
    "total_tokens": 63,
}


def response(status: str, output: list[Any], usage: Any = None) -> dict[str, Any]:
    return {
        "id": RESP_ID, "object": "response", "created_at": 1735689600, "status": status,
        "background": False, "error": None, "incomplete_details": None, "instructions": None,
        "max_output_tokens": None, "model": "gpt-4.1-mini-2025-04-14", "output": output,
        "parallel_tool_calls": True, "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None}, "store": True, "temperature": 1.0,
        "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [],
        "top_p": 1.0, "truncation": "disabled", "usage": usage, "user": None, "metadata": {},
    }  # fmt: skip


def build(events: list[dict[str, Any]]) -> list[bytes]:
    frames = []
    for seq, event in enumerate(events):
        data = {"type": event.pop("type"), "sequence_number": seq, **event}
        name = data["type"].encode()
        frames.append(b"event: " + name + b"\ndata: " + orjson.dumps(data) + b"\n\n")
    return frames


def message_item(status: str, text: str | None) -> dict[str, Any]:
    content = [] if text is None else [
        {"type": "output_text", "annotations": [], "logprobs": [], "text": text}
    ]  # fmt: skip
    return {"id": MSG_ID, "type": "message", "status": status, "content": content,
            "role": "assistant"}  # fmt: skip


def reasoning_item(summary: str | None) -> dict[str, Any]:
    parts = [] if summary is None else [{"type": "summary_text", "text": summary}]
    return {"id": RS_ID, "type": "reasoning", "summary": parts}


def call_item(status: str, args: str) -> dict[str, Any]:
    return {"id": FC_ID, "type": "function_call", "status": status, "arguments": args,
            "call_id": "call_0a1b2c", "name": "get_weather"}  # fmt: skip


SUMMARY = "Looking up the card."
FINAL_OUTPUT = [reasoning_item(SUMMARY), message_item("completed", TEXT),
                call_item("completed", "".join(ARGS_PIECES))]  # fmt: skip
EVENTS: list[dict[str, Any]] = [
    {"type": "response.created", "response": response("in_progress", [])},
    {"type": "response.in_progress", "response": response("in_progress", [])},
    {"type": "response.output_item.added", "output_index": 0, "item": reasoning_item(None)},
    {"type": "response.reasoning_summary_part.added", "item_id": RS_ID, "output_index": 0,
     "summary_index": 0, "part": {"type": "summary_text", "text": ""}},
    {"type": "response.reasoning_summary_text.delta", "item_id": RS_ID, "output_index": 0,
     "summary_index": 0, "delta": SUMMARY},
    {"type": "response.reasoning_summary_text.done", "item_id": RS_ID, "output_index": 0,
     "summary_index": 0, "text": SUMMARY},
    {"type": "response.reasoning_summary_part.done", "item_id": RS_ID, "output_index": 0,
     "summary_index": 0, "part": {"type": "summary_text", "text": SUMMARY}},
    {"type": "response.output_item.done", "output_index": 0, "item": reasoning_item(SUMMARY)},
    {"type": "response.output_item.added", "output_index": 1,
     "item": message_item("in_progress", None)},
    {"type": "response.content_part.added", "item_id": MSG_ID, "output_index": 1,
     "content_index": 0, "part": {"type": "output_text", "annotations": [], "logprobs": [],
                                  "text": ""}},
    *[{"type": "response.output_text.delta", "item_id": MSG_ID, "output_index": 1,
       "content_index": 0, "delta": piece, "logprobs": []} for piece in TEXT_PIECES],
    {"type": "response.output_text.done", "item_id": MSG_ID, "output_index": 1,
     "content_index": 0, "text": TEXT, "logprobs": []},
    {"type": "response.content_part.done", "item_id": MSG_ID, "output_index": 1,
     "content_index": 0, "part": {"type": "output_text", "annotations": [], "logprobs": [],
                                  "text": TEXT}},
    {"type": "response.output_item.done", "output_index": 1,
     "item": message_item("completed", TEXT)},
    {"type": "response.output_item.added", "output_index": 2,
     "item": call_item("in_progress", "")},
    *[{"type": "response.function_call_arguments.delta", "item_id": FC_ID, "output_index": 2,
       "delta": piece} for piece in ARGS_PIECES],
    {"type": "response.function_call_arguments.done", "item_id": FC_ID, "output_index": 2,
     "arguments": "".join(ARGS_PIECES)},
    {"type": "response.output_item.done", "output_index": 2,
     "item": call_item("completed", "".join(ARGS_PIECES))},
    {"type": "response.completed", "response": response("completed", FINAL_OUTPUT, USAGE)},
]  # fmt: skip
FRAMES = build([dict(e) for e in EVENTS])
BODY = b"".join(FRAMES)


def decoder() -> OpenAIResponsesStream:
    return OpenAIResponses.stream_decoder(hide_usage=False, max_frame_bytes=1 << 16)


@REPLAY
@given(st.data())
def test_any_chunking_meters_and_forwards_bytes_exactly(data):
    dec = decoder()
    events = replay(dec, cut(BODY, data.draw(cuts(BODY))))
    assert raw_of(events) == BODY and out_of(events) == BODY
    assert usage_tuple(dec.usage) == (36, 27, 63, 16, 9, True)
    assert dec.finish_reason == "tool_calls"
    assert dec.content_events == len(TEXT_PIECES) + len(ARGS_PIECES) + 1
    assert [e.name for e in events] == [e["type"] for e in EVENTS]
    assert events[-1].is_done


def test_deltas_are_running_texts_and_repeats_are_final():
    dec = decoder()
    events = replay(dec, [BODY])
    assert running_texts(dec, events) == {
        ("reasoning", 0): SUMMARY,
        ("content", 1 << 16): TEXT,
        ("tool_arguments", 2 << 16): "".join(ARGS_PIECES),
    }
    finals = {text for _, _, text in final_texts(dec, events)}
    assert {TEXT, SUMMARY, "".join(ARGS_PIECES)} <= finals


def test_masking_reaches_deltas_and_every_repeat():
    dec = decoder()
    events = replay(dec, [BODY])
    masked = rewrite_all(dec, events, mask_cards)
    assert CARD.encode() not in masked
    check = decoder()
    after = replay(check, [masked])
    assert running_texts(check, after)[("content", 1 << 16)] == f"Your card is {MASK}."
    assert usage_tuple(check.usage) == usage_tuple(dec.usage)
    # The rewritten stream is still what the SDK expects, text included.
    final = next(e for e in sdk_events(masked) if e.type == "response.completed")
    assert final.response.output_text == f"Your card is {MASK}."


def test_only_terminal_events_are_parsed(monkeypatch):
    calls = []
    real = openai_responses.loads
    monkeypatch.setattr(openai_responses, "loads", lambda d: calls.append(d) or real(d))
    replay(decoder(), [BODY])
    assert len(calls) == 1


def test_incomplete_and_failed_finish_reasons():
    dec = decoder()
    incomplete = response("incomplete", [], USAGE)
    incomplete["incomplete_details"] = {"reason": "max_output_tokens"}
    dec.feed(build([{"type": "response.incomplete", "response": incomplete}])[0])
    assert dec.finish_reason == "length" and dec.usage.total_tokens == 63
    dec = decoder()
    dec.feed(build([{"type": "response.failed", "response": response("failed", [])}])[0])
    assert dec.finish_reason == "error"


def sdk_events(body: bytes) -> list[Any]:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)

    client = openai.OpenAI(
        api_key="sk-test",
        base_url="http://provider.test/v1",
        http_client=httpx.Client(transport=httpx.MockTransport(handler)),
        max_retries=0,
    )
    return list(client.responses.create(model="gpt-4.1-mini", input="hi", stream=True))


def test_error_event_is_the_sdks_error_event_with_the_next_sequence_number():
    dec = decoder()
    events = replay(dec, [b"".join(FRAMES[:12])])
    body = b"".join(e.out for e in events) + dec.error_event("blocked by policy", "blocked")
    seen = sdk_events(body)
    assert seen[-1].type == "error"
    assert (seen[-1].message, seen[-1].code, seen[-1].sequence_number) == (
        "blocked by policy", "blocked", 12,
    )  # fmt: skip
    assert [e.delta for e in seen if e.type == "response.output_text.delta"] == TEXT_PIECES[:2]


# ------------------------------------------------------------------ requests


def test_request_texts_string_and_items():
    simple = OpenAIResponses.parse_request(
        orjson.dumps({"model": "gpt-4.1", "input": f"pay {CARD}", "instructions": "Be kind."})
    )
    assert simple.prompt_texts == ["Be kind.", f"pay {CARD}"] and not simple.stream
    masked = [mask_cards(t) for t in simple.prompt_texts]
    body = OpenAIResponses.replace_request_texts(simple, masked)
    assert orjson.loads(body)["input"] == f"pay {MASK}"

    items = {
        "model": "gpt-4.1", "stream": True, "max_output_tokens": 64,
        "input": [
            {"role": "user", "content": "hello"},
            {"type": "message", "role": "user",
             "content": [{"type": "input_text", "text": "part"}, {"type": "input_image"}]},
            {"type": "function_call", "call_id": "c", "name": "f", "arguments": '{"x":1}'},
            {"type": "function_call_output", "call_id": "c", "output": "result"},
            {"type": "reasoning", "id": "rs_1", "summary": []},
        ],
    }  # fmt: skip
    info = OpenAIResponses.parse_request(orjson.dumps(items))
    assert info.prompt_texts == ["hello", "part", '{"x":1}', "result"]
    assert info.stream and info.max_output_tokens == 64
    assert OpenAIResponses.ensure_usage(info) is None
    new = orjson.loads(OpenAIResponses.replace_request_texts(info, ["a", "b", "c", "d"]))
    assert new["input"][1]["content"][0]["text"] == "b" and new["input"][3]["output"] == "d"


def test_whole_response_texts_usage_finish():
    body = orjson.dumps(response("completed", FINAL_OUTPUT, USAGE))
    assert OpenAIResponses.completion_usage(body).total_tokens == 63
    assert OpenAIResponses.completion_finish_reason(body) == "tool_calls"
    texts = OpenAIResponses.completion_texts(body)
    assert [t.text for t in texts] == [SUMMARY, TEXT, "".join(ARGS_PIECES)]
    assert all(t.final for t in texts)
    new = OpenAIResponses.rewrite_completion(body, [mask_cards(t.text) for t in texts])
    assert CARD.encode() not in new


def test_paths_and_errors():
    assert OpenAIResponses.handles("/v1/responses")
    assert not OpenAIResponses.handles("/v1/responses/resp_1/cancel")
    # A missing model stays empty for a policy default; the exchange refuses it after.
    assert OpenAIResponses.parse_request(b'{"input": "x"}').model == ""
    with pytest.raises(Exception, match="model"):
        OpenAIResponses.parse_request(b'{"input": "x", "model": 3}')
    err = orjson.loads(OpenAIResponses.error_body(400, "bad", "invalid_value", "input"))
    assert err["error"]["param"] == "input"


def test_whole_text_repeats_are_shown_to_policies():
    """`*.done` events and `response.completed` repeat the whole answer: they must be
    flagged for the guards like the deltas, or masked text would leak through them."""
    from extproc.dev import mock

    frames = mock.build_responses_stream(
        {"model": "gpt-4o", "input": "hi", "stream": True}, mock.MockOptions(tokens=5)
    )
    decoder = OpenAIResponses.stream_decoder(hide_usage=False, max_frame_bytes=1 << 20)
    events = decoder.feed(b"".join(frames)) + decoder.finish()
    repeats = [e for e in events if e.name and (e.name.endswith(".done") or e.is_done)]
    assert repeats and all(e.is_content for e in repeats)
    assert any(t.final for e in repeats for t in decoder.texts(e))
