"""What the request phase costs on hostile bodies, as the body grows.

    .venv/bin/python bench/request_cost_bench.py            # n = 1k, 4k, 16k, 64k
    .venv/bin/python bench/request_cost_bench.py --sizes 1000 8000

For each hostile shape (many keys, many messages, strings full of escapes, escaped
colons that force the strict duplicate-key parse, non-ASCII keys that force the fold
walk, long digit runs that force the 64-bit check, many tools, deep nesting...) and
each size n, the body is sent through one in-process exchange's request phase (headers
then body: parse, duplicate keys, auth, models, a card-masking guard, rate limit) and
the figure is µs per KB of body, best of a few runs. A linear cost shows a flat row;
a super-linear one grows along it (x4 per column for quadratic at the default sizes).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script
    sys.path.insert(0, str(REPO))

import orjson  # noqa: E402

from extproc.config import parse_config  # noqa: E402
from extproc.exchange import Exchange  # noqa: E402
from extproc.metrics import Metrics  # noqa: E402
from extproc.policy import Shared, build_policy  # noqa: E402
from tests.test_exchange import headers_msg  # noqa: E402

CONFIG = parse_config(
    {
        "providers": {"mock": {"url": "http://127.0.0.1:1"}},
        "routes": [{"name": "v1", "prefix": "/v1/", "provider": "mock"}],
        "guards": {
            "rules": [{"name": "pii", "detectors": ["credit_card", "email"]}],
            # Measured, not refused: the budgets would cut the biggest bodies short.
            "scan_budget_chars": 10**8,
            "scan_budget_ms": 60000,
        },
        "rate_limits": {"limits": [{"name": "r", "requests": 10**9, "window": "1h"}]},
    },
    "bench.yaml",
)


def _chat(**extra: object) -> dict:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], **extra}


# name -> n -> body
SHAPES: dict[str, Callable[[int], bytes]] = {
    "many_keys": lambda n: orjson.dumps(_chat(x={f"k{i}": i for i in range(n)})),
    "case_keys": lambda n: orjson.dumps(_chat(x=[{f"K{i}": 1, f"k{i}x": 2} for i in range(n)])),
    "nonascii_keys": lambda n: orjson.dumps(_chat(x={f"\u00e9{i}": i for i in range(n)})),
    "escaped_colons": lambda n: (
        b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"'
        + b"a\\u003ab " * n
        + b'"}],"x":{'
        + b",".join(b'"k%d":1' % i for i in range(n))
        + b"}}"
    ),
    "many_messages": lambda n: orjson.dumps(
        {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": f"hello {i}"} for i in range(n)],
        }
    ),
    "cards_masked": lambda n: orjson.dumps(_messages(["card 4111 1111 1111 1111"] * n)),
    "cards_split": lambda n: orjson.dumps(_messages(["4111 1111", " 1111 1111 "] * (n // 2))),
    "escapes": lambda n: (
        b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"'
        + b'\\u0041\\"\\\\\\n' * n
        + b'"}]}'
    ),
    "digit_runs": lambda n: orjson.dumps(_chat(x=["1234567890123456789012"] * n)),
    "many_tools": lambda n: orjson.dumps(
        _chat(
            tools=[
                {
                    "type": "function",
                    "function": {
                        "name": f"f{i}",
                        "description": "looks things up",
                        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
                    },
                }
                for i in range(n)
            ]
        )
    ),
    "nested_250": lambda n: orjson.dumps(_chat(x=[_nest(250) for _ in range(max(1, n // 250))])),
    "empty_objects": lambda n: orjson.dumps(_chat(x=[{}] * n)),
}


def _messages(texts: list[str]) -> dict:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": t} for t in texts]}


def _nest(depth: int) -> object:
    value: object = 1
    for _ in range(depth - 3):
        value = [value]
    return value


def run_once(policy, body: bytes) -> float:
    ex = Exchange(policy, Metrics(), now=0.0)
    headers = {":method": "POST", ":path": "/v1/chat/completions", "content-type": "x"}
    started = time.perf_counter()
    ex.handle(headers_msg(headers, route="v1"), 0.0)
    answer = asyncio.run(ex.on_request_body(body, 0.0))
    spent = time.perf_counter() - started
    assert answer.HasField("request_body"), answer  # the body was accepted, not refused
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000, 64000])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    policy = build_policy(CONFIG, Shared(), {})
    print(f"{'shape':<16}" + "".join(f"{f'n={n}':>22}" for n in args.sizes))
    for name, shape in SHAPES.items():
        cells = []
        for n in args.sizes:
            body = shape(n)
            best = min(run_once(policy, body) for _ in range(args.repeat))
            cells.append(
                f"{best * 1e6 / (len(body) / 1024):8.1f} us/KB ({len(body) // 1024:>5} KB)"
            )
        print(f"{name:<16}" + "".join(f"{c:>22}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
