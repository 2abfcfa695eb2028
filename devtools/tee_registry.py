"""Dev-chain administration of the TEE registry (devtools/contracts/TEERegistry.sol): register a
stand-in enclave (as the registry's owner, with its key and certificate), enable or disable it,
send a heartbeat. Blocking: for tests, the demo and the dev chain's CLI."""

from __future__ import annotations

import time
from typing import Any

from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address

from devtools.devchain import DEV_PCR_HASH, DevChainError, calldata
from devtools.rpc import BlockingRpc
from devtools.tee_enclave import EnclaveIdentity

LLM_PROXY = 0  # TEE type of an LLM proxy enclave (OpenGradient's TEE_TYPE_LLM_PROXY)
_REGISTER_GAS = 3_000_000  # the certificate and key are stored in full


def _send(description: dict[str, Any], account: LocalAccount, to: str, data: bytes, gas: int = 200_000) -> dict[str, Any]:
    rpc = BlockingRpc(description["rpc_url"])
    try:
        nonce = int(rpc.call("eth_getTransactionCount", account.address, "pending"), 16)
        tx = {"to": to, "data": data, "gas": gas, "chainId": description["chain_id"], "type": 2, "nonce": nonce,
              "maxFeePerGas": 10**11, "maxPriorityFeePerGas": 10**9, "value": 0}
        tx_hash = rpc.call("eth_sendRawTransaction", "0x" + bytes(account.sign_transaction(tx).raw_transaction).hex())
        deadline = time.monotonic() + 15
        while not (receipt := rpc.call("eth_getTransactionReceipt", tx_hash)):
            if time.monotonic() > deadline:
                raise DevChainError(f"transaction {tx_hash} was not mined")
            time.sleep(0.01)
    finally:
        rpc.close()
    if int(receipt["status"], 16) != 1:
        raise DevChainError(f"transaction {tx_hash} reverted")
    return receipt


def deploy_registry(description: dict[str, Any]) -> str:
    """A fresh, empty TEERegistry (the dev PCR approved), owned by the registry admin: for tests
    that need enclaves of their own."""
    from devtools.solidity import load_contracts

    account = admin(description)
    code = bytes.fromhex(load_contracts()["TEERegistry"]["bytecode"][2:])
    rpc = BlockingRpc(description["rpc_url"])
    try:
        nonce = int(rpc.call("eth_getTransactionCount", account.address, "pending"), 16)
        tx = {"data": code, "gas": 5_000_000, "chainId": description["chain_id"], "type": 2, "nonce": nonce,
              "maxFeePerGas": 10**11, "maxPriorityFeePerGas": 10**9, "value": 0}
        tx_hash = rpc.call("eth_sendRawTransaction", "0x" + bytes(account.sign_transaction(tx).raw_transaction).hex())
        deadline = time.monotonic() + 15
        while not (receipt := rpc.call("eth_getTransactionReceipt", tx_hash)):
            if time.monotonic() > deadline:
                raise DevChainError("the registry was not deployed in time")
            time.sleep(0.01)
    finally:
        rpc.close()
    address: str = to_checksum_address(receipt["contractAddress"])
    _send(description, account, address, calldata("setPCRApproved(bytes32,bool)", ["bytes32", "bool"],
                                                  [DEV_PCR_HASH, True]))
    return address


def admin(description: dict[str, Any]) -> LocalAccount:
    return Account.from_key(description["accounts"]["tee_admin"]["private_key"])


def operator(description: dict[str, Any], index: int = 0) -> LocalAccount:
    return Account.from_key(description["accounts"]["tee_operators"][index]["private_key"])


def register(description: dict[str, Any], identity: EnclaveIdentity, endpoint: str, *, operator_index: int = 0,
             payment_address: str | None = None, tee_type: int = LLM_PROXY, registry: str | None = None) -> str:
    """Register `identity` at `endpoint`; returns its tee_id (0x-hex)."""
    op = operator(description, operator_index)
    data = calldata("registerTEE(address,address,string,bytes,bytes,bytes32,uint8)",
                    ["address", "address", "string", "bytes", "bytes", "bytes32", "uint8"],
                    [op.address, payment_address or op.address, endpoint, identity.public_key_der,
                     identity.certificate_der, DEV_PCR_HASH, tee_type])
    _send(description, admin(description), registry or description["contracts"]["tee_registry"], data,
          gas=_REGISTER_GAS)
    return identity.tee_id


def set_enabled(description: dict[str, Any], tee_id: str, enabled: bool) -> None:
    data = calldata("setTEEEnabled(bytes32,bool)", ["bytes32", "bool"], [bytes.fromhex(tee_id[2:]), enabled])
    _send(description, admin(description), description["contracts"]["tee_registry"], data)


def heartbeat(description: dict[str, Any], tee_id: str, *, operator_index: int = 0) -> None:
    data = calldata("heartbeat(bytes32)", ["bytes32"], [bytes.fromhex(tee_id[2:])])
    _send(description, operator(description, operator_index), description["contracts"]["tee_registry"], data)
