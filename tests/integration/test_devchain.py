"""The dev chain against a real anvil: Permit2, our x402 proxies, OPG/USDC and the CLI.

Payers, payees and transaction senders are fresh accounts made per test, so these tests leave the
description's shared accounts (used by other test files) untouched.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import abi_to_signature, keccak
from web3 import Web3
from web3.exceptions import ContractCustomError, ContractLogicError
from web3.logs import DISCARD
from x402.mechanisms.evm import constants as x402c

from devtools.devchain import (
    CANONICAL_TOKENS,
    DevChain,
    load_description,
    permit2_domain_separator,
)
from devtools.solidity import load_contracts

pytestmark = pytest.mark.integration

PROJECT_ROOT = Path(__file__).resolve().parents[2]
MAX_UINT256 = 2**256 - 1
EXACT_WITNESS_TYPE_STRING = (
    "Witness witness)TokenPermissions(address token,uint256 amount)Witness(address to,uint256 validAfter)"
)
UPTO_WITNESS_TYPE_STRING = (
    "Witness witness)TokenPermissions(address token,uint256 amount)"
    "Witness(address to,address facilitator,uint256 validAfter)"
)
PERMIT2_ABI = [
    {"type": "function", "name": "DOMAIN_SEPARATOR", "stateMutability": "view", "inputs": [],
     "outputs": [{"name": "", "type": "bytes32"}]},
    {"type": "function", "name": "nonceBitmap", "stateMutability": "view",
     "inputs": [{"name": "owner", "type": "address"}, {"name": "word", "type": "uint256"}],
     "outputs": [{"name": "", "type": "uint256"}]},
]
TRANSFER_WITH_AUTHORIZATION_TYPES = {
    "TransferWithAuthorization": [
        {"name": "from", "type": "address"}, {"name": "to", "type": "address"},
        {"name": "value", "type": "uint256"}, {"name": "validAfter", "type": "uint256"},
        {"name": "validBefore", "type": "uint256"}, {"name": "nonce", "type": "bytes32"},
    ]
}


def error_selector(signature: str) -> str:
    return "0x" + keccak(text=signature)[:4].hex()


INVALID_SIGNER = error_selector("InvalidSigner()")  # Permit2
INVALID_NONCE = error_selector("InvalidNonce()")  # Permit2


class Chain:
    """web3 access to the session's dev chain with a few helpers."""

    def __init__(self, description: dict[str, Any]) -> None:
        self.d = description
        self.w3 = Web3(Web3.HTTPProvider(description["rpc_url"]))
        self.abis = {name: c["abi"] for name, c in load_contracts().items()}
        self.permit2 = self.w3.eth.contract(description["contracts"]["permit2"], abi=PERMIT2_ABI)
        self.exact = self.w3.eth.contract(description["contracts"]["exact_proxy"],
                                          abi=self.abis["X402ExactPermit2Proxy"])
        self.upto = self.w3.eth.contract(description["contracts"]["upto_proxy"],
                                         abi=self.abis["X402UptoPermit2Proxy"])
        self.opg = self.w3.eth.contract(description["tokens"]["OPG"]["address"], abi=self.abis["OpgToken"])
        self.usdc = self.w3.eth.contract(description["tokens"]["USDC"]["address"], abi=self.abis["UsdcToken"])

    def new_account(self) -> LocalAccount:
        account = Account.create()
        self.w3.provider.make_request("anvil_setBalance", [account.address, hex(10**21)])
        return account

    def send(self, sender: LocalAccount, fn: Any, gas: int = 500_000) -> Any:
        tx = fn.build_transaction({
            "from": sender.address, "gas": gas, "chainId": self.d["chain_id"],
            "nonce": self.w3.eth.get_transaction_count(sender.address, "pending"),
            "maxFeePerGas": 10**11, "maxPriorityFeePerGas": 10**9,
        })
        tx_hash = self.w3.eth.send_raw_transaction(sender.sign_transaction(tx).raw_transaction)
        return self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=10, poll_latency=0.005)

    def payer(self, *, opg: int = 10**21, usdc: int = 10**9, approve_permit2: bool = True) -> LocalAccount:
        account = self.new_account()
        for token, amount in ((self.opg, opg), (self.usdc, usdc)):
            assert self.send(account, token.functions.mint(account.address, amount)).status == 1
            if approve_permit2:
                approve = token.functions.approve(self.d["contracts"]["permit2"], MAX_UINT256)
                assert self.send(account, approve).status == 1
        return account

    def sign_permit2(self, payer: LocalAccount, *, spender: str, token: str, amount: int, witness: dict[str, Any],
                     types: dict[str, Any], nonce: int | None = None, deadline: int | None = None) -> dict[str, Any]:
        message = {
            "permitted": {"token": token, "amount": amount},
            "spender": spender,
            "nonce": secrets.randbits(256) if nonce is None else nonce,
            "deadline": int(time.time()) + 3600 if deadline is None else deadline,
            "witness": witness,
        }
        domain = {"name": "Permit2", "chainId": self.d["chain_id"],
                  "verifyingContract": self.d["contracts"]["permit2"]}
        signature = payer.sign_typed_data(domain, types, message).signature
        permit = ((token, amount), message["nonce"], message["deadline"])
        return {"permit": permit, "signature": bytes(signature), "message": message}


