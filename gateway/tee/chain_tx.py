"""One signer sending the relay's anchoring transactions: EIP-1559, nonce from the node
(only the batcher's lease holder sends), waits for the receipt."""

from __future__ import annotations

import asyncio
import time

from eth_account import Account

from facilitator.evm.rpc import JsonRpcClient


class AnchorTxError(Exception):
    """The transaction reverted or was not mined in time."""


class TxSender:
    def __init__(self, rpc_url: str, chain_id: int, key: str, *, timeout_s: float = 60.0) -> None:
        self.rpc = JsonRpcClient(rpc_url)
        self.chain_id = chain_id
        self.account = Account.from_key(key)
        self.timeout_s = timeout_s

    async def close(self) -> None:
        await self.rpc.close()

    async def send(self, to: str, data: bytes) -> str:
        """The mined transaction's hash; raises AnchorTxError on a revert or timeout."""
        call = {"from": self.account.address, "to": to, "data": "0x" + data.hex()}
        nonce, gas, base = await asyncio.gather(
            self.rpc.call("eth_getTransactionCount", [self.account.address, "pending"]),
            self.rpc.call("eth_estimateGas", [call]),
            self.rpc.call("eth_gasPrice", []))
        tip = 10**9
        tx = {"to": to, "data": data, "gas": int(int(gas, 16) * 1.3) + 10_000, "chainId": self.chain_id,
              "nonce": int(nonce, 16), "type": 2, "maxFeePerGas": 2 * int(base, 16) + tip,
              "maxPriorityFeePerGas": tip, "value": 0}
        raw = self.account.sign_transaction(tx).raw_transaction
        tx_hash: str = await self.rpc.call("eth_sendRawTransaction", ["0x" + bytes(raw).hex()])
        deadline = time.monotonic() + self.timeout_s
        while True:
            receipt = await self.rpc.call("eth_getTransactionReceipt", [tx_hash])
            if receipt:
                if int(receipt["status"], 16) != 1:
                    raise AnchorTxError(f"{tx_hash} reverted")
                return tx_hash
            if time.monotonic() > deadline:
                raise AnchorTxError(f"{tx_hash} was not mined within {self.timeout_s} s")
            await asyncio.sleep(0.2)
