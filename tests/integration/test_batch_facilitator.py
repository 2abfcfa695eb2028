"""Our batch-settlement facilitator (in process, `memory://` store) on the dev chain, against the
official SDK's `BatchSettlementEvmFacilitator` as an independent reference.

Differential verify: a corpus of deposit (ERC-3009 via USDC, Permit2 via OPG), voucher and refund
payloads, made with the SDK's own client helpers and then tampered, is verified by both; they must
agree on validity and on the reason, except where pinned in DIFFERENT (with why). Then the money
path through our /settle: deposit -> claim (claimWithSignature, receiver-authorizer signed) ->
settle (sweep) -> cooperative refund; the receiver gets exactly what was claimed, the payer exactly
the rest, and a claim sent twice is claimed once.
"""

from __future__ import annotations

import copy
import secrets
import time
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import keccak
from x402.mechanisms.evm import FacilitatorWeb3Signer
from x402.mechanisms.evm.batch_settlement.authorizer_signer import (
    LocalAuthorizerSigner,
    sign_claim_batch,
    sign_refund,
)
from x402.mechanisms.evm.batch_settlement.client.eip3009 import create_batch_settlement_eip3009_deposit_payload
from x402.mechanisms.evm.batch_settlement.client.permit2 import create_batch_settlement_permit2_deposit_payload
from x402.mechanisms.evm.batch_settlement.client.voucher import sign_voucher
from x402.mechanisms.evm.batch_settlement.facilitator import BatchSettlementEvmFacilitator
from x402.mechanisms.evm.batch_settlement.types import ChannelConfig, VoucherClaim
from x402.mechanisms.evm.batch_settlement.utils import compute_channel_id
from x402.mechanisms.evm.signers import EthAccountSigner
from x402.schemas import PaymentPayload as SdkPaymentPayload
from x402.schemas import PaymentRequirements as SdkPaymentRequirements

from facilitator.service import Facilitator
from facilitator.x402.types import SettleRequest, VerifyRequest
from tests.integration.test_differential import MAX_UINT256, our_facilitator
from tests.payments import balance_of, send_transactions

pytestmark = pytest.mark.integration

SEED = "x402-batch-facilitator"
RESOURCE = {"url": "http://test/batch"}
METHODS = {"eip3009": "USDC", "permit2": "OPG"}


def derived(label: str) -> LocalAccount:
    return Account.from_key(keccak(text=f"{SEED}:{label}:{time.time_ns()}"))


@dataclass
class Env:
    devchain: dict[str, Any]
    ours: Facilitator
    sdk: BatchSettlementEvmFacilitator
    payer: LocalAccount
    broke: LocalAccount
    stranger: LocalAccount
    receiver: LocalAccount
    authorizer: LocalAccount

    def requirements(self, method: str, amount: int = 1_000, **changes: Any) -> dict[str, Any]:
        token = self.devchain["tokens"][METHODS[method]]
        extra = {"name": token["eip712_name"], "version": token["eip712_version"],
                 "receiverAuthorizer": self.authorizer.address, "withdrawDelay": 900}
        if method == "permit2":
            extra["assetTransferMethod"] = "permit2"
        req = {"scheme": "batch-settlement", "network": self.devchain["network"], "asset": token["address"],
               "amount": str(amount), "payTo": self.receiver.address, "maxTimeoutSeconds": 600, "extra": extra}
        for key, value in changes.items():
            if key in extra or key in ("receiverAuthorizer", "withdrawDelay"):
                req["extra"][key] = value
            else:
                req[key] = value
        return req

    def config(self, method: str, payer: LocalAccount | None = None, salt: str | None = None) -> ChannelConfig:
        payer = payer or self.payer
        return ChannelConfig(payer=payer.address, payer_authorizer=payer.address, receiver=self.receiver.address,
                             receiver_authorizer=self.authorizer.address,
                             token=self.devchain["tokens"][METHODS[method]]["address"], withdraw_delay=900,
                             salt=salt or "0x" + secrets.token_hex(32))


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def env(devchain: dict[str, Any]):
    sdk_key = devchain["accounts"]["facilitator"][-1]["private_key"]
    e = Env(devchain=devchain, ours=our_facilitator(devchain),
            sdk=BatchSettlementEvmFacilitator(FacilitatorWeb3Signer(private_key=sdk_key, rpc_url=devchain["rpc_url"])),
            payer=derived("payer"), broke=derived("broke"), stranger=derived("stranger"),
            receiver=derived("receiver"), authorizer=derived("authorizer"))
    from devtools.devchain import calldata
    from devtools.rpc import BlockingRpc

    rpc = BlockingRpc(devchain["rpc_url"])
    rpc.batch([("anvil_setBalance", [a.address, hex(10**21)]) for a in (e.payer, e.broke)])
    rpc.close()
    txs = []
    for account, mint in ((e.payer, True), (e.broke, False)):
        for symbol, token in devchain["tokens"].items():
            if mint:
                txs.append((account, token["address"], calldata("mint(address,uint256)", ["address", "uint256"],
                                                                [account.address, 10**24 if symbol == "OPG" else 10**12])))
            txs.append((account, token["address"], calldata("approve(address,uint256)", ["address", "uint256"],
                                                            [devchain["contracts"]["permit2"], MAX_UINT256])))
    send_transactions(devchain, txs)
    try:
        yield e
    finally:
        await e.ours.close()


