"""Budgets shared by every replica: the arithmetic of `LocalBudgetStore` as two Lua
scripts, each run atomically by Redis, so concurrent reservations from any number of
sidecars never both take the last dollar.

No second client: the scripts go through the rate-limit `RedisStore`'s batcher
(pipelined, bounded queue) and breaker (an outage logged once, counted, skipped for
`retry_interval`), so budgets and limits share one pool and one view of an outage.
Each budget key is a hash of slot -> micro-dollars (a calendar period has one slot;
a rolling window SLOTS) plus a `soft` field: the slot at which the soft notice fired.
Amounts are integers (HINCRBY); sums stay exact in Lua's doubles below 2^53 micros.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence

from extproc.policy.ratelimit.redis import RedisStore
from extproc.policy.ratelimit.store import StoreUnavailable
from extproc.spend.budgets import Check, Outcome
from extproc.spend.store import oldest_slot

KEY_PREFIX = "spend:"

# ARGV[1] = amount; then per key: limit, slot, lo, ttl_ms, soft, span.
RESERVE_LUA = """
local amount = tonumber(ARGV[1])
local n = #KEYS
local spent, blocked, crossed = {}, {}, {}
for i = 1, n do
  local b = 2 + (i - 1) * 6
  local limit, lo = tonumber(ARGV[b]), tonumber(ARGV[b + 2])
  local flat = redis.call('HGETALL', KEYS[i])
  local sum = 0
  for j = 1, #flat, 2 do
    local f = flat[j]
    if f ~= 'soft' then
      if tonumber(f) >= lo then
        sum = sum + tonumber(flat[j + 1])
      else
        redis.call('HDEL', KEYS[i], f)
      end
    end
  end
  spent[i] = sum
  if sum + amount > limit then blocked[#blocked + 1] = tostring(i - 1) end
end
local ok = 0
if #blocked == 0 then
  ok = 1
  for i = 1, n do
    local b = 2 + (i - 1) * 6
    local slot, soft, span = ARGV[b + 1], tonumber(ARGV[b + 4]), tonumber(ARGV[b + 5])
    redis.call('HINCRBY', KEYS[i], slot, amount)
    redis.call('PEXPIRE', KEYS[i], ARGV[b + 3])
    spent[i] = spent[i] + amount
    if soft > 0 and spent[i] >= soft then
      local at = tonumber(redis.call('HGET', KEYS[i], 'soft'))
      if at == nil or at + span <= tonumber(slot) then
        redis.call('HSET', KEYS[i], 'soft', slot)
        crossed[#crossed + 1] = tostring(i - 1)
      end
    end
  end
end
local out = {}
for i = 1, n do out[i] = string.format('%d', spent[i]) end
return {ok, table.concat(out, ','), table.concat(blocked, ','), table.concat(crossed, ',')}
"""

# ARGV[1] = delta; then per key: slot, lo_now, soft, span. A key gone (period over)
# or a slot already out of the window moves nothing.
SETTLE_LUA = """
local delta = tonumber(ARGV[1])
local out, crossed = {}, {}
for i = 1, #KEYS do
  local b = 2 + (i - 1) * 4
  local slot, lo = tonumber(ARGV[b]), tonumber(ARGV[b + 1])
  local sum = 0
  if slot >= lo and redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('HINCRBY', KEYS[i], ARGV[b], delta)
    local flat = redis.call('HGETALL', KEYS[i])
    for j = 1, #flat, 2 do
      if flat[j] ~= 'soft' and tonumber(flat[j]) >= lo then sum = sum + tonumber(flat[j + 1]) end
    end
    local soft, span = tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
    if delta > 0 and soft > 0 and sum >= soft then
      local at = tonumber(redis.call('HGET', KEYS[i], 'soft'))
      if at == nil or at + span <= slot then
        redis.call('HSET', KEYS[i], 'soft', ARGV[b])
        crossed[#crossed + 1] = tostring(i - 1)
      end
    end
  end
  out[i] = string.format('%d', sum)
end
return {1, table.concat(out, ','), '', table.concat(crossed, ',')}
"""


def _sha(script: str) -> str:
    return hashlib.sha1(script.encode()).hexdigest()


def _ints(raw: bytes | str) -> list[int]:
    text = raw.decode() if isinstance(raw, bytes) else raw
    return [int(x) for x in text.split(",") if x]


def _outcome(reply: object) -> Outcome:
    ok, spent, blocked, crossed = reply  # type: ignore[misc]
    return Outcome(bool(int(ok)), _ints(spent), _ints(blocked), _ints(crossed))


class RedisBudgetStore:
    name = "redis"

    def __init__(self, shared: RedisStore, clock: Callable[[], float] | None = None) -> None:
        """`shared` is the rate-limit store whose client and batcher these scripts use;
        `clock` (epoch seconds) must be the planner's, for the settle's window edge."""
        self._shared = shared
        self._clock = clock or time.time
        self._prefix = shared.key_prefix + KEY_PREFIX
        self._reserve_sha = _sha(RESERVE_LUA)
        self._settle_sha = _sha(SETTLE_LUA)

    async def reserve(self, checks: Sequence[Check], amount: int) -> Outcome:
        if not checks:
            return Outcome(True, [])
        args: list[str | float] = [str(amount)]
        for c in checks:
            args += (
                str(c.limit),
                str(c.slot),
                str(c.lo),
                str(c.ttl_ms),
                str(c.soft_micros),
                str(c.span),
            )
        keys = [self._prefix + c.key for c in checks]
        reply = await self._shared.run_script(
            RESERVE_LUA, self._reserve_sha, keys, args, op="budget_reserve"
        )
        return _outcome(reply)

    async def settle(self, checks: Sequence[Check], delta: int) -> Outcome:
        """Never raises: a lost settle is logged and counted by the shared breaker,
        and the reservation stands (the budget errs on the side of spent)."""
        if not checks or delta == 0:
            return Outcome(True, [0] * len(checks))
        now = self._clock()
        args: list[str | float] = [str(delta)]
        for c in checks:
            args += (str(c.slot), str(oldest_slot(c, now)), str(c.soft_micros), str(c.span))
        keys = [self._prefix + c.key for c in checks]
        try:
            reply = await self._shared.run_script(
                SETTLE_LUA, self._settle_sha, keys, args, op="budget_settle", bounded=False
            )
        except StoreUnavailable:  # already counted and logged by the breaker
            return Outcome(False, [0] * len(checks))
        return _outcome(reply)
