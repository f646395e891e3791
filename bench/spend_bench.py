"""What spend accounting costs: pricing + a budget check per request, and the ledger's
write throughput.

    .venv/bin/python bench/spend_bench.py            # ~30 s
    .venv/bin/python bench/spend_bench.py --quick    # ~8 s

Per request (the path a request will take once the stage is wired): look up the
price, reserve the worst case in three budgets (consumer month, team day, global
rolling 7d), price the exact usage, settle. In-process store, then a real valkey
(tests/redis_server.py) one request at a time and with 50 in flight. Reported: wall
and this process's CPU per request (Redis's own CPU not included).

Stage: the CPU one exchange (request, a 10-chunk stream, settle) costs through the
sans-I/O `Exchange` with and without the spend stage (in-process budgets, ledger row),
i.e. what the wiring adds per exchange, next to one ext_proc message (60-150 us).

Ledger: rows/s through `Ledger.record` + the batching writer until every row is
committed, into SQLite (WAL) and a throwaway PostgreSQL (tests/postgres_server.py),
batches of 500. Results also go to bench/results/spend.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: `python bench/spend_bench.py`
    sys.path.insert(0, str(REPO))

import psycopg  # noqa: E402

from extproc.policy.ratelimit.redis import RedisStore  # noqa: E402
from extproc.spend.budgets import Budget, Planner, Subject  # noqa: E402
from extproc.spend.ledger import Ledger, Row, open_backend  # noqa: E402
from extproc.spend.prices import PriceBook  # noqa: E402
from extproc.spend.redis_store import RedisBudgetStore  # noqa: E402
from extproc.spend.store import LocalBudgetStore  # noqa: E402
from extproc.usage import Usage  # noqa: E402
from tests.postgres_server import PostgresServer  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

RESULTS = REPO / "bench" / "results" / "spend.json"
CONSUMERS = 100
BUDGETS = [
    Budget("consumer-month", "consumer", 10**15, period="month", soft_limit=0.8),
    Budget("team-day", "team", 10**15, period="day"),
    Budget("all-7d", "global", 10**15, window=7 * 86400.0),
]


def usage() -> Usage:
    u = Usage()
    u.set_reported(1200, 300, cached=400, reasoning=100)
    return u


async def one_request(book, planner, store, i: int, u: Usage) -> None:
    subject = Subject(consumer=f"c{i % CONSUMERS}", teams=(f"t{i % 7}",), model="gpt-4o")
    worst = book.worst_case("openai", "gpt-4o", 1200, 1024, "openai").micros
    checks = planner.checks(subject)
    outcome = await store.reserve(checks, worst)
    assert outcome.admitted
    cost = book.cost("openai", "gpt-4o", u, "openai").micros
    await store.settle(checks, cost - worst)


async def per_request(store, n: int, in_flight: int) -> tuple[float, float]:
    book, planner, u = PriceBook(), Planner(BUDGETS, "Europe/Paris"), usage()
    await one_request(book, planner, store, 0, u)  # warm the price cache, load scripts
    wall, cpu = time.perf_counter(), time.process_time()
    if in_flight == 1:
        for i in range(n):
            await one_request(book, planner, store, i, u)
    else:
        sem = asyncio.Semaphore(in_flight)

        async def bounded(i: int) -> None:
            async with sem:
                await one_request(book, planner, store, i, u)

        await asyncio.gather(*(bounded(i) for i in range(n)))
    return (time.perf_counter() - wall) / n * 1e6, (time.process_time() - cpu) / n * 1e6


def spend_sections(model: str, input_usd: float, output_usd: float, at: Path) -> dict:
    """The policy's spend sections for a bench: one price, two budgets that never fill
    (a calendar month and a rolling window), a SQLite ledger under `at`."""
    return {
        "prices": {"models": [{"model": model, "input": input_usd, "output": output_usd}]},
        "budgets": {
            "items": {
                "c": {"scope": "consumer", "limit_usd": 10**6, "period": "month"},
                "g": {"scope": "global", "limit_usd": 10**6, "window": "7d"},
            }
        },
        "ledger": {
            "url": f"sqlite:///{at}/ledger.sqlite3",
            "journal_dir": str(at / "journal"),
            "queue_limit": 10_000_000,
        },
    }


def exchange_cpu(with_spend: bool, n: int, tmp: Path) -> float:
    """CPU microseconds per exchange through the sans-I/O Exchange."""
    import orjson

    from extproc.config import parse_config
    from extproc.exchange import Exchange
    from extproc.metrics import Metrics
    from extproc.policy import Shared, build_policy
    from tests.test_exchange import body_msg, headers_msg, stream_frames

    document: dict = {
        "providers": {"mock": {"url": "http://127.0.0.1:1"}},
        "routes": [{"name": "v1", "prefix": "/v1/", "provider": "mock"}],
    }
    if with_spend:
        document.update(spend_sections("gpt-4o", 2.5, 10, tmp / "stage"))
    metrics = Metrics()
    policy = build_policy(parse_config(document, "bench.yaml"), Shared(metrics))
    head = headers_msg(
        {":method": "POST", ":path": "/v1/chat/completions", "x-request-id": "r"}, route="v1"
    )
    body = orjson.dumps(
        {"model": "gpt-4o", "stream": True, "max_tokens": 200,
         "messages": [{"role": "user", "content": "hello there " * 20}]}
    )  # fmt: skip
    answer = headers_msg({":status": "200", "content-type": "text/event-stream"}, response=True)
    frames = [body_msg(f, end=False, response=True) for f in stream_frames(10, usage=True)]
    request = body_msg(body)
    loop = asyncio.new_event_loop()

    def one() -> None:
        ex = Exchange(policy, metrics, 0.0)
        ex.handle(head, 0.0)
        loop.run_until_complete(ex.on_request_body(request.request_body.body, 0.0))
        ex.handle(answer, 0.0)
        for frame in frames:
            ex.handle(frame, 0.0)
        ex.close(0.0)
        for work in ex.after:
            loop.run_until_complete(work)

    for _ in range(200):
        one()
    cpu = time.process_time()
    for _ in range(n):
        one()
    loop.close()
    return (time.process_time() - cpu) / n * 1e6


def rows(n: int, tag: str) -> list[Row]:
    base = int(time.time() * 1000)
    return [
        Row(f"{tag}-{i}", base + i, f"c{i % CONSUMERS}", "t", "chat", "openai", "gpt-4o",
            1200, 300, 400, 0, 100, 4321)
        for i in range(n)
    ]  # fmt: skip


async def ledger_rate(url: str, journal: Path, n: int, tag: str) -> tuple[float, float]:
    """(rows/s end to end, record() microseconds of CPU per row on the loop)."""
    ledger = Ledger(open_backend(url), journal, batch_size=500, flush_interval=0.05)
    await ledger.start()
    batch = rows(n, tag)
    wall = time.perf_counter()
    record_cpu = 0.0
    for start in range(0, n, 1000):  # arrivals in bursts, the writer keeps up
        t = time.process_time()
        for r in batch[start : start + 1000]:
            ledger.record(r)
        record_cpu += time.process_time() - t
        await asyncio.sleep(0)
    await ledger.close()
    return n / (time.perf_counter() - wall), record_cpu / n * 1e6


async def run(quick: bool) -> dict:
    n = 2_000 if quick else 10_000
    rows_n = 20_000 if quick else 100_000
    results: dict = {"machine": platform.platform(), "python": platform.python_version()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        results["local"] = await per_request(LocalBudgetStore(), n, 1)
        stage_n = 1_000 if quick else 5_000
        results["exchange"] = {
            "without spend": await asyncio.to_thread(exchange_cpu, False, stage_n, tmp_path),
            "with spend": await asyncio.to_thread(exchange_cpu, True, stage_n, tmp_path),
        }
        redis = RedisServer(tmp_path / "redis").start()
        base = RedisStore(redis.url, key_prefix="bench:", timeout=10.0)
        try:
            store = RedisBudgetStore(base)
            results["redis, 1 in flight"] = await per_request(store, n // 4, 1)
            results["redis, 50 in flight"] = await per_request(store, n, 50)
        finally:
            await base.close()
            redis.stop()
        ledger = {}
        ledger["sqlite"] = await ledger_rate(
            f"sqlite:///{tmp_path}/l.sqlite3", tmp_path / "j1", rows_n, "s"
        )
        pg = PostgresServer().start()
        try:
            with psycopg.connect(pg.url, autocommit=True) as conn:
                conn.execute("CREATE DATABASE bench")
            url = pg.url.rsplit("/", 1)[0] + "/bench"
            ledger["postgresql"] = await ledger_rate(url, tmp_path / "j2", rows_n, "p")
        finally:
            pg.destroy()
        results["ledger"] = ledger
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    results = asyncio.run(run(args.quick))
    print("pricing + 3 budgets (reserve worst case, price usage, settle) per request")
    print(f"{'store':<22}{'wall us/req':>12}{'cpu us/req':>12}")
    for name in ("local", "redis, 1 in flight", "redis, 50 in flight"):
        wall, cpu = results[name]
        print(f"{name:<22}{wall:>12.1f}{cpu:>12.1f}")
    print("\none exchange through the sans-I/O Exchange (request, 10 chunks, settle)")
    print(f"{'policy':<22}{'cpu us/exch':>12}")
    for name, cpu in results["exchange"].items():
        print(f"{name:<22}{cpu:>12.1f}")
    print("\nledger, batches of 500, until committed")
    print(f"{'database':<22}{'rows/s':>12}{'record us':>12}")
    for name, (rate, rec) in results["ledger"].items():
        print(f"{name:<22}{rate:>12,.0f}{rec:>12.1f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten to {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
