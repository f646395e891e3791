"""Pricing: every wire format's fixture, decoded by its real decoder, priced by hand
(cached reads, cache writes and reasoning each at their own rate); the catalog is the
bundled snapshot and never touches the network; unpriced models follow the policy."""

from __future__ import annotations

import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from extproc.config.base import ConfigError
from extproc.spend.prices import (
    Cost,
    Override,
    Price,
    PriceBook,
    Rates,
    Unpriced,
    catalog_price,
    cost_of,
    picos,
)
from extproc.spend.settings import PricesConfig, validate
from extproc.usage import Usage
from tests import (
    test_providers_anthropic as anthropic,
)
from tests import (
    test_providers_bedrock as bedrock,
)
from tests import (
    test_providers_gemini as gemini,
)
from tests import (
    test_providers_openai_chat as openai_chat,
)
from tests import (
    test_providers_openai_responses as openai_responses,
)
from tests.providers_helpers import replay

REPO = Path(__file__).resolve().parent.parent

# Distinct rates per kind ($ per 1M tokens), so a kind priced at the wrong rate shows.
RATES = {"input": "3", "cached": "0.3", "cache_write": "3.75", "output": "15", "reasoning": "20"}
BOOK = PriceBook(
    overrides=[Override("fixture-model", Price(Rates.per_million(**RATES), source="override"))],
    unpriced="refuse",
    catalog=False,
)


def usage_of(decoder, body: bytes) -> Usage:
    replay(decoder, [body])
    return decoder.usage


# (format, decoder, body, hand-computed micro-dollars x 1000 = nano-dollars)
FIXTURES = [
    # 31 prompt (8 cached), 17 completion (5 reasoning):
    # 23*3 + 8*0.3 + 12*15 + 5*20 = 69 + 2.4 + 180 + 100 = 351.4 micro-dollars
    ("openai_chat", openai_chat.decoder, openai_chat.BODY, 351_400),
    # 36 prompt (16 cached), 27 completion (9 reasoning):
    # 20*3 + 16*0.3 + 18*15 + 9*20 = 60 + 4.8 + 270 + 180 = 514.8
    ("openai_responses", openai_responses.decoder, openai_responses.BODY, 514_800),
    # input 472, cache write 16, cache read 128, output 89 (thinking inside output):
    # 472*3 + 16*3.75 + 128*0.3 + 89*15 = 1416 + 60 + 38.4 + 1335 = 2849.4
    ("anthropic", anthropic.decoder, anthropic.BODY, 2_849_400),
    # 9 prompt (4 cached), 32 completion = 12 candidates + 20 thoughts:
    # 5*3 + 4*0.3 + 12*15 + 20*20 = 15 + 1.2 + 180 + 400 = 596.2
    ("gemini", gemini.sse, gemini.SSE_BODY, 596_200),
    # input 412, cache read 64, cache write 0, output 57:
    # 412*3 + 64*0.3 + 57*15 = 1236 + 19.2 + 855 = 2110.2
    ("bedrock", bedrock.decoder, bedrock.BODY, 2_110_200),
]


@pytest.mark.parametrize(
    ("fmt", "decoder", "body", "nanos"), FIXTURES, ids=[f[0] for f in FIXTURES]
)
def test_every_wire_format_fixture_costs_the_hand_computed_figure(fmt, decoder, body, nanos):
    usage = usage_of(decoder(), body)
    cost = BOOK.cost("p", "fixture-model", usage, fmt)
    assert cost.picos == nanos * 1000
    assert cost.usd == Decimal(nanos).scaleb(-9)
    assert cost.micros == (nanos + 500) // 1000
    assert cost.status == "priced"


def test_anthropic_cache_writes_are_kept_apart_from_reads():
    usage = usage_of(anthropic.decoder(), anthropic.BODY)
    assert (usage.prompt_tokens, usage.cached_tokens, usage.cache_write_tokens) == (616, 128, 16)


def test_catalog_prices_the_fixtures_at_the_bundled_snapshot():
    """Pinned genai-prices snapshot: gpt-4o is $2.5 in, $1.25 cached, $10 out per 1M;
    reasoning has no own rate, so it pays the output rate."""
    book = PriceBook()
    usage = usage_of(openai_chat.decoder(), openai_chat.BODY)
    # 23*2.5 + 8*1.25 + 17*10 = 57.5 + 10 + 170 = 237.5 micro-dollars
    assert book.cost("openai", "gpt-4o", usage, "openai").picos == 237_500_000
    # claude-sonnet-4-5: $3 in, $0.3 read, $3.75 write, $15 out: the fixture is 2849.4
    usage = usage_of(anthropic.decoder(), anthropic.BODY)
    assert book.cost("anthropic", "claude-sonnet-4-5", usage, "anthropic").picos == 2_849_400_000


def test_catalog_tiers_apply_to_every_token_past_the_threshold():
    price = catalog_price("google", "gemini-2.5-pro", "gemini")
    assert price is not None and price.tiers
    small = Usage()
    small.set_reported(200_000, 1000)
    big = Usage()
    big.set_reported(200_001, 1000)
    # $1.25 / $10 up to 200k prompt tokens, then $2.5 / $15 for all of them
    assert cost_of(small, price) == 200_000 * picos("1.25") + 1000 * picos("10")
    assert cost_of(big, price) == 200_001 * picos("2.5") + 1000 * picos("15")


