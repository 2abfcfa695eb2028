"""Waiting for receipts: one poll loop per chain for every pending transaction hash.

A loop per settlement made one `eth_getTransactionReceipt` request per transaction per poll; at
16 settlements in flight that is 16 requests where one JSON-RPC batch does. A new hash wakes the
loop at once (on an automining dev chain, or a fast L2, the receipt is usually there by the time
the broadcast returns), then the loop backs off while nothing new arrives.

A transaction the node does not know (after `lookup_after_s`, then every second) is sent again
from its recorded raw bytes: rebroadcasting the same signed bytes can never make a second
payment.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

from facilitator.evm.rpc import Call, JsonRpcClient, RpcError, RpcUnavailableError

FIRST_DELAY_S = 0.002
MAX_DELAY_S = 0.25
LOOKUP_EVERY_S = 1.0


@dataclass(frozen=True, slots=True)
class Receipt:
    tx_hash: str
    status: int
    block_number: int
    logs: list[dict[str, Any]]
    gas_used: int


def parse_receipt(tx_hash: str, receipt: dict[str, Any]) -> Receipt:
    return Receipt(
        tx_hash=tx_hash,
        status=int(receipt.get("status", "0x0"), 16),
        block_number=int(receipt.get("blockNumber", "0x0"), 16),
        logs=list(receipt.get("logs") or []),
        gas_used=int(receipt.get("gasUsed", "0x0"), 16),
    )


@dataclass(eq=False)
class _Pending:
    raw: str | None
    next_lookup: float
    waiters: list[asyncio.Future[Receipt | None]] = field(default_factory=list)


class ReceiptWaiter:
    def __init__(self, rpc: JsonRpcClient) -> None:
        self.rpc = rpc
        self._pending: dict[str, _Pending] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.polls = 0  # batches sent (for benchmarks and tests)

    async def wait(self, tx_hash: str, raw: str | None, timeout_s: float, *, lookup_after_s: float = 1.0) -> Receipt | None:
        """The receipt, or None when it did not come within `timeout_s`."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Receipt | None] = loop.create_future()
        entry = self._pending.get(tx_hash)
        if entry is None:
            entry = self._pending[tx_hash] = _Pending(raw=raw, next_lookup=time.monotonic() + lookup_after_s)
        else:
            entry.raw = entry.raw or raw
            entry.next_lookup = min(entry.next_lookup, time.monotonic() + lookup_after_s)
        entry.waiters.append(fut)
        self._wake.set()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._task = asyncio.create_task(self._run())
        try:
            return await asyncio.wait_for(fut, timeout_s)
        except TimeoutError:
            return None
        finally:
            self._forget(tx_hash, fut)

    def _forget(self, tx_hash: str, fut: asyncio.Future[Receipt | None]) -> None:
        entry = self._pending.get(tx_hash)
        if entry is None:
            return
        with contextlib.suppress(ValueError):
            entry.waiters.remove(fut)
        if not entry.waiters:
            del self._pending[tx_hash]

    async def _run(self) -> None:
        delay = FIRST_DELAY_S
        while self._pending:
            self._wake.clear()
            await self._poll_once()
            if not self._pending:
                break
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
                delay = FIRST_DELAY_S  # a new hash: poll now, and soon again
            except TimeoutError:
                delay = min(delay * 2, MAX_DELAY_S)

    async def _poll_once(self) -> None:
        hashes = list(self._pending)
        self.polls += 1
        try:
            results: list[Any] = await self.rpc.batch([Call("eth_getTransactionReceipt", [h]) for h in hashes])
        except RpcUnavailableError:
            results = [None] * len(hashes)
        missing: list[str] = []
        for tx_hash, result in zip(hashes, results, strict=True):
            entry = self._pending.get(tx_hash)
            if entry is None:
                continue
            if isinstance(result, dict) and result:
                receipt = parse_receipt(tx_hash, result)
                del self._pending[tx_hash]  # its waiters are answered; do not poll it again
                for fut in entry.waiters:
                    if not fut.done():
                        fut.set_result(receipt)
            else:
                missing.append(tx_hash)
        await self._rebroadcast_unknown(missing)

    async def _rebroadcast_unknown(self, hashes: list[str]) -> None:
        now = time.monotonic()
        due = [h for h in hashes if (e := self._pending.get(h)) is not None and e.raw and now >= e.next_lookup]
        if not due:
            return
        for h in due:
            self._pending[h].next_lookup = now + LOOKUP_EVERY_S
        try:
            known = await self.rpc.batch([Call("eth_getTransactionByHash", [h]) for h in due])
        except RpcUnavailableError:
            return
        for h, tx in zip(due, known, strict=True):
            entry = self._pending.get(h)
            if entry is None or entry.raw is None or isinstance(tx, RpcError) or tx:
                continue
            try:
                await self.rpc.call("eth_sendRawTransaction", [entry.raw])
            except (RpcError, RpcUnavailableError):
                pass  # already known, already mined (nonce too low) or replaced: the receipt decides

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
