"""The spend ledger on SQLite and on a real PostgreSQL (tests/postgres_server.py):
batched writes, idempotent by request id, flushed on close, spooled through an outage
and replayed with exact totals, and a writer killed with SIGKILL mid-load loses and
doubles no row of a completed exchange."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap
import time
from datetime import datetime
from pathlib import Path

import psycopg
import pytest

from extproc.spend.ledger import Ledger, Row, migrations, open_backend
from tests.postgres_server import PostgresServer

REPO = Path(__file__).resolve().parent.parent


async def until(condition, what: str, patience: float = 120.0) -> None:
    """Wait for a state (never a timing claim): fail instead of hanging forever."""
    deadline = time.monotonic() + patience
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.05)


def row(i: int, **extra) -> Row:
    values = dict(
        request_id=f"req-{i:06d}",
        ts_ms=1_800_000_000_000 + i,
        consumer=f"c{i % 3}",
        team="t",
        route="chat",
        provider="openai",
        model="gpt-4o",
        prompt_tokens=10,
        completion_tokens=i % 7,
        cost_micros=100 + i,
        status="completed",
        reason="stop",
    )
    values.update(extra)
    return Row(**values)


@pytest.fixture(scope="module")
def postgres():
    server = PostgresServer().start()
    yield server
    server.destroy()


@pytest.fixture
def pg_url(postgres):
    """A fresh database per test on the shared cluster."""
    name = f"t{time.monotonic_ns()}"
    with psycopg.connect(postgres.url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return postgres.url.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture(params=["sqlite", "postgres"])
def ledger_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/db/ledger.sqlite3"
    return request.getfixturevalue("pg_url")


def count(url: str) -> tuple[int, int]:
    backend = open_backend(url)
    try:
        totals = backend.totals("team", 0)
    finally:
        backend.close()
    return (totals[0]["requests"], totals[0]["cost_micros"]) if totals else (0, 0)


async def test_rows_are_batched_idempotent_and_flushed_on_close(ledger_url, tmp_path):
    backend = open_backend(ledger_url)
    ledger = Ledger(backend, tmp_path / "journal", batch_size=64, flush_interval=30)
    await ledger.start()
    for i in range(1000):
        ledger.record(row(i))
    for i in range(0, 1000, 10):
        ledger.record(row(i))  # a retry or a replay of the same exchange
    await ledger.close()  # nothing waited for the 30 s interval: close flushed
    assert ledger.stats.batches >= 1100 // 64
    assert count(ledger_url) == (1000, sum(100 + i for i in range(1000)))
    assert not list((tmp_path / "journal").iterdir())  # every segment committed


async def test_totals_by_each_dimension(tmp_path):
    url = f"sqlite:///{tmp_path}/ledger.sqlite3"
    ledger = Ledger(open_backend(url), tmp_path / "journal", batch_size=10)
    await ledger.start()
    for i in range(30):
        ledger.record(row(i, model="a" if i < 10 else "b"))
    await ledger.close()
    backend = open_backend(url)
    by_model = {t["key"]: (t["requests"], t["cost_micros"]) for t in backend.totals("model", 0)}
    assert by_model == {
        "a": (10, sum(100 + i for i in range(10))),
        "b": (20, sum(100 + i for i in range(10, 30))),
    }
    since = backend.totals("consumer", 1_800_000_000_000 + 15)
    assert sum(t["requests"] for t in since) == 15
    with pytest.raises(ValueError):
        backend.totals("status; DROP TABLE spend_ledger", 0)
    backend.close()


def test_migrations_apply_in_order_once(pg_url, tmp_path):
    for url in (pg_url, f"sqlite:///{tmp_path}/l.sqlite3"):
        backend = open_backend(url)
        dialect = "postgres" if url.startswith("postgresql") else "sqlite"
        assert backend.migrate() == [v for v, _ in migrations(dialect)]
        assert backend.migrate() == []
        backend.close()


async def test_postgres_down_for_seconds_is_spooled_then_replayed_exactly(
    postgres, pg_url, tmp_path
):
    ledger = Ledger(
        open_backend(pg_url, timeout=1.0),
        tmp_path / "journal",
        batch_size=20,
        flush_interval=0.05,
        retry_interval=0.2,
    )
    await ledger.start()
    for i in range(200):
        ledger.record(row(i))
    await until(lambda: ledger.stats.written >= 200, "the first rows written")
    await asyncio.to_thread(postgres.stop, True)  # crash it: connections drop
    try:
        down_until = time.monotonic() + 3
        i = 200
        while time.monotonic() < down_until or ledger.stats.failures == 0:
            assert time.monotonic() < down_until + 120, "no batch failed with the database down"
            ledger.record(row(i))
            i += 1
            await asyncio.sleep(0.005)
        assert ledger.backlog and ledger.journal.bytes > 0
    finally:
        await asyncio.to_thread(postgres.start)
    for _ in range(100):
        ledger.record(row(i))
        i += 1
    await until(lambda: not ledger.backlog and not ledger.journal.closed, "the journal replayed")
    await ledger.close()
    assert ledger.stats.replayed > 0 and ledger.stats.lost == 0
    assert count(pg_url) == (i, sum(100 + n for n in range(i)))


async def test_a_full_spool_counts_what_it_could_not_keep(postgres, tmp_path):
    url = f"postgresql://postgres@127.0.0.1:{postgres.port + 1}/nowhere"  # nothing listens
    ledger = Ledger(
        open_backend(url, timeout=0.5), tmp_path / "j", batch_size=5, spool_max_bytes=2000
    )
    await ledger.start()
    for i in range(100):
        ledger.record(row(i))
    await ledger.close()
    assert ledger.stats.unspooled > 0
    assert ledger.stats.unspooled == ledger.stats.lost
    assert ledger.journal.bytes <= 2000
    # What the journal kept is written at the next start against a working database.


WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from extproc.spend.ledger import Ledger, open_backend
    from tests.test_spend_ledger import row

    async def main():
        ledger = Ledger(open_backend(sys.argv[1]), Path(sys.argv[2]), batch_size=25,
                        flush_interval=0.01)
        await ledger.start()
        i = 0
        while True:
            ledger.record(row(i))
            print(i, flush=True)  # the exchange is complete once record returned
            i += 1
            await asyncio.sleep(0.001)

    asyncio.run(main())
    """
)


