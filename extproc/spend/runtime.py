"""What spend accounting keeps per process, across policy reloads: the ledger writer,
the in-process budget counters, and the soft-limit webhook calls in flight.

The worker starts it before it serves (`Shared.start`): the ledger migrates and
replays what an earlier run left in its journal, then the in-process budgets are
rebuilt from the ledger, so they survive a restart. At shutdown (`aclose`, after the
last stream settled) the ledger writes everything queued: nothing is lost on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson

from extproc.spend.ledger import Ledger, LedgerStats, open_backend
from extproc.spend.rebuild import rebuild
from extproc.spend.store import LocalBudgetStore

if TYPE_CHECKING:
    import aiohttp

    from extproc.metrics import Metrics
    from extproc.spend.budgets import Planner
    from extproc.spend.settings import LedgerConfig

log = logging.getLogger("extproc.spend")

BACKLOG_WAIT_S = 10.0  # at start: how long the journal replay may delay the rebuild
WEBHOOK_TASKS = 256  # soft-limit calls in flight at most; more are dropped (counted)


class SpendShared:
    """One per worker process (`Shared.spend`)."""

    def __init__(self, metrics: Metrics, worker: int = 0) -> None:
        self.metrics = metrics
        self.worker = worker
        self.ledger: Ledger | None = None
        self._ledger_identity: tuple = ()
        self.local: LocalBudgetStore | None = None
        self.planner: Planner | None = None  # the local budgets to rebuild at start
        self.started = False
        self._seen = LedgerStats()
        self._tasks: set[asyncio.Task] = set()
        self.http: Callable[[], aiohttp.ClientSession] | None = None

    # -- the ledger ---------------------------------------------------------------------

    def ledger_for(self, config: LedgerConfig) -> Ledger:
        """The process's ledger for these settings (a reload that changes them gets a
        new writer; the old one is closed once its queue is written)."""
        identity = (
            config.url,
            config.journal_dir,
            config.batch_size,
            config.flush_interval_ms,
            config.retry_interval_ms,
            config.queue_limit,
            config.spool_max_bytes,
            config.pool_size,
        )
        if self.ledger is not None and identity == self._ledger_identity:
            return self.ledger
        old = self.ledger
        options: dict[str, Any] = {}
        if config.url.startswith(("postgresql://", "postgres://")):
            options["pool_size"] = config.pool_size
        backend = open_backend(config.url, **options)
        # One journal per process: each worker writes its own segments.
        journal = Path(config.journal_dir) / f"worker-{self.worker}"
        self.ledger = Ledger(
            backend,
            journal,
            batch_size=config.batch_size,
            flush_interval=config.flush_interval_ms / 1000,
            retry_interval=config.retry_interval_ms / 1000,
            queue_limit=config.queue_limit,
            spool_max_bytes=config.spool_max_bytes,
            on_stats=self._stats,
        )
        self._ledger_identity = identity
        if old is not None:  # a reload: the new writer starts now, the old one drains
            self._spawn(old.close())
            if self.started:
                self._spawn(self.ledger.start())
        return self.ledger

    def _stats(self, stats: LedgerStats) -> None:
        """Cumulative writer figures -> counter increments."""
        seen = self._seen
        rows = self.metrics.ledger_rows
        for name in ("recorded", "written", "replayed", "unspooled", "lost"):
            delta = getattr(stats, name) - getattr(seen, name)
            if delta > 0:
                rows.labels(name).inc(delta)
        if stats.failures > seen.failures:
            self.metrics.ledger_failures.inc(stats.failures - seen.failures)
        self._seen = LedgerStats(**{k: getattr(stats, k) for k in LedgerStats.__annotations__})

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Before serving: the ledger writer, then the local budgets from the ledger."""
        if self.started:
            return
        self.started = True
        ledger = self.ledger
        if ledger is None:
            return
        await ledger.start()
        if self.local is None or self.planner is None:
            return
        deadline = time.monotonic() + BACKLOG_WAIT_S
        while ledger.backlog and time.monotonic() < deadline:  # the journal replays first
            await asyncio.sleep(0.05)
        if ledger.backlog:
            log.error(
                "spend ledger %s: journal not replayed in %.0f s; budgets start without it",
                ledger.backend.where,
                BACKLOG_WAIT_S,
            )
        try:
            micros = await asyncio.to_thread(
                rebuild, self.local, self.planner, ledger.backend, time.time()
            )
        except Exception as exc:  # a database down at start: budgets start empty
            log.error("spend budgets not rebuilt from the ledger: %s", exc)
            return
        log.info("spend budgets rebuilt from the ledger: $%.6f in this period", micros / 1e6)

    async def aclose(self) -> None:
        """Shutdown: write what the ledger holds; let soft-limit calls end (bounded)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5.0)
        if self.ledger is not None:
            await self.ledger.close()
            self._stats(self.ledger.stats)

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- soft limits ----------------------------------------------------------------------

    def notify(self, url: str, timeout: float, payload: dict[str, Any]) -> None:
        """POST a soft-limit crossing, off the request path; never raises."""
        if self.http is None or len(self._tasks) >= WEBHOOK_TASKS:
            self.metrics.budget_webhook_calls.labels("dropped").inc()
            return
        try:
            self._spawn(self._post(url, timeout, payload))
        except RuntimeError:  # no running loop (a unit test's synchronous path)
            self.metrics.budget_webhook_calls.labels("dropped").inc()

    async def _post(self, url: str, timeout: float, payload: dict[str, Any]) -> None:
        import aiohttp

        assert self.http is not None
        outcome = "ok"
        try:
            async with asyncio.timeout(timeout):
                session = self.http()
                async with session.post(
                    url, data=orjson.dumps(payload), headers={"content-type": "application/json"}
                ) as resp:
                    if resp.status >= 300:
                        outcome = "error"
                    with contextlib.suppress(aiohttp.ClientError):
                        await resp.content.read(4096)
        except TimeoutError:
            outcome = "timeout"
        except (aiohttp.ClientError, OSError):
            outcome = "error"
        self.metrics.budget_webhook_calls.labels(outcome).inc()
        if outcome != "ok":  # scheme and host only: a path or query may carry a token
            parts = urlsplit(url)
            log.warning("soft-limit webhook %s://%s: %s", parts.scheme, parts.hostname, outcome)
