"""Proofs of inference in the shared store (gateway/tee/proofs.py) and the batcher's lease
(gateway/tee/batcher.py) on a real Redis, with the relay on the dev chain: two replicas' batchers,
one anchors; an item is kept once per request hash; a failed anchoring leaves the items pending."""

from __future__ import annotations

import asyncio
import base64
import os
from pathlib import Path
from typing import Any

import pytest

from facilitator.evm.rpc import RpcError
from gateway.metrics import GatewayMetrics
from gateway.settings import ProofAnchoring
from gateway.tee.batcher import ProofBatcher
from gateway.tee.blobs import LocalBlobStore
from gateway.tee.chain_tx import AnchorTxError, TxSender
from gateway.tee.proofs import ProofItem, open_proofs

pytestmark = pytest.mark.integration


def item(i: int, kind: str = "batch") -> ProofItem:
    return ProofItem("0x" + os.urandom(32).hex(), "0x" + os.urandom(32).hex(), base64.b64encode(os.urandom(256)).decode(),
                     "0x" + os.urandom(32).hex(), 1_700_000_000 + i, kind, "0x" + "ab" * 20, queued_at=0.0)


def anchoring(devchain: dict[str, Any], tmp: Path, relay: str | None = None) -> ProofAnchoring:
    return ProofAnchoring(relay=relay or devchain["contracts"]["settlement_relay"], rpc_url=devchain["rpc_url"],
                          chain_id=devchain["chain_id"], signer_key=devchain["accounts"]["tee_admin"]["private_key"],
                          interval_s=0.1, blob_dir=str(tmp))


async def test_two_batchers_one_anchors(devchain: dict[str, Any], redis_server: Any, redis_prefix: str,
                                        tmp_path: Path) -> None:
    settings = anchoring(devchain, tmp_path)
    stores = [open_proofs(redis_server.url, prefix=redis_prefix) for _ in range(2)]
    senders = [TxSender(settings.rpc_url, settings.chain_id, settings.signer_key.get_secret_value()) for _ in range(2)]
    try:
        first = item(0)
        for it in (first, item(1), item(2, "individual")):
            await stores[0].add(it)
        await stores[1].add(first)  # the same request hash again: kept once
        assert len(await stores[1].pending(100)) == 3
        batchers = [ProofBatcher(settings, s, LocalBlobStore(str(tmp_path)), GatewayMetrics(), sender)
                    for s, sender in zip(stores, senders, strict=True)]
        counts = await asyncio.gather(*(b.step() for b in batchers))
        assert sorted(counts) == [0, 3]  # the lease: one replica anchored all three
        assert await stores[1].pending(100) == []
        done = await stores[1].get(first.request_hash)
        assert done is not None and done.state == "anchored" and done.tx and done.batch_size == 2 and done.path
        individual, merkle = await stores[1].recent_batches(10)  # the console's recent batches, newest first
        assert (merkle.kind, merkle.root, merkle.size, merkle.tx, merkle.blob_id) == \
            ("batch", done.root, 2, done.tx, done.blob_id)
        assert (individual.kind, individual.root, individual.size) == ("individual", "", 1) and individual.tx
    finally:
        for s in stores:
            await s.close()
        for sender in senders:
            await sender.close()


async def test_a_failed_anchoring_keeps_the_items_pending(devchain: dict[str, Any], redis_server: Any,
                                                          redis_prefix: str, tmp_path: Path) -> None:
    # Not a relay (the OPG token has no batchSettle): the node refuses the estimate (or it reverts).
    settings = anchoring(devchain, tmp_path, relay=devchain["tokens"]["OPG"]["address"])
    store = open_proofs(redis_server.url, prefix=redis_prefix)
    sender = TxSender(settings.rpc_url, settings.chain_id, settings.signer_key.get_secret_value())
    try:
        await store.add(item(0))
        with pytest.raises((AnchorTxError, RpcError)):
            await ProofBatcher(settings, store, LocalBlobStore(str(tmp_path)), GatewayMetrics(), sender).step()
        assert len(await store.pending(10)) == 1
    finally:
        await store.close()
        await sender.close()
