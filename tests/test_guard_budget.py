"""The guards' scan budget: a request too long to check, or whose check takes too
long, is refused (413 by default, 400 if configured) with an OpenAI-style error, and
a huge response frame ends the stream, instead of one request freezing the worker;
a long text is scanned in pieces with exactly the matches of a whole scan."""

from __future__ import annotations

from dataclasses import replace

import orjson
import pytest

from extproc.config import GuardConfig, GuardsConfig
from extproc.policy import Policy, Shared
from extproc.policy import guards as guards_module
from extproc.policy.guards.engine import PIECE_CHARS
from tests.test_exchange import CHAT, CONFIG, Run
from tests.test_guard_stage import PII, Consumer, client_text, content_frames

CARD = "4111 1111 1111 1111"


class Clock:
    """Advances `step` seconds on every reading."""

    def __init__(self, step: float) -> None:
        self.now = 0.0
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def guarded(*rules: GuardConfig, step: float = 0.0, **budget) -> Run:
    run = Run()
    shared = Shared(run.metrics)
    config = replace(CONFIG, guards=GuardsConfig(rules=rules, **budget))
    stage = guards_module.build(config, shared, {})
    assert stage is not None
    stage.clock = Clock(step)
    run.ex.policy = Policy(config, stages=(Consumer(), stage))
    return run


def ask(run: Run, *texts: str):
    messages = [{"role": "user", "content": t} for t in texts]
    return run.request({**CHAT, "messages": messages})[1]


def refused(response, status: int) -> dict:
    imm = response.immediate_response
    assert imm.status.code == status
    error = orjson.loads(imm.body)["error"]
    assert error["code"] == "guard_budget_exceeded"
    return error


def test_too_many_characters_is_413_before_any_scan(caplog):
    run = guarded(PII, scan_budget_chars=2048)
    response = ask(run, "x" * 1000, CARD + " " + "y" * 1100)
    error = refused(response, 413)
    assert "4111" not in error["message"] and b"4111" not in response.immediate_response.body
    assert run.metric("ai_gateway_errors_total", {"kind": "guard_budget_exceeded"}) == 1
    assert "2120 characters to scan, budget 2048" in caplog.text
    assert "4111" not in caplog.text


def test_budget_status_400_is_configurable():
    run = guarded(PII, scan_budget_chars=2048, scan_budget_status=400)
    refused(ask(run, "z" * 4096), 400)


def test_at_the_character_budget_the_request_is_checked_not_refused():
    run = guarded(PII, scan_budget_chars=2048)
    text = CARD + "." * (2048 - len(CARD))
    upstream = orjson.loads(ask(run, text).request_body.response.body_mutation.body)
    assert upstream["messages"][0]["content"].startswith("<CREDIT_CARD>.")


def test_a_scan_over_the_time_budget_is_refused(caplog):
    # Every clock reading is 0.4 s later: the second step (second text) is past 1 s.
    # The texts hold numbers, which the one linear pre-check search cannot clear, so
    # each is scanned (plain words are cleared without a scan: the test below).
    run = guarded(PII, step=0.4, scan_budget_ms=1000)
    response = ask(run, "hello 12", "world 34", "again 56")
    refused(response, 413)
    assert "scan took over 1000 ms" in caplog.text
    assert response.immediate_response.status.code == 413


def test_texts_the_pre_check_clears_take_no_scan_and_no_time_budget():
    """One linear RE2 search (bounded by the character budget) clears texts no
    detector can match; no exact scan runs, so no scan step can run over time."""
    run = guarded(PII, step=0.4, scan_budget_ms=1000)
    response = ask(run, "hello", "world", "again")
    assert not response.HasField("immediate_response")


def test_a_fast_scan_is_not_refused_by_time():
    run = guarded(PII, step=0.0001, scan_budget_ms=1000)
    upstream = orjson.loads(ask(run, f"card {CARD}").request_body.response.body_mutation.body)
    assert upstream["messages"][0]["content"] == "card <CREDIT_CARD>"


@pytest.mark.parametrize("offset", [PIECE_CHARS - 10, PIECE_CHARS - 1, 2 * PIECE_CHARS - 5])
def test_a_long_text_is_scanned_in_pieces_with_the_same_matches(offset):
    """A text over PIECE_CHARS goes through the streaming scanner; a card across a
    piece boundary is still masked whole, and so are matches on both sides."""
    text = "a@example.com " + "w " * (offset // 2 - 7)
    text = text[:offset] + CARD + " and 123-45-6789" + " z" * 2000
    run = guarded(PII)
    upstream = orjson.loads(ask(run, text).request_body.response.body_mutation.body)
    masked = upstream["messages"][0]["content"]
    want = text.replace(CARD, "<CREDIT_CARD>").replace("123-45-6789", "<US_SSN>")
    assert masked == want.replace("a@example.com", "<EMAIL>")


def test_a_mebibyte_of_ordinary_text_is_within_the_default_budget():
    """The default character budget admits anything a 1 MiB body can carry."""
    budget = GuardsConfig().scan_budget_chars
    assert budget >= 1 << 20
    run = guarded(PII, step=0.0)  # a clock that stands still: size alone decides
    text = ("The 2023-01-15 report: 42 units, 17 left. " * 25000)[: 1 << 20]
    response = ask(run, text)
    assert not response.HasField("immediate_response")


def test_a_huge_response_frame_over_the_time_budget_ends_the_stream():
    run = guarded(PII, step=0.3, scan_budget_ms=1000)
    run.request({**CHAT, "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    big = "1 2 3 " * PIECE_CHARS  # six pieces, the clock read (0.3 s later) after each
    body = run.respond(content_frames(["hello ", big, "bye"]))
    assert b"guard_budget_exceeded" in body
    assert b"[DONE]" in body
    assert "bye" not in client_text(body)
    assert run.metric("ai_gateway_errors_total", {"kind": "guard_budget_exceeded"}) == 1


def test_a_huge_response_frame_within_budget_is_masked():
    run = guarded(PII, step=0.0)
    run.request({**CHAT, "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    big = "x " * PIECE_CHARS + CARD + " y" * 10
    body = run.respond(content_frames(["hello ", big, "bye"]))
    assert client_text(body) == "hello " + big.replace(CARD, "<CREDIT_CARD>") + "bye"


def test_the_response_budget_is_per_frame_not_per_stream():
    # Each huge frame is two pieces (one clock reading, 0.3 s, inside it): many such
    # frames add up past 1 s, but no single one does, so the stream goes through.
    run = guarded(PII, step=0.3, scan_budget_ms=1000)
    run.request({**CHAT, "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    big = "w " * PIECE_CHARS  # two pieces
    body = run.respond(content_frames([big, big, big, big, "bye"]))
    assert b"guard_budget_exceeded" not in body
    assert client_text(body) == big * 4 + "bye"
