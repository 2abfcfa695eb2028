"""Settlement store on Redis: what several facilitator replicas share.

Each record is one hash, changed only by Lua scripts, so every transition is atomic on a single
Redis, behind Sentinel and on Cluster (a script touches one key). The index of unfinished records
is a sorted set in its own slot, written *before* a record becomes SUBMITTED and cleared after it
is finished, so a reconciler can always find a broadcast that a crashed process left behind.
"""

from __future__ import annotations

from typing import cast

from facilitator.store.base import ClaimResult, SettlementRecord, SettlementState, StoreUnavailableError
from storage import BackendErrors, RedisClient, redis_from_url
from storage.lua import CLAIM_WITH_LEASE, claim_args, hash_fields

_errors = BackendErrors(StoreUnavailableError)
# A claim that is never submitted disappears on its own after this many leases; a submitted one
# never expires.
_CLAIM_TTL_LEASES = 20

_SUBMIT = """
local st = redis.call('HGET', KEYS[1], 'state')
if redis.call('HGET', KEYS[1], 'digest') ~= ARGV[1] or (st ~= 'claimed' and st ~= 'submitted') then
  return 0
end
redis.call('HSET', KEYS[1], 'state', 'submitted', 'tx_hash', ARGV[2], 'raw_tx', ARGV[3], 'signer', ARGV[4],
           'response', ARGV[5], 'updated_ms', ARGV[6])
redis.call('PERSIST', KEYS[1])
return 1
"""

_FINISH = """
if redis.call('HGET', KEYS[1], 'digest') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'response', ARGV[3], 'updated_ms', ARGV[4])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[5]))
return 1
"""

_RELEASE = """
local st = redis.call('HGET', KEYS[1], 'state')
if redis.call('HGET', KEYS[1], 'digest') == ARGV[1] and (st == 'claimed' or st == 'submitted') then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def _record(key: str, fields: dict[str, str]) -> SettlementRecord:
    return SettlementRecord(
        key=key,
        digest=fields.get("digest", ""),
        state=SettlementState(fields.get("state", "claimed")),
        lease_until_ms=int(fields.get("lease_until_ms", 0) or 0),
        tx_hash=fields.get("tx_hash", ""),
        raw_tx=fields.get("raw_tx", ""),
        signer=fields.get("signer", ""),
        response=fields.get("response", ""),
        updated_ms=int(fields.get("updated_ms", 0) or 0),
    )


class RedisSettlementStore:
    def __init__(self, client: RedisClient, *, prefix: str = "x402:", retention_s: int = 7 * 86400) -> None:
        self._redis = client
        self._prefix = prefix
        self._retention_ms = retention_s * 1000
        self._index = f"{prefix}settle:unfinished"
        self._claim = client.register_script(CLAIM_WITH_LEASE)
        self._submit = client.register_script(_SUBMIT)
        self._finish = client.register_script(_FINISH)
        self._release = client.register_script(_RELEASE)

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "x402:") -> RedisSettlementStore:
        return cls(redis_from_url(url), prefix=prefix)

    def _key(self, key: str) -> str:
        # The braces are a Cluster hash tag: the record is addressed by its own slot.
        return f"{self._prefix}settle:{{{key}}}"

    @_errors
    async def claim(self, key: str, digest: str, *, now_ms: int, lease_ms: int) -> ClaimResult:
        args = claim_args(SettlementState.CLAIMED.value, now_ms=now_ms, lease_ms=lease_ms,
                          ttl_ms=lease_ms * _CLAIM_TTL_LEASES, fields={"digest": digest, "updated_ms": now_ms})
        res = await self._claim(keys=[self._key(key)], args=args)
        if res == 1:
            return ClaimResult(won=True, record=None)
        return ClaimResult(won=False, record=_record(key, hash_fields(res)))

    @_errors
    async def mark_submitted(
        self, key: str, digest: str, *, tx_hash: str, raw_tx: str, signer: str, response: str, now_ms: int
    ) -> None:
        await self._redis.zadd(self._index, {key: now_ms})
        ok = await self._submit(keys=[self._key(key)], args=[digest, tx_hash, raw_tx, signer, response, now_ms])
        if ok != 1:
            raise StoreUnavailableError(f"settlement record {key} was not in a submittable state")

    @_errors
    async def finish(self, key: str, digest: str, *, state: SettlementState, response: str, now_ms: int) -> None:
        await self._finish(keys=[self._key(key)], args=[digest, state.value, response, now_ms, self._retention_ms])
        await self._redis.zrem(self._index, key)

    @_errors
    async def release(self, key: str, digest: str) -> None:
        await self._release(keys=[self._key(key)], args=[digest])

    @_errors
    async def get(self, key: str) -> SettlementRecord | None:
        # The client decodes replies (decode_responses=True); redis-py types them all `bytes | str`.
        fields = cast(dict[str, str], await self._redis.hgetall(self._key(key)))
        return _record(key, fields) if fields else None

    @_errors
    async def unfinished(self, *, older_than_ms: int, limit: int = 100) -> list[SettlementRecord]:
        keys = cast(list[str], await self._redis.zrangebyscore(self._index, "-inf", older_than_ms, start=0, num=limit))
        out: list[SettlementRecord] = []
        for key in keys:
            rec = await self.get(key)
            if rec is None or rec.state in (SettlementState.SETTLED, SettlementState.FAILED):
                await self._redis.zrem(self._index, key)
                continue
            if rec.state == SettlementState.SUBMITTED or rec.lease_until_ms < older_than_ms:
                out.append(rec)
        return out

    @_errors
    async def ping(self) -> None:
        await self._redis.ping()

    async def close(self) -> None:
        await self._redis.aclose()
