"""Pipelined script calls: a burst shares a few connections instead of waiting for them.

A request that waits for a free pooled connection and times out is not a Redis outage,
yet treating it as one made a burst fail open (1,000 requests at once, 310 admitted
unchecked). Here every script call joins one bounded queue; at most `lanes` senders
(one connection each) take what is queued and send it as one non-transactional
pipeline. Each script still runs atomically on the server, in queue order, so a burst
of N calls costs about N / lanes round trips' worth of waiting, never a pool timeout.

A full queue raises `StoreBusy` (back-pressure: the caller refuses, never admits); a
failed round trip gives every caller in it the Redis error (an outage: fail_mode).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from extproc.policy.ratelimit.store import StoreBusy

MAX_BATCH = 256  # script calls per pipeline: a round trip of a few milliseconds


@dataclass(slots=True)
class _Call:
    script: str
    sha: str
    keys: Sequence[str]
    args: Sequence[str | float]
    future: asyncio.Future


class ScriptBatcher:
    def __init__(self, client: aioredis.Redis, lanes: int, max_pending: int) -> None:
        self._client = client
        self._lanes = lanes
        self._max_pending = max_pending
        self._queue: deque[_Call] = deque()
        self._senders = 0
        self._tasks: set[asyncio.Task] = set()

    @property
    def pending(self) -> int:
        return len(self._queue)

    def submit(
        self,
        script: str,
        sha: str,
        keys: Sequence[str],
        args: Sequence[str | float],
        *,
        bounded: bool = True,
    ) -> asyncio.Future:
        """Queue one EVALSHA; the future gets its reply or the Redis error. `bounded`
        calls (acquires) meet the queue bound; settles do not: each belongs to a request
        already admitted, and dropping it would lose the accounting."""
        if bounded and len(self._queue) >= self._max_pending:
            raise StoreBusy(f"{len(self._queue)} rate-limit checks already wait for the store")
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Call(script, sha, keys, args, future))
        if self._senders < self._lanes:
            self._senders += 1
            task = asyncio.ensure_future(self._send())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return future

    async def _send(self) -> None:
        try:
            while self._queue:
                take = min(len(self._queue), MAX_BATCH)
                taken = [self._queue.popleft() for _ in range(take)]
                batch = [c for c in taken if not c.future.done()]  # skip callers gone
                if not batch:
                    continue
                try:
                    replies = await self._run(batch)
                except asyncio.CancelledError:  # closed: no caller waits forever
                    for call in batch:
                        call.future.cancel()
                    raise
                except Exception as exc:  # any failure goes to each caller
                    for call in batch:
                        if not call.future.done():
                            call.future.set_exception(exc)
                    continue
                for call, reply in zip(batch, replies, strict=True):
                    if call.future.done():
                        continue
                    if isinstance(reply, Exception):
                        call.future.set_exception(reply)
                    else:
                        call.future.set_result(reply)
        finally:
            self._senders -= 1

    async def _run(self, batch: list[_Call]) -> list[object]:
        replies = await self._pipeline(batch)
        missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if missing:  # a restarted (or flushed) server: load the scripts, run those again
            for script in {batch[i].script for i in missing}:
                await self._client.script_load(script)
            again = await self._pipeline([batch[i] for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

    async def _pipeline(self, batch: list[_Call]) -> list[object]:
        pipe = self._client.pipeline(transaction=False)
        for call in batch:
            pipe.execute_command("EVALSHA", call.sha, len(call.keys), *call.keys, *call.args)
        return list(await pipe.execute(raise_on_error=False))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for call in self._queue:
            call.future.cancel()
        self._queue.clear()
