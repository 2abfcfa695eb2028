"""The Lua scripts of the Redis budget store (budgets/redis_store.py), one per atomic operation.

Per scope (an agent's or a group's budget) the scripts keep, all under the scope's hash tag:
- `rz` holds by expiry (ZSET id -> expires), `rh` their amounts (HASH id -> amount), `rt` the
  running total of `rh`: reserve reads one value instead of summing every hold, and expired holds
  are swept by score (each hold is swept once: O(1) amortized per hold);
- `c` every spend counter in one HASH: a calendar window's counter is the field named by its
  window key ("day:2026-11-24T00"), a rolling window's bucket the field "<key>:<bucket>"
  ("roll:day:20436"). A commit reads and writes all of its windows with one HMGET and one HSET.
  Old fields are dropped as the windows move on: for a calendar period `cur:<key>` / `prev:<key>`
  name its two newest windows, and a window two back is deleted (it ended at least an hour ago,
  the slack the per-window TTLs used to give replicas with skewed clocks); for a rolling period
  `lo:<key>` is the oldest bucket that may still have a field, and buckets 61 or more behind the
  current one are deleted.

Amounts are non-negative decimal strings: 18-decimal tokens pass both Lua's doubles (2^53) and
Redis' int64 counters after a few tokens. Below 10^15 both operands fit a double exactly, and the
sum does too, so the common case skips the digit loop.
"""

from __future__ import annotations

from storage.lua import BIGNUM

ROLLING_KEEP = 60  # a rolling window is the current bucket and the 60 before it

_FAST = BIGNUM + """
local bigadd = add
add = function(a, b)
  if #a < 16 and #b < 16 then return string.format('%.0f', tonumber(a) + tonumber(b)) end
  return bigadd(a, b)
end
-- holds: the running total of a scope, after sweeping its expired holds by score
local function reserved(z, h, t, now)
  local total = redis.call('GET', t) or '0'
  local expired = redis.call('ZRANGEBYSCORE', z, '-inf', now)
  if #expired > 0 then
    for _, id in ipairs(expired) do
      local a = redis.call('HGET', h, id)
      if a then total = sub(total, a) end
    end
    redis.call('HDEL', h, unpack(expired))
    redis.call('ZREMRANGEBYSCORE', z, '-inf', now)
    redis.call('SET', t, total, 'KEEPTTL')
  end
  return total
end
-- drop one hold (commit, release): its amount leaves the running total
local function drop(z, h, t, id)
  local a = redis.call('HGET', h, id)
  if not a then return end
  redis.call('HDEL', h, id)
  redis.call('ZREM', z, id)
  redis.call('SET', t, sub(redis.call('GET', t) or '0', a), 'KEEPTTL')
end
-- the fields a window's spend is read from
local function window_fields(fields, w)
  if w.rolling then
    for b = w.bucket - 60, w.bucket do fields[#fields + 1] = w.k .. ':' .. string.format('%d', b) end
  else
    fields[#fields + 1] = w.k
  end
end
local function bucket(key, r, now, take)
  local cap = r.burst
  if cap <= 0 then cap = r.per_minute end
  local per_s = r.per_minute / 60.0
  local st = redis.call('HMGET', key, 'tokens', 'ts')
  local tokens = tonumber(st[1]) or cap
  local ts = tonumber(st[2]) or now
  tokens = math.min(cap, tokens + math.max(0, now - ts) * per_s)
  if tokens < 1 then return false, (1 - tokens) / per_s end
  if take then
    -- numbers, not tostring(): Redis converts them exactly; tostring keeps 14 digits and would
    -- round a unix time with a fraction to 0.1 ms
    redis.call('HSET', key, 'tokens', tokens - 1, 'ts', now)
    redis.call('EXPIRE', key, 3600)
  end
  return true, 0
end
"""

# ARGV[1]: {now, amount, id, exp, keep, checks: [{z, h, t, c, windows: [{k, rolling, limit, bucket}], rate}]}
RESERVE = _FAST + """
local spec = cjson.decode(ARGV[1])
local now, amt = spec.now, spec.amount
local held = {}
for ci, c in ipairs(spec.checks) do
  local h = reserved(KEYS[c.z], KEYS[c.h], KEYS[c.t], now)
  held[ci] = h
  if #c.windows > 0 then
    local fields = {}
    for _, w in ipairs(c.windows) do window_fields(fields, w) end
    local vals = redis.call('HMGET', KEYS[c.c], unpack(fields))
    local i = 0
    for wi, w in ipairs(c.windows) do
      local used = h
      local n = 1
      if w.rolling then n = 61 end
      for _ = 1, n do
        i = i + 1
        if vals[i] then used = add(used, vals[i]) end
      end
      if cmp(add(used, amt), w.limit) > 0 then return {'budget', ci, wi, sub(w.limit, used)} end
    end
  end
end
for ci, c in ipairs(spec.checks) do
  if c.rate then
    local ok, wait = bucket(KEYS[c.rate.k], c.rate, now, false)
    if not ok then return {'rate', ci, 0, tostring(math.ceil(wait))} end
  end
end
for ci, c in ipairs(spec.checks) do
  if c.rate then bucket(KEYS[c.rate.k], c.rate, now, true) end
  local total = held[ci]
  local prev = redis.call('HGET', KEYS[c.h], spec.id)
  if prev then total = sub(total, prev) end  -- the same id reserved again: its new amount replaces the old
  redis.call('ZADD', KEYS[c.z], spec.exp, spec.id)
  redis.call('HSET', KEYS[c.h], spec.id, amt)
  redis.call('SET', KEYS[c.t], add(total, amt), 'EX', spec.keep)
  redis.call('EXPIRE', KEYS[c.z], spec.keep)
  redis.call('EXPIRE', KEYS[c.h], spec.keep)
end
return {'ok'}
"""

