"""The shared ledger: PostgreSQL through psycopg 3 and a psycopg_pool pool.

Every replica writes the same table; request ids keep the rows unique whichever
replica (or replay) wrote first. Migrations run under an advisory lock, so replicas
starting together apply each one once. An unreachable server is `LedgerUnavailable`
within `timeout` seconds (the pool does not wait forever), so the writer spools.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from extproc.policy.ratelimit.redis import redacted
from extproc.spend.ledger import (
    TOTAL_FIELDS,
    LedgerUnavailable,
    Row,
    insert_sql,
    migrations,
    sums_sql,
    totals_sql,
)

INSERT = insert_sql("%s")
MIGRATION_LOCK = 0x5E7D_1ED6  # pg_advisory_xact_lock key: one migrator at a time


class PostgresBackend:
    def __init__(self, url: str, pool_size: int = 4, timeout: float = 5.0) -> None:
        self.where = redacted(url)
        self._timeout = timeout
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            timeout=timeout,
            open=False,
            kwargs={"connect_timeout": max(1, int(timeout)), "autocommit": False},
            # Give up a failed reconnect quickly: the next write asks again, so the
            # ledger's retry_interval (not the pool's growing backoff) paces retries.
            reconnect_timeout=timeout,
        )
        self._pool.open(wait=False)
        self._migrated = False

    def _run(self, work):  # one pooled connection, errors as LedgerUnavailable
        try:
            with self._pool.connection() as conn:
                return work(conn)
        except (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout) as exc:
            raise LedgerUnavailable(f"{type(exc).__name__}: {exc}") from None

    def migrate(self) -> list[str]:
        applied = self._run(self._migrate)
        self._migrated = True
        return applied

    def _migrate(self, conn: psycopg.Connection) -> list[str]:
        applied = []
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS spend_migrations "
                "(version text PRIMARY KEY, applied_ms bigint NOT NULL)"
            )
            done = {v for (v,) in conn.execute("SELECT version FROM spend_migrations")}
            for version, sql in migrations("postgres"):
                if version in done:
                    continue
                conn.execute(sql)
                conn.execute(
                    "INSERT INTO spend_migrations VALUES (%s, %s)",
                    (version, int(time.time() * 1000)),
                )
                applied.append(version)
        return applied

    def write(self, rows: Sequence[Row]) -> None:
        if not self._migrated:
            self.migrate()

        def insert(conn: psycopg.Connection) -> None:
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(INSERT, [r.values() for r in rows])

        self._run(insert)

    def totals(self, by: str, since_ms: int) -> list[dict]:
        def query(conn: psycopg.Connection) -> list[dict]:
            rows = conn.execute(totals_sql(by, "%s"), (since_ms,)).fetchall()
            conn.rollback()
            return [dict(zip(TOTAL_FIELDS, map(_plain, r), strict=True)) for r in rows]

        return self._run(query)

    def sums(
        self, column: str | None, since_ms: int, until_ms: int, slot_ms: int
    ) -> list[tuple[str, int, int]]:
        def query(conn: psycopg.Connection) -> list[tuple[str, int, int]]:
            sql = sums_sql(column, slot_ms, "%s")
            rows = conn.execute(sql, (since_ms, until_ms)).fetchall()
            conn.rollback()
            return [(str(a), int(b), int(c)) for a, b, c in rows]

        return self._run(query)

    def close(self) -> None:
        self._pool.close()


def _plain(value: object) -> object:
    """SUM(bigint) is numeric in PostgreSQL: back to int, as SQLite gives."""
    from decimal import Decimal

    return int(value) if isinstance(value, Decimal) else value