async def test_kill_9_mid_load_then_restart_loses_and_doubles_nothing(ledger_url, tmp_path):
    journal = tmp_path / "journal"
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER, ledger_url, str(journal)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    done = []
    try:
        assert child.stdout is not None
        while len(done) < 400:
            line = await asyncio.to_thread(child.stdout.readline)
            assert line, "the writer died on its own"
            done.append(int(line))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    done += [int(line) for line in child.stdout.read().split()]  # printed before the kill
    ledger = Ledger(open_backend(ledger_url), journal, batch_size=50)
    await ledger.start()
    await ledger.close()
    backend = open_backend(ledger_url)
    totals = backend.totals("route", 0)
    backend.close()
    requests, cost = totals[0]["requests"], totals[0]["cost_micros"]
    last = done[-1]
    # Every completed exchange is there once; at most the one in flight besides.
    assert requests in (last + 1, last + 2)
    assert cost == sum(100 + n for n in range(requests))


def test_ledger_settings_and_urls():
    from extproc.config.base import ConfigError
    from extproc.spend.settings import LedgerConfig, validate

    assert validate(LedgerConfig, None).url == "sqlite:///data/ledger.sqlite3"
    with pytest.raises(ConfigError) as refused:
        validate(LedgerConfig, {"url": "mysql://x", "batch_size": 0, "spool": "x"}, key="ledger")
    assert [line.split(": ", 2)[1] for line in refused.value.lines()] == [
        "ledger.url",
        "ledger.batch_size",
        "ledger.spool",
    ]
    with pytest.raises(ValueError, match="expected sqlite"):
        open_backend("mysql://u:secret@h/db")


async def test_in_process_budgets_are_rebuilt_from_the_ledger(ledger_url, tmp_path):
    """A restart without Redis: each budget's period or window spend comes back."""
    from zoneinfo import ZoneInfo

    from extproc.spend.budgets import Budget, Planner, Subject
    from extproc.spend.rebuild import rebuild
    from extproc.spend.store import LocalBudgetStore

    paris = ZoneInfo("Europe/Paris")
    now = datetime(2026, 3, 10, 12, tzinfo=paris).timestamp()
    at = lambda *p: int(datetime(*p, tzinfo=paris).timestamp() * 1000)  # noqa: E731
    ledger = Ledger(open_backend(ledger_url), tmp_path / "journal")
    await ledger.start()
    for i, (ts, consumer, cost) in enumerate(
        [
            (at(2026, 2, 28, 23, 59), "alice", 1_000),  # last month
            (at(2026, 3, 1, 0, 0), "alice", 20),  # this month from its first instant
            (at(2026, 3, 10, 11, 30), "alice", 300),  # inside the last hour
            (at(2026, 3, 10, 10, 59), "bob", 4_000),  # this month, before the hour
            (at(2026, 3, 10, 11, 1), "bob", 5),
        ]
    ):
        ledger.record(Row(f"r{i}", ts, consumer=consumer, cost_micros=cost))
    await ledger.close()
    month = Budget("month", "consumer", 5_000, period="month")
    hour = Budget("hour", "global", 400, window=3600.0)
    planner = Planner([month, hour], "Europe/Paris", lambda: now)
    store = LocalBudgetStore(lambda: now)
    backend = open_backend(ledger_url)
    try:
        seeded = rebuild(store, planner, backend, now)
    finally:
        backend.close()
    assert seeded == (20 + 300 + 4_000 + 5) + (300 + 5)
    alice, bob = planner.checks(Subject("alice")), planner.checks(Subject("bob"))
    assert [store.spent(c) for c in alice] == [320, 305]
    assert [store.spent(c) for c in bob] == [4_005, 305]
    assert not store.reserve_now(alice, 100).admitted  # the hour has 95 left
    assert store.reserve_now(alice, 95).admitted