@pytest.fixture(scope="module")
def chain(devchain: dict[str, Any]) -> Chain:
    return Chain(devchain)


def expect_custom_error(call: Any, selector: str) -> None:
    with pytest.raises(ContractCustomError) as info:
        call()
    data = info.value.data if isinstance(info.value.data, str) else str(info.value.data)
    assert data.startswith(selector), data


# ---------------------------------------------------------------------------------------------
# Static shape


def test_permit2_domain_separator(chain: Chain) -> None:
    separator = chain.permit2.functions.DOMAIN_SEPARATOR().call()
    assert separator == permit2_domain_separator(chain.d["chain_id"])
    expected = keccak(
        keccak(text="EIP712Domain(string name,uint256 chainId,address verifyingContract)")
        + keccak(text="Permit2")
        + chain.d["chain_id"].to_bytes(32, "big")
        + bytes(12) + bytes.fromhex(chain.d["contracts"]["permit2"][2:])
    )
    assert separator == expected


def test_proxies_live_at_canonical_addresses(chain: Chain) -> None:
    assert chain.d["contracts"]["exact_proxy"] == x402c.X402_EXACT_PERMIT2_PROXY_ADDRESS
    assert chain.d["contracts"]["upto_proxy"] == x402c.X402_UPTO_PERMIT2_PROXY_ADDRESS
    for proxy, type_string, type_hash in (
        (chain.exact, EXACT_WITNESS_TYPE_STRING, "Witness(address to,uint256 validAfter)"),
        (chain.upto, UPTO_WITNESS_TYPE_STRING, "Witness(address to,address facilitator,uint256 validAfter)"),
    ):
        assert len(chain.w3.eth.get_code(proxy.address)) > 1000
        assert proxy.functions.PERMIT2().call() == chain.d["contracts"]["permit2"]
        assert proxy.functions.WITNESS_TYPE_STRING().call() == type_string
        assert proxy.functions.WITNESS_TYPEHASH().call() == keccak(text=type_hash)


