"""The Lua scripts of the Redis budget store (budgets/redis_store.py), one per atomic operation.

Money is exact: amounts are split into limbs of base 10^9 (lowest first), so every number the
scripts handle is far below 2^53 and Lua's doubles add and compare them exactly, and counters
grow with HINCRBY on one field per limb (a carry moves into the next limb) with no decimal-string
arithmetic. Arguments come as flat ARGV (no JSON to decode).

Per scope (an agent's or a group's budget), all under the scope's hash tag:
- `rz` holds by expiry (ZSET id -> expires), `rh` their amounts (`h:<id>` -> decimal) with the
  running total `t` (limbs, comma-separated), the earliest expiry `x`, the keys' own expiry `e`
  and the rate bucket (`tokens`, `ts`): a reserve reads all of it with one HMGET instead of
  summing every hold, and sweeps expired holds by score only once `x` has passed (each hold is
  swept once: O(1) amortized);
- `c` one HASH with every counter of the scope: a calendar window's limbs are the fields
  `<window key>#<i>` ("day:2026-11-24T00#0"), a rolling window's bucket `<key>:<bucket>#<i>`,
  and the spend of each UTC hour `h<hour>#<i>` (the last 800 hours).

Which windows are counted: those the scope has been limited by (its "tracked" periods, marked by
`cur:<period>` for a calendar period, `lo:<period>` for a rolling one) — not all eight periods. A
reserve that meets a period not tracked yet builds its counter from the hourly spend and tracks it
from then on, inside the same script: from that moment every commit, from any replica whatever
policy it has cached, counts in it. A calendar window starting on the hour (every time zone with
whole-hour offsets) is rebuilt exactly; otherwise the hour holding its start counts whole, and a
rolling window's rebuilt spend is put in the bucket where its hour ends, so a rebuilt counter
can only count more, never forgive spend.

Old fields go as windows move on: `prev:<period>` names the calendar window before the current
one and the one two back is deleted (it ended at least an hour ago, the slack the per-window
TTLs used to give replicas with skewed clocks); rolling buckets 61 or more behind the current
one and hours 800 back are deleted a bounded number at a time; the whole hash expires 36 days
after its last commit.
"""

from __future__ import annotations

LIMB = 10**9
HISTORY_HOURS = 800  # > the longest window (a 31-day month, the rolling 30 days + a bucket) in hours
COUNTERS_TTL_S = 36 * 86400

