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

# Pieces of Lua the scripts are put together from: each script takes only the pieces it uses. Redis
# runs a script's whole body on every call (so every function it defines is a closure made anew each
# time), and on this kind of machine every argument, table, string and command a script touches
# costs about a microsecond or a fraction of one: the scripts pass and build as little as they can.
# loadtests/bench_budget_scripts.py measures them.

_DIG = """
local DIG = {[0] = '0', '1', '2', '3', '4', '5', '6', '7', '8', '9'}
local function dig(i) return DIG[i] or string.format('%d', i) end  -- a small integer as Redis takes it
"""

_LIMBS = """
local B = 1000000000
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
"""

# the scope's holds: `h` has the running total 't' (limbs), 'x' (no hold expires before it), 'e'
# (when `h` and `z` expire) and the rate bucket; returns the total after sweeping expired holds
# (by score, when one may have expired) and HMGET's values of 't', 'x', 'e', the hold `id`, and
# with `rate` 'tokens' and 'ts'
_HOLDS = """
local function holds(z, h, now, id, rate)
  local v
  if rate then
    v = redis.call('HMGET', h, 't', 'x', 'e', 'h:' .. id, 'tokens', 'ts')
  else
    v = redis.call('HMGET', h, 't', 'x', 'e', 'h:' .. id)
  end
  local total = csv_limbs(v[1])
  local x = tonumber(v[2])
  if x and x <= now then
    local expired = redis.call('ZRANGEBYSCORE', z, '-inf', now)
    if #expired > 0 then
      local fields = {}
      for i, e in ipairs(expired) do fields[i] = 'h:' .. e end
      for _, a in ipairs(redis.call('HMGET', h, unpack(fields))) do
        if a then total = minus(total, dec_limbs(a)) end
      end
      redis.call('HDEL', h, unpack(fields))
      redis.call('ZREMRANGEBYSCORE', z, '-inf', now)
      if v[4] then for _, e in ipairs(expired) do if e == id then v[4] = false end end end
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
"""