def test_abis_cover_what_the_x402_sdk_calls() -> None:
    abis = {name: c["abi"] for name, c in load_contracts().items()}

    def selectors(abi: list[dict[str, Any]]) -> set[str]:
        return {abi_to_signature(e) for e in abi if e.get("type") == "function"}

    wanted = {
        "X402ExactPermit2Proxy": (x402c.X402_EXACT_PERMIT2_PROXY_ABI
                                  + x402c.X402_EXACT_PERMIT2_PROXY_SETTLE_WITH_PERMIT_ABI),
        "X402UptoPermit2Proxy": (x402c.X402_UPTO_PERMIT2_PROXY_ABI
                                 + x402c.X402_UPTO_PERMIT2_PROXY_SETTLE_WITH_PERMIT_ABI),
        "UsdcToken": (x402c.TRANSFER_WITH_AUTHORIZATION_VRS_ABI + x402c.TRANSFER_WITH_AUTHORIZATION_BYTES_ABI
                      + x402c.AUTHORIZATION_STATE_ABI + x402c.NAME_ABI + x402c.VERSION_ABI + x402c.BALANCE_OF_ABI
                      + x402c.EIP2612_NONCES_ABI + x402c.ERC20_ALLOWANCE_ABI + x402c.ERC20_APPROVE_ABI),
        "OpgToken": (x402c.NAME_ABI + x402c.VERSION_ABI + x402c.BALANCE_OF_ABI + x402c.EIP2612_NONCES_ABI
                     + x402c.ERC20_ALLOWANCE_ABI + x402c.ERC20_APPROVE_ABI),
    }
    for contract, sdk_abi in wanted.items():
        missing = selectors(sdk_abi) - selectors(abis[contract])
        assert not missing, f"{contract} lacks {missing}"


def test_agents_are_funded_and_approved(chain: Chain) -> None:
    assert len(chain.d["accounts"]["agents"]) == 4
    permit2 = chain.d["contracts"]["permit2"]
    for agent in chain.d["accounts"]["agents"]:
        assert Account.from_key(agent["private_key"]).address == agent["address"]
        for token, decimals in ((chain.opg, 18), (chain.usdc, 6)):
            assert token.functions.balanceOf(agent["address"]).call() >= 10**decimals
            assert token.functions.allowance(agent["address"], permit2).call() == MAX_UINT256
    assert chain.opg.functions.decimals().call() == 18
    assert chain.usdc.functions.decimals().call() == 6
    assert (chain.usdc.functions.name().call(), chain.usdc.functions.version().call()) == ("USD Coin", "2")
    assert chain.opg.functions.name().call() == "OpenGradient"
    assert list(chain.opg.functions.eip712Domain().call()[1:3]) == ["OpenGradient", "1"]


# ---------------------------------------------------------------------------------------------
# Exact proxy


def test_exact_settle_moves_exactly_the_amount(chain: Chain) -> None:
    payer, payee, sender = chain.payer(), chain.new_account(), chain.new_account()
    amount = 12_345
    p = chain.sign_permit2(payer, spender=chain.exact.address, token=chain.opg.address, amount=amount,
                           witness={"to": payee.address, "validAfter": 0}, types=x402c.PERMIT2_WITNESS_TYPES)
    before = chain.opg.functions.balanceOf(payer.address).call()
    receipt = chain.send(sender, chain.exact.functions.settle(p["permit"], payer.address, (payee.address, 0),
                                                             p["signature"]))
    assert receipt.status == 1
    print(f"\nexact settle gas: {receipt.gasUsed}")
    assert chain.opg.functions.balanceOf(payee.address).call() == amount
    assert chain.opg.functions.balanceOf(payer.address).call() == before - amount
    assert chain.exact.events.Settled().process_receipt(receipt, errors=DISCARD)

    # a second settle through the same (storage-less, setCode'd) proxy works: the guard is reset
    p2 = chain.sign_permit2(payer, spender=chain.exact.address, token=chain.opg.address, amount=1,
                            witness={"to": payee.address, "validAfter": 0}, types=x402c.PERMIT2_WITNESS_TYPES)
    assert chain.send(sender, chain.exact.functions.settle(p2["permit"], payer.address, (payee.address, 0),
                                                           p2["signature"])).status == 1
    # replaying the first one hits Permit2's nonce bitmap
    replay = chain.exact.functions.settle(p["permit"], payer.address, (payee.address, 0), p["signature"])
    expect_custom_error(lambda: replay.call({"from": sender.address}), INVALID_NONCE)


