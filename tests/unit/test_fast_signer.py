"""The fast signer (coincurve + direct RLP) must produce the very bytes eth_account produces: a
wrong byte is a transaction the node refuses, or worse, one that does something else."""

from __future__ import annotations

import random

import pytest
import rlp as pyrlp
from eth_account import Account

from facilitator.evm import rlp
from facilitator.evm.eip712 import checksum_address
from facilitator.evm.signer import Signer

# Edge values where an RLP or integer encoding goes wrong: zero (empty string), one byte below and
# at 0x80 (single byte vs. length prefix), 55/56-byte lengths (short vs. long form), 2**64.
EDGE_INTS = [0, 1, 0x7F, 0x80, 0xFF, 0x100, 2**32 - 1, 2**63, 2**64 - 1, 2**64, 2**255]
EDGE_DATA_LENGTHS = [0, 1, 55, 56, 57, 255, 256, 1024, 65_536]


def _corpus(seed: int, n: int) -> list[tuple[str, dict]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        key = "0x" + rng.randbytes(32).hex()
        length = EDGE_DATA_LENGTHS[i % len(EDGE_DATA_LENGTHS)] if i % 3 == 0 else rng.randrange(0, 700)
        data = bytes([0x80]) if length == 1 and i % 2 else rng.randbytes(length)  # one byte >= 0x80
        edge = i % 4 == 0
        out.append((key, {
            "chain_id": rng.choice([1, 8453, 84532, 31337, 2**32 + 7]),
            "nonce": rng.choice([v for v in EDGE_INTS if v < 2**64]) if edge else rng.randrange(0, 2**20),
            "to": checksum_address("0x" + rng.randbytes(20).hex()),
            "data": data,
            "gas": rng.randrange(21_000, 30_000_000),
            "max_fee": rng.choice(EDGE_INTS) if edge else rng.randrange(1, 10**12),
            "priority_fee": rng.randrange(0, 10**10),
        }))
    return out


def _reference(key: str, tx: dict) -> tuple[str, str]:
    signed = Account.from_key(key).sign_transaction({
        "type": 2, "chainId": tx["chain_id"], "nonce": tx["nonce"], "to": tx["to"], "data": tx["data"], "value": 0,
        "gas": tx["gas"], "maxFeePerGas": tx["max_fee"], "maxPriorityFeePerGas": tx["priority_fee"],
    })
    return "0x" + bytes(signed.raw_transaction).hex(), "0x" + bytes(signed.hash).hex()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_raw_transaction_is_byte_identical_to_eth_account(seed: int) -> None:
    for key, tx in _corpus(seed, 60):
        ours = Signer.from_key(key).sign(**tx)
        raw, tx_hash = _reference(key, tx)
        assert ours.raw == raw, (key, tx)
        assert ours.tx_hash == tx_hash
        assert ours.nonce == tx["nonce"]


def test_address_and_key_forms() -> None:
    key = "0x" + "11" * 32
    signer = Signer.from_key(key)
    assert signer.address == Account.from_key(key).address
    assert Signer.from_key(key[2:]).address == signer.address
    assert key[2:] not in repr(signer) and "11" * 8 not in repr(signer)


def test_kept_key_signs_many_transactions_identically() -> None:
    """One Signer object is reused for every settlement: no state may leak between signatures."""
    key, tx = _corpus(9, 1)[0]
    signer = Signer.from_key(key)
    first = signer.sign(**tx)
    for nonce in range(5):
        signer.sign(**{**tx, "nonce": nonce})
    assert signer.sign(**tx) == first


def test_rlp_matches_pyrlp() -> None:
    rng = random.Random(4)

    def item(depth: int) -> rlp.Item:
        kind = rng.randrange(4 if depth < 3 else 2)
        if kind == 0:
            return rng.choice(EDGE_INTS) if rng.random() < 0.5 else rng.randrange(0, 2**rng.randrange(1, 300))
        if kind == 1:
            return bytes([rng.randrange(256)]) if rng.random() < 0.3 else rng.randbytes(rng.choice(EDGE_DATA_LENGTHS))
        return [item(depth + 1) for _ in range(rng.randrange(0, 6 if kind == 2 else 60))]

    for _ in range(200):
        value = item(0)
        assert rlp.encode(value) == pyrlp.encode(value), value
    with pytest.raises(ValueError):
        rlp.encode(-1)
