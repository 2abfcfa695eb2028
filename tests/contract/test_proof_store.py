"""The proof-of-inference store on the embedded store (in process) and Redis (single, Sentinel,
Cluster): the pending queue's size and order, and the recent anchoring transactions the console
shows, newest first and trimmed to RECENT_BATCHES, written with the items they anchored."""

from __future__ import annotations

import os

import pytest

from gateway.tee.proofs import RECENT_BATCHES, AnchoredBatch, ProofItem, ProofStore, open_proofs


@pytest.fixture
def store(open_backend) -> ProofStore:
    return open_backend(open_proofs)


def item(i: int) -> ProofItem:
    return ProofItem("0x" + os.urandom(32).hex(), "0x" + os.urandom(32).hex(), "c2ln", "0x" + "01" * 32, i, "batch",
                     "0x" + "ab" * 20, queued_at=float(i))


def batch(n: int) -> AnchoredBatch:
    return AnchoredBatch("batch", "0x" + f"{n:064x}", 2, f"blob{n}", "0x" + f"{n + 1:064x}", 1000.0 + n)


async def test_pending_count_and_recent_batches(store: ProofStore) -> None:
    items = [item(i) for i in range(3)]
    for it in items:
        await store.add(it)
    assert await store.pending_count() == 3 and await store.recent_batches(10) == []
    assert [p.request_hash for p in await store.pending(1)] == [items[0].request_hash]  # the oldest
    await store.anchored(items[:2], [batch(0)])
    assert await store.pending_count() == 1
    assert await store.recent_batches(10) == [batch(0)]
    await store.anchored([], [batch(n) for n in range(1, RECENT_BATCHES + 5)])  # one round, many transactions
    recent = await store.recent_batches(RECENT_BATCHES + 50)
    assert len(recent) == RECENT_BATCHES and recent[0] == batch(RECENT_BATCHES + 4)  # newest first, trimmed
    assert [b.tx for b in await store.recent_batches(3)] == [batch(n).tx for n in range(RECENT_BATCHES + 4,
                                                                                       RECENT_BATCHES + 1, -1)]