def test_exact_settle_rejects_tampering(chain: Chain) -> None:
    payer, payee, sender = chain.payer(), chain.new_account(), chain.new_account()
    amount = 1_000
    witness = {"to": payee.address, "validAfter": 0}
    p = chain.sign_permit2(payer, spender=chain.exact.address, token=chain.opg.address, amount=amount,
                           witness=witness, types=x402c.PERMIT2_WITNESS_TYPES)
    (_, amt), nonce, deadline = p["permit"]
    settle = chain.exact.functions.settle
    tx = {"from": sender.address}

    more = ((chain.opg.address, amount + 1), nonce, deadline)
    expect_custom_error(lambda: settle(more, payer.address, (payee.address, 0), p["signature"]).call(tx),
                        INVALID_SIGNER)
    other_payee = chain.new_account().address
    expect_custom_error(lambda: settle(p["permit"], payer.address, (other_payee, 0), p["signature"]).call(tx),
                        INVALID_SIGNER)
    # a witness signed under another type (x402's upto type) is not an exact witness
    upto_types = x402c.UPTO_PERMIT2_WITNESS_TYPES
    q = chain.sign_permit2(payer, spender=chain.exact.address, token=chain.opg.address, amount=amount,
                           witness={**witness, "facilitator": sender.address}, types=upto_types)
    expect_custom_error(lambda: settle(q["permit"], payer.address, (payee.address, 0), q["signature"]).call(tx),
                        INVALID_SIGNER)
    # a tampered transaction really reverts on chain and moves nothing
    receipt = chain.send(sender, settle(more, payer.address, (payee.address, 0), p["signature"]))
    assert receipt.status == 0
    assert chain.opg.functions.balanceOf(payee.address).call() == 0


def test_exact_settle_argument_checks(chain: Chain) -> None:
    payer, payee, sender = chain.payer(), chain.new_account(), chain.new_account()
    settle, tx, zero = chain.exact.functions.settle, {"from": sender.address}, "0x" + "00" * 20
    later = int(time.time()) + 3600
    p = chain.sign_permit2(payer, spender=chain.exact.address, token=chain.opg.address, amount=5,
                           witness={"to": payee.address, "validAfter": later}, types=x402c.PERMIT2_WITNESS_TYPES)
    expect_custom_error(lambda: settle(p["permit"], payer.address, (payee.address, later), p["signature"]).call(tx),
                        error_selector("PaymentTooEarly()"))
    expect_custom_error(lambda: settle(p["permit"], zero, (payee.address, 0), p["signature"]).call(tx),
                        error_selector("InvalidOwner()"))
    expect_custom_error(lambda: settle(p["permit"], payer.address, (zero, 0), p["signature"]).call(tx),
                        error_selector("InvalidDestination()"))
    (token, _), nonce, deadline = p["permit"]
    expect_custom_error(lambda: settle(((token, 0), nonce, deadline), payer.address, (payee.address, 0),
                                       p["signature"]).call(tx), error_selector("InvalidAmount()"))