# Checks as RESERVE and USAGE take them. Per check (its keys KEYS[3ci-2..3ci]: z, h, c): rate per
# minute (0: none), burst, the limbs to read of each counter (one more than the longest limit has),
# #windows, then 7 values per window: rolling (0/1), its marker field (`cur:<period>`,
# `lo:<rolling key>`), its key (a calendar window's id, or the rolling period's: its buckets are
# `<key>:<bucket>`), bucket, bucket_s, first hour, limit (decimal). A check is a table of where its
# values start in ARGV: windows are read from ARGV where they are used.
_CHECKS = """
local function read_checks(a, n)
  local checks = {}
  for ci = 1, n do
    local nw = tonumber(ARGV[a + 3])
    checks[ci] = {z = KEYS[3 * ci - 2], h = KEYS[3 * ci - 1], c = KEYS[3 * ci], per_minute = tonumber(ARGV[a]),
                  burst = tonumber(ARGV[a + 1]), L = tonumber(ARGV[a + 2]), nw = nw, w = a + 4}
    a = a + 4 + 7 * nw
  end
  return checks
end
-- a window never tracked in this scope (its values at ARGV[j..j+6]): build its counter from the
-- hourly spend, track it from now on; returns its limbs
local function rebuild(key, j, n, hour)
  local rolling, k, bucket = ARGV[j] == '1', ARGV[j + 2], tonumber(ARGV[j + 3])
  local start_h = tonumber(ARGV[j + 5])
  local total = {}
  if n > 0 and hour >= start_h then
    local bucket_s = tonumber(ARGV[j + 4])
    local fields = {}
    for h = start_h, hour do
      for i = 0, n - 1 do fields[#fields + 1] = 'h' .. string.format('%d', h) .. '#' .. dig(i) end
    end
    local vals = redis.call('HMGET', key, unpack(fields))
    local sums = {}  -- rolling: spend per target bucket
    local jj = 0
    for h = start_h, hour do
      local v = {}
      for i = 1, n do jj = jj + 1 v[i] = tonumber(vals[jj]) or 0 end
      v = trim(v)
      if #v > 0 then
        total = plus(total, v)
        if rolling then
          local b = math.min(bucket, math.floor(((h + 1) * 3600 - 1) / bucket_s))
          sums[b] = plus(sums[b] or {}, v)
        end
      end
    end
    local out = {}
    if rolling then
      for b, v in pairs(sums) do
        for i = 1, #v do out[#out + 1] = k .. ':' .. string.format('%d', b) .. '#' .. dig(i - 1) out[#out + 1] = v[i] end
      end
    else
      for i = 1, #total do out[#out + 1] = k .. '#' .. dig(i - 1) out[#out + 1] = total[i] end
    end
    if #out > 0 then redis.call('HSET', key, unpack(out)) end
    if #total > n then redis.call('HSET', key, 'n', #total) end
  end
  if rolling then
    redis.call('HSET', key, ARGV[j + 1], string.format('%d', bucket - 60))
  else
    redis.call('HSET', key, ARGV[j + 1], k)
  end
  redis.call('EXPIRE', key, %(ttl)d)
  return total
end
-- what a check's windows hold: per window the sums of its limbs (lowest first, not carried),
-- tracking the untracked windows. A rolling window reads its bucket and the 60 before it, and 3
-- after it: a replica whose clock is a little behind still sees what one ahead of it counted
-- (spend is never forgiven early)
local function spent(c, hour)
  local out = {}
  if c.nw == 0 then return out end
  local key, L = c.c, c.L
  local fields, vals
  for _ = 1, 2 do
    fields = {'n'}
    for j = c.w, c.w + 7 * (c.nw - 1), 7 do
      fields[#fields + 1] = ARGV[j + 1]
      if ARGV[j] == '1' then
        local k, b = ARGV[j + 2] .. ':', tonumber(ARGV[j + 3])
        for bb = b - 60, b + 3 do
          local pre = k .. string.format('%d', bb) .. '#'
          for i = 0, L - 1 do fields[#fields + 1] = pre .. dig(i) end
        end
      else
        local pre = ARGV[j + 2] .. '#'
        for i = 0, L - 1 do fields[#fields + 1] = pre .. dig(i) end
      end
    end
    vals = redis.call('HMGET', key, unpack(fields))
    local n = tonumber(vals[1]) or 0
    if n <= L then break end
    L = n  -- some counter of this scope has more limbs than the limits: read them all
  end
  local n = tonumber(vals[1]) or 0
  local i0 = 1
  for wi = 1, c.nw do
    local j = c.w + 7 * (wi - 1)
    i0 = i0 + 1
    local per = 1
    if ARGV[j] == '1' then per = 64 end
    if vals[i0] then
      local sum = {}
      for i = 1, L do sum[i] = 0 end
      for _ = 1, per do
        for i = 1, L do
          local v = vals[i0 + i]
          if v then sum[i] = sum[i] + tonumber(v) end
        end
        i0 = i0 + L
      end
      out[wi] = sum
    else
      i0 = i0 + per * L
      out[wi] = rebuild(key, j, n, hour)
    end
  end
  return out
end
"""

# drop one hold (commit, release): its amount leaves the running total. The last pinned hold
# to go gives the keys their expiry back: past the latest live hold, and `e` so that the next
# reserve renews it as usual
_DROP = """
local function drop(z, h, id, now)
  local f = 'h:' .. id
  local v = redis.call('HMGET', h, f, 't', 'p')
  if not v[1] then return end
  local set, del, ttl = {'t', table.concat(minus(csv_limbs(v[2]), dec_limbs(v[1])), ',')}, {f}, nil
  if redis.call('ZSCORE', z, id) == 'inf' then
    local p = (tonumber(v[3]) or 0) - 1
    if p > 0 then
      set[3] = 'p' set[4] = dig(p)
    else
      del[2] = 'p'
      local last = redis.call('ZREVRANGEBYSCORE', z, '(inf', '-inf', 'WITHSCORES', 'LIMIT', 0, 1)
      ttl = math.ceil(math.max(0, (tonumber(last[2]) or now) - now)) + 7200
      set[3] = 'e' set[4] = now + ttl
    end
  end
  redis.call('HDEL', h, unpack(del))
  redis.call('HSET', h, unpack(set))
  redis.call('ZREM', z, id)
  if ttl then
    redis.call('EXPIRE', z, ttl)
    redis.call('EXPIRE', h, ttl)
  end
end
"""


