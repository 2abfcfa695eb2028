"""Proofs of inference waiting to be anchored, and the anchored ones (x402-protocol.md §7.3):
an item per verified, settled `tee` call whose agent asked for `batch` or `individual`
settlement (X-SETTLEMENT-TYPE; `private` records nothing). Replicas share them through Redis;
with an SQLite or memory store (one replica) they live in the process.

Redis layout under the prefix, every key in one Cluster slot (hash tag `{p}`: anchoring updates
items and the queue in one transaction): `proofs:{p}:pending` (list of request hashes, oldest
first), `proofs:{p}:item:<request_hash>` (the item, then its batch, path and tx once anchored),
`proofs:{p}:batches` (the last RECENT_BATCHES anchoring transactions, newest first, for the
console), `proofs:{p}:lease` (the batcher's lease: one replica anchors at a time).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import orjson

import storage
from storage import BackendErrors, RedisClient

SETTLEMENT_TYPES = {"private": "private", "pivate": "private", "batch": "batch", "individual": "individual",
                    "inidvidual": "individual"}  # OpenGradient's middleware tolerates these typos


RECENT_BATCHES = 100  # anchoring transactions remembered for the console


class ProofStoreUnavailableError(storage.StoreUnavailableError):
    pass


_errors = BackendErrors(ProofStoreUnavailableError)


def settlement_type(header: str | None) -> str:
    """The agent's X-SETTLEMENT-TYPE (default batch, as OpenGradient's)."""
    return SETTLEMENT_TYPES.get((header or "batch").strip().lower(), "batch")


@dataclass
class ProofItem:
    request_hash: str  # 0x-hex: the item's key (GET /v1/proofs/{request_hash})
    output_hash: str
    signature: str  # base64 RSA-PSS, as the enclave gave it
    tee_id: str
    timestamp: int
    kind: str  # batch | individual
    payer: str
    queued_at: float = field(default_factory=time.time)
    state: str = "pending"  # pending | anchored
    root: str = ""
    path: list[str] = field(default_factory=list)
    leaf: str = ""
    index: int = -1
    batch_size: int = 0
    blob_id: str = ""
    tx: str = ""
    anchored_at: float = 0.0

    def encode(self) -> bytes:
        return orjson.dumps(self)  # orjson writes a dataclass as asdict would, without its deep copy

    @classmethod
    def decode(cls, raw: bytes | str) -> ProofItem:
        return cls(**orjson.loads(raw))


@dataclass
class AnchoredBatch:
    """One anchoring transaction: a Merkle batch (its root) or one individual proof (no root)."""

    kind: str  # batch | individual
    root: str
    size: int
    blob_id: str
    tx: str
    anchored_at: float

    def encode(self) -> bytes:
        return orjson.dumps(self)  # orjson writes a dataclass as asdict would, without its deep copy

    @classmethod
    def decode(cls, raw: bytes | str) -> AnchoredBatch:
        return cls(**orjson.loads(raw))


class ProofStore(Protocol):
    async def add(self, item: ProofItem) -> None: ...

    async def get(self, request_hash: str) -> ProofItem | None: ...

    async def pending(self, limit: int) -> list[ProofItem]:
        """The oldest pending items, oldest first."""
        ...

    async def pending_count(self) -> int: ...

    async def anchored(self, items: list[ProofItem], batches: Sequence[AnchoredBatch] = ()) -> None:
        """Save `items` (now anchored), drop them from the pending queue and remember `batches`
        (the transactions that anchored them) among the recent ones."""
        ...

    async def recent_batches(self, limit: int) -> list[AnchoredBatch]:
        """The last anchoring transactions, newest first (at most RECENT_BATCHES)."""
        ...

    async def lease(self, owner: str, ttl_s: float) -> bool:
        """Take or renew the batcher's lease."""
        ...

    async def close(self) -> None: ...