def test_exact_settle_with_eip2612_permit(chain: Chain) -> None:
    payer = chain.payer(approve_permit2=False)
    payee, sender = chain.new_account(), chain.new_account()
    permit2, amount = chain.d["contracts"]["permit2"], 777
    deadline = int(time.time()) + 3600
    signed_2612 = payer.sign_typed_data(
        {"name": "OpenGradient", "version": "1", "chainId": chain.d["chain_id"],
         "verifyingContract": chain.opg.address},
        x402c.EIP2612_PERMIT_TYPES,
        {"owner": payer.address, "spender": permit2, "value": amount, "nonce": 0, "deadline": deadline},
    )
    permit2612 = (amount, deadline, signed_2612.r.to_bytes(32, "big"), signed_2612.s.to_bytes(32, "big"),
                  signed_2612.v)
    p = chain.sign_permit2(payer, spender=chain.exact.address, token=chain.opg.address, amount=amount,
                           witness={"to": payee.address, "validAfter": 0}, types=x402c.PERMIT2_WITNESS_TYPES)
    fn = chain.exact.functions.settleWithPermit
    mismatch = (amount + 1, *permit2612[1:])
    expect_custom_error(
        lambda: fn(mismatch, p["permit"], payer.address, (payee.address, 0), p["signature"]).call(
            {"from": sender.address}),
        error_selector("Permit2612AmountMismatch()"))
    receipt = chain.send(sender, fn(permit2612, p["permit"], payer.address, (payee.address, 0), p["signature"]))
    assert receipt.status == 1
    assert chain.exact.events.SettledWithPermit().process_receipt(receipt, errors=DISCARD)
    assert chain.opg.functions.balanceOf(payee.address).call() == amount

    # the same (now used) 2612 permit fails inside the proxy, which logs it and still settles:
    # Permit2 keeps no allowance left (777 spent), so approve first to exercise the "existing allowance" path
    assert chain.send(payer, chain.opg.functions.approve(permit2, amount)).status == 1
    p2 = chain.sign_permit2(payer, spender=chain.exact.address, token=chain.opg.address, amount=amount,
                            witness={"to": payee.address, "validAfter": 0}, types=x402c.PERMIT2_WITNESS_TYPES)
    receipt = chain.send(sender, fn(permit2612, p2["permit"], payer.address, (payee.address, 0), p2["signature"]))
    assert receipt.status == 1
    failed = chain.exact.events.EIP2612PermitFailedWithData().process_receipt(receipt, errors=DISCARD)
    assert failed and failed[0].args.owner == payer.address
    assert chain.opg.functions.balanceOf(payee.address).call() == 2 * amount


# ---------------------------------------------------------------------------------------------
# Upto proxy


def test_upto_settles_less_only_from_the_named_facilitator(chain: Chain) -> None:
    payer, payee = chain.payer(), chain.new_account()
    facilitator, stranger = chain.new_account(), chain.new_account()
    permitted, charged = 10_000, 4_321
    witness = (payee.address, facilitator.address, 0)
    p = chain.sign_permit2(payer, spender=chain.upto.address, token=chain.opg.address, amount=permitted,
                           witness={"to": payee.address, "facilitator": facilitator.address, "validAfter": 0},
                           types=x402c.UPTO_PERMIT2_WITNESS_TYPES)
    settle = chain.upto.functions.settle

    expect_custom_error(
        lambda: settle(p["permit"], charged, payer.address, witness, p["signature"]).call({"from": stranger.address}),
        error_selector("UnauthorizedFacilitator()"))
    assert chain.send(stranger, settle(p["permit"], charged, payer.address, witness, p["signature"])).status == 0
    expect_custom_error(
        lambda: settle(p["permit"], permitted + 1, payer.address, witness, p["signature"]).call(
            {"from": facilitator.address}),
        error_selector("AmountExceedsPermitted()"))
    # naming another facilitator in the submitted witness breaks the signature
    other = (payee.address, stranger.address, 0)
    expect_custom_error(
        lambda: settle(p["permit"], charged, payer.address, other, p["signature"]).call({"from": stranger.address}),
        INVALID_SIGNER)

    receipt = chain.send(facilitator, settle(p["permit"], charged, payer.address, witness, p["signature"]))
    assert receipt.status == 1
    print(f"\nupto settle gas: {receipt.gasUsed}")
    assert chain.opg.functions.balanceOf(payee.address).call() == charged
    assert chain.upto.events.Settled().process_receipt(receipt, errors=DISCARD)


# ---------------------------------------------------------------------------------------------
# USDC / EIP-3009


def _sign_3009(chain: Chain, payer: LocalAccount, to: str, value: int, **overrides: Any) -> dict[str, Any]:
    message = {"from": payer.address, "to": to, "value": value, "validAfter": 0,
               "validBefore": int(time.time()) + 3600, "nonce": secrets.token_bytes(32), **overrides}
    domain = {"name": "USD Coin", "version": "2", "chainId": chain.d["chain_id"],
              "verifyingContract": chain.usdc.address}
    signed = payer.sign_typed_data(domain, TRANSFER_WITH_AUTHORIZATION_TYPES, message)
    return {"message": message, "signed": signed}


