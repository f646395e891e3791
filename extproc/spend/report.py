"""`extproc spend`: who spent what, from the ledger, as a table, CSV or JSON.

Money is printed from integral micro-dollars (never through a float sum), so the
figures equal the ledger's to the micro-dollar.
"""

from __future__ import annotations

import csv
import io
import sys
import time
from datetime import datetime

import orjson

from extproc.spend.budgets import parse_duration
from extproc.spend.ledger import TOTAL_FIELDS, LedgerUnavailable, open_backend

HEADERS = ("requests", "prompt", "completion", "cached", "cache_write", "reasoning", "cost_usd")


def usd(micros: int) -> str:
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(int(micros)), 1_000_000)
    return f"{sign}{whole}.{frac:06d}"


def since_ms(text: str, now: float | None = None) -> int:
    """'7d', '24h' (back from now) or an ISO date/time ('2026-11-01')."""
    now = time.time() if now is None else now
    try:
        return int((now - parse_duration(text)) * 1000)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--since {text!r}: a duration (7d, 24h, 30m) or an ISO date") from None
    if when.tzinfo is None:
        when = when.astimezone()
    return int(when.timestamp() * 1000)


def render(rows: list[dict], by: str, fmt: str) -> str:
    if fmt == "json":
        out = [
            {by: r["key"], **{k: r[k] for k in TOTAL_FIELDS[1:]}, "cost_usd": usd(r["cost_micros"])}
            for r in rows
        ]
        return orjson.dumps(out, option=orjson.OPT_INDENT_2).decode() + "\n"
    table = [
        [
            str(r["key"]),
            *(str(int(r[k] or 0)) for k in TOTAL_FIELDS[1:-1]),
            usd(r["cost_micros"] or 0),
        ]
        for r in rows
    ]
    header = [by, *HEADERS]
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(table)
        return buf.getvalue()
    total = sum(int(r["cost_micros"] or 0) for r in rows)
    requests = sum(int(r["requests"]) for r in rows)
    footer = ["TOTAL", str(requests), "", "", "", "", "", usd(total)]
    widths = [max(len(line[i]) for line in [header, *table, footer]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    return "\n".join([line(header), *(line(t) for t in table), line(footer)]) + "\n"


def main(by: str, since: str, fmt: str, ledger: str) -> int:
    try:
        start = since_ms(since)
    except ValueError as exc:
        print(f"extproc spend: {exc}", file=sys.stderr)
        return 2
    if ledger.startswith("sqlite:///"):
        from pathlib import Path

        if not Path(ledger.removeprefix("sqlite:///")).exists():
            print(f"extproc spend: no ledger at {ledger}", file=sys.stderr)
            return 1
    try:
        backend = (
            open_backend(ledger, timeout=5.0)
            if ledger.startswith("postgres")
            else (open_backend(ledger))
        )
    except ValueError as exc:
        print(f"extproc spend: {exc}", file=sys.stderr)
        return 2
    try:
        rows = backend.totals(by, start)
    except LedgerUnavailable as exc:
        print(f"extproc spend: ledger {backend.where} unavailable: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # sqlite3.Error: not a ledger, or no table yet
        print(f"extproc spend: ledger {backend.where}: {exc}", file=sys.stderr)
        return 1
    finally:
        backend.close()
    sys.stdout.write(render(rows, by, fmt))
    return 0
