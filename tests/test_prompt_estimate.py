"""The offline prompt estimate: the same figures from the cheaper count, and computed
once per exchange however many stages ask for it."""

from __future__ import annotations

import math
import random
import re
from pathlib import Path

import pytest

import extproc.providers.base as base
from extproc.config import parse_config
from extproc.policy import Shared, build_policy
from extproc.policy.ratelimit.stage import RateLimitStage
from extproc.policy.spend import SpendStage
from extproc.providers.openai_chat import OpenAIChat
from extproc.spend.budgets import Subject
from extproc.usage import SAMPLE_CHARS, estimate_prompt_tokens, estimate_tokens
from tests.test_exchange import CHAT, Run, body_msg, headers_msg, stream_frames

_PIECES = re.compile(r"[A-Za-z]+|\d{1,3}|[^\sA-Za-z\d]|\s+(?=\S)?")


def piece_walk(text: str) -> int:
    """The count as it was first written: one Python step per piece."""
    count = 0
    for piece in _PIECES.findall(text):
        if piece[0].isalpha():
            count += 1 + (len(piece) - 1) // 5
        elif not piece.isspace():
            count += 1
    return count


def test_the_count_is_the_piece_walks_on_mixed_text():
    alphabet = "abcXYZ \t\n0123456789.,;!_-{}\"'é漢字ß\u00a0\u2003\x1c" + "supercalifragilistic"
    rng = random.Random(14)
    texts = ["", " ", "hello there", "x" * 23, "1234567 12 a-b", "naïve café 東京 42%"]
    texts += [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 120))) for _ in range(3000)
    ]
    mismatches = [t for t in texts if estimate_tokens(t) != piece_walk(t)]
    assert mismatches == []
    assert (
        estimate_tokens("internationalization 123456")
        == piece_walk("internationalization 123456")
        == 6
    )


@pytest.fixture
def counted(monkeypatch):
    """Every text list `RequestInfo.prompt_estimate` actually estimates."""
    calls: list[list[str]] = []

    def counting(texts):
        calls.append(list(texts))
        return estimate_prompt_tokens(texts)

    monkeypatch.setattr(base, "estimate_prompt_tokens", counting)
    return calls


def test_the_estimate_is_kept_and_redone_once_the_texts_are_masked(counted):
    body = b'{"model": "m", "messages": [{"role": "user", "content": "call 555 0100 now"}]}'
    info = OpenAIChat.parse_request(body, "/v1/chat/completions")
    first = info.prompt_estimate()
    assert info.prompt_estimate() == first == estimate_prompt_tokens(["call 555 0100 now"])
    assert len(counted) == 1
    OpenAIChat.replace_request_texts(info, ["call X now"])
    assert info.prompt_estimate() == estimate_prompt_tokens(["call X now"]) != first
    assert counted == [["call 555 0100 now"], ["call X now"]]


def test_token_limit_spend_and_settlement_share_one_estimate(tmp_path: Path, counted):
    cfg = parse_config(
        {
            "providers": {"mock": {"url": "http://127.0.0.1:1"}},
            "routes": [{"name": "v1", "prefix": "/v1/", "provider": "mock"}],
            "rate_limits": {"limits": [{"name": "t", "tokens": 10**9, "window": "1h"}]},
            "prices": {"models": [{"model": CHAT["model"], "input": 10, "output": 30}]},
            "budgets": {"items": {"all": {"scope": "global", "limit_usd": 1, "period": "day"}}},
            "ledger": {
                "url": f"sqlite:///{tmp_path / 'l.sqlite3'}",
                "journal_dir": str(tmp_path / "journal"),
            },
        },
        "test.yaml",
    )
    shared = Shared()
    policy = build_policy(cfg, shared)
    assert any(isinstance(s, RateLimitStage) for s in policy.stages)
    run = Run(cfg)
    run.metrics = shared.metrics
    run.ex.policy = policy
    run.request({**CHAT, "stream": True, "max_tokens": 50})
    [stage] = [s for s in policy.stages if isinstance(s, SpendStage)]
    prompt = estimate_prompt_tokens(["hello there"])
    [check] = stage.planner.checks(Subject())
    assert stage.store.spent(check) == prompt * 10 + 50 * 30  # reserved on the estimate
    run.send(headers_msg({":status": "200", "content-type": "text/event-stream"}, response=True))
    for frame in stream_frames(8, usage=True)[:5]:  # no usage reported: settled on it
        run.send(body_msg(frame, end=False, response=True))
    run.ex.close(1.0)
    assert stage.store.spent(check) == prompt * 10 + 4 * 30
    assert counted == [["hello there"]]  # the limit, spend and settlement: one count


def test_a_prompt_is_counted_as_the_sum_of_its_texts():
    """The texts are counted joined (one scan): the figure is each text's count added up,
    sampling included, whatever the texts' edges are (words, digits, marks, spaces)."""

    def per_text(texts: list[str]) -> int:  # the code as it was: a count per text
        tokens = sampled = rest = 0
        budget = SAMPLE_CHARS
        for text in texts:
            if budget <= 0:
                rest += len(text)
                continue
            part = text if len(text) <= budget else text[:budget]
            tokens += estimate_tokens(part)
            sampled += len(part)
            rest += len(text) - len(part)
            budget -= len(part)
        if rest:
            tokens += math.ceil(rest * tokens / max(sampled, 1))
        return tokens + 3 * len(texts) + 3

    alphabet = "abXY \t\n0123456789.,-é漢ß\u00a0\u2003\u0663\u0664" + "longerwordhere"
    rng = random.Random(7)
    cases = [[], [""], ["", ""], ["ab", "cd"], ["12", "34"], ["1", "234"], ["x" * 20000, "yz"]]
    for _ in range(2000):
        cases.append(
            [
                "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
                for _ in range(rng.randint(0, 6))
            ]
        )
    big = ["word " * 3000, "12345 " * 2000, "tail"]
    cases.append(big)
    assert [estimate_prompt_tokens(c) for c in cases] == [per_text(c) for c in cases]