def test_eip3009_transfer_and_replay(chain: Chain) -> None:
    payer, payee, sender = chain.payer(), chain.new_account(), chain.new_account()
    value = 2_500_000
    a = _sign_3009(chain, payer, payee.address, value)
    m, s = a["message"], a["signed"]
    args = (m["from"], m["to"], m["value"], m["validAfter"], m["validBefore"], m["nonce"])
    vrs = (s.v, s.r.to_bytes(32, "big"), s.s.to_bytes(32, "big"))
    transfer = chain.usdc.get_function_by_signature(
        "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)")

    receipt = chain.send(sender, transfer(*args, *vrs))
    assert receipt.status == 1
    print(f"\nEIP-3009 transferWithAuthorization gas: {receipt.gasUsed}")
    assert chain.usdc.functions.balanceOf(payee.address).call() == value
    assert chain.usdc.functions.authorizationState(payer.address, m["nonce"]).call() is True
    used = chain.usdc.events.AuthorizationUsed().process_receipt(receipt, errors=DISCARD)
    assert used and used[0].args.nonce == m["nonce"]

    with pytest.raises(ContractLogicError, match="FiatTokenV2: authorization is used or canceled"):
        transfer(*args, *vrs).call({"from": sender.address})
    assert chain.send(sender, transfer(*args, *vrs)).status == 0
    assert chain.usdc.functions.balanceOf(payee.address).call() == value


def test_eip3009_bytes_overload_and_error_strings(chain: Chain) -> None:
    payer, payee, sender = chain.payer(), chain.new_account(), chain.new_account()
    transfer = chain.usdc.get_function_by_signature(
        "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)")
    tx = {"from": sender.address}

    def args(a: dict[str, Any]) -> tuple[Any, ...]:
        m = a["message"]
        return (m["from"], m["to"], m["value"], m["validAfter"], m["validBefore"], m["nonce"],
                bytes(a["signed"].signature))

    now = int(time.time())
    cases = [
        (_sign_3009(chain, payer, payee.address, 1, validAfter=now + 3600), "authorization is not yet valid"),
        (_sign_3009(chain, payer, payee.address, 1, validBefore=now - 10), "authorization is expired"),
    ]
    for a, reason in cases:
        with pytest.raises(ContractLogicError, match=f"FiatTokenV2: {reason}"):
            transfer(*args(a)).call(tx)
    good = _sign_3009(chain, payer, payee.address, 3)
    forged = (*args(good)[:2], 4, *args(good)[3:])
    with pytest.raises(ContractLogicError, match="FiatTokenV2: invalid signature"):
        transfer(*forged).call(tx)
    assert chain.send(sender, transfer(*args(good))).status == 1
    assert chain.usdc.functions.balanceOf(payee.address).call() == 3