# ARGV[1]: {now, amount, id, done, ledger, checks: [{z, h, t, c, ttl, windows: [{k, p, rolling, bucket}]}]}
# (k: the calendar window's key or the rolling period's; p: the period's name in the markers);
# ARGV[2]: the ledger entry (JSON).
COMMIT = _FAST + """
local spec = cjson.decode(ARGV[1])
if redis.call('SET', KEYS[spec.done], '1', 'NX', 'EX', 604800) == false then return 0 end
local amt = spec.amount
for _, c in ipairs(spec.checks) do
  drop(KEYS[c.z], KEYS[c.h], KEYS[c.t], spec.id)
  local n = #c.windows
  if n > 0 then
    local key = KEYS[c.c]
    local fields = {}
    for i, w in ipairs(c.windows) do
      local f = w.k
      if w.rolling then f = w.k .. ':' .. string.format('%d', w.bucket) end
      w.f = f
      fields[i] = f
      fields[n + 2 * i - 1] = (w.rolling and 'lo:' or 'cur:') .. w.p
      fields[n + 2 * i] = 'prev:' .. w.p
    end
    local vals = redis.call('HMGET', key, unpack(fields))
    local out, stale = {}, {}
    for i, w in ipairs(c.windows) do
      out[#out + 1] = w.f
      out[#out + 1] = add(vals[i] or '0', amt)
      local mark, prev = vals[n + 2 * i - 1], vals[n + 2 * i]
      if w.rolling then
        local lo = tonumber(mark)
        if not lo or w.bucket < lo then
          out[#out + 1] = 'lo:' .. w.p
          out[#out + 1] = string.format('%d', w.bucket)
        elseif w.bucket - 61 >= lo then
          -- fields exist only from lo to lo + 60 (older buckets were dropped when lo moved)
          for b = lo, math.min(w.bucket - 61, lo + 180) do stale[#stale + 1] = w.k .. ':' .. string.format('%d', b) end
          out[#out + 1] = 'lo:' .. w.p
          out[#out + 1] = string.format('%d', w.bucket - 60)
        end
      elseif not mark or mark < w.f then  -- a newer window of this period (keys sort by time)
        if prev then stale[#stale + 1] = prev end
        out[#out + 1] = 'cur:' .. w.p
        out[#out + 1] = w.f
        if mark then
          out[#out + 1] = 'prev:' .. w.p
          out[#out + 1] = mark
        end
      end
    end
    if #stale > 0 then redis.call('HDEL', key, unpack(stale)) end
    redis.call('HSET', key, unpack(out))
    if redis.call('TTL', key) < c.ttl then redis.call('EXPIRE', key, c.ttl) end
  end
end
redis.call('ZADD', KEYS[spec.ledger], spec.now, ARGV[2])
return 1
"""

RELEASE = _FAST + """
local spec = cjson.decode(ARGV[1])
for _, c in ipairs(spec.checks) do drop(KEYS[c.z], KEYS[c.h], KEYS[c.t], spec.id) end
return 1
"""

RATE = _FAST + """
local r = cjson.decode(ARGV[1])
local ok, wait = bucket(KEYS[1], r, r.now, r.take)
if ok then return {1, '0'} end
return {0, tostring(wait)}
"""

USAGE = _FAST + """
local spec = cjson.decode(ARGV[1])
local c = spec.checks[1]
local out = {reserved(KEYS[c.z], KEYS[c.h], KEYS[c.t], spec.now)}
if #c.windows > 0 then
  local fields = {}
  for _, w in ipairs(c.windows) do window_fields(fields, w) end
  local vals = redis.call('HMGET', KEYS[c.c], unpack(fields))
  local i = 0
  for _, w in ipairs(c.windows) do
    local used = '0'
    local n = 1
    if w.rolling then n = 61 end
    for _ = 1, n do
      i = i + 1
      if vals[i] then used = add(used, vals[i]) end
    end
    out[#out + 1] = used
  end
end
return out
"""

# The trivial script the benchmark measures the floor of one EVALSHA against.
NOOP = "return 1"
