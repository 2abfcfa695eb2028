"""Our hand-rolled EIP-712 digests and recovery agree with eth_account's generic encoder."""

from __future__ import annotations

import os

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_utils import to_checksum_address

from facilitator.evm import eip712
from facilitator.evm.contracts import EXACT_PERMIT2_PROXY, PERMIT2, UPTO_PERMIT2_PROXY

CHAIN = 84532
KEY = Account.create()


def _addr() -> str:
    return to_checksum_address("0x" + os.urandom(20).hex())


def _permit2_typed(token: str, amount: int, spender: str, nonce: int, deadline: int, to: str, valid_after: int,
                   facilitator: str | None) -> dict:
    witness_fields = [{"name": "to", "type": "address"}]
    witness = {"to": to, "validAfter": valid_after}
    if facilitator:
        witness_fields.append({"name": "facilitator", "type": "address"})
        witness["facilitator"] = facilitator
    witness_fields.append({"name": "validAfter", "type": "uint256"})
    return {
        "types": {
            "EIP712Domain": [{"name": "name", "type": "string"}, {"name": "chainId", "type": "uint256"},
                             {"name": "verifyingContract", "type": "address"}],
            "PermitWitnessTransferFrom": [
                {"name": "permitted", "type": "TokenPermissions"}, {"name": "spender", "type": "address"},
                {"name": "nonce", "type": "uint256"}, {"name": "deadline", "type": "uint256"},
                {"name": "witness", "type": "Witness"}],
            "TokenPermissions": [{"name": "token", "type": "address"}, {"name": "amount", "type": "uint256"}],
            "Witness": witness_fields,
        },
        "primaryType": "PermitWitnessTransferFrom",
        "domain": {"name": "Permit2", "chainId": CHAIN, "verifyingContract": PERMIT2},
        "message": {"permitted": {"token": token, "amount": amount}, "spender": spender, "nonce": nonce,
                    "deadline": deadline, "witness": witness},
    }


@pytest.mark.parametrize("upto", [False, True], ids=["exact", "upto"])
def test_permit2_witness_digest_matches_eth_account(upto: bool) -> None:
    for _ in range(20):
        token, to, fac = _addr(), _addr(), _addr()
        amount, nonce = int.from_bytes(os.urandom(12), "big"), int.from_bytes(os.urandom(32), "big")
        deadline, valid_after = 1_900_000_000, int.from_bytes(os.urandom(4), "big")
        spender = UPTO_PERMIT2_PROXY if upto else EXACT_PERMIT2_PROXY
        typed = _permit2_typed(token, amount, spender, nonce, deadline, to, valid_after, fac if upto else None)
        signable = encode_typed_data(full_message=typed)
        expected = eip712.keccak(b"\x19" + signable.version + signable.header + signable.body)
        ours = eip712.permit2_witness_digest(
            chain_id=CHAIN, permit2=eip712.address_bytes(PERMIT2), token=eip712.address_bytes(token), amount=amount,
            spender=eip712.address_bytes(spender), nonce=nonce, deadline=deadline, to=eip712.address_bytes(to),
            valid_after=valid_after, facilitator=eip712.address_bytes(fac) if upto else None,
        )
        assert ours == expected
        sig = KEY.sign_message(signable).signature
        assert eip712.recover_signer(ours, bytes(sig)) == bytes.fromhex(KEY.address[2:])


def test_transfer_with_authorization_digest_matches_eth_account() -> None:
    token, to = _addr(), _addr()
    nonce = os.urandom(32)
    typed = {
        "types": {
            "EIP712Domain": [{"name": "name", "type": "string"}, {"name": "version", "type": "string"},
                             {"name": "chainId", "type": "uint256"}, {"name": "verifyingContract", "type": "address"}],
            "TransferWithAuthorization": [
                {"name": "from", "type": "address"}, {"name": "to", "type": "address"},
                {"name": "value", "type": "uint256"}, {"name": "validAfter", "type": "uint256"},
                {"name": "validBefore", "type": "uint256"}, {"name": "nonce", "type": "bytes32"}],
        },
        "primaryType": "TransferWithAuthorization",
        "domain": {"name": "USD Coin", "version": "2", "chainId": CHAIN, "verifyingContract": token},
        "message": {"from": KEY.address, "to": to, "value": 12345, "validAfter": 0, "validBefore": 1_900_000_000,
                    "nonce": nonce},
    }
    signable = encode_typed_data(full_message=typed)
    expected = eip712.keccak(b"\x19" + signable.version + signable.header + signable.body)
    ours = eip712.transfer_with_authorization_digest(
        domain_separator=eip712.token_domain_separator("USD Coin", "2", CHAIN, eip712.address_bytes(token)),
        from_=eip712.address_bytes(KEY.address), to=eip712.address_bytes(to), value=12345, valid_after=0,
        valid_before=1_900_000_000, nonce=nonce,
    )
    assert ours == expected
    sig = bytes(KEY.sign_message(signable).signature)
    assert eip712.recover_signer(ours, sig, require_low_s=True) == eip712.address_bytes(KEY.address)


def test_witness_type_strings_are_byte_exact() -> None:
    assert eip712.EXACT_WITNESS_TYPE_STRING == (
        "Witness witness)TokenPermissions(address token,uint256 amount)Witness(address to,uint256 validAfter)")
    assert eip712.UPTO_WITNESS_TYPE_STRING == (
        "Witness witness)TokenPermissions(address token,uint256 amount)"
        "Witness(address to,address facilitator,uint256 validAfter)")


def test_compact_and_malleable_signatures() -> None:
    digest = os.urandom(32)
    sig = bytes(Account._sign_hash(digest, KEY.key).signature) if hasattr(Account, "_sign_hash") else None
    if sig is None:
        pytest.skip("eth_account has no raw hash signing")
    r, s, v = sig[:32], int.from_bytes(sig[32:64], "big"), sig[64]
    me = eip712.address_bytes(KEY.address)
    # EIP-2098 compact form recovers the same signer
    vs = s | ((v - 27) << 255)
    assert eip712.recover_signer(digest, r + vs.to_bytes(32, "big")) == me
    # the high-s twin is accepted by ecrecover (Permit2) but refused where low s is required (EIP-3009)
    high = r + (eip712.SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - v])
    assert eip712.recover_signer(digest, high) == me
    with pytest.raises(eip712.SignatureFormatError):
        eip712.recover_signer(digest, high, require_low_s=True)
    for bad in (b"", sig[:63], sig + b"\x00", sig[:64] + b"\x05", b"\x00" * 65):
        with pytest.raises(eip712.SignatureFormatError):
            eip712.recover_signer(digest, bad)


def test_checksum_address_matches_eip55() -> None:
    for _ in range(200):
        a = "0x" + os.urandom(20).hex()
        assert eip712.checksum_address(a) == to_checksum_address(a)
        assert eip712.checksum_address(a.upper().replace("0X", "0x")) == to_checksum_address(a)