NO_NETWORK = """
import socket
def refuse(*args, **kwargs):
    raise SystemExit("the price catalog tried to open a connection")
socket.socket.connect = socket.socket.connect_ex = refuse
socket.create_connection = socket.getaddrinfo = refuse
from extproc.spend.prices import PriceBook
from extproc.usage import Usage
from genai_prices import data_snapshot
usage = Usage()
usage.set_reported(1000, 1000)
book = PriceBook()
for model in ("gpt-4o", "o3", "claude-sonnet-4-5", "gemini-2.5-pro"):
    assert book.cost("p", model, usage).status == "priced", model
assert data_snapshot.get_snapshot().from_auto_update is False
print("offline")
"""


def test_the_catalog_never_reaches_the_network():
    """From a fresh interpreter whose sockets refuse: import, load, price."""
    out = subprocess.run(
        [sys.executable, "-c", NO_NETWORK], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "offline"


def test_overrides_win_over_the_catalog_and_may_name_one_provider():
    mine = Price(Rates.per_million(1, 2), source="override")
    book = PriceBook(overrides=[Override("gpt-4o", mine, provider="openai-eu")])
    assert book.price("openai-eu", "GPT-4o", "openai")[0] is mine
    assert book.price("openai", "gpt-4o", "openai")[0].source == "catalog"


def test_unpriced_refuse_zero_and_estimate_from():
    usage = Usage()
    usage.set_reported(1000, 1000)
    with pytest.raises(Unpriced):
        PriceBook(unpriced="refuse").cost("mock", "no-such-model-xyz", usage)
    zero = PriceBook(unpriced="zero")
    assert zero.cost("mock", "no-such-model-xyz", usage) == Cost(0, "unpriced", "no-such-model-xyz")
    estimate = PriceBook(unpriced="estimate-from: gpt-4o")
    cost = estimate.cost("mock", "no-such-model-xyz", usage)
    assert (cost.status, cost.priced_as, cost.picos) == (
        "estimated",
        "gpt-4o",
        1000 * picos("2.5") + 1000 * picos("10"),
    )
    assert estimate.lookups["estimated"] == 1
    with pytest.raises(ValueError, match="has no price"):
        PriceBook(unpriced="estimate-from: no-such-model-xyz")


def test_unpriced_is_logged_once_and_counted_every_time(caplog):
    book = PriceBook(unpriced="zero")
    usage = Usage()
    for _ in range(3):
        book.cost("mock", "mystery-1", usage)
    assert book.lookups["unpriced"] == 3
    assert sum("mystery-1" in r.getMessage() for r in caplog.records) == 1


def test_worst_case_is_never_below_the_exact_cost():
    price = Price(Rates.per_million(**RATES))
    book = PriceBook(overrides=[Override("m", price)], catalog=False)
    worst = book.worst_case("p", "m", 31, 17)
    # prompt at the cache-write rate (dearer than input), output at the reasoning rate
    assert worst.picos == 31 * picos("3.75") + 17 * picos("20")
    for fmt, decoder, body, _ in FIXTURES:
        usage = usage_of(decoder(), body)
        exact = book.cost("p", "m", usage, fmt)
        assert (
            book.worst_case("p", "m", usage.prompt_tokens, usage.completion_tokens).picos
            >= exact.picos
        )


def test_settings_build_the_book_and_refuse_bad_prices():
    settings = validate(
        PricesConfig,
        {
            "unpriced": "refuse",
            "models": [
                {
                    "model": "house-llm",
                    "input": "0.5",
                    "output": 1.5,
                    "tiers": [{"above_prompt_tokens": 100000, "input": 1, "output": 3}],
                }
            ],
        },
    )
    book = settings.book()
    usage = Usage()
    usage.set_reported(100_001, 10)
    assert book.cost("any", "house-llm", usage).picos == 100_001 * picos(1) + 10 * picos(3)
    with pytest.raises(Unpriced):
        book.cost("any", "gpt-4o-unknown-xyz", usage)
    with pytest.raises(ConfigError) as refused:
        validate(
            PricesConfig,
            {
                "unpriced": "sometimes",
                "models": [
                    {"model": "m", "input": -1, "output": 1, "typo": 1},
                    {"model": "m", "input": "0.0000001", "output": True},
                    {"model": "m", "input": 1, "output": 1, "tiers": [
                        {"above_prompt_tokens": 9, "input": 1, "output": 1},
                        {"above_prompt_tokens": 2, "input": 1, "output": 1},
                    ]},
                ],
            },
            key="prices",
        )  # fmt: skip
    assert refused.value.lines() == [
        "<policy>: prices.unpriced: expected refuse, zero or estimate-from: <model>, "
        "got 'sometimes'",
        "<policy>: prices.models[0].input: expected an amount >= 0, got -1",
        "<policy>: prices.models[0].typo: unknown key 'typo' (known: model, provider, input, "
        "output, cached_input, cache_write, reasoning, tiers)",
        "<policy>: prices.models[1].input: at most 6 decimals, got 0.0000001",
        "<policy>: prices.models[1].output: expected an amount in USD, got true",
        "<policy>: prices.models[2].tiers: above_prompt_tokens must be distinct and ascending",
    ]
