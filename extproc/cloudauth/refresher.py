"""One credential kept fresh in the background: an OAuth token, a set of AWS keys.

The SDKs that make these (google-auth, azure-identity, botocore) are blocking, so the
fetch runs in a thread, driven by one asyncio task per credential: started with the
policy, stopped when a reload no longer names it and at shutdown. The request path
only reads `value()`: a fetch never delays a request. A token is refreshed well before
it expires (a quarter of its lifetime early, at most 15 minutes); a failed fetch is
logged with its reason and retried with a growing pause, and the old token is used
while it is still valid.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("extproc.cloudauth")

MAX_LEAD_S = 900.0  # refresh at most this long before expiry (botocore's advisory window)
RECHECK_S = 300.0  # credentials with no known expiry are fetched again this often
MIN_WAIT_S = 1.0  # never fetch more often than this, whatever a token's lifetime
RETRY_MAX_S = 30.0  # a failing fetch is retried at 1, 2, 4... seconds up to this


class CredentialsUnavailable(Exception):
    """No usable credential (yet): the reason is safe to show (it holds no secret)."""


@dataclass(frozen=True, slots=True)
class Fetched:
    value: Any  # what the request path uses: a token string, ReadOnlyCredentials
    expires_at: float | None  # wall-clock seconds; None: no expiry known


def reason_of(exc: BaseException) -> str:
    """A fetch failure in one bounded line (SDK errors carry the endpoint's answer)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:300]}"


class Refresher:
    """A credential made by the blocking `fetch`, refreshed by one background task."""

    def __init__(
        self,
        name: str,
        fetch: Callable[[], Fetched],
        *,
        clock: Callable[[], float] = time.time,
        min_wait_s: float = MIN_WAIT_S,
        metrics: Any = None,
        label: str = "",
    ) -> None:
        self.name = name  # e.g. "provider vertex (gcp)": what log lines say
        self._metrics = metrics
        self._label = label  # the provider, as the metrics' label
        self._fetch = fetch
        self._clock = clock
        self._min_wait = min_wait_s
        self.current: Fetched | None = None
        self.last_error = "not fetched yet"
        self.fetches = 0  # attempts, for tests and logs
        self._task: asyncio.Task | None = None

    # -- the request path (reads only) -------------------------------------------

    def value(self) -> Any:
        """The credential now; CredentialsUnavailable (with why) when there is none."""
        got = self.current
        if got is not None and (got.expires_at is None or self._clock() < got.expires_at):
            return got.value
        if got is not None:
            raise CredentialsUnavailable(f"the last token expired; {self.last_error}")
        raise CredentialsUnavailable(self.last_error)

    # -- the background task -------------------------------------------------------

    def start(self) -> None:
        """Start refreshing if an event loop runs in this thread (idempotent)."""
        if self._task is not None and not self._task.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._task = loop.create_task(self._run(), name=f"credentials {self.name}")

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def refresh(self) -> bool:
        """One fetch in a thread: True when it gave a credential."""
        self.fetches += 1
        if self.current is None and self.fetches == 1:
            self.last_error = "the first fetch has not finished yet"
        try:
            fetched = await asyncio.to_thread(self._fetch)
        except Exception as exc:  # any SDK error: logged and retried, never fatal
            self.last_error = reason_of(exc)
            self._count("error")
            return False
        if self.current is None or self.last_error:
            log.info("%s: credentials fetched", self.name)
        self.current = fetched
        self.last_error = ""
        self._count("ok")
        return True

    def _count(self, result: str) -> None:
        m = self._metrics
        if m is None:
            return
        m.cloud_credentials_refresh.labels(self._label, result).inc()
        got = self.current
        expiry = got.expires_at if got is not None and got.expires_at is not None else 0
        if got is not None and got.expires_at is None:
            expiry = float("inf")  # keys with no expiry
        m.cloud_credentials_expiry.labels(self._label).set(expiry)

    def next_delay(self) -> float:
        """After a good fetch: a quarter of the lifetime early (at most MAX_LEAD_S)."""
        got = self.current
        if got is None or got.expires_at is None:
            return RECHECK_S
        ttl = got.expires_at - self._clock()
        return max(ttl - min(ttl / 4, MAX_LEAD_S), self._min_wait)

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                ok = await self.refresh()
            except Exception as exc:  # never let the refresher die
                self.last_error, ok = reason_of(exc), False
            if ok:
                failures = 0
                delay = self.next_delay()
            else:
                failures += 1
                delay = min(self._min_wait * 2 ** (failures - 1), RETRY_MAX_S)
                self._log_failure(failures, delay)
            await asyncio.sleep(delay)

    def _log_failure(self, failures: int, delay: float) -> None:
        got = self.current
        if got is None:
            state = "no credentials yet: its requests get 503"
        elif got.expires_at is None or self._clock() < got.expires_at:
            left = "" if got.expires_at is None else f" for {got.expires_at - self._clock():.0f} s"
            state = f"the current credentials stay in use{left}"
        else:
            state = "the last credentials expired: its requests get 503"
        log.warning(
            "%s: credentials refresh failed (attempt %d, retrying in %.0f s; %s): %s",
            self.name,
            failures,
            delay,
            state,
            self.last_error,
        )

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._metrics is not None:  # a provider a reload dropped leaves no series
            for family in (self._metrics.cloud_credentials_expiry,):
                with contextlib.suppress(KeyError):
                    family.remove(self._label)
