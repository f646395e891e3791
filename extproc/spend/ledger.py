"""The spend ledger: one row per exchange, written off the request path in batches,
never lost and never doubled.

`record(row)` is all the request path does: it appends the row as one JSON line to
the current journal segment (one `write`, no fsync: a kill -9 of the sidecar keeps it,
the kernel has it) and queues it in memory. A writer task takes up to `batch_size`
rows (or what came within `flush_interval`), and a worker thread inserts them in one
transaction. Once every row of a closed segment is committed the segment is deleted.

The journal is also the outage spool: when a batch fails (database down) the writer
stops writing from memory, keeps the segments, and every `retry_interval` replays the
closed segments in order; rows recorded meanwhile join a new segment, replayed next.
A restart (after a crash or with the database still down) starts by replaying what
segments it finds. Inserts are idempotent by request id (`ON CONFLICT DO NOTHING`),
so a row written twice (a replay after a commit whose answer was lost) counts once.
The journal is bounded by `spool_max_bytes`: past it rows stay in memory only and
are counted in `stats.unspooled` (and in `stats.lost` if the database is down too).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import operator
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Protocol

import orjson

log = logging.getLogger("extproc.spend.ledger")

SEGMENT_BYTES = 4 << 20  # a segment rolls past this, so committed ones get deleted
_SEGMENT = re.compile(r"^ledger-(\d{12})\.jsonl$")
BY = ("consumer", "team", "model", "route", "provider")


@dataclass(frozen=True, slots=True)
class Row:
    """One exchange. Money in micro-dollars, time in epoch milliseconds."""

    request_id: str
    ts_ms: int
    consumer: str = ""
    team: str = ""
    route: str = ""
    provider: str = ""
    model: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cost_micros: int = 0
    status: str = "completed"  # completed | aborted | refused | error
    reason: str = ""  # finish reason (stop, length, ...) or why it was cut

    def values(self) -> tuple:
        return _VALUES(self)


COLUMNS = tuple(f.name for f in fields(Row))
_VALUES = operator.attrgetter(*COLUMNS)  # astuple() deep-copies: 10x slower


class LedgerUnavailable(Exception):
    """The database did not take the batch: the rows stay in the journal."""


class Backend(Protocol):
    """A database the writer thread calls; every method blocks, none is called on
    the event loop."""

    where: str

    def migrate(self) -> list[str]: ...

    def write(self, rows: Sequence[Row]) -> None:
        """Insert all in one transaction, skipping request ids already there;
        raise LedgerUnavailable when the database cannot be reached."""
        ...

    def totals(self, by: str, since_ms: int) -> list[dict]: ...

    def sums(
        self, column: str | None, since_ms: int, until_ms: int, slot_ms: int
    ) -> list[tuple[str, int, int]]:
        """(subject, slot, micro-dollars) spent in [since, until): see sums_sql."""
        ...

    def close(self) -> None: ...


def migrations(dialect: str) -> list[tuple[str, str]]:
    """(version, SQL) shipped in extproc/spend/migrations/<dialect>/, in order."""
    folder = resources.files("extproc.spend") / "migrations" / dialect
    found = sorted(
        (entry.name.removesuffix(".sql"), entry.read_text(encoding="utf-8"))
        for entry in folder.iterdir()
        if entry.name.endswith(".sql")
    )
    return found


def insert_sql(placeholder: str) -> str:
    """One row's INSERT, a replayed request id kept once (`placeholder`: the driver's)."""
    return (
        f"INSERT INTO spend_ledger ({', '.join(COLUMNS)}) "
        f"VALUES ({', '.join([placeholder] * len(COLUMNS))}) "
        "ON CONFLICT (request_id) DO NOTHING"
    )


def totals_sql(by: str, placeholder: str) -> str:
    if by not in BY:
        raise ValueError(f"--by: one of {', '.join(BY)}")
    return (
        f"SELECT {by} AS key, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), "
        "SUM(cached_tokens), SUM(cache_write_tokens), SUM(reasoning_tokens), SUM(cost_micros) "
        f"FROM spend_ledger WHERE ts_ms >= {placeholder} GROUP BY {by} "
        "ORDER BY SUM(cost_micros) DESC, key"
    )


def sums_sql(column: str | None, slot_ms: int, placeholder: str) -> str:
    """Spend since a time by subject (a column, or everything) and by slot of
    `slot_ms` (0: one slot), to rebuild budget counters."""
    if column is not None and column not in BY:
        raise ValueError(f"not a ledger dimension: {column!r}")
    subject = column or "'*'"
    slot = f"ts_ms / {int(slot_ms)}" if slot_ms else "0"
    return (
        f"SELECT {subject}, {slot}, SUM(cost_micros) FROM spend_ledger "
        f"WHERE ts_ms >= {placeholder} AND ts_ms < {placeholder} GROUP BY 1, 2"
    )


TOTAL_FIELDS = (
    "key",
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "cost_micros",
)


def open_backend(url: str, **options: object) -> Backend:
    """sqlite:///path (created with its folder) or postgresql://..."""
    if url.startswith("sqlite:///"):
        from extproc.spend.ledger_sqlite import SqliteBackend

        return SqliteBackend(url.removeprefix("sqlite:///"))  # sqlite:////abs, sqlite:///rel
    if url.startswith(("postgresql://", "postgres://")):
        from extproc.spend.ledger_postgres import PostgresBackend

        return PostgresBackend(url, **options)  # type: ignore[arg-type]
    raise ValueError(f"ledger url {url.split(':', 1)[0]!r}: expected sqlite:/// or postgresql://")


