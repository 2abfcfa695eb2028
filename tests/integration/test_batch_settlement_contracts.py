"""Our batch-settlement escrow and deposit collectors at the canonical addresses, driven through
the official x402 SDK's ABI, EIP-712 types and encoders (so the SDK's view of the contract is what
is tested): deposits by ERC-3009 and Permit2, claim, claimWithSignature, settle, refund,
refundWithSignature, and the timed withdrawal with its bounds and its race against claims.

The module runs its own anvil: the withdrawal tests move the chain's clock (evm_increaseTime,
relative to the chain's own latest block), which must not leak into the session's shared chain.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import keccak, to_checksum_address
from web3 import Web3
from web3.exceptions import ContractCustomError
from web3.logs import DISCARD
from x402.mechanisms.evm.batch_settlement import constants as bsc
from x402.mechanisms.evm.batch_settlement.abi import BATCH_SETTLEMENT_ABI
from x402.mechanisms.evm.batch_settlement.authorizer_signer import (
    LocalAuthorizerSigner,
    sign_claim_batch,
    sign_refund,
)
from x402.mechanisms.evm.batch_settlement.encoding import (
    build_erc3009_collector_data,
    build_erc3009_deposit_nonce,
    build_permit2_collector_data,
)
from x402.mechanisms.evm.batch_settlement.types import ChannelConfig, VoucherClaim
from x402.mechanisms.evm.batch_settlement.utils import compute_channel_id, get_batch_settlement_eip712_domain

from devtools.devchain import DevChain
from devtools.solidity import load_contracts

pytestmark = pytest.mark.integration

MAX_UINT256 = 2**256 - 1
ZERO = "0x0000000000000000000000000000000000000000"


def selector(signature: str) -> str:
    return "0x" + keccak(text=signature)[:4].hex()


class Chain:
    def __init__(self, devchain: DevChain) -> None:
        self.d = devchain.description
        self.chain_id: int = self.d["chain_id"]
        self.network: str = self.d["network"]
        self.w3 = Web3(Web3.HTTPProvider(self.d["rpc_url"]))
        abis = {name: c["abi"] for name, c in load_contracts().items()}
        self.batch = self.w3.eth.contract(bsc.BATCH_SETTLEMENT_ADDRESS, abi=BATCH_SETTLEMENT_ABI)
        self.ours = self.w3.eth.contract(bsc.BATCH_SETTLEMENT_ADDRESS, abi=abis["X402BatchSettlement"])
        self.erc3009_collector = self.w3.eth.contract(bsc.ERC3009_DEPOSIT_COLLECTOR_ADDRESS,
                                                      abi=abis["X402Erc3009DepositCollector"])
        self.usdc = self.w3.eth.contract(self.d["tokens"]["USDC"]["address"], abi=abis["UsdcToken"])
        self.opg = self.w3.eth.contract(self.d["tokens"]["OPG"]["address"], abi=abis["OpgToken"])

    def new_account(self) -> LocalAccount:
        account = Account.create()
        self.w3.provider.make_request("anvil_setBalance", [account.address, hex(10**21)])
        return account

    def send(self, sender: LocalAccount, fn: Any, gas: int = 1_000_000) -> Any:
        tx = fn.build_transaction({
            "from": sender.address, "gas": gas, "chainId": self.chain_id,
            "nonce": self.w3.eth.get_transaction_count(sender.address, "pending"),
            "maxFeePerGas": 10**11, "maxPriorityFeePerGas": 10**9,
        })
        tx_hash = self.w3.eth.send_raw_transaction(sender.sign_transaction(tx).raw_transaction)
        receipt = self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=10, poll_latency=0.005)
        assert receipt.status == 1, receipt
        return receipt

    def payer(self) -> LocalAccount:
        account = self.new_account()
        for token, amount in ((self.usdc, 10**12), (self.opg, 10**24)):
            self.send(account, token.functions.mint(account.address, amount))
            self.send(account, token.functions.approve(self.d["contracts"]["permit2"], MAX_UINT256))
        return account

    def travel(self, seconds: int) -> None:
        """Move the chain's clock forward by `seconds` past its latest block and mine."""
        self.w3.provider.make_request("evm_increaseTime", [seconds])
        self.w3.provider.make_request("evm_mine", [])

    def now(self) -> int:
        return int(self.w3.eth.get_block("latest")["timestamp"])


