"""Anchoring proofs of inference (x402-protocol.md §7.3), on whichever replica holds the lease in
the shared store:

- batch items (inputHash, outputHash, keccak256(teeSignature)) become a StandardMerkleTree; the
  tree and its items go to the blob store (blob id = content hash), and
  `batchSettle(root, size, blobId)` anchors the root on the relay;
- individual items each get `settleIndividual(teeId, inputHash, outputHash, timestamp, payer,
  blobId, signature)`;
- then every item records its root, Merkle path, blob id and transaction (GET /v1/proofs/{hash}),
  and each transaction is kept among the recent batches (the console's Settlements page).

A batch is sent when `max_batch` items wait or the oldest waited `interval_s`. A replica that dies
between the transaction and the write leaves its items pending: the next holder anchors them
again (a second anchoring of the same proofs is harmless; none is lost).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid

import orjson
from eth_abi import encode as abi_encode
from eth_utils import function_signature_to_4byte_selector, keccak, to_checksum_address

from facilitator.evm.rpc import RpcError, RpcUnavailableError
from gateway.metrics import GatewayMetrics
from gateway.settings import ProofAnchoring
from gateway.tee.blobs import BlobStore
from gateway.tee.chain_tx import AnchorTxError, TxSender
from gateway.tee.merkle import StandardMerkleTree
from gateway.tee.proofs import AnchoredBatch, ProofItem, ProofStore, ProofStoreUnavailableError

log = logging.getLogger(__name__)
BATCH_SETTLE = function_signature_to_4byte_selector("batchSettle(bytes32,uint256,bytes)")
SETTLE_INDIVIDUAL = function_signature_to_4byte_selector(
    "settleIndividual(bytes32,bytes32,bytes32,uint256,address,bytes,bytes)")


def _b32(hex_value: str) -> bytes:
    return bytes.fromhex(hex_value.removeprefix("0x").rjust(64, "0"))


def leaf_values(item: ProofItem) -> list[bytes]:
    return [_b32(item.request_hash), _b32(item.output_hash), keccak(base64.b64decode(item.signature))]


class ProofBatcher:
    def __init__(self, settings: ProofAnchoring, store: ProofStore, blobs: BlobStore, metrics: GatewayMetrics,
                 sender: TxSender) -> None:
        self.settings = settings
        self.store = store
        self.blobs = blobs
        self.metrics = metrics
        self.sender = sender
        self.owner = uuid.uuid4().hex

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.settings.interval_s))
            try:
                await self.step()
            except (ProofStoreUnavailableError, AnchorTxError, RpcError, RpcUnavailableError, OSError) as exc:
                log.warning("proof batch not anchored (%s); its items stay pending", exc)
            except Exception:  # the loop must survive a bad round; the items stay pending
                log.exception("proof batcher round failed")

    async def step(self) -> int:
        """Anchor what is due; returns how many items were anchored."""
        if not await self.store.lease(self.owner, self.settings.lease_s):
            return 0
        items = await self.store.pending(self.settings.max_batch)
        if self.metrics is not None:
            self.metrics.tee_proofs_pending.set(len(items))
        if not items or (len(items) < self.settings.max_batch
                         and time.time() - items[0].queued_at < self.settings.interval_s):
            return 0
        batch = [i for i in items if i.kind == "batch"]
        sent = [await self._batch(batch)] if batch else []
        for item in (i for i in items if i.kind == "individual"):
            sent.append(await self._individual(item))
        await self.store.anchored(items, sent)
        now = time.time()
        for item in items:
            self.metrics.tee_proof_lag.labels(item.tee_id).observe(now - item.queued_at)
            self.metrics.tee_proofs_anchored.labels(item.tee_id, item.kind).inc()
        return len(items)

    async def _batch(self, items: list[ProofItem]) -> AnchoredBatch:
        tree = StandardMerkleTree.of([leaf_values(i) for i in items])
        blob = orjson.dumps({"tree": tree.dump(), "items": [{"request_hash": i.request_hash, "output_hash": i.output_hash,
                                                             "tee_signature": i.signature, "tee_id": i.tee_id,
                                                             "tee_timestamp": i.timestamp} for i in items]})
        blob_id = await self.blobs.put(blob)
        data = BATCH_SETTLE + abi_encode(["bytes32", "uint256", "bytes"], [tree.root, len(items), blob_id.encode()])
        tx = await self.sender.send(self.settings.relay, data)
        now = time.time()
        for index, item in enumerate(items):
            item.state, item.root, item.index, item.batch_size = "anchored", "0x" + tree.root.hex(), index, len(items)
            item.leaf = "0x" + tree.tree[tree.values[index][1]].hex()
            item.path = ["0x" + p.hex() for p in tree.proof(index)]
            item.blob_id, item.tx, item.anchored_at = blob_id, tx, now
        log.info("proof_batch_anchored", extra={"root": "0x" + tree.root.hex(), "size": len(items), "tx": tx})
        return AnchoredBatch("batch", "0x" + tree.root.hex(), len(items), blob_id, tx, now)

    async def _individual(self, item: ProofItem) -> AnchoredBatch:
        blob_id = await self.blobs.put(item.encode())
        signature = base64.b64decode(item.signature)
        data = SETTLE_INDIVIDUAL + abi_encode(
            ["bytes32", "bytes32", "bytes32", "uint256", "address", "bytes", "bytes"],
            [_b32(item.tee_id), _b32(item.request_hash), _b32(item.output_hash), item.timestamp,
             to_checksum_address(item.payer), blob_id.encode(), signature])
        item.tx = await self.sender.send(self.settings.relay, data)
        item.state, item.blob_id, item.anchored_at = "anchored", blob_id, time.time()
        return AnchoredBatch("individual", "", 1, blob_id, item.tx, item.anchored_at)
