"""Calldata of the batch-settlement escrow's functions, and decoding of its views."""

from __future__ import annotations

from eth_abi import decode as abi_decode
from eth_abi import encode as abi_encode
from eth_utils import function_signature_to_4byte_selector as selector

from facilitator.schemes.evm_batch.channel import ChannelConfig

CONFIG = "(address,address,address,address,address,uint40,bytes32)"
VOUCHER_CLAIM = f"(({CONFIG},uint128),bytes,uint128)"

SEL_DEPOSIT = selector(f"deposit({CONFIG},uint128,address,bytes)")
SEL_CLAIM_WITH_SIGNATURE = selector(f"claimWithSignature({VOUCHER_CLAIM}[],bytes)")
SEL_SETTLE = selector("settle(address,address)")
SEL_REFUND_WITH_SIGNATURE = selector(f"refundWithSignature({CONFIG},uint128,uint256,bytes)")
SEL_MULTICALL = selector("multicall(bytes[])")
SEL_CHANNELS = selector("channels(bytes32)")
SEL_PENDING_WITHDRAWALS = selector("pendingWithdrawals(bytes32)")
SEL_REFUND_NONCE = selector("refundNonce(bytes32)")
SEL_RECEIVERS = selector("receivers(address,address)")

# Gas limits (measured on the dev chain: deposit ~137k, claimWithSignature ~25k + ~33k per row).
GAS_DEPOSIT = 300_000
GAS_SETTLE = 120_000
GAS_CLAIM_BASE = 80_000
GAS_CLAIM_PER_ROW = 60_000
GAS_REFUND = 150_000

# One claim row: (channel config, maxClaimableAmount, payer's voucher signature, new totalClaimed).
ClaimRow = tuple[ChannelConfig, int, bytes, int]


def hexdata(data: bytes) -> str:
    return "0x" + data.hex()


def deposit(config: ChannelConfig, amount: int, collector: str, collector_data: bytes) -> bytes:
    return SEL_DEPOSIT + abi_encode(
        [CONFIG, "uint128", "address", "bytes"], [config.as_tuple(), amount, collector, collector_data]
    )


def claim_with_signature(rows: list[ClaimRow], authorizer_signature: bytes) -> bytes:
    claims = [((config.as_tuple(), max_claimable), signature, total) for config, max_claimable, signature, total in rows]
    return SEL_CLAIM_WITH_SIGNATURE + abi_encode([f"{VOUCHER_CLAIM}[]", "bytes"], [claims, authorizer_signature])


def settle(receiver: str, token: str) -> bytes:
    return SEL_SETTLE + abi_encode(["address", "address"], [receiver, token])


def refund_with_signature(config: ChannelConfig, amount: int, nonce: int, signature: bytes) -> bytes:
    return SEL_REFUND_WITH_SIGNATURE + abi_encode(
        [CONFIG, "uint128", "uint256", "bytes"], [config.as_tuple(), amount, nonce, signature]
    )


def multicall(calls: list[bytes]) -> bytes:
    return SEL_MULTICALL + abi_encode(["bytes[]"], [calls])


def erc3009_collector_data(valid_after: int, valid_before: int, salt: int, signature: bytes) -> bytes:
    return abi_encode(["uint256", "uint256", "uint256", "bytes"], [valid_after, valid_before, salt, signature])


def permit2_collector_data(nonce: int, deadline: int, signature: bytes) -> bytes:
    return abi_encode(["uint256", "uint256", "bytes", "bytes"], [nonce, deadline, signature, b""])


def channel_reads(channel_id: bytes) -> list[str]:
    """channels, pendingWithdrawals, refundNonce of one channel (decode with `decode_channel`)."""
    return [
        hexdata(SEL_CHANNELS + channel_id),
        hexdata(SEL_PENDING_WITHDRAWALS + channel_id),
        hexdata(SEL_REFUND_NONCE + channel_id),
    ]


def receivers_read(receiver: str, token: str) -> str:
    return hexdata(SEL_RECEIVERS + abi_encode(["address", "address"], [receiver, token]))


def decode_pair(result: str) -> tuple[int, int]:
    first, second = abi_decode(["uint256", "uint256"], bytes.fromhex(result[2:]))
    return int(first), int(second)