def _script(*parts: str) -> str:
    return "".join(parts).replace("%(ttl)d", str(COUNTERS_TTL_S)).replace("%(keep)d", str(HISTORY_HOURS))


# ARGV: now, exp, keep, id, amount (decimal), hour, #checks, calls (the rate tokens to take: 1, or a
# lease's calls), then the checks (_CHECKS).
# Whether a window has room is decided on doubles when the sum is clearly below the limit (each
# value converted from its limbs or digits is within 2^-52 of the exact one, relatively, and a sum
# of at most a few thousand such nonnegative terms within 10^-12: a sum below the limit by a
# relative 10^-9 is below it exactly), and on limbs (exactly) otherwise: near the limit, over it,
# and for a limit of 0.
RESERVE = _script(_DIG, _LIMBS, _HOLDS, _CHECKS, """
local now, exp, keep, id, amt_s, hour = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], ARGV[5],
  tonumber(ARGV[6])
local amt, amt_d = dec_limbs(amt_s), tonumber(amt_s)
local calls = tonumber(ARGV[8])
local checks = read_checks(9, tonumber(ARGV[7]))
local held, state = {}, {}
for ci, c in ipairs(checks) do
  local total, v = holds(c.z, c.h, now, id, c.per_minute > 0)
  if v[4] then total = minus(total, dec_limbs(v[4])) end  -- the same id again: replaced
  held[ci], state[ci] = total, v
  local sums = spent(c, hour)
  local base = amt_d
  for i = #total, 1, -1 do base = base + total[i] * B ^ (i - 1) end
  for wi = 1, c.nw do
    local s, lim_s = sums[wi], ARGV[c.w + 7 * wi - 1]
    local u = 0
    for i = #s, 1, -1 do u = u * B + s[i] end
    if not (u + base <= tonumber(lim_s) * 0.999999999) then
      u = plus(normalize(s, #s), total)
      if cmp(plus(u, amt), dec_limbs(lim_s)) > 0 then return {'budget', ci, wi, unpack(u)} end
    end
  end
end
local left = {}
for ci, c in ipairs(checks) do
  if c.per_minute > 0 then  -- the token bucket in `h` ('tokens', 'ts')
    local cap = c.burst
    if cap <= 0 then cap = c.per_minute end
    local per_s = c.per_minute / 60.0
    local tokens, ts = tonumber(state[ci][5]) or cap, tonumber(state[ci][6]) or now
    tokens = math.min(cap, tokens + math.max(0, now - ts) * per_s)
    if tokens < calls then return {'rate', ci, 0, tostring(math.ceil((calls - tokens) / per_s))} end
    left[ci] = tokens - calls
  end
end
for ci, c in ipairs(checks) do
  local set = {'h:' .. id, amt_s, 't', table.concat(plus(held[ci], amt), ',')}
  if left[ci] then
    -- a number, not tostring(): Redis converts it exactly; tostring keeps 14 digits (and `now` and
    -- `exp` go on as the caller wrote them)
    set[5] = 'tokens' set[6] = left[ci] set[7] = 'ts' set[8] = ARGV[1]
  end
  local x = tonumber(state[ci][2])
  if not x or exp < x then set[#set + 1] = 'x' set[#set + 1] = ARGV[2] end
  -- the holds' keys live `keep` past the last hold: refreshed (to twice that) once `e` says less is left
  local renew = (tonumber(state[ci][3]) or 0) - now < keep
  if renew then set[#set + 1] = 'e' set[#set + 1] = now + 2 * keep end
  redis.call('HSET', c.h, unpack(set))
  -- the member '' (never expiring) keeps `z` from vanishing when its last hold goes, and so
  -- from coming back without a TTL
  redis.call('ZADD', c.z, ARGV[2], id, '+inf', '')
  if renew then
    redis.call('EXPIRE', c.z, 2 * keep)
    redis.call('EXPIRE', c.h, 2 * keep)
  end
end
return {'ok'}
""")