# -- the journal ------------------------------------------------------------------------


class Journal:
    """Append-only segments of JSON lines in `directory`, bounded in total bytes."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        directory.mkdir(parents=True, exist_ok=True)
        self.closed: list[int] = sorted(self._existing())
        self.bytes = sum(self._size(s) for s in self.closed)
        self.current = (self.closed[-1] + 1) if self.closed else 1
        self._fd = -1
        self._current_bytes = 0
        self.appended: dict[int, int] = {}  # rows appended per segment (this process)

    def _existing(self) -> Iterator[int]:
        for entry in os.scandir(self.directory):
            m = _SEGMENT.match(entry.name)
            if m:
                yield int(m.group(1))

    def path(self, seq: int) -> Path:
        return self.directory / f"ledger-{seq:012d}.jsonl"

    def _size(self, seq: int) -> int:
        try:
            return self.path(seq).stat().st_size
        except FileNotFoundError:
            return 0

    def append(self, row: Row) -> int | None:
        """The segment the row went to, or None when the journal is full."""
        line = orjson.dumps(row.values()) + b"\n"
        if self.bytes + len(line) > self.max_bytes:
            return None
        if self._fd < 0 or self._current_bytes >= SEGMENT_BYTES:
            self.roll()
            self._fd = os.open(
                self.path(self.current), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600
            )
        os.write(self._fd, line)
        self._current_bytes += len(line)
        self.bytes += len(line)
        self.appended[self.current] = self.appended.get(self.current, 0) + 1
        return self.current

    def roll(self) -> None:
        """Close the current segment (if written): the next row opens a new one."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self.closed.append(self.current)
            self.current += 1
            self._current_bytes = 0

    def read(self, seq: int) -> list[Row]:
        try:
            data = self.path(seq).read_bytes()
        except FileNotFoundError:
            return []
        rows = []
        for line in data.split(b"\n"):
            if not line:
                continue
            try:
                rows.append(Row(*orjson.loads(line)))
            except (orjson.JSONDecodeError, TypeError):  # a line cut by a crash
                log.warning("ledger journal %s: skipped a torn line", self.path(seq).name)
        return rows

    def delete(self, seq: int) -> None:
        size = self._size(seq)
        try:
            self.path(seq).unlink()
        except FileNotFoundError:
            size = 0
        self.bytes -= size
        if seq in self.closed:
            self.closed.remove(seq)
        self.appended.pop(seq, None)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# -- the writer -------------------------------------------------------------------------


@dataclass(slots=True)
class LedgerStats:
    recorded: int = 0
    written: int = 0  # rows committed (a replayed duplicate counts again here)
    batches: int = 0
    failures: int = 0  # batches the database refused or could not take
    replayed: int = 0  # rows sent again from the journal
    unspooled: int = 0  # rows the full journal could not take
    lost: int = 0  # rows neither in the journal nor in the database


