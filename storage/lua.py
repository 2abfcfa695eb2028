"""Lua shared by the Redis stores. Every script touches the keys of one Cluster hash slot only,
so it runs unchanged on a single Redis, behind Sentinel and on Cluster."""

from __future__ import annotations

from typing import Any

# Exact arithmetic on non-negative decimal strings: 18-decimal token amounts pass both Lua's
# doubles (2^53) and Redis' int64 counters after a few tokens. Prepend to a script that uses
# norm/cmp/add/sub.
BIGNUM = """
local function norm(a) a = string.gsub(a, '^0+', '') if a == '' then return '0' end return a end
local function cmp(a, b)
  a = norm(a) b = norm(b)
  if #a ~= #b then if #a < #b then return -1 else return 1 end end
  if a == b then return 0 end
  if a < b then return -1 else return 1 end
end
local function add(a, b)
  a = norm(a) b = norm(b)
  local out, carry, i, j = {}, 0, #a, #b
  while i > 0 or j > 0 or carry > 0 do
    local s = carry
    if i > 0 then s = s + string.byte(a, i) - 48 i = i - 1 end
    if j > 0 then s = s + string.byte(b, j) - 48 j = j - 1 end
    out[#out + 1] = string.char(48 + s % 10)
    carry = math.floor(s / 10)
  end
  return norm(string.reverse(table.concat(out)))
end
local function sub(a, b)  -- max(a - b, 0)
  if cmp(a, b) <= 0 then return '0' end
  a = norm(a) b = norm(b)
  local out, borrow, i, j = {}, 0, #a, #b
  while i > 0 do
    local d = string.byte(a, i) - 48 - borrow
    i = i - 1
    if j > 0 then d = d - (string.byte(b, j) - 48) j = j - 1 end
    if d < 0 then d = d + 10 borrow = 1 else borrow = 0 end
    out[#out + 1] = string.char(48 + d)
  end
  return norm(string.reverse(table.concat(out)))
end
"""

# Claim a record (a hash with `state` and `lease_until_ms`) under a lease: create it in the claimed
# state, or take over one still in that state whose lease expired (its owner died before it got
# further); returns 1. Otherwise returns the existing record (HGETALL) untouched.
# KEYS[1] the record; ARGV[1] the claimed state's name, ARGV[2] now_ms, ARGV[3] lease_ms,
# ARGV[4] ttl_ms of the claimed record, ARGV[5..] the claim's other fields and values.
CLAIM_WITH_LEASE = """
local st = redis.call('HGET', KEYS[1], 'state')
local now = tonumber(ARGV[2])
if (not st) or (st == ARGV[1] and tonumber(redis.call('HGET', KEYS[1], 'lease_until_ms') or '0') < now) then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'state', ARGV[1], 'lease_until_ms', now + tonumber(ARGV[3]), unpack(ARGV, 5))
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4]))
  return 1
end
return redis.call('HGETALL', KEYS[1])
"""


def claim_args(state: str, *, now_ms: int, lease_ms: int, ttl_ms: int, fields: dict[str, str | int]) -> list[str | int]:
    """ARGV for CLAIM_WITH_LEASE."""
    args: list[str | int] = [state, now_ms, lease_ms, ttl_ms]
    for name, value in fields.items():
        args += [name, value]
    return args


def hash_fields(reply: list[Any]) -> dict[Any, Any]:
    """HGETALL's flat [field, value, …] reply from a script, as a dict."""
    return dict(zip(reply[::2], reply[1::2], strict=True))