@dataclass
class Channel:
    chain: Chain
    payer: LocalAccount
    payer_authorizer: LocalAccount
    receiver: LocalAccount
    receiver_authorizer: LocalAccount
    token: Any
    withdraw_delay: int = 900
    salt: str = "0x" + "00" * 32

    @property
    def config(self) -> ChannelConfig:
        return ChannelConfig(payer=self.payer.address, payer_authorizer=self.payer_authorizer.address,
                             receiver=self.receiver.address, receiver_authorizer=self.receiver_authorizer.address,
                             token=self.token.address, withdraw_delay=self.withdraw_delay, salt=self.salt)

    @property
    def tuple(self) -> tuple[Any, ...]:
        c = self.config
        return (c.payer, c.payer_authorizer, c.receiver, c.receiver_authorizer, c.token, c.withdraw_delay,
                bytes.fromhex(c.salt[2:]))

    @property
    def id(self) -> str:
        return compute_channel_id(self.config, self.chain.chain_id)

    def state(self) -> tuple[int, int]:
        return tuple(self.chain.batch.functions.channels(bytes.fromhex(self.id[2:])).call())  # type: ignore[return-value]

    def voucher(self, max_claimable: int, signer: LocalAccount | None = None) -> bytes:
        domain = get_batch_settlement_eip712_domain(self.chain.chain_id)
        message = {"channelId": bytes.fromhex(self.id[2:]), "maxClaimableAmount": max_claimable}
        account = signer or self.payer_authorizer
        return bytes(account.sign_typed_data(domain, bsc.VOUCHER_TYPES, message).signature)

    def claim_row(self, max_claimable: int, total: int, signature: bytes | None = None) -> tuple[Any, ...]:
        return ((self.tuple, max_claimable), signature or self.voucher(max_claimable), total)

    def sdk_claim(self, max_claimable: int, total: int) -> VoucherClaim:
        return VoucherClaim(channel=self.config, max_claimable_amount=str(max_claimable), signature="0x",
                            total_claimed=str(total))

    # -- deposits

    def deposit_erc3009(self, amount: int, relayer: LocalAccount) -> Any:
        salt = "0x" + secrets.token_hex(32)
        valid_before = self.chain.now() + 3600
        nonce = build_erc3009_deposit_nonce(self.id, salt)
        domain = {"name": "USD Coin", "version": "2", "chainId": self.chain.chain_id,
                  "verifyingContract": self.token.address}
        message = {"from": self.payer.address, "to": bsc.ERC3009_DEPOSIT_COLLECTOR_ADDRESS, "value": amount,
                   "validAfter": 0, "validBefore": valid_before, "nonce": bytes.fromhex(nonce[2:])}
        signature = self.payer.sign_typed_data(domain, bsc.RECEIVE_AUTHORIZATION_TYPES, message).signature
        data = build_erc3009_collector_data("0", str(valid_before), salt, "0x" + bytes(signature).hex())
        return self.chain.batch.functions.deposit(self.tuple, amount, bsc.ERC3009_DEPOSIT_COLLECTOR_ADDRESS, data)

    def deposit_permit2(self, amount: int, *, channel_id: str | None = None) -> Any:
        nonce, deadline = secrets.randbits(256), self.chain.now() + 3600
        domain = {"name": "Permit2", "chainId": self.chain.chain_id,
                  "verifyingContract": self.chain.d["contracts"]["permit2"]}
        message = {"permitted": {"token": self.token.address, "amount": amount},
                   "spender": bsc.PERMIT2_DEPOSIT_COLLECTOR_ADDRESS, "nonce": nonce, "deadline": deadline,
                   "witness": {"channelId": bytes.fromhex((channel_id or self.id)[2:])}}
        signature = self.payer.sign_typed_data(domain, bsc.BATCH_PERMIT2_WITNESS_TYPES, message).signature
        data = build_permit2_collector_data(str(nonce), str(deadline), "0x" + bytes(signature).hex())
        return self.chain.batch.functions.deposit(self.tuple, amount, bsc.PERMIT2_DEPOSIT_COLLECTOR_ADDRESS, data)


@pytest.fixture(scope="module")
def chain() -> Iterator[Chain]:
    with DevChain(agents=0, facilitators=1) as devchain:
        yield Chain(devchain)