# the commit's counting in one scope's counters hash: the hour's spend and every tracked window.
# `incr` adds limbs (decimal strings, passed on as they came: no number is formatted) to the counter
# whose fields start with `pre`; returns how many limbs it has at least, and whether its first
# field written was new (or 0): a new hour
_COUNT = """
local function incr(key, pre, a)
  local c, i, fresh = 0, 1, nil
  while i <= #a or c > 0 do
    local d = a[i] or '0'
    if c > 0 then d = tonumber(d) + c end
    c = 0
    if d ~= '0' then
      local v = redis.call('HINCRBY', key, pre .. dig(i - 1), d)
      if fresh == nil then fresh = v == tonumber(d) end
      if v >= B then redis.call('HINCRBY', key, pre .. dig(i - 1), -B) c = 1 end
    end
    i = i + 1
  end
  return i - 1, fresh
end
-- the windows are ARGV[w0..]: 3 values each, marker field, the previous window's marker field
-- ('' for a rolling window), counter name (a calendar window's key, or `roll:<period>:<bucket>`)
local function count(key, w0, nw, amt, hour, hs)  -- hs: the hour as ARGV has it
  local fields = {'n', 'lo:h'}
  for j = w0, w0 + 3 * (nw - 1), 3 do fields[#fields + 1] = ARGV[j] end
  local vals = redis.call('HMGET', key, unpack(fields))
  local n = tonumber(vals[1]) or 0
  local top, new_hour = incr(key, 'h' .. hs .. '#', amt)
  local set, stale = {}, {}
  local lo_h = tonumber(vals[2])
  if not lo_h or hour < lo_h then
    set[#set + 1] = 'lo:h' set[#set + 1] = hs
    new_hour = true  -- the hash may be new
  elseif hour - %(keep)d > lo_h then
    local last = math.min(hour - %(keep)d - 1, lo_h + 50)
    for x = lo_h, last do for i = 0, n - 1 do stale[#stale + 1] = 'h' .. string.format('%d', x) .. '#' .. dig(i) end end
    set[#set + 1] = 'lo:h' set[#set + 1] = string.format('%d', last + 1)
  end
  for wi = 1, nw do
    local mark = vals[2 + wi]
    if mark then  -- tracked
      local j = w0 + 3 * (wi - 1)
      local f = ARGV[j + 2]
      top = math.max(top, (incr(key, f .. '#', amt)))
      if ARGV[j + 1] == '' then
        local k, b = string.match(f, '^(.*):(%d+)$')
        local bucket, lo = tonumber(b), tonumber(mark)
        if bucket < lo then
          set[#set + 1] = ARGV[j] set[#set + 1] = b
        elseif bucket - 61 >= lo then
          -- fields exist only from lo to lo + 60 (older buckets were dropped when lo moved)
          for bb = lo, math.min(bucket - 61, lo + 120) do
            for i = 0, n - 1 do stale[#stale + 1] = k .. ':' .. string.format('%d', bb) .. '#' .. dig(i) end
          end
          set[#set + 1] = ARGV[j] set[#set + 1] = string.format('%d', bucket - 60)
        end
      elseif mark < f then  -- a newer window of this period (keys sort by time)
        local prev = redis.call('HGET', key, ARGV[j + 1])
        if prev then for i = 0, n - 1 do stale[#stale + 1] = prev .. '#' .. dig(i) end end
        set[#set + 1] = ARGV[j] set[#set + 1] = f
        set[#set + 1] = ARGV[j + 1] set[#set + 1] = mark
      end
    end
  end
  if top > n then set[#set + 1] = 'n' set[#set + 1] = top end
  if #stale > 0 then redis.call('HDEL', key, unpack(stale)) end
  if #set > 0 then redis.call('HSET', key, unpack(set)) end
  if new_hour then redis.call('EXPIRE', key, %(ttl)d) end  -- once an hour: the hash outlives its oldest hour
end
"""