def test_eip3009_receive_and_cancel(chain: Chain) -> None:
    payer, payee = chain.payer(), chain.new_account()
    domain = {"name": "USD Coin", "version": "2", "chainId": chain.d["chain_id"],
              "verifyingContract": chain.usdc.address}
    receive_types = {"ReceiveWithAuthorization": TRANSFER_WITH_AUTHORIZATION_TYPES["TransferWithAuthorization"]}
    m = {"from": payer.address, "to": payee.address, "value": 9, "validAfter": 0,
         "validBefore": int(time.time()) + 3600, "nonce": secrets.token_bytes(32)}
    sig = bytes(payer.sign_typed_data(domain, receive_types, m).signature)
    receive = chain.usdc.get_function_by_signature(
        "receiveWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)")
    args = (*m.values(), sig)
    with pytest.raises(ContractLogicError, match="FiatTokenV2: caller must be the payee"):
        receive(*args).call({"from": chain.new_account().address})
    # a receive authorization is not a transfer authorization (different typehash)
    transfer = chain.usdc.get_function_by_signature(
        "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)")
    with pytest.raises(ContractLogicError, match="FiatTokenV2: invalid signature"):
        transfer(*args).call({"from": payee.address})
    assert chain.send(payee, receive(*args)).status == 1
    assert chain.usdc.functions.balanceOf(payee.address).call() == 9

    a = _sign_3009(chain, payer, payee.address, 5)
    cancel_types = {"CancelAuthorization": [{"name": "authorizer", "type": "address"},
                                            {"name": "nonce", "type": "bytes32"}]}
    nonce = a["message"]["nonce"]
    cancel_sig = bytes(payer.sign_typed_data(domain, cancel_types,
                                             {"authorizer": payer.address, "nonce": nonce}).signature)
    cancel = chain.usdc.get_function_by_signature("cancelAuthorization(address,bytes32,bytes)")
    receipt = chain.send(payee, cancel(payer.address, nonce, cancel_sig))
    assert receipt.status == 1
    assert chain.usdc.events.AuthorizationCanceled().process_receipt(receipt, errors=DISCARD)
    assert chain.usdc.functions.authorizationState(payer.address, nonce).call() is True
    with pytest.raises(ContractLogicError, match="FiatTokenV2: authorization is used or canceled"):
        transfer(*a["message"].values(), bytes(a["signed"].signature)).call({"from": payee.address})


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_writes_description(tmp_path: Path, free_port: int) -> None:
    out = tmp_path / "devchain.json"
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "facilitator.cli", "devchain", "--port", str(free_port), "--agents", "2",
         "--facilitators", "1", "--out", str(out)],
        cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not out.exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "devchain did not write its description"
            time.sleep(0.05)
        d = load_description(out)
        assert json.loads(out.read_text()) == d
        assert set(d) == {"rpc_url", "chain_id", "network", "contracts", "tokens", "accounts"}
        assert d["rpc_url"] == f"http://127.0.0.1:{free_port}"
        assert (d["chain_id"], d["network"]) == (84532, "eip155:84532")
        tee_contracts = {k: d["contracts"].pop(k) for k in ("tee_registry", "settlement_relay")}
        assert all(re.fullmatch(r"0x[0-9a-fA-F]{40}", a) for a in tee_contracts.values()), tee_contracts
        assert d["contracts"] == {"permit2": "0x000000000022D473030F116dDEE9F6B43aC78BA3",
                                  "exact_proxy": "0x402085c248EeA27D92E8b30b2C58ed07f9E20001",
                                  "upto_proxy": "0x4020A4f3b7b90ccA423B9fabCc0CE57C6C240002",
                                  "batch_settlement": "0x4020074e9dF2ce1deE5A9C1b5c3f541D02a10003",
                                  "erc3009_deposit_collector": "0x4020806089470a89826cB9fB1f4059150b550004",
                                  "permit2_deposit_collector": "0x4020425FAf3B746C082C2f942b4E5159887B0005"}
        assert set(d["tokens"]) == {"OPG", "USDC"}
        assert {k: v for k, v in d["tokens"]["OPG"].items() if k != "address"} == {
            "decimals": 18, "transfer_method": "permit2", "eip712_name": "OpenGradient", "eip712_version": "1"}
        assert {k: v for k, v in d["tokens"]["USDC"].items() if k != "address"} == {
            "decimals": 6, "transfer_method": "eip3009", "eip712_name": "USD Coin", "eip712_version": "2"}
        accounts = d["accounts"]
        assert set(accounts) == {"facilitator", "payee", "agents", "tee_admin", "tee_operators"}
        assert len(accounts["facilitator"]) == 1 and len(accounts["agents"]) == 2
        for entry in [*accounts["facilitator"], accounts["payee"], *accounts["agents"]]:
            assert set(entry) == {"address", "private_key"}
            assert Web3.is_checksum_address(entry["address"])
            assert Account.from_key(entry["private_key"]).address == entry["address"]
        for token in d["tokens"].values():
            assert Web3.is_checksum_address(token["address"])
        w3 = Web3(Web3.HTTPProvider(d["rpc_url"]))
        assert w3.eth.chain_id == 84532
    finally:
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 0, stderr
    assert d["contracts"]["exact_proxy"] in stdout and d["rpc_url"] in stdout
    assert all(e["private_key"][2:] not in stdout for e in [accounts["payee"], *accounts["agents"]])
    with pytest.raises(Exception):  # noqa: B017 - whichever connection error web3 raises for a dead node
        _ = Web3(Web3.HTTPProvider(d["rpc_url"], request_kwargs={"timeout": 1})).eth.chain_id


