"""Addresses, selectors and calldata for the contracts a verify reads and a settle writes.

Reads on the hot path are hand-encoded (static arguments only: a selector and 32-byte words);
settlement calldata, which has dynamic `bytes`, goes through eth_abi.
"""

from __future__ import annotations

from eth_abi import encode as abi_encode

from facilitator.evm.eip712 import word_address, word_uint

PERMIT2 = "0x000000000022D473030F116dDEE9F6B43aC78BA3"
EXACT_PERMIT2_PROXY = "0x402085c248EeA27D92E8b30b2C58ed07f9E20001"
UPTO_PERMIT2_PROXY = "0x4020A4f3b7b90ccA423B9fabCc0CE57C6C240002"
# batch-settlement: the escrow and its two deposit collectors (CREATE2, same on every chain)
BATCH_SETTLEMENT = "0x4020074e9dF2ce1deE5A9C1b5c3f541D02a10003"
ERC3009_DEPOSIT_COLLECTOR = "0x4020806089470a89826cB9fB1f4059150b550004"
PERMIT2_DEPOSIT_COLLECTOR = "0x4020425FAf3B746C082C2f942b4E5159887B0005"

SEL_BALANCE_OF = bytes.fromhex("70a08231")
SEL_ALLOWANCE = bytes.fromhex("dd62ed3e")
SEL_NONCE_BITMAP = bytes.fromhex("4fe02b44")
SEL_AUTHORIZATION_STATE = bytes.fromhex("e94a0102")
SEL_DOMAIN_SEPARATOR = bytes.fromhex("3644e515")
SEL_IS_VALID_SIGNATURE = bytes.fromhex("1626ba7e")
SEL_EXACT_PROXY_SETTLE = bytes.fromhex("13cd3b53")
SEL_UPTO_PROXY_SETTLE = bytes.fromhex("ff11e7b4")
SEL_TRANSFER_WITH_AUTHORIZATION_VRS = bytes.fromhex("e3ee160e")
SEL_TRANSFER_WITH_AUTHORIZATION_BYTES = bytes.fromhex("cf092995")

ERC1271_MAGIC = SEL_IS_VALID_SIGNATURE
TRANSFER_TOPIC = "0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"

# Gas limits for settlement transactions. Measured: a Permit2 witness transfer uses 59k-93k,
# an EIP-3009 transfer ~60k-80k (feasibility.md §4); unused gas is not charged, and fixed limits
# save an eth_estimateGas round trip per settlement.
GAS_PERMIT2_SETTLE = 250_000
GAS_EIP3009_SETTLE = 200_000


def hexdata(data: bytes) -> str:
    return "0x" + data.hex()


def balance_of(owner: bytes) -> str:
    return hexdata(SEL_BALANCE_OF + word_address(owner))


def allowance(owner: bytes, spender: bytes) -> str:
    return hexdata(SEL_ALLOWANCE + word_address(owner) + word_address(spender))


def nonce_bitmap(owner: bytes, word_pos: int) -> str:
    return hexdata(SEL_NONCE_BITMAP + word_address(owner) + word_uint(word_pos))


def authorization_state(authorizer: bytes, nonce: bytes) -> str:
    return hexdata(SEL_AUTHORIZATION_STATE + word_address(authorizer) + nonce)


def domain_separator() -> str:
    return hexdata(SEL_DOMAIN_SEPARATOR)


def is_valid_signature(digest: bytes, signature: bytes) -> str:
    return hexdata(SEL_IS_VALID_SIGNATURE + abi_encode(["bytes32", "bytes"], [digest, signature]))


def exact_proxy_settle(
    *, token: str, amount: int, nonce: int, deadline: int, owner: str, to: str, valid_after: int, signature: bytes
) -> bytes:
    args = abi_encode(
        ["((address,uint256),uint256,uint256)", "address", "(address,uint256)", "bytes"],
        [((token, amount), nonce, deadline), owner, (to, valid_after), signature],
    )
    return SEL_EXACT_PROXY_SETTLE + args


def upto_proxy_settle(
    *,
    token: str,
    permitted: int,
    nonce: int,
    deadline: int,
    amount: int,
    owner: str,
    to: str,
    facilitator: str,
    valid_after: int,
    signature: bytes,
) -> bytes:
    args = abi_encode(
        ["((address,uint256),uint256,uint256)", "uint256", "address", "(address,address,uint256)", "bytes"],
        [((token, permitted), nonce, deadline), amount, owner, (to, facilitator, valid_after), signature],
    )
    return SEL_UPTO_PROXY_SETTLE + args


def transfer_with_authorization(
    *,
    from_: str,
    to: str,
    value: int,
    valid_after: int,
    valid_before: int,
    nonce: bytes,
    signature: bytes,
) -> bytes:
    """The (v, r, s) overload for 65-byte EOA signatures (what USDC has everywhere); the
    `bytes signature` overload for anything else (ERC-1271 wallets)."""
    if len(signature) == 65:
        v = signature[64] if signature[64] >= 27 else signature[64] + 27
        args = abi_encode(
            ["address", "address", "uint256", "uint256", "uint256", "bytes32", "uint8", "bytes32", "bytes32"],
            [from_, to, value, valid_after, valid_before, nonce, v, signature[:32], signature[32:64]],
        )
        return SEL_TRANSFER_WITH_AUTHORIZATION_VRS + args
    args = abi_encode(
        ["address", "address", "uint256", "uint256", "uint256", "bytes32", "bytes"],
        [from_, to, value, valid_after, valid_before, nonce, signature],
    )
    return SEL_TRANSFER_WITH_AUTHORIZATION_BYTES + args


def decode_uint(result: str) -> int:
    return int(result, 16) if result not in ("0x", "") else 0