# KEYS: per check z, h. ARGV: now, id, then per check the rate tokens to give back (a retired
# lease's unused calls; 0: none) and the bucket's capacity
RELEASE = _script(_DIG, _LIMBS, _DROP, """
local now, id = tonumber(ARGV[1]), ARGV[2]
for ci = 1, #KEYS / 2 do
  drop(KEYS[2 * ci - 1], KEYS[2 * ci], id, now)
  local back = tonumber(ARGV[1 + 2 * ci]) or 0
  if back > 0 then
    local h = KEYS[2 * ci]
    local tokens = tonumber(redis.call('HGET', h, 'tokens'))
    -- added to the stored value, then capped: never more than the bucket would hold
    if tokens then redis.call('HSET', h, 'tokens', math.min(tonumber(ARGV[2 + 2 * ci]), tokens + back)) end
  end
end
return 1
""")

# a lease (a hold of several calls' amount that one replica hands out) gives up `amt` (limbs)
_SHRINK = """
local function limbs_dec(a)
  if #a == 0 then return '0' end
  local out = {string.format('%d', a[#a])}
  for i = #a - 1, 1, -1 do out[#out + 1] = string.format('%09d', a[i]) end
  return table.concat(out)
end
local function shrink(h, lid, amt)  -- amt: limbs
  local f = 'h:' .. lid
  local v = redis.call('HMGET', h, f, 't')
  if not v[1] then return end  -- retired or expired
  local cur = dec_limbs(v[1])
  local left = minus(cur, amt)
  redis.call('HSET', h, f, limbs_dec(left), 't', table.concat(minus(csv_limbs(v[2]), minus(cur, left)), ','))
end
"""

# The end of calls, several at once (the calls of one hash tag that were ended while the previous
# batch ran): each a commit (with its ledger entry) or a release of a call out of a lease, or the
# commit of a hold of its own (lease id ''; its hold is dropped as a release drops it). A lease gives up
# a call's reserved amount once per call (the set `out` remembers the call: the serving replica and
# a recovering one may both end it), a hold of the call's own (a recovery pinned one) is dropped,
# and what was charged is counted once per `done` (the settlement's transaction: two holds for one
# payment count it once); amounts are summed per lease and per scope first, so each lease shrinks
# once and each scope counts once per batch.
# KEYS: ledger, then per call its done and out keys, then per scope z, h, c. ARGV: now, hour,
# #calls, #scopes, per scope its windows (#windows or -1 for the previous scope's, then
# 3 values each), then per call: lease id, call id, reserved (decimal), ledger entry (JSON; '' for
# a release), its time (the ledger's score), the charged amount's limbs (their number, then each,
# lowest first), #scopes, their indexes. Returns per call 1 if it was counted now, else 0. The calls
# of one END share the hour and the windows (the store batches only those).
END = _script(_DIG, _LIMBS, _DROP, _SHRINK, _COUNT, """
local now, hour, hs = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[2]
local nc, ns = tonumber(ARGV[3]), tonumber(ARGV[4])
local a = 5
local sw = {}
local w0, nw = a, 0
for si = 1, ns do
  local k = tonumber(ARGV[a])
  a = a + 1
  if k >= 0 then
    w0, nw = a, k
    a = a + 3 * k
  end
  sw[si] = {w0, nw}
end
local zbase = 1 + 2 * nc
local sums, gives, out = {}, {}, {}
for i = 1, nc do
  local lid, id, reserved, entry, ts, m = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4],
    tonumber(ARGV[a + 5])
  local amt = a + 6
  a = amt + m
  local fresh = false  -- a hold of its own (lease id ''): nothing to give up
  if lid ~= '' then
    fresh = redis.call('SADD', KEYS[2 * i + 1], id) == 1
    if fresh then redis.call('EXPIRE', KEYS[2 * i + 1], %(ttl)d) end
  end
  local first = false
  if entry ~= '' then first = redis.call('SET', KEYS[2 * i], '1', 'NX', 'EX', 604800) end
  local k = tonumber(ARGV[a])
  a = a + 1
  for _ = 1, k do
    local si = tonumber(ARGV[a])
    a = a + 1
    local h = KEYS[zbase + 3 * si - 1]
    if fresh then
      local g = gives[si] or {}
      gives[si] = g
      g[lid] = plus(g[lid] or {}, dec_limbs(reserved))
    end
    drop(KEYS[zbase + 3 * si - 2], h, id, now)
    if first then
      local sum = sums[si] or {}
      sums[si] = sum
      for li = 1, m do sum[li] = (sum[li] or 0) + tonumber(ARGV[amt + li - 1]) end
    end
  end
  if first then
    redis.call('ZADD', KEYS[1], ts, entry)
    out[i] = 1
  else
    out[i] = 0
  end
end
for si, g in pairs(gives) do
  for lid, amt in pairs(g) do shrink(KEYS[zbase + 3 * si - 1], lid, amt) end
end
for si, sum in pairs(sums) do
  local amt = {}
  for li, x in ipairs(normalize(sum, #sum)) do amt[li] = string.format('%d', x) end
  count(KEYS[zbase + 3 * si], sw[si][1], sw[si][2], amt, hour, hs)
end
return out
""")