def deposit_payload(e: Env, method: str, req: dict[str, Any], *, amount: int = 100_000, max_claimable: int = 1_000,
                    payer: LocalAccount | None = None, config: ChannelConfig | None = None) -> dict[str, Any]:
    payer = payer or e.payer
    config = config or e.config(method, payer)
    make = (create_batch_settlement_permit2_deposit_payload if method == "permit2"
            else create_batch_settlement_eip3009_deposit_payload)
    inner = make(EthAccountSigner(payer), SdkPaymentRequirements.model_validate(req), config, amount, max_claimable)
    return wire(inner.to_dict(), req)


def voucher_payload(e: Env, config: ChannelConfig, req: dict[str, Any], max_claimable: int, *,
                    signer: LocalAccount | None = None, kind: str = "voucher") -> dict[str, Any]:
    channel_id = compute_channel_id(config, e.devchain["network"])
    voucher = sign_voucher(EthAccountSigner(signer or e.payer), channel_id, max_claimable, e.devchain["network"])
    return wire({"type": kind, "channelConfig": config.to_dict(), "voucher": voucher.to_dict()}, req)


def wire(inner: dict[str, Any], req: dict[str, Any]) -> dict[str, Any]:
    return {"x402Version": 2, "payload": inner, "accepted": copy.deepcopy(req), "resource": RESOURCE}


async def verify_both(e: Env, payload: dict[str, Any], req: dict[str, Any]) -> tuple[str | None, str | None, Any]:
    ours = await e.ours.verify(VerifyRequest.model_validate(
        {"x402Version": 2, "paymentPayload": payload, "paymentRequirements": req}))
    sdk = e.sdk.verify(SdkPaymentPayload.model_validate(payload), SdkPaymentRequirements.model_validate(req))
    return (None if ours.is_valid else ours.invalid_reason), (None if sdk.is_valid else sdk.invalid_reason), ours


async def settle(e: Env, payload: dict[str, Any], req: dict[str, Any]) -> Any:
    return await e.ours.settle(SettleRequest.model_validate(
        {"x402Version": 2, "paymentPayload": payload, "paymentRequirements": req}))


P = "invalid_batch_settlement_evm_"


def tamper_deposit(e: Env, case: str, method: str) -> tuple[dict[str, Any], dict[str, Any]]:
    req = e.requirements(method)
    if case == "valid":
        return deposit_payload(e, method, req), req
    if case == "wrong_receiver":
        return deposit_payload(e, method, req), e.requirements(method, payTo=e.stranger.address)
    if case == "wrong_authorizer":
        return deposit_payload(e, method, req), e.requirements(method, receiverAuthorizer=e.stranger.address)
    if case == "wrong_delay":
        return deposit_payload(e, method, req), e.requirements(method, withdrawDelay=1800)
    if case == "voucher_other_key":
        payload = deposit_payload(e, method, req)
        cfg = ChannelConfig.from_dict(payload["payload"]["channelConfig"])
        payload["payload"]["voucher"] = voucher_payload(e, cfg, req, 1_000, signer=e.stranger)["payload"]["voucher"]
        return payload, req
    if case == "channel_id_mismatch":
        payload = deposit_payload(e, method, req)
        payload["payload"]["channelConfig"]["salt"] = "0x" + "11" * 32
        return payload, req
    if case == "voucher_above_deposit":
        return deposit_payload(e, method, req, amount=5_000, max_claimable=5_001), req
    if case == "deposit_other_key":
        cfg = e.config(method)
        payload = deposit_payload(e, method, req, payer=e.stranger, config=cfg)
        # the voucher is the payer's (valid); the token authorization is the stranger's
        voucher = voucher_payload(e, cfg, req, 1_000)["payload"]["voucher"]
        payload["payload"]["voucher"] = voucher
        if method == "permit2":
            payload["payload"]["deposit"]["authorization"]["permit2Authorization"]["from"] = e.payer.address
        return payload, req
    if case == "insufficient_balance":
        return deposit_payload(e, method, req, payer=e.broke), req
    if case == "expired":
        return deposit_payload(e, method, e.requirements(method, maxTimeoutSeconds=1)), e.requirements(
            method, maxTimeoutSeconds=1)
    raise AssertionError(case)


