"""The batch-settlement digests the gateway verifies vouchers with (facilitator/schemes/evm_batch/
channel.py) are the official SDK's: channel id, Voucher, Refund and ClaimBatch, and a voucher is
accepted only when signed (65 bytes, low s) by the payerAuthorizer."""

from __future__ import annotations

import secrets

from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_utils import keccak
from x402.mechanisms.evm.batch_settlement import constants as bsc
from x402.mechanisms.evm.batch_settlement.types import ChannelConfig as SdkConfig
from x402.mechanisms.evm.batch_settlement.utils import compute_channel_id, get_batch_settlement_eip712_domain

from facilitator.schemes.evm_batch.channel import (
    ChannelConfig,
    claim_batch_digest,
    recovers_to,
    refund_digest,
    voucher_digest,
)
from facilitator.x402.reasons import ErrorReason as R

CHAIN_ID = 84532
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


def _digest(types: dict, message: dict) -> bytes:
    signable = encode_typed_data(get_batch_settlement_eip712_domain(CHAIN_ID), types, message)
    return keccak(b"\x19" + signable.version + signable.header + signable.body)


def _config() -> tuple[ChannelConfig, SdkConfig]:
    addresses = [Account.create().address for _ in range(5)]
    wire = {"payer": addresses[0], "payerAuthorizer": addresses[1], "receiver": addresses[2],
            "receiverAuthorizer": addresses[3], "token": addresses[4], "withdrawDelay": 3600,
            "salt": "0x" + secrets.token_hex(32)}
    return ChannelConfig.from_wire(wire, R.INVALID_BATCH_SETTLEMENT_EVM_VOUCHER_PAYLOAD), SdkConfig.from_dict(wire)


def test_digests_are_the_sdks() -> None:
    ours, sdk = _config()
    cid = ours.channel_id(CHAIN_ID)
    assert "0x" + cid.hex() == compute_channel_id(sdk, CHAIN_ID)
    assert voucher_digest(CHAIN_ID, cid, 12_345) == _digest(bsc.VOUCHER_TYPES,
                                                           {"channelId": cid, "maxClaimableAmount": 12_345})
    assert refund_digest(CHAIN_ID, cid, 3, 777) == _digest(bsc.REFUND_TYPES, {"channelId": cid, "nonce": 3, "amount": 777})
    entries = [(cid, 10, 7), (bytes(32), 5, 5)]
    claims = [{"channelId": c, "maxClaimableAmount": m, "totalClaimed": t} for c, m, t in entries]
    assert claim_batch_digest(CHAIN_ID, entries) == _digest(bsc.CLAIM_BATCH_TYPES, {"claims": claims})


def test_only_the_payer_authorizers_low_s_signature_recovers() -> None:
    signer, other = Account.create(), Account.create()
    digest = secrets.token_bytes(32)
    signature = bytes(signer.unsafe_sign_hash(digest).signature)
    assert recovers_to(digest, signature, signer.address)
    assert not recovers_to(digest, signature, other.address)
    assert not recovers_to(digest, signature[:64], signer.address)  # compact form: the contract reads 65 bytes
    r, s, v = signature[:32], int.from_bytes(signature[32:64], "big"), signature[64]
    malleated = r + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - v])  # the high-s twin
    assert not recovers_to(digest, malleated, signer.address)
    assert not recovers_to(digest, b"\x00" * 65, signer.address)


def test_a_voucher_receipt_built_directly_is_byte_identical_to_the_models() -> None:
    from types import SimpleNamespace

    from facilitator.x402.headers import encode_settle_response
    from facilitator.x402.types import SettleResponse
    from gateway.batch_calls import receipt_fields
    from gateway.batch_channels import Channel

    channel = Channel(id="0x" + "ab" * 32, network="eip155:84532", asset="0xtoken", payer="0x" + "cd" * 20, route="r",
                      config="{}", requirement="{}", charged=10**25 + 7, balance=10**26, total_claimed=5,
                      withdraw_at=1_700_000_000, refund_nonce=3)
    call = SimpleNamespace(network="eip155:84532")
    deposits = [None, SettleResponse(success=True, transaction="0x" + "12" * 32, network="eip155:84532", amount="5000"),
                SettleResponse(success=True, transaction="0x" + "34" * 32, network="eip155:84532")]
    for deposit in deposits:
        model = SettleResponse(success=True, payer=channel.payer, network=call.network,
                               transaction=deposit.transaction if deposit else "",
                               amount=deposit.amount if deposit else "",
                               extra={"chargedAmount": "5000", "channelState": channel.snapshot()})
        assert encode_settle_response(receipt_fields(call, channel, 5000, deposit)) == \
            encode_settle_response(model)  # type: ignore[arg-type]