def channel(chain: Chain, *, token: str = "usdc", **kw: Any) -> Channel:
    return Channel(chain, chain.payer(), chain.new_account(), chain.new_account(), chain.new_account(),
                   chain.usdc if token == "usdc" else chain.opg, **kw)


def _shape(params: list[dict[str, Any]]) -> list[Any]:
    """Names, types, tuple components and `indexed`, without solc's internalType."""
    return [(p["name"], p["type"], p.get("indexed", False), _shape(p.get("components", []))) for p in params]


def reverts_with(call: Any, error: str) -> None:
    with pytest.raises(ContractCustomError) as info:
        call()
    data = info.value.data if isinstance(info.value.data, str) else str(info.value.data)
    assert data.startswith(selector(error)), (error, data)


# ---------------------------------------------------------------------------------------------


def test_canonical_addresses_abi_and_domain(chain: Chain) -> None:
    contracts = chain.d["contracts"]
    assert contracts["batch_settlement"] == bsc.BATCH_SETTLEMENT_ADDRESS
    assert contracts["erc3009_deposit_collector"] == bsc.ERC3009_DEPOSIT_COLLECTOR_ADDRESS
    assert contracts["permit2_deposit_collector"] == bsc.PERMIT2_DEPOSIT_COLLECTOR_ADDRESS
    ours = {e["name"]: e for e in chain.ours.abi if e.get("type") in ("function", "event")}
    for entry in BATCH_SETTLEMENT_ABI:  # every function/event the SDK uses, with the same shape
        assert _shape(ours[entry["name"]]["inputs"]) == _shape(entry["inputs"]), entry["name"]
    _, name, version, chain_id, verifying, *_ = chain.ours.functions.eip712Domain().call()
    assert (name, version, chain_id, verifying) == ("x402 Batch Settlement", "1", chain.chain_id,
                                                    bsc.BATCH_SETTLEMENT_ADDRESS)
    assert chain.ours.functions.CHANNEL_CONFIG_TYPEHASH().call() == bsc.CHANNEL_CONFIG_TYPEHASH
    assert (chain.ours.functions.MIN_WITHDRAW_DELAY().call(), chain.ours.functions.MAX_WITHDRAW_DELAY().call()) == (
        bsc.MIN_WITHDRAW_DELAY, bsc.MAX_WITHDRAW_DELAY)
    ch = channel(chain)
    assert "0x" + chain.batch.functions.getChannelId(ch.tuple).call().hex() == ch.id


def test_erc3009_deposit_then_claim_and_settle(chain: Chain) -> None:
    ch, relayer = channel(chain), chain.new_account()
    payer_before = chain.usdc.functions.balanceOf(ch.payer.address).call()
    receipt = chain.send(relayer, ch.deposit_erc3009(1_000_000, relayer))
    print(f"\nbatch deposit (ERC-3009) gas: {receipt.gasUsed}")
    assert ch.state() == (1_000_000, 0)
    assert chain.usdc.functions.balanceOf(ch.payer.address).call() == payer_before - 1_000_000
    assert chain.usdc.functions.balanceOf(bsc.BATCH_SETTLEMENT_ADDRESS).call() >= 1_000_000
    created = chain.ours.events.ChannelCreated().process_receipt(receipt, errors=DISCARD)
    assert len(created) == 1 and "0x" + created[0].args.channelId.hex() == ch.id

    # claim: only the receiver side, only up to the voucher and the balance, signed by payerAuthorizer
    claim = chain.batch.functions.claim
    reverts_with(lambda: claim([ch.claim_row(300, 300)]).call({"from": relayer.address}), "NotAuthorizedToClaim()")
    frm = {"from": ch.receiver.address}
    reverts_with(lambda: claim([ch.claim_row(300, 301)]).call(frm), "ClaimExceedsCeiling()")
    reverts_with(lambda: claim([ch.claim_row(2_000_000, 1_000_001)]).call(frm), "ClaimExceedsBalance()")
    reverts_with(lambda: claim([ch.claim_row(300, 300, ch.voucher(300, ch.payer))]).call(frm), "InvalidSignature()")
    reverts_with(lambda: claim([ch.claim_row(300, 300, b"\x01" * 65)]).call(frm), "InvalidSignature()")
    reverts_with(lambda: claim([]).call(frm), "EmptyBatch()")
    chain.send(ch.receiver, claim([ch.claim_row(500, 300)]))
    assert ch.state() == (1_000_000, 300)
    chain.send(ch.receiver_authorizer, claim([ch.claim_row(500, 300)]))  # a replayed row is a no-op
    assert ch.state() == (1_000_000, 300)
    assert chain.batch.functions.receivers(ch.receiver.address, chain.usdc.address).call() == [300, 0]

    # settle (permissionless) sweeps what was claimed, once
    chain.send(relayer, chain.batch.functions.settle(ch.receiver.address, chain.usdc.address))
    assert chain.usdc.functions.balanceOf(ch.receiver.address).call() == 300
    chain.send(relayer, chain.batch.functions.settle(ch.receiver.address, chain.usdc.address))
    assert chain.usdc.functions.balanceOf(ch.receiver.address).call() == 300
    assert chain.batch.functions.receivers(ch.receiver.address, chain.usdc.address).call() == [300, 300]


