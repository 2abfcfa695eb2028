"""Sending settlement transactions: per-signer nonces, fees, broadcast and receipt waiting.

Rules that keep money safe:
- a signer's broadcasts are serialised by a lock shared by every process using the key
  (facilitator/evm/nonces.py), so two settlements never take the same account nonce (the
  collision reported in daydreamsai/facilitator#46);
- the signed raw transaction is handed to `persist` *before* it is broadcast, so a crash after
  the broadcast leaves a record any process can finish (rebroadcasting the same bytes is a no-op);
- an ambiguous broadcast (timeout, connection reset) is treated as sent: we never sign a second
  transaction for the same payment, we wait for the first.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from facilitator.evm.nonces import LocalNonces, Nonces, NonceUnavailableError
from facilitator.evm.receipts import Receipt, ReceiptWaiter
from facilitator.evm.rpc import Call, JsonRpcClient, RpcError, RpcUnavailableError
from facilitator.evm.signer import SignedTransaction, Signer

Persist = Callable[[SignedTransaction], Awaitable[None]]


class BroadcastRejectedError(Exception):
    """The node refused the transaction outright; nothing was sent, the nonce is free again."""


def _is_nonce_error(exc: RpcError) -> bool:
    msg = exc.message.lower()
    return ("nonce too low" in msg or "nonce too high" in msg or "invalid nonce" in msg or "nonce is too low" in msg
            or "replacement transaction underpriced" in msg)


def _is_already_known(exc: RpcError) -> bool:
    msg = exc.message.lower()
    return "already known" in msg or "already imported" in msg or "known transaction" in msg


class TransactionSender:
    def __init__(self, rpc: JsonRpcClient, chain_id: int, *, nonces: Nonces | None = None,
                 fee_cache_s: float = 2.0) -> None:
        self.rpc = rpc
        self.chain_id = chain_id
        self.nonces: Nonces = nonces or LocalNonces()
        self._fees: tuple[float, int, int] | None = None  # (fetched_at, max_fee, priority)
        self._fee_cache_s = fee_cache_s
        self._fee_lock = asyncio.Lock()
        self.receipts = ReceiptWaiter(rpc)

    def nonce_key(self, address: str) -> str:
        return f"{self.chain_id}:{address.lower()}"

    async def chain_pending(self, address: str) -> int:
        return int(await self.rpc.call("eth_getTransactionCount", [address, "pending"]), 16)

    async def _fees_now(self) -> tuple[int, int]:
        cached = self._fees
        if cached is not None and time.monotonic() - cached[0] < self._fee_cache_s:
            return cached[1], cached[2]
        async with self._fee_lock:
            cached = self._fees
            if cached is not None and time.monotonic() - cached[0] < self._fee_cache_s:
                return cached[1], cached[2]
            gas_price, priority = await self.rpc.batch([Call("eth_gasPrice", []), Call("eth_maxPriorityFeePerGas", [])])
            if isinstance(gas_price, RpcError):
                raise gas_price
            prio = int(priority, 16) if not isinstance(priority, RpcError) else 1_000_000
            # Twice the current price leaves room for a base-fee rise over the next blocks;
            # EIP-1559 charges only base fee + tip, not the cap.
            max_fee = max(int(gas_price, 16) * 2, prio + 1)
            self._fees = (time.monotonic(), max_fee, prio)
            return max_fee, prio

    async def send(self, signer: Signer, *, to: str, data: bytes, gas: int, persist: Persist) -> SignedTransaction:
        """Sign and broadcast one transaction. Returns the transaction that was (or may have
        been) broadcast; raises BroadcastRejectedError if the node refused it."""
        max_fee, priority = await self._fees_now()
        key = self.nonce_key(signer.address)

        async def chain_count() -> int:
            return await self.chain_pending(signer.address)

        async with self.nonces.hold(key):
            for _attempt in range(3):
                nonce = await self.nonces.current(key, chain_count)
                signed = signer.sign(chain_id=self.chain_id, nonce=nonce, to=to, data=data, gas=gas,
                                     max_fee=max_fee, priority_fee=priority)
                await persist(signed)
                try:
                    await self.rpc.call("eth_sendRawTransaction", [signed.raw])
                except RpcError as exc:
                    if _is_already_known(exc):
                        await self._advance(key, nonce)
                        return signed
                    if _is_nonce_error(exc):
                        await self.nonces.reset(key)
                        continue
                    await self.nonces.reset(key)
                    raise BroadcastRejectedError(exc.message) from exc
                except RpcUnavailableError:
                    # It may have reached the node: the nonce counts as used, the caller waits
                    # for this hash and rebroadcasts the same bytes if the node does not know it.
                    await self._advance(key, nonce)
                    return signed
                await self._advance(key, nonce)
                return signed
            raise BroadcastRejectedError("nonce kept colliding after 3 re-syncs")

    async def _advance(self, key: str, used: int) -> None:
        """After a broadcast: failing to record the next nonce must not look like "not sent"; the
        chain's pending count covers it for the next sender."""
        try:
            await self.nonces.advance(key, used)
        except NonceUnavailableError:
            pass

    async def rebroadcast(self, raw: str) -> None:
        try:
            await self.rpc.call("eth_sendRawTransaction", [raw])
        except RpcError:
            pass  # already known, already mined (nonce too low) or replaced: the receipt decides
        except RpcUnavailableError:
            pass

    async def wait_receipt(self, tx_hash: str, raw: str | None, timeout_s: float, *,
                           lookup_after_s: float = 1.0) -> Receipt | None:
        """The receipt, or None when it did not come within `timeout_s`. If the node does not know
        the transaction (after `lookup_after_s`; 0 for a record found unfinished), the persisted
        raw bytes are sent again. One poll loop serves every pending hash of this chain."""
        return await self.receipts.wait(tx_hash, raw, timeout_s, lookup_after_s=lookup_after_s)
