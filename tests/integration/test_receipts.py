"""Receipts of every pending transaction of a chain come from one poll loop: transactions waited
for together are fetched in one JSON-RPC batch, and the fast signer's transactions are accepted
and mined by a real node."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from facilitator.app import build_facilitator
from facilitator.evm.receipts import ReceiptWaiter
from facilitator.evm.rpc import Call
from facilitator.evm.signer import SignedTransaction
from facilitator.settings import devchain_overlay, load_settings

pytestmark = pytest.mark.integration


async def _noop(_: SignedTransaction) -> None:
    return None


async def test_pending_hashes_share_one_poll_and_unknown_ones_time_out(devchain: dict[str, Any]) -> None:
    fac = build_facilitator(load_settings(None, env={}, overrides=devchain_overlay(devchain) | {"store_url": "memory://"}))
    try:
        chain = next(iter(fac.chains.values()))
        signer = fac.signers.next()
        payee = devchain["accounts"]["payee"]["address"]
        sent = [await chain.sender.send(signer, to=payee, data=b"", gas=21_000, persist=_noop) for _ in range(3)]
        assert len({s.nonce for s in sent}) == 3
        for _ in range(500):  # mined (anvil may mine just after answering), so one poll finds all three
            if all(await chain.rpc.batch([Call("eth_getTransactionReceipt", [s.tx_hash]) for s in sent])):
                break
            await asyncio.sleep(0.01)

        waiter = ReceiptWaiter(chain.rpc)
        receipts = await asyncio.gather(*(waiter.wait(s.tx_hash, s.raw, 10.0) for s in sent))
        assert [r.tx_hash if r else None for r in receipts] == [s.tx_hash for s in sent]
        assert all(r is not None and r.status == 1 for r in receipts)
        assert waiter.polls == 1  # three waiters, one batch

        unknown = "0x" + "ab" * 32
        assert await waiter.wait(unknown, None, 0.05) is None
        assert await waiter.wait(unknown, None, 0.0) is None
        assert not waiter._pending  # nothing left behind to poll
        await waiter.close()
    finally:
        await fac.close()
