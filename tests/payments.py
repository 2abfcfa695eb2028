"""Payments signed by the official `x402` client (a client we did not write), for tests."""

from __future__ import annotations

import asyncio
import copy
import time
from typing import Any

from eth_account import Account
from eth_account.signers.local import LocalAccount
from x402 import x402Client
from x402.mechanisms.evm.exact.register import register_exact_evm_client
from x402.schemas import PaymentRequired, PaymentRequirements, ResourceInfo


def requirements_for(devchain: dict[str, Any], symbol: str, amount: int, *, pay_to: str | None = None,
                     scheme: str = "exact", max_timeout_seconds: int = 300) -> dict[str, Any]:
    t = devchain["tokens"][symbol]
    extra: dict[str, Any] = {"name": t["eip712_name"], "version": t["eip712_version"]}
    if t["transfer_method"] == "permit2":
        extra["assetTransferMethod"] = "permit2"
    return {
        "scheme": scheme,
        "network": devchain["network"],
        "asset": t["address"],
        "amount": str(amount),
        "payTo": pay_to or devchain["accounts"]["payee"]["address"],
        "maxTimeoutSeconds": max_timeout_seconds,
        "extra": extra,
    }


async def sign_async(devchain: dict[str, Any], requirements: dict[str, Any], *, agent: int = 0,
                     url: str = "http://test/resource") -> dict[str, Any]:
    """The PaymentPayload (wire dict) the official client creates for `requirements`."""
    account = Account.from_key(devchain["accounts"]["agents"][agent]["private_key"])
    client = x402Client()
    register_exact_evm_client(client, account)
    client.set_spend_controls(False)  # test tokens are not in the SDK's default-asset table
    req = PaymentRequirements.model_validate(requirements)
    payload = await client.create_payment_payload(PaymentRequired(accepts=[req], resource=ResourceInfo(url=url)))
    return payload.model_dump(by_alias=True, exclude_none=True)


def sign(devchain: dict[str, Any], requirements: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    return asyncio.run(sign_async(devchain, requirements, **kwargs))


def facilitator_body(payload: dict[str, Any], requirements: dict[str, Any]) -> dict[str, Any]:
    return {"x402Version": 2, "paymentPayload": copy.deepcopy(payload), "paymentRequirements": copy.deepcopy(requirements)}


def balance_of(devchain: dict[str, Any], symbol: str, who: str) -> int:
    from devtools.devchain import calldata
    from devtools.rpc import BlockingRpc

    rpc = BlockingRpc(devchain["rpc_url"])
    try:
        data = "0x" + calldata("balanceOf(address)", ["address"], [who]).hex()
        return int(rpc.call("eth_call", {"to": devchain["tokens"][symbol]["address"], "data": data}, "latest"), 16)
    finally:
        rpc.close()


def send_transactions(devchain: dict[str, Any], txs: list[tuple[LocalAccount, str, bytes]]) -> None:
    """Sign and send (account, to, calldata) transactions, nonces in order per sender; wait until all are mined."""
    from devtools.rpc import BlockingRpc

    rpc = BlockingRpc(devchain["rpc_url"])
    try:
        senders = sorted({a.address for a, _, _ in txs})
        counts = rpc.batch([("eth_getTransactionCount", [a, "pending"]) for a in senders])
        nonces = {a: int(c, 16) for a, c in zip(senders, counts, strict=True)}
        raw = []
        for account, to, data in txs:
            tx = {"to": to, "data": data, "gas": 200_000, "chainId": devchain["chain_id"], "type": 2,
                  "nonce": nonces[account.address], "maxFeePerGas": 10**11, "maxPriorityFeePerGas": 10**9, "value": 0}
            nonces[account.address] += 1
            raw.append("0x" + bytes(account.sign_transaction(tx).raw_transaction).hex())
        hashes = rpc.batch([("eth_sendRawTransaction", [r]) for r in raw])
        deadline = time.monotonic() + 10
        while True:
            receipts = rpc.batch([("eth_getTransactionReceipt", [h]) for h in hashes])
            if all(receipts):
                break
            assert time.monotonic() < deadline, "funding transactions were not mined"
            time.sleep(0.01)
        assert all(int(r["status"], 16) == 1 for r in receipts), receipts
    finally:
        rpc.close()
