"""The Lua scripts of the Redis store, each run atomically by the server (see
redis.py): the GCRA acquire (with the generation key and the worker's lease), the
settle, and the lease upkeep. Kept apart from the client code that sends them."""

# Times are milliseconds as doubles (the Redis clock is ~1.7e12 ms: precise to ~0.25
# microseconds). Numbers go back as strings: Redis truncates Lua numbers to integers.
# Keep the arithmetic identical to gcra.acquire/fits (SLACK included).
# Both scripts start the same: the caller's clock when it sends one, else Redis's.
_NOW_LUA = """
local now = tonumber(ARGV[1])
if now == nil then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end
"""
ACQUIRE_LUA = (
    _NOW_LUA
    + """local slack = tonumber(ARGV[2])
-- KEYS: the buckets, the store's generation, then (leased) the owner's lease hash and
-- the set of owners. ARGV: now, slack, 3 per bucket, then (leased) the lease's field,
-- its record and the owner's lease in ms.
local n, leased = #KEYS - 1, false
if #ARGV ~= 3 * n + 2 then n, leased = #KEYS - 3, true end
-- The generation key is written once, never expiring. Gone means Redis restarted
-- without persistence or was flushed, and every bucket is full again.
local gen = redis.call('GET', KEYS[n + 1])
if not gen then
  local t = redis.call('TIME')
  gen = t[1] .. '.' .. t[2]
  redis.call('SET', KEYS[n + 1], gen)
end
local tats, ok, blocked = {}, 1, {}
for i = 1, n do
  local b = 3 * i
  local interval, window, cost = tonumber(ARGV[b]), tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2])
  local tat = tonumber(redis.call('GET', KEYS[i])) or now
  tats[i] = tat
  if tat < now then tat = now end
  if tat + cost * interval - now > window + slack * interval then
    ok = 0
    blocked[#blocked + 1] = tostring(i - 1)
  end
end
local out = {ok, string.format('%.6f', now), gen}
for i = 1, n do
  local tat = tats[i]
  if ok == 1 then
    local b = 3 * i
    if tat < now then tat = now end
    tat = tat + tonumber(ARGV[b + 2]) * tonumber(ARGV[b])
    if tat > now then
      redis.call('SET', KEYS[i], string.format('%.6f', tat),
                 'PX', string.format('%d', math.ceil(tat - now) + 1000))
    end
  end
  out[#out + 1] = string.format('%.6f', tat)
end
out[#out + 1] = table.concat(blocked, ',')
if ok == 1 and leased then
  local leases, owners, b = KEYS[n + 2], KEYS[n + 3], 3 * n + 3
  redis.call('HSET', leases, ARGV[b], ARGV[b + 1])
  redis.call('SADD', owners, leases)
  redis.call('SET', leases .. ':alive', '1', 'PX', ARGV[b + 2])
end
return out
"""
)

# Settle: move each bucket by delta units (refund < 0, charge > 0), never above full.
SETTLE_LUA = (
    _NOW_LUA
    + """local n = math.floor((#ARGV - 1) / 2)
-- Leased: the last key is the owner's lease hash and the last ARGV the lease's field.
-- A lease already gone was settled by a sweep (its owner looked dead): not again.
if #ARGV > 1 + 2 * n and redis.call('HDEL', KEYS[n + 1], ARGV[#ARGV]) == 0 then
  return 0
end
for i = 1, n do
  local b = 2 * i
  local interval, delta = tonumber(ARGV[b]), tonumber(ARGV[b + 1])
  local tat = tonumber(redis.call('GET', KEYS[i])) or now
  if tat < now then tat = now end
  tat = tat + delta * interval
  if tat > now then
    redis.call('SET', KEYS[i], string.format('%.6f', tat),
               'PX', string.format('%d', math.ceil(tat - now) + 1000))
  else
    redis.call('DEL', KEYS[i])
  end
end
return 1
"""
)

# Leases of owners whose `:alive` key expired (a worker killed, a host gone): each one
# settled from the usage its worker last recorded, else left at its reservation (the
# estimate). KEYS[1]: the set of owners. Returns leases settled: metered, estimated.
SWEEP_LUA = r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local metered, estimated = 0, 0
for _, owner in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', owner .. ':alive') == 0 then
    local all = redis.call('HGETALL', owner)
    for i = 2, #all, 2 do
      local recorded = false
      local line = '([^\t\n]+)\t([^\t]+)\t([^\t]+)\t([^\t\n]*)'
      for key, interval, cost, actual in string.gmatch(all[i], line) do
        if actual ~= '' then
          recorded = true
          local delta = tonumber(actual) - tonumber(cost)
          local tat = tonumber(redis.call('GET', key)) or now
          if tat < now then tat = now end
          tat = tat + delta * tonumber(interval)
          if tat > now then
            redis.call('SET', key, string.format('%.6f', tat),
                       'PX', string.format('%d', math.ceil(tat - now) + 1000))
          else
            redis.call('DEL', key)
          end
        end
      end
      if recorded then metered = metered + 1 else estimated = estimated + 1 end
    end
    redis.call('DEL', owner)
    redis.call('SREM', KEYS[1], owner)
  end
end
return {metered, estimated}
"""

# The owner is alive for another lease; each lease still open gets its progress (the
# usage its stream metered so far). KEYS[1]: the lease hash; ARGV: lease ms, then
# field/record pairs. A field already settled (or swept) is not written back.
RENEW_LUA = """
redis.call('SET', KEYS[1] .. ':alive', '1', 'PX', ARGV[1])
for i = 2, #ARGV, 2 do
  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 1 then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
return 1
"""
