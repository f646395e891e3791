"""The embedded ledger: SQLite in WAL mode in the sidecar's data directory.

WAL lets `extproc spend` read while the sidecar writes; `synchronous=NORMAL` syncs at
checkpoints, not per commit (a power cut may lose the last commits, a process crash
none). One connection, used by one writer thread at a time (the Ledger serialises).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from extproc.spend.ledger import (
    TOTAL_FIELDS,
    LedgerUnavailable,
    Row,
    insert_sql,
    migrations,
    sums_sql,
    totals_sql,
)

INSERT = insert_sql("?")


class SqliteBackend:
    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.where = f"sqlite:///{self.path}"
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._migrated = False

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=5.0, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._conn = conn
        return self._conn

    def migrate(self) -> list[str]:
        """Apply the shipped migrations not yet recorded; the versions applied."""
        with self._lock:
            try:
                return self._migrate()
            except sqlite3.Error as exc:
                raise LedgerUnavailable(f"{type(exc).__name__}: {exc}") from None

    def _migrate(self) -> list[str]:
        conn = self._connect()
        conn.execute(
            "CREATE TABLE IF NOT EXISTS spend_migrations "
            "(version TEXT PRIMARY KEY, applied_ms INTEGER NOT NULL)"
        )
        done = {v for (v,) in conn.execute("SELECT version FROM spend_migrations")}
        applied = []
        for version, sql in migrations("sqlite"):
            if version in done:
                continue
            conn.execute("BEGIN IMMEDIATE")
            try:
                code = "\n".join(ln for ln in sql.splitlines() if not ln.lstrip().startswith("--"))
                for statement in code.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(
                    "INSERT INTO spend_migrations VALUES (?, ?)", (version, int(time.time() * 1000))
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            applied.append(version)
        self._migrated = True
        return applied

    def write(self, rows: Sequence[Row]) -> None:
        with self._lock:
            try:
                if not self._migrated:
                    self._migrate()
                conn = self._connect()
                with conn:
                    conn.executemany(INSERT, [r.values() for r in rows])
            except sqlite3.Error as exc:
                raise LedgerUnavailable(f"{type(exc).__name__}: {exc}") from None

    def totals(self, by: str, since_ms: int) -> list[dict]:
        with self._lock:
            conn = self._connect()
            cur = conn.execute(totals_sql(by, "?"), (since_ms,))
            return [dict(zip(TOTAL_FIELDS, r, strict=True)) for r in cur.fetchall()]

    def sums(
        self, column: str | None, since_ms: int, until_ms: int, slot_ms: int
    ) -> list[tuple[str, int, int]]:
        with self._lock:
            cur = self._connect().execute(sums_sql(column, slot_ms, "?"), (since_ms, until_ms))
            return [(str(a), int(b), int(c)) for a, b, c in cur.fetchall()]

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