def test_permit2_deposit_binds_the_channel(chain: Chain) -> None:
    ch, relayer = channel(chain, token="opg", withdraw_delay=bsc.MAX_WITHDRAW_DELAY), chain.new_account()
    other = channel(chain, token="opg")
    # a permit whose witness names another channel does not fund this one
    wrong = ch.deposit_permit2(10**18, channel_id=other.id)
    reverts_with(lambda: wrong.call({"from": relayer.address}), "InvalidSigner()")
    receipt = chain.send(relayer, ch.deposit_permit2(10**18))
    print(f"\nbatch deposit (Permit2) gas: {receipt.gasUsed}")
    assert ch.state() == (10**18, 0)
    chain.send(relayer, ch.deposit_permit2(5))  # a top-up adds to the same channel
    assert ch.state() == (10**18 + 5, 0)


def test_deposit_argument_checks(chain: Chain) -> None:
    relayer = chain.new_account()
    for delay in (bsc.MIN_WITHDRAW_DELAY - 1, bsc.MAX_WITHDRAW_DELAY + 1):
        ch = channel(chain, withdraw_delay=delay)
        reverts_with(lambda ch=ch: ch.deposit_erc3009(1, relayer).call({"from": relayer.address}),
                     "WithdrawDelayOutOfRange()")
    ch = channel(chain)
    reverts_with(lambda: ch.deposit_erc3009(0, relayer).call({"from": relayer.address}), "ZeroDeposit()")
    no_authorizer = (*ch.tuple[:3], ZERO, *ch.tuple[4:])
    call = chain.batch.functions.deposit(no_authorizer, 1, bsc.ERC3009_DEPOSIT_COLLECTOR_ADDRESS, b"")
    reverts_with(lambda: call.call({"from": relayer.address}), "InvalidChannel()")
    # nobody but the escrow may drive a collector
    collect = chain.erc3009_collector.functions.collect(ch.payer.address, chain.usdc.address, 1, b"\0" * 32, b"")
    reverts_with(lambda: collect.call({"from": relayer.address}), "OnlySettlement()")


def test_claim_with_signature_batches_channels(chain: Chain) -> None:
    relayer, authorizer, receiver = chain.new_account(), chain.new_account(), chain.new_account()
    channels = [Channel(chain, chain.payer(), chain.new_account(), receiver, authorizer, chain.usdc,
                        salt="0x" + secrets.token_hex(32)) for _ in range(3)]
    for ch in channels:
        chain.send(relayer, ch.deposit_erc3009(10_000, relayer))
    amounts = [700, 1_100, 2_500]
    rows = [ch.claim_row(a, a) for ch, a in zip(channels, amounts, strict=True)]
    signer = LocalAuthorizerSigner(authorizer)
    signature = sign_claim_batch(signer, [ch.sdk_claim(a, a) for ch, a in zip(channels, amounts, strict=True)],
                                 chain.network)
    sig = bytes.fromhex(signature.removeprefix("0x"))
    assert chain.batch.functions.getClaimBatchDigest(rows).call() == _claim_batch_digest(chain, channels, amounts)
    bad = sign_claim_batch(LocalAuthorizerSigner(chain.new_account()),
                           [ch.sdk_claim(a, a) for ch, a in zip(channels, amounts, strict=True)], chain.network)
    cws = chain.batch.functions.claimWithSignature
    reverts_with(lambda: cws(rows, bytes.fromhex(bad[2:])).call({"from": relayer.address}), "InvalidSignature()")
    reverts_with(lambda: cws(rows[:2], sig).call({"from": relayer.address}), "InvalidSignature()")
    receipt = chain.send(relayer, cws(rows, sig))
    print(f"\nclaimWithSignature gas for 3 channels: {receipt.gasUsed}")
    assert [ch.state() for ch in channels] == [(10_000, a) for a in amounts]
    assert chain.batch.functions.receivers(receiver.address, chain.usdc.address).call() == [sum(amounts), 0]
    # a row of another receiverAuthorizer cannot ride on this signature
    stranger = channel(chain)
    chain.send(relayer, stranger.deposit_erc3009(10_000, relayer))
    mixed = [channels[0].claim_row(800, 800), stranger.claim_row(5, 5)]
    mixed_sig = sign_claim_batch(signer, [channels[0].sdk_claim(800, 800), stranger.sdk_claim(5, 5)], chain.network)
    reverts_with(lambda: cws(mixed, bytes.fromhex(mixed_sig[2:])).call({"from": relayer.address}),
                 "NotReceiverAuthorizer()")