class Ledger:
    """The asyncio side: `record` on the request path, one writer task, `close`."""

    def __init__(
        self,
        backend: Backend,
        directory: Path,
        *,
        batch_size: int = 500,
        flush_interval: float = 1.0,
        retry_interval: float = 2.0,
        queue_limit: int = 100_000,
        spool_max_bytes: int = 256 << 20,
        on_stats: Callable[[LedgerStats], None] | None = None,
    ) -> None:
        self.backend = backend
        self.journal = Journal(Path(directory), spool_max_bytes)
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.retry_interval = retry_interval
        self.queue_limit = queue_limit
        self.stats = LedgerStats()
        self._on_stats = on_stats
        self._queue: list[tuple[Row, int | None]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closing = False
        self.backlog = bool(self.journal.closed)  # segments from an earlier run
        self.committed: dict[int, int] = {}

    async def start(self) -> None:
        """Migrate (a database down now is retried by the writer) and start writing."""
        try:
            await asyncio.to_thread(self.backend.migrate)
        except LedgerUnavailable as exc:
            self._failed(exc)
        self._task = asyncio.create_task(self._run(), name="spend-ledger-writer")

    def record(self, row: Row) -> None:
        """Journal the row and queue it; never blocks on the database."""
        self.stats.recorded += 1
        seq = self.journal.append(row)
        if seq is None:
            self.stats.unspooled += 1
        if len(self._queue) >= self.queue_limit:
            if seq is None:
                self.stats.lost += 1
            else:
                self.backlog = True  # the journal has it; memory is full
        else:
            self._queue.append((row, seq))
        if len(self._queue) >= self.batch_size:
            self._wake.set()

    async def close(self) -> None:
        """Write everything still queued (flush on SIGTERM); what the database cannot
        take stays in the journal for the next start."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        self.journal.close()
        await asyncio.to_thread(self.backend.close)

    async def _run(self) -> None:
        while True:
            if self.backlog:
                if not await self._replay():
                    if self._closing:
                        return  # the journal keeps the rows for the next start
                    await self._sleep(self.retry_interval)
                continue
            if not self._closing and len(self._queue) < self.batch_size:
                await self._sleep(self.flush_interval)  # a batch fills, or time is up
            while self._queue and not self.backlog:
                await self._write_queued()
            if self._closing and not self._queue and not self.backlog:
                self._finish_segments()
                return

    async def _sleep(self, seconds: float) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    async def _write_queued(self) -> None:
        batch, self._queue = self._queue[: self.batch_size], self._queue[self.batch_size :]
        try:
            await asyncio.to_thread(self.backend.write, [row for row, _ in batch])
        except LedgerUnavailable as exc:
            self.stats.lost += sum(1 for _, seq in batch if seq is None)  # the rest: journal
            self._failed(exc)
            return
        self.stats.batches += 1
        self.stats.written += len(batch)
        for _, seq in batch:
            if seq is not None:
                self.committed[seq] = self.committed.get(seq, 0) + 1
        self._delete_committed()
        self._report()

    def _failed(self, exc: BaseException) -> None:
        self.stats.failures += 1
        if not self.backlog:
            log.error(
                "spend ledger %s unavailable (%s): rows go to the journal and are "
                "replayed every %.1fs",
                self.backend.where,
                exc,
                self.retry_interval,
            )
        self.backlog = True
        self._report()

    async def _replay(self) -> bool:
        """Replay every closed segment; True when the backlog is gone. Memory is
        dropped first: every row in it is in a segment about to be replayed (those
        the journal could not take are lost while the database is down)."""
        self.journal.roll()
        self.stats.lost += sum(1 for _, seq in self._queue if seq is None)
        self._queue = []
        for seq in list(self.journal.closed):
            rows = await asyncio.to_thread(self.journal.read, seq)
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start : start + self.batch_size]
                try:
                    await asyncio.to_thread(self.backend.write, chunk)
                except LedgerUnavailable as exc:
                    self._failed(exc)
                    return False
                self.stats.batches += 1
                self.stats.written += len(chunk)
                self.stats.replayed += len(chunk)
            self.journal.delete(seq)
            self.committed.pop(seq, None)
        if self.backlog:
            log.warning("spend ledger %s reachable again: journal replayed", self.backend.where)
        self.backlog = False
        self._report()
        return True

    def _delete_committed(self) -> None:
        for seq in list(self.journal.closed):
            appended = self.journal.appended.get(seq)
            if appended is not None and self.committed.get(seq, 0) >= appended:
                self.journal.delete(seq)
                self.committed.pop(seq, None)

    def _finish_segments(self) -> None:
        self.journal.roll()
        self._delete_committed()

    def _report(self) -> None:
        if self._on_stats is not None:
            self._on_stats(self.stats)


def now_ms() -> int:
    return int(time.time() * 1000)