# Pin a live hold: its expiry score becomes +inf, which the sweep never reaches, and the keys lose
# their TTL until the last pinned hold of the scope is dropped (`p` counts them: the first one
# persists the keys, and nothing gives them a TTL again while `p` is above 0). 0, writing nothing,
# when the hold is gone or expired in any scope (its budget may be another call's now).
# KEYS: per check z, h. ARGV: now, id
PIN = _script(_DIG, """
local now, id = tonumber(ARGV[1]), ARGV[2]
local n = #KEYS / 2
local pins = {}
for ci = 1, n do
  local s = redis.call('ZSCORE', KEYS[2 * ci - 1], id)
  if not s then return 0 end
  local v = redis.call('HMGET', KEYS[2 * ci], 'h:' .. id, 'p')
  if not v[1] then return 0 end
  if s ~= 'inf' then  -- pinning twice counts once
    if tonumber(s) <= now then return 0 end
    pins[ci] = tonumber(v[2]) or 0
  end
end
for ci = 1, n do
  local p = pins[ci]
  if p then
    local z, h = KEYS[2 * ci - 1], KEYS[2 * ci]
    redis.call('ZADD', z, '+inf', id)
    if p > 0 then
      redis.call('HSET', h, 'p', dig(p + 1))
    else
      redis.call('HSET', h, 'p', '1', 'e', '1000000000000000')  -- far off: a reserve does not renew (shorten) the keys' life
      redis.call('PERSIST', z)
      redis.call('PERSIST', h)
    end
  end
end
return 1
""")

RATE = _script("""
local r = cjson.decode(ARGV[1])
local key, now = KEYS[1], r.now
local st = redis.call('HMGET', key, 'tokens', 'ts', 'p')
local cap = r.burst
if cap <= 0 then cap = r.per_minute end
local per_s = r.per_minute / 60.0
local tokens = math.min(cap, (tonumber(st[1]) or cap) + math.max(0, now - (tonumber(st[2]) or now)) * per_s)
if tokens < 1 then return {0, tostring((1 - tokens) / per_s)} end
if r.take then
  redis.call('HSET', key, 'tokens', tokens - 1, 'ts', now)
  -- never shortens the holds' TTL, nor gives one to keys a pinned hold keeps
  if (tonumber(st[3]) or 0) <= 0 and redis.call('TTL', key) < 3600 then redis.call('EXPIRE', key, 3600) end
end
return {1, '0'}
""")

# KEYS: z, h, c. ARGV: now, hour, then one check as RESERVE has it. Returns the held total's limbs,
# then each window's: each list as its length, then its limbs.
USAGE = _script(_DIG, _LIMBS, _HOLDS, _CHECKS, """
local now, hour = tonumber(ARGV[1]), tonumber(ARGV[2])
local c = read_checks(3, 1)[1]
local held = holds(c.z, c.h, now, '')
local out = {#held, unpack(held)}
for _, s in ipairs(spent(c, hour)) do
  s = normalize(s, #s)
  out[#out + 1] = #s
  for _, x in ipairs(s) do out[#out + 1] = x end
end
return out
""")