_PRELUDE = """
local B = 1000000000
local ai = 0
local function arg() ai = ai + 1 return ARGV[ai] end
local function num() ai = ai + 1 return tonumber(ARGV[ai]) end
local function limbs_arg()
  local n = num()
  local t = {}
  for i = 1, n do t[i] = tonumber(ARGV[ai + i]) end
  ai = ai + n
  return t
end
local function trim(a) while #a > 0 and a[#a] == 0 do a[#a] = nil end return a end
local function normalize(a, n)  -- carry every limb below B (a may hold sums of many limbs)
  local out, c, i = {}, 0, 1
  while i <= n or c > 0 do
    local v = (a[i] or 0) + c
    c = math.floor(v / B)
    out[i] = v - c * B
    i = i + 1
  end
  return trim(out)
end
local function plus(a, b)
  local n = math.max(#a, #b)
  local out = {}
  for i = 1, n do out[i] = (a[i] or 0) + (b[i] or 0) end
  return normalize(out, n)
end
local function cmp(a, b)  -- both normalized
  if #a ~= #b then if #a < #b then return -1 else return 1 end end
  for i = #a, 1, -1 do
    if a[i] ~= b[i] then if a[i] < b[i] then return -1 else return 1 end end
  end
  return 0
end
local function minus(a, b)  -- max(a - b, 0)
  if cmp(a, b) <= 0 then return {} end
  local out, br = {}, 0
  for i = 1, #a do
    local v = a[i] - (b[i] or 0) - br
    if v < 0 then v = v + B br = 1 else br = 0 end
    out[i] = v
  end
  return trim(out)
end
local function dec_limbs(s)
  local out, i = {}, #s
  while i > 0 do
    local j = math.max(1, i - 8)
    out[#out + 1] = tonumber(string.sub(s, j, i))
    i = j - 1
  end
  return trim(out)
end
local function csv_limbs(s)
  local out = {}
  if s then for x in string.gmatch(s, '[^,]+') do out[#out + 1] = tonumber(x) end end
  return out
end
-- add limbs to the counter whose fields start with `pre`; returns how many limbs it has at least
local function incr(key, pre, a)
  local c, i = 0, 1
  while i <= #a or c > 0 do
    local d = (a[i] or 0) + c
    c = 0
    if d > 0 then
      local v = redis.call('HINCRBY', key, pre .. (i - 1), d)
      if v >= B then redis.call('HINCRBY', key, pre .. (i - 1), -B) c = 1 end
    end
    i = i + 1
  end
  return i - 1
end
-- the hold's field in `h` (ids come from callers: a prefix keeps them off the scope's own fields)
local function hid(id) return 'h:' .. id end
-- the scope's holds: `h` has the running total 't' (limbs), 'x' (no hold expires before it), 'e'
-- (when `h` and `z` expire) and the rate bucket; returns the total after sweeping expired holds
-- (by score, when one may have expired) and HMGET's values of 't', 'x', the hold `id`, 'tokens',
-- 'ts', 'e'
local function holds(z, h, now, id)
  local v = redis.call('HMGET', h, 't', 'x', hid(id), 'tokens', 'ts', 'e')
  local total = csv_limbs(v[1])
  local x = tonumber(v[2])
  if x and x <= now then
    local expired = redis.call('ZRANGEBYSCORE', z, '-inf', now)
    if #expired > 0 then
      local fields = {}
      for i, e in ipairs(expired) do fields[i] = hid(e) end
      for _, a in ipairs(redis.call('HMGET', h, unpack(fields))) do
        if a then total = minus(total, dec_limbs(a)) end
      end
      redis.call('HDEL', h, unpack(fields))
      redis.call('ZREMRANGEBYSCORE', z, '-inf', now)
      if v[3] then for _, e in ipairs(expired) do if e == id then v[3] = false end end end
    end
    local first = redis.call('ZRANGE', z, 0, 0, 'WITHSCORES')
    v[2] = first[2] or false
    if first[2] then
      redis.call('HSET', h, 't', table.concat(total, ','), 'x', first[2])
    else
      redis.call('HSET', h, 't', table.concat(total, ','))
      redis.call('HDEL', h, 'x')
    end
  end
  return total, v
end
-- drop one hold (commit, release): its amount leaves the running total. The last pinned hold
-- to go gives the keys their expiry back: past the latest live hold, and `e` so that the next
-- reserve renews it as usual
local function drop(z, h, id, now)
  local v = redis.call('HMGET', h, hid(id), 't')
  if not v[1] then return end
  local pinned = redis.call('ZSCORE', z, id) == 'inf'
  redis.call('HDEL', h, hid(id))
  redis.call('HSET', h, 't', table.concat(minus(csv_limbs(v[2]), dec_limbs(v[1])), ','))
  redis.call('ZREM', z, id)
  if pinned and redis.call('HINCRBY', h, 'p', -1) <= 0 then
    redis.call('HDEL', h, 'p')
    local last = redis.call('ZREVRANGEBYSCORE', z, '(inf', '-inf', 'WITHSCORES', 'LIMIT', 0, 1)
    local ttl = math.ceil(math.max(0, (tonumber(last[2]) or now) - now)) + 7200
    redis.call('HSET', h, 'e', now + ttl)
    redis.call('EXPIRE', z, ttl)
    redis.call('EXPIRE', h, ttl)
  end
end
-- the token bucket in `h` ('tokens', 'ts'): (allowed, wait s, tokens left after taking one)
local function tokens_left(r, now, tokens_s, ts_s)
  local cap = r.burst
  if cap <= 0 then cap = r.per_minute end
  local per_s = r.per_minute / 60.0
  local tokens = tonumber(tokens_s) or cap
  local ts = tonumber(ts_s) or now
  tokens = math.min(cap, tokens + math.max(0, now - ts) * per_s)
  if tokens < 1 then return false, (1 - tokens) / per_s, 0 end
  return true, 0, tokens - 1
end
local function bucket(key, r, now, take)
  local st = redis.call('HMGET', key, 'tokens', 'ts')
  local ok, wait, left = tokens_left(r, now, st[1], st[2])
  if ok and take then
    -- numbers, not tostring(): Redis converts them exactly; tostring keeps 14 digits and would
    -- round a unix time with a fraction to 0.1 ms
    redis.call('HSET', key, 'tokens', left, 'ts', now)
    if redis.call('TTL', key) < 3600 then redis.call('EXPIRE', key, 3600) end  -- never shortens the holds' TTL
  end
  return ok, wait
end
-- a check as reserve and usage read it: keys, rate, windows (with their limits)
local function read_check(with_rate)
  local c = {z = KEYS[num()], h = KEYS[num()], c = KEYS[num()], windows = {}}
  if with_rate and num() == 1 then c.rate = {per_minute = num(), burst = num()} end
  for wi = 1, num() do
    c.windows[wi] = {rolling = num() == 1, p = arg(), k = arg(), bucket = num(), bucket_s = num(),
                     start_h = num(), limit = limbs_arg()}
  end
  return c
end
-- a rolling window reads its bucket and the 60 before it, and 3 after it: a replica whose clock is
-- a little behind still sees what one ahead of it counted (spend is never forgiven early)
local function counter_fields(fields, w, n)
  if w.rolling then
    for b = w.bucket - 60, w.bucket + 3 do
      local pre = w.k .. ':' .. string.format('%d', b) .. '#'
      for i = 0, n - 1 do fields[#fields + 1] = pre .. i end
    end
  else
    for i = 0, n - 1 do fields[#fields + 1] = w.k .. '#' .. i end
  end
end
-- a window never tracked in this scope: build its counter from the hourly spend, track it from now on
local function rebuild(key, w, n, hour)
  local total = {}
  if n > 0 and hour >= w.start_h then
    local fields = {}
    for h = w.start_h, hour do
      for i = 0, n - 1 do fields[#fields + 1] = 'h' .. string.format('%d', h) .. '#' .. i end
    end
    local vals = redis.call('HMGET', key, unpack(fields))
    local sums = {}  -- rolling: spend per target bucket
    local j = 0
    for h = w.start_h, hour do
      local v = {}
      for i = 1, n do j = j + 1 v[i] = tonumber(vals[j]) or 0 end
      v = trim(v)
      if #v > 0 then
        total = plus(total, v)
        if w.rolling then
          local b = math.min(w.bucket, math.floor(((h + 1) * 3600 - 1) / w.bucket_s))
          sums[b] = plus(sums[b] or {}, v)
        end
      end
    end
    local out = {}
    if w.rolling then
      for b, v in pairs(sums) do
        for i = 1, #v do out[#out + 1] = w.k .. ':' .. string.format('%d', b) .. '#' .. (i - 1) out[#out + 1] = v[i] end
      end
    else
      for i = 1, #total do out[#out + 1] = w.k .. '#' .. (i - 1) out[#out + 1] = total[i] end
    end
    if #out > 0 then redis.call('HSET', key, unpack(out)) end
    if #total > n then redis.call('HSET', key, 'n', #total) end
  end
  if w.rolling then
    redis.call('HSET', key, 'lo:' .. w.p, string.format('%d', w.bucket - 60))
  else
    redis.call('HSET', key, 'cur:' .. w.p, w.k)
  end
  redis.call('EXPIRE', key, %(ttl)d)
  return total
end
-- what a check's windows hold: one list of limbs per window (tracking the untracked ones)
local function spent(c, hour)
  local out = {}
  if #c.windows == 0 then return out end
  local key = c.c
  local L = 1
  for _, w in ipairs(c.windows) do L = math.max(L, #w.limit + 1) end
  local fields, vals
  for _ = 1, 2 do
    fields = {'n'}
    for _, w in ipairs(c.windows) do
      fields[#fields + 1] = (w.rolling and 'lo:' or 'cur:') .. w.p
      counter_fields(fields, w, L)
    end
    vals = redis.call('HMGET', key, unpack(fields))
    local n = tonumber(vals[1]) or 0
    if n <= L then break end
    L = n  -- some counter of this scope has more limbs than the limits: read them all
  end
  local n = tonumber(vals[1]) or 0
  local j = 1
  for wi, w in ipairs(c.windows) do
    j = j + 1
    local tracked = vals[j]
    local per = 1
    if w.rolling then per = 64 end
    if tracked then
      local sum = {}
      for _ = 1, per do
        for i = 1, L do sum[i] = (sum[i] or 0) + (tonumber(vals[j + i]) or 0) end
        j = j + L
      end
      out[wi] = normalize(sum, L)
    else
      j = j + per * L
      out[wi] = rebuild(key, w, n, hour)
    end
  end
  return out
end
"""