DEPOSIT_CASES = ["valid", "wrong_receiver", "wrong_authorizer", "wrong_delay", "voucher_other_key",
                 "channel_id_mismatch", "voucher_above_deposit", "deposit_other_key", "insufficient_balance", "expired"]
# (case, method) -> the reason both must give (None: valid)
EXPECTED: dict[tuple[str, str], str | None] = {
    **{("valid", m): None for m in METHODS},
    **{("wrong_receiver", m): P + "receiver_mismatch" for m in METHODS},
    **{("wrong_authorizer", m): P + "receiver_authorizer_mismatch" for m in METHODS},
    **{("wrong_delay", m): P + "withdraw_delay_mismatch" for m in METHODS},
    **{("voucher_other_key", m): P + "voucher_signature" for m in METHODS},
    **{("channel_id_mismatch", m): P + "channel_id_mismatch" for m in METHODS},
    **{("voucher_above_deposit", m): P + "cumulative_exceeds_balance" for m in METHODS},
    ("deposit_other_key", "eip3009"): P + "receive_authorization_signature",
    ("deposit_other_key", "permit2"): P + "permit2_invalid_signature",
    **{("insufficient_balance", m): P + "insufficient_balance" for m in METHODS},
    ("expired", "eip3009"): P + "payload_authorization_valid_before",
    ("expired", "permit2"): P + "permit2_deadline_expired",
}
# Where we differ from the SDK, and why.
DIFFERENT: dict[tuple[str, str], str | None] = {}


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("case", DEPOSIT_CASES)
async def test_deposit_verify_matches_the_sdk(env: Env, case: str, method: str) -> None:
    payload, req = tamper_deposit(env, case, method)
    ours, sdk, resp = await verify_both(env, payload, req)
    print(f"\n| {case:22} | {method:7} | {ours or 'valid':60} | {sdk or 'valid':60} |")
    assert ours == EXPECTED[(case, method)]
    assert sdk == DIFFERENT.get((case, method), EXPECTED[(case, method)])
    if ours is None:
        assert resp.extra["balance"] == "0" and resp.extra["channelId"] == payload["payload"]["voucher"]["channelId"]


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("method", list(METHODS))
async def test_channel_lifecycle_through_our_settle(env: Env, method: str) -> None:
    e, network = env, env.devchain["network"]
    symbol = METHODS[method]
    req = e.requirements(method)
    payload = deposit_payload(e, method, req, amount=100_000, max_claimable=1_000)
    config = ChannelConfig.from_dict(payload["payload"]["channelConfig"])
    channel_id = payload["payload"]["voucher"]["channelId"]
    payer_before = balance_of(e.devchain, symbol, e.payer.address)

    resp = await settle(e, payload, req)
    assert resp.success, resp
    assert resp.amount == "100000" and resp.transaction
    assert resp.extra["channelState"]["balance"] == "100000"
    assert balance_of(e.devchain, symbol, e.payer.address) == payer_before - 100_000
    again = await settle(e, payload, req)  # the same deposit settled twice: one deposit
    assert again.transaction == resp.transaction
    assert balance_of(e.devchain, symbol, e.payer.address) == payer_before - 100_000

    # vouchers against the funded channel: both facilitators agree
    cases = {
        "valid": (voucher_payload(e, config, req, 3_000), None),
        "other_key": (voucher_payload(e, config, req, 3_000, signer=e.stranger), P + "voucher_signature"),
        "above_balance": (voucher_payload(e, config, req, 100_001), P + "cumulative_exceeds_balance"),
        "unfunded_channel": (voucher_payload(e, e.config(method), req, 10), P + "channel_not_found"),
    }
    for name, (voucher, expected) in cases.items():
        ours, sdk, vresp = await verify_both(e, voucher, req)
        print(f"\n| voucher {name:14} | {method:7} | {ours or 'valid':60} | {sdk or 'valid':60} |")
        assert (ours, sdk) == (expected, expected), name
    assert vresp is not None

    # claim 3,000 (the server's receiver-authorizer signs the batch); sent twice, claimed once
    authorizer = LocalAuthorizerSigner(e.authorizer)
    voucher = voucher_payload(e, config, req, 3_000)["payload"]["voucher"]
    claim = VoucherClaim(channel=config, max_claimable_amount="3000", signature=voucher["signature"],
                         total_claimed="2500")
    claim_inner = {"type": "claim", "claims": [claim.to_dict()],
                   "claimAuthorizerSignature": sign_claim_batch(authorizer, [claim], network)}
    first = await settle(e, wire(claim_inner, req), req)
    assert first.success and first.amount == "" and first.transaction, first
    second = await settle(e, wire(claim_inner, req), req)
    assert second.transaction == first.transaction
    unsigned = {k: v for k, v in claim_inner.items() if k != "claimAuthorizerSignature"}
    refused = await settle(e, wire(unsigned, req), req)
    assert not refused.success and refused.error_reason == P + "authorizer_not_configured"
    forged = dict(claim_inner, claimAuthorizerSignature=sign_claim_batch(LocalAuthorizerSigner(e.stranger), [claim],
                                                                         network))
    refused = await settle(e, wire(forged, req), req)
    assert not refused.success and refused.error_reason == P + "authorizer_address_mismatch"

    # a voucher at or below what was claimed is refused now; a zero-charge refund voucher at it is fine
    ours, sdk, _ = await verify_both(e, voucher_payload(e, config, req, 2_500), req)
    assert (ours, sdk) == (P + "cumulative_below_claimed",) * 2
    ours, sdk, vresp = await verify_both(e, voucher_payload(e, config, req, 2_500, kind="refund"), req)
    assert (ours, sdk) == (None, None)
    assert vresp.extra["totalClaimed"] == "2500"

    # settle sweeps exactly the claimed 2,500 to the receiver; a second sweep moves nothing
    receiver_before = balance_of(e.devchain, symbol, e.receiver.address)
    sweep = {"type": "settle", "receiver": e.receiver.address, "token": config.token}
    swept = await settle(e, wire(sweep, req), req)
    assert swept.success and swept.amount == "2500", swept
    assert balance_of(e.devchain, symbol, e.receiver.address) == receiver_before + 2_500
    nothing = await settle(e, wire(sweep, req), req)
    assert nothing.success and nothing.amount == "0" and nothing.transaction == ""
    for bad in ("0x" + "zz" * 20, "0x" + "\x00" * 40, "0x" + "ab" * 19):  # the fuzzer's: were a traceback + claimed record
        for field in ("receiver", "token"):
            refused = await settle(e, wire(sweep | {field: bad}, req), req)
            assert not refused.success and refused.error_reason == P + "settle_payload", refused

    # cooperative refund: claim the last voucher (3,000) and return exactly the rest (97,000)
    rest = 100_000 - 3_000
    final_claim = VoucherClaim(channel=config, max_claimable_amount="3000", signature=voucher["signature"],
                               total_claimed="3000")
    refund_inner = {
        "type": "refund", "channelConfig": config.to_dict(),
        "voucher": voucher_payload(e, config, req, 3_000, kind="refund")["payload"]["voucher"],
        "amount": str(rest), "refundNonce": "0", "claims": [final_claim.to_dict()],
        "claimAuthorizerSignature": sign_claim_batch(authorizer, [final_claim], network),
        "refundAuthorizerSignature": sign_refund(authorizer, channel_id, rest, 0, network),
    }
    payer_before = balance_of(e.devchain, symbol, e.payer.address)
    refunded = await settle(e, wire(refund_inner, req), req)
    assert refunded.success and refunded.amount == str(rest), refunded
    assert refunded.extra["channelState"] == {"channelId": channel_id, "balance": "3000", "totalClaimed": "3000",
                                              "withdrawRequestedAt": 0, "refundNonce": "1"}
    assert balance_of(e.devchain, symbol, e.payer.address) == payer_before + rest
    swept = await settle(e, wire(sweep, req), req)
    assert swept.success and swept.amount == "500"
    assert balance_of(e.devchain, symbol, e.receiver.address) == receiver_before + 3_000
    replay = await settle(e, wire(refund_inner, req), req)  # the same refund again: its first result
    assert replay.transaction == refunded.transaction
    assert balance_of(e.devchain, symbol, e.payer.address) == payer_before + rest