def test_devchain_rejects_chain_31337() -> None:
    from devtools.devchain import DevChainError

    with pytest.raises(DevChainError, match="31337"):
        DevChain(chain_id=31337)


def test_devchain_on_base_puts_the_tokens_at_their_base_addresses(free_port: int) -> None:
    """Clients that hard-code OPG's and USDC's Base addresses (OpenGradient's `ensure_opg_approval`)
    work unchanged against `devchain --chain-id 8453`: same addresses, same EIP-712 domains,
    funded and approved agents, and signatures that bind to those addresses."""
    opg, usdc = CANONICAL_TOKENS[8453]["OPG"], CANONICAL_TOKENS[8453]["USDC"]
    assert opg == "0xFbC2051AE2265686a469421b2C5A2D5462FbF5eB" and usdc == "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"
    with DevChain(port=free_port, chain_id=8453, agents=1, facilitators=1) as dev:
        d = dev.description
        assert d["network"] == "eip155:8453"
        assert (d["tokens"]["OPG"]["address"], d["tokens"]["USDC"]["address"]) == (opg, usdc)
        chain = Chain(d)
        for token, name, symbol, version, decimals in ((chain.opg, "OpenGradient", "OPG", "1", 18),
                                                        (chain.usdc, "USD Coin", "USDC", "2", 6)):
            assert (token.functions.name().call(), token.functions.symbol().call()) == (name, symbol)
            assert token.functions.decimals().call() == decimals and token.functions.version().call() == version
            _, domain_name, domain_version, chain_id, contract, _, _ = token.functions.eip712Domain().call()
            assert (domain_name, domain_version, chain_id, contract) == (name, version, 8453, token.address)
            agent = d["accounts"]["agents"][0]["address"]
            assert token.functions.balanceOf(agent).call() == 10**6 * 10**decimals
            assert token.functions.allowance(agent, d["contracts"]["permit2"]).call() == MAX_UINT256

        # An EIP-2612 permit signed for OPG's Base address is accepted there ...
        owner, spender = chain.new_account(), chain.new_account()
        deadline = int(time.time()) + 3600
        signed = owner.sign_typed_data(
            {"name": "OpenGradient", "version": "1", "chainId": 8453, "verifyingContract": opg},
            x402c.EIP2612_PERMIT_TYPES,
            {"owner": owner.address, "spender": spender.address, "value": 5, "nonce": 0, "deadline": deadline})
        permit = chain.opg.functions.permit(owner.address, spender.address, 5, deadline, signed.v,
                                            signed.r.to_bytes(32, "big"), signed.s.to_bytes(32, "big"))
        assert chain.send(spender, permit).status == 1
        assert chain.opg.functions.allowance(owner.address, spender.address).call() == 5
        # ... and so is an EIP-3009 transfer signed for USDC's.
        payer, payee = chain.payer(), chain.new_account()
        a = _sign_3009(chain, payer, payee.address, 1_234)
        m, s = a["message"], a["signed"]
        transfer = chain.usdc.get_function_by_signature(
            "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)")
        receipt = chain.send(payer, transfer(m["from"], m["to"], m["value"], m["validAfter"], m["validBefore"],
                                             m["nonce"], s.v, s.r.to_bytes(32, "big"), s.s.to_bytes(32, "big")))
        assert receipt.status == 1 and chain.usdc.functions.balanceOf(payee.address).call() == 1_234
        pid = dev.pid
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_the_default_chain_keeps_its_deployed_token_addresses(devchain: dict[str, Any]) -> None:
    assert devchain["chain_id"] == 84532 and 84532 not in CANONICAL_TOKENS
    assert {t["address"] for t in devchain["tokens"].values()}.isdisjoint(CANONICAL_TOKENS[8453].values())