def _script(body: str) -> str:
    return (_PRELUDE + body).replace("%(ttl)d", str(COUNTERS_TTL_S)).replace("%(keep)d", str(HISTORY_HOURS))


# ARGV: now, exp, keep, id, amount (decimal), amount limbs, hour, #checks, then per check:
#   z, h, c, rate (0: none, 1: per_minute and burst follow), #windows, then per window:
#   rolling, period, key, bucket, bucket_s, start hour, limit limbs
# (a limb list is its length, then its limbs, lowest first)
RESERVE = _script("""
local now, exp, keep, id, amt_s = num(), num(), num(), arg(), arg()
local amt = limbs_arg()
local hour = num()
local checks = {}
for ci = 1, num() do checks[ci] = read_check(true) end
local held, state = {}, {}
for ci, c in ipairs(checks) do
  held[ci], state[ci] = holds(c.z, c.h, now, id)
  if state[ci][3] then held[ci] = minus(held[ci], dec_limbs(state[ci][3])) end  -- the same id again: replaced
  local used = spent(c, hour)
  for wi, w in ipairs(c.windows) do
    local u = plus(used[wi], held[ci])
    if cmp(plus(u, amt), w.limit) > 0 then return {'budget', ci, wi, unpack(u)} end
  end
end
local left = {}
for ci, c in ipairs(checks) do
  if c.rate then
    local ok, wait, l = tokens_left(c.rate, now, state[ci][4], state[ci][5])
    if not ok then return {'rate', ci, 0, tostring(math.ceil(wait))} end
    left[ci] = l
  end
end
for ci, c in ipairs(checks) do
  local set = {hid(id), amt_s, 't', table.concat(plus(held[ci], amt), ',')}
  if c.rate then
    set[#set + 1] = 'tokens' set[#set + 1] = left[ci]
    set[#set + 1] = 'ts' set[#set + 1] = now
  end
  local x = tonumber(state[ci][2])
  if not x or exp < x then set[#set + 1] = 'x' set[#set + 1] = exp end
  -- the holds' keys live `keep` past the last hold: refreshed (to twice that) once `e` says less is left
  local renew = (tonumber(state[ci][6]) or 0) - now < keep
  if renew then set[#set + 1] = 'e' set[#set + 1] = now + 2 * keep end
  redis.call('HSET', c.h, unpack(set))
  -- the member '' (never expiring) keeps `z` from vanishing when its last hold goes, and so
  -- from coming back without a TTL
  redis.call('ZADD', c.z, exp, id, '+inf', '')
  if renew then
    redis.call('EXPIRE', c.z, 2 * keep)
    redis.call('EXPIRE', c.h, 2 * keep)
  end
end
return {'ok'}
""")

