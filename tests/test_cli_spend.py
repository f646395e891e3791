"""`extproc spend` as a user runs it (a subprocess): totals from the ledger by each
dimension, in table, CSV and JSON, within --since, exact to the micro-dollar."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import psycopg

from extproc.spend.ledger import Ledger, Row, open_backend
from tests.postgres_server import PostgresServer

REPO = Path(__file__).resolve().parent.parent
NOW_MS = int(time.time() * 1000)
DAY_MS = 86_400_000


def rows() -> list[Row]:
    return [
        Row("r1", NOW_MS - DAY_MS, "alice", "research", "chat", "openai", "gpt-4o",
            100, 20, 10, 0, 5, 1_234_567),
        Row("r2", NOW_MS - 2 * DAY_MS, "alice", "research", "chat", "anthropic", "claude",
            50, 10, 0, 16, 0, 2_000_001),
        Row("r3", NOW_MS - 3 * DAY_MS, "bob", "ops", "embed", "openai", "gpt-4o",
            7, 3, 0, 0, 0, 999),
        Row("old", NOW_MS - 30 * DAY_MS, "bob", "ops", "chat", "openai", "gpt-4o",
            1, 1, 0, 0, 0, 50_000_000),
    ]  # fmt: skip


def fill(url: str, journal: Path) -> None:
    async def go() -> None:
        ledger = Ledger(open_backend(url), journal)
        await ledger.start()
        for r in rows():
            ledger.record(r)
        await ledger.close()

    asyncio.run(go())


def spend(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "extproc", "spend", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_table_csv_and_json_from_sqlite(tmp_path):
    url = f"sqlite:///{tmp_path}/ledger.sqlite3"
    fill(url, tmp_path / "journal")
    out = spend("--by", "consumer", "--since", "7d", "--ledger", url)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "consumer  requests  prompt  completion  cached  cache_write  reasoning  cost_usd",
        "alice            2     150          30      10           16          5  3.234568",
        "bob              1       7           3       0            0          0  0.000999",
        "TOTAL            3                                                      3.235567",
    ]
    out = spend("--by", "model", "--since", "60d", "--format", "csv", "--ledger", url)
    assert out.returncode == 0, out.stderr
    table = list(csv.DictReader(io.StringIO(out.stdout)))
    assert [(r["model"], r["requests"], r["cost_usd"]) for r in table] == [
        ("gpt-4o", "3", "51.235566"),  # the 30-day-old row is inside 60d
        ("claude", "1", "2.000001"),
    ]
    out = spend("--by", "team", "--since", "36h", "--format", "json", "--ledger", url)
    assert json.loads(out.stdout) == [
        {
            "team": "research",
            "requests": 1,
            "prompt_tokens": 100,
            "completion_tokens": 20,
            "cached_tokens": 10,
            "cache_write_tokens": 0,
            "reasoning_tokens": 5,
            "cost_micros": 1_234_567,
            "cost_usd": "1.234567",
        }
    ]


def test_errors_name_the_problem_and_exit_non_zero(tmp_path):
    missing = spend("--ledger", f"sqlite:///{tmp_path}/none.sqlite3")
    assert missing.returncode == 1 and "no ledger at" in missing.stderr
    assert not (tmp_path / "none.sqlite3").exists()  # a report never creates a ledger
    bad = spend("--since", "last tuesday", "--ledger", f"sqlite:///{tmp_path}/x")
    assert bad.returncode == 2 and "--since" in bad.stderr
    wrong = spend("--by", "colour")
    assert wrong.returncode == 2 and "invalid choice" in wrong.stderr
    down = spend("--ledger", "postgresql://u:hunter2@127.0.0.1:1/db")
    assert down.returncode == 1 and "unavailable" in down.stderr
    assert "hunter2" not in down.stderr + down.stdout


def test_postgres_ledger(tmp_path):
    server = PostgresServer().start()
    try:
        with psycopg.connect(server.url, autocommit=True) as conn:
            conn.execute("CREATE DATABASE cli")
        url = server.url.rsplit("/", 1)[0] + "/cli"
        fill(url, tmp_path / "journal")
        out = spend("--by", "provider", "--format", "json", "--ledger", url)
        assert out.returncode == 0, out.stderr
        assert [(r["provider"], r["requests"], r["cost_usd"]) for r in json.loads(out.stdout)] == [
            ("anthropic", 1, "2.000001"),
            ("openai", 2, "1.235566"),
        ]
    finally:
        server.destroy()