def _claim_batch_digest(chain: Chain, channels: list[Channel], amounts: list[int]) -> bytes:
    from eth_account.messages import encode_typed_data

    entries = [{"channelId": bytes.fromhex(ch.id[2:]), "maxClaimableAmount": a, "totalClaimed": a}
               for ch, a in zip(channels, amounts, strict=True)]
    signable = encode_typed_data(get_batch_settlement_eip712_domain(chain.chain_id), bsc.CLAIM_BATCH_TYPES,
                                 {"claims": entries})
    return keccak(b"\x19" + signable.version + signable.header + signable.body)


def test_refunds_direct_and_signed(chain: Chain) -> None:
    ch, relayer = channel(chain), chain.new_account()
    chain.send(relayer, ch.deposit_erc3009(10_000, relayer))
    chain.send(ch.receiver, chain.batch.functions.claim([ch.claim_row(4_000, 4_000)]))
    cid = bytes.fromhex(ch.id[2:])
    refund = chain.batch.functions.refund
    reverts_with(lambda: refund(ch.tuple, 1).call({"from": relayer.address}), "NotAuthorizedToRefund()")
    reverts_with(lambda: refund(ch.tuple, 0).call({"from": ch.receiver.address}), "ZeroRefund()")
    payer_before = chain.usdc.functions.balanceOf(ch.payer.address).call()
    chain.send(ch.receiver_authorizer, refund(ch.tuple, 1_000))
    assert ch.state() == (9_000, 4_000)
    assert chain.batch.functions.refundNonce(cid).call() == 1

    signer = LocalAuthorizerSigner(ch.receiver_authorizer)
    rws = chain.batch.functions.refundWithSignature
    stale = bytes.fromhex(sign_refund(signer, ch.id, 2_000, 0, chain.network)[2:])
    reverts_with(lambda: rws(ch.tuple, 2_000, 0, stale).call({"from": relayer.address}), "InvalidRefundNonce()")
    sig = bytes.fromhex(sign_refund(signer, ch.id, 2_000, 1, chain.network)[2:])
    reverts_with(lambda: rws(ch.tuple, 2_001, 1, sig).call({"from": relayer.address}), "InvalidSignature()")
    chain.send(relayer, rws(ch.tuple, 2_000, 1, sig))
    assert ch.state() == (7_000, 4_000)
    reverts_with(lambda: rws(ch.tuple, 2_000, 1, sig).call({"from": relayer.address}), "InvalidRefundNonce()")
    # asking for more than is unclaimed returns exactly the unclaimed rest; the claimed part stays
    chain.send(ch.receiver, refund(ch.tuple, 10**9))
    assert ch.state() == (4_000, 4_000)
    assert chain.usdc.functions.balanceOf(ch.payer.address).call() == payer_before + 6_000
    # nothing left to return: no transfer, yet the nonce still advances
    chain.send(ch.receiver, refund(ch.tuple, 1))
    assert ch.state() == (4_000, 4_000) and chain.batch.functions.refundNonce(cid).call() == 4