# the commit's counting in one scope's counters hash: the hour's spend and every tracked window
COUNT = """
local function count(key, windows, amt, hour)
  local fields = {'n', 'lo:h', 'h' .. string.format('%d', hour) .. '#0'}
  for _, w in ipairs(windows) do
    if w.rolling then
      fields[#fields + 1] = 'lo:' .. w.p
      fields[#fields + 1] = 'lo:' .. w.p
    else
      fields[#fields + 1] = 'cur:' .. w.p
      fields[#fields + 1] = 'prev:' .. w.p
    end
  end
  local vals = redis.call('HMGET', key, unpack(fields))
  local n = tonumber(vals[1]) or 0
  local new_hour = not vals[3]
  local top = incr(key, 'h' .. string.format('%d', hour) .. '#', amt)
  local set, stale = {}, {}
  local lo_h = tonumber(vals[2])
  if not lo_h or hour < lo_h then
    set[#set + 1] = 'lo:h' set[#set + 1] = string.format('%d', hour)
  elseif hour - %(keep)d > lo_h then
    local last = math.min(hour - %(keep)d - 1, lo_h + 50)
    for x = lo_h, last do for i = 0, n - 1 do stale[#stale + 1] = 'h' .. string.format('%d', x) .. '#' .. i end end
    set[#set + 1] = 'lo:h' set[#set + 1] = string.format('%d', last + 1)
  end
  for wi, w in ipairs(windows) do
    local mark, prev = vals[2 + 2 * wi], vals[3 + 2 * wi]
    if w.rolling then
      local lo = tonumber(mark)
      if lo then
        top = math.max(top, incr(key, w.k .. ':' .. string.format('%d', w.bucket) .. '#', amt))
        if w.bucket < lo then
          set[#set + 1] = 'lo:' .. w.p set[#set + 1] = string.format('%d', w.bucket)
        elseif w.bucket - 61 >= lo then
          -- fields exist only from lo to lo + 60 (older buckets were dropped when lo moved)
          for b = lo, math.min(w.bucket - 61, lo + 120) do
            for i = 0, n - 1 do stale[#stale + 1] = w.k .. ':' .. string.format('%d', b) .. '#' .. i end
          end
          set[#set + 1] = 'lo:' .. w.p set[#set + 1] = string.format('%d', w.bucket - 60)
        end
      end
    elseif mark then
      top = math.max(top, incr(key, w.k .. '#', amt))
      if mark < w.k then  -- a newer window of this period (keys sort by time)
        if prev then for i = 0, n - 1 do stale[#stale + 1] = prev .. '#' .. i end end
        set[#set + 1] = 'cur:' .. w.p set[#set + 1] = w.k
        set[#set + 1] = 'prev:' .. w.p set[#set + 1] = mark
      end
    end
  end
  if top > n then set[#set + 1] = 'n' set[#set + 1] = top end
  if #stale > 0 then redis.call('HDEL', key, unpack(stale)) end
  if #set > 0 then redis.call('HSET', key, unpack(set)) end
  if new_hour then redis.call('EXPIRE', key, %(ttl)d) end  -- once an hour: the hash outlives its oldest hour
end
"""