_ADD = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then redis.call('RPUSH', KEYS[2], ARGV[3]) end
return 1
"""


class RedisProofStore:
    def __init__(self, redis: RedisClient, prefix: str, ttl_s: int = 30 * 86_400) -> None:
        self.r = redis
        tag = f"{prefix}proofs:{{p}}"
        self.pending_key = f"{tag}:pending"
        self.item_prefix = f"{tag}:item:"
        self.lease_key = f"{tag}:lease"
        self.batches_key = f"{tag}:batches"
        self.ttl_s = ttl_s
        self._add = redis.register_script(_ADD)

    async def close(self) -> None:
        await self.r.aclose()

    @_errors
    async def add(self, item: ProofItem) -> None:
        # one item per request hash, queued in the same step (a crash between would strand it)
        await self._add(keys=[self.item_prefix + item.request_hash, self.pending_key],
                        args=[item.encode(), self.ttl_s, item.request_hash])

    @_errors
    async def get(self, request_hash: str) -> ProofItem | None:
        raw = await self.r.get(self.item_prefix + request_hash)
        return None if raw is None else ProofItem.decode(raw)

    @_errors
    async def pending(self, limit: int) -> list[ProofItem]:
        hashes = await self.r.lrange(self.pending_key, 0, limit - 1)
        if not hashes:
            return []
        raws = await self.r.mget([self.item_prefix + (h.decode() if isinstance(h, bytes) else h) for h in hashes])
        return [ProofItem.decode(raw) for raw in raws if raw is not None]

    @_errors
    async def pending_count(self) -> int:
        return int(await self.r.llen(self.pending_key))

    @_errors
    async def anchored(self, items: list[ProofItem], batches: Sequence[AnchoredBatch] = ()) -> None:
        pipe = self.r.pipeline(transaction=True)
        for item in items:
            pipe.set(self.item_prefix + item.request_hash, item.encode(), ex=self.ttl_s)
            pipe.lrem(self.pending_key, 1, item.request_hash)
        if batches:
            pipe.lpush(self.batches_key, *(b.encode() for b in batches))
            pipe.ltrim(self.batches_key, 0, RECENT_BATCHES - 1)
        await pipe.execute()

    @_errors
    async def recent_batches(self, limit: int) -> list[AnchoredBatch]:
        raws = await self.r.lrange(self.batches_key, 0, min(limit, RECENT_BATCHES) - 1)
        return [AnchoredBatch.decode(raw) for raw in raws]

    @_errors
    async def lease(self, owner: str, ttl_s: float) -> bool:
        ms = int(ttl_s * 1000)
        if await self.r.set(self.lease_key, owner, nx=True, px=ms):
            return True
        current = await self.r.get(self.lease_key)
        if (current.decode() if isinstance(current, bytes) else current) == owner:
            await self.r.pexpire(self.lease_key, ms)
            return True
        return False


class MemoryProofStore:
    """One replica (SQLite or memory store): the items live in this process."""

    def __init__(self) -> None:
        self.items: dict[str, ProofItem] = {}
        self.queue: list[str] = []
        self.batches: deque[AnchoredBatch] = deque(maxlen=RECENT_BATCHES)  # newest first

    async def add(self, item: ProofItem) -> None:
        if item.request_hash not in self.items:
            self.items[item.request_hash] = item
            self.queue.append(item.request_hash)

    async def get(self, request_hash: str) -> ProofItem | None:
        return self.items.get(request_hash)

    async def pending(self, limit: int) -> list[ProofItem]:
        return [self.items[h] for h in self.queue[:limit]]

    async def pending_count(self) -> int:
        return len(self.queue)

    async def anchored(self, items: list[ProofItem], batches: Sequence[AnchoredBatch] = ()) -> None:
        done = {i.request_hash for i in items}
        for item in items:
            self.items[item.request_hash] = item
        self.queue = [h for h in self.queue if h not in done]
        self.batches.extendleft(batches)

    async def recent_batches(self, limit: int) -> list[AnchoredBatch]:
        return list(self.batches)[:limit]

    async def lease(self, owner: str, ttl_s: float) -> bool:
        return True

    async def close(self) -> None:
        pass


def open_proofs(url: str, *, prefix: str) -> ProofStore:
    def in_process(_path: str) -> ProofStore:
        return MemoryProofStore()

    def shared(r: RedisClient) -> ProofStore:
        return RedisProofStore(r, prefix)

    return storage.open_url(url, sqlite=in_process, redis=shared, decode_responses=False)