def test_timed_withdrawal_bounds_and_race(chain: Chain) -> None:
    ch, relayer = channel(chain, withdraw_delay=bsc.MIN_WITHDRAW_DELAY), chain.new_account()
    chain.send(relayer, ch.deposit_erc3009(10_000, relayer))
    chain.send(ch.receiver, chain.batch.functions.claim([ch.claim_row(1_000, 1_000)]))
    initiate, finalize = chain.batch.functions.initiateWithdraw, chain.batch.functions.finalizeWithdraw
    reverts_with(lambda: initiate(ch.tuple, 1).call({"from": ch.receiver.address}), "InvalidChannel()")
    reverts_with(lambda: initiate(ch.tuple, 9_001).call({"from": ch.payer.address}),
                 "WithdrawAmountExceedsAvailable()")
    reverts_with(lambda: finalize(ch.tuple).call({"from": ch.payer.address}), "WithdrawalNotPending()")
    chain.send(ch.payer, initiate(ch.tuple, 9_000))
    started = chain.now()
    cid = bytes.fromhex(ch.id[2:])
    assert chain.batch.functions.pendingWithdrawals(cid).call() == [9_000, started]
    reverts_with(lambda: initiate(ch.tuple, 1).call({"from": ch.payer.address}), "WithdrawalAlreadyPending()")

    # the receiver's claim lands during the delay: it wins over the pending withdrawal
    chain.send(ch.receiver, chain.batch.functions.claim([ch.claim_row(6_000, 6_000)]))
    chain.travel(bsc.MIN_WITHDRAW_DELAY - (chain.now() - started) - 2)
    reverts_with(lambda: finalize(ch.tuple).call({"from": ch.payer_authorizer.address}), "WithdrawDelayNotElapsed()")
    reverts_with(lambda: finalize(ch.tuple).call({"from": relayer.address}), "NotAuthorizedToFinalizeWithdraw()")
    chain.travel(2)
    payer_before = chain.usdc.functions.balanceOf(ch.payer.address).call()
    chain.send(ch.payer_authorizer, finalize(ch.tuple))
    assert chain.usdc.functions.balanceOf(ch.payer.address).call() == payer_before + 4_000
    assert ch.state() == (6_000, 6_000)
    assert chain.batch.functions.pendingWithdrawals(cid).call() == [0, 0]
    # a voucher not claimed in time cannot be claimed after the escrow left
    reverts_with(lambda: chain.batch.functions.claim([ch.claim_row(7_000, 7_000)]).call(
        {"from": ch.receiver.address}), "ClaimExceedsBalance()")
    # what was claimed is still the receiver's
    chain.send(relayer, chain.batch.functions.settle(ch.receiver.address, chain.usdc.address))
    assert chain.usdc.functions.balanceOf(ch.receiver.address).call() == 6_000


def test_refund_shrinks_a_pending_withdrawal(chain: Chain) -> None:
    ch, relayer = channel(chain, withdraw_delay=3_600), chain.new_account()
    chain.send(relayer, ch.deposit_erc3009(10_000, relayer))
    chain.send(ch.payer, chain.batch.functions.initiateWithdraw(ch.tuple, 8_000))
    cid = bytes.fromhex(ch.id[2:])
    chain.send(ch.receiver, chain.batch.functions.refund(ch.tuple, 3_000))
    assert chain.batch.functions.pendingWithdrawals(cid).call()[0] == 5_000
    chain.send(ch.receiver, chain.batch.functions.refund(ch.tuple, 5_000))
    assert chain.batch.functions.pendingWithdrawals(cid).call() == [0, 0]
    assert ch.state() == (2_000, 0)


def test_multicall_and_clock_is_the_chains(chain: Chain) -> None:
    # the time travel above moved only this module's chain, relative to its own clock
    assert chain.now() >= int(time.time()) + bsc.MIN_WITHDRAW_DELAY - 5
    ch, relayer = channel(chain), chain.new_account()
    chain.send(relayer, ch.deposit_erc3009(1_000, relayer))
    calls = [chain.batch.encode_abi("claim", args=[[ch.claim_row(100, 100)]]),
             chain.batch.encode_abi("settle", args=[ch.receiver.address, chain.usdc.address])]
    chain.send(ch.receiver, chain.batch.functions.multicall([bytes.fromhex(c[2:]) for c in calls]))
    assert chain.usdc.functions.balanceOf(ch.receiver.address).call() == 100
    assert to_checksum_address(ch.receiver.address) == ch.receiver.address