# ARGV: now, id, amount limbs, hour, done key, ledger key, ledger entry (JSON), #checks, then per
#   check: z, h, c, #windows (-1: the previous check's), then per window its counter's name (a
#   calendar window's key, or `roll:<period>:<bucket>`)
COMMIT = _script(COUNT + """
local now, id = num(), arg()
local amt = limbs_arg()
local hour, done, ledger, entry = num(), KEYS[num()], KEYS[num()], arg()
-- counted once per `done` (the settlement's transaction): a second hold for the same payment
-- (a resend that took over a stalled claim, and recovery of the first) is only dropped
local first = redis.call('SET', done, '1', 'NX', 'EX', 604800)
local windows = {}
for _ = 1, num() do
  local z, h, key = KEYS[num()], KEYS[num()], KEYS[num()]
  drop(z, h, id, now)
  local nw = num()
  if nw >= 0 then  -- else: the same windows as the check before
    windows = {}
    for wi = 1, nw do
      local f = arg()
      local p, b = string.match(f, '^(roll:[^:]+):(%d+)$')
      if p then
        windows[wi] = {rolling = true, p = p, k = p, bucket = tonumber(b)}
      else
        windows[wi] = {rolling = false, p = string.match(f, '^[^:]+'), k = f, bucket = 0}
      end
    end
  end
  if first then count(key, windows, amt, hour) end
end
if not first then return 0 end
redis.call('ZADD', ledger, now, entry)
return 1
""")

# ARGV: now, id, #checks, then per check: z, h
RELEASE = _script("""
local now, id = num(), arg()
for _ = 1, num() do drop(KEYS[num()], KEYS[num()], id, now) end
return 1
""")

# Pin a live hold: its expiry score becomes +inf, which the sweep never reaches, and the keys lose
# their TTL until the last pinned hold of the scope is dropped (`p` counts them). 0, writing
# nothing, when the hold is gone or expired in any scope (its budget may be another call's now).
# ARGV: now, id, #checks, then per check: z, h
PIN = _script("""
local now, id = num(), arg()
local checks = {}
for ci = 1, num() do checks[ci] = {z = KEYS[num()], h = KEYS[num()]} end
for _, c in ipairs(checks) do
  local s = redis.call('ZSCORE', c.z, id)
  if (not s) or tonumber(s) <= now or not redis.call('HGET', c.h, hid(id)) then return 0 end
end
for _, c in ipairs(checks) do
  if redis.call('ZSCORE', c.z, id) ~= 'inf' then  -- pinning twice counts once
    redis.call('ZADD', c.z, '+inf', id)
    redis.call('HINCRBY', c.h, 'p', 1)
    redis.call('HSET', c.h, 'e', 1e15)  -- far off: a reserve does not renew (shorten) the keys' life
    redis.call('PERSIST', c.z)
    redis.call('PERSIST', c.h)
  end
end
return 1
""")

RATE = _script("""
local r = cjson.decode(ARGV[1])
local ok, wait = bucket(KEYS[1], r, r.now, r.take)
if ok then return {1, '0'} end
return {0, tostring(wait)}
""")

# ARGV: now, hour, then one check as RESERVE has it (without the rate key). Returns the held total's
# limbs, then each window's: each list as its length, then its limbs.
USAGE = _script("""
local now, hour = num(), num()
local c = read_check(false)
local held = holds(c.z, c.h, now, '')
local out = {#held, unpack(held)}
for _, s in ipairs(spent(c, hour)) do
  out[#out + 1] = #s
  for _, x in ipairs(s) do out[#out + 1] = x end
end
return out
""")
