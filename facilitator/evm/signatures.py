"""Whose signature is it: route exactly as the contracts do on-chain.

Permit2's SignatureVerification and OpenZeppelin's SignatureChecker use ecrecover when the
claimed signer has no code, and ERC-1271 `isValidSignature` when it has (a contract wallet or an
EIP-7702 delegated EOA). ERC-6492 wrapped signatures of wallets that are not deployed yet are
recognised and refused with their own reason (we do not deploy wallets).
"""

from __future__ import annotations

from eth_abi import decode as abi_decode

from facilitator.errors import ChainUnavailableError, PaymentInvalidError
from facilitator.evm import contracts
from facilitator.evm.eip712 import SignatureFormatError, recover_signer
from facilitator.evm.rpc import JsonRpcClient, RpcError, RpcUnavailableError
from facilitator.x402.reasons import ErrorReason

ERC6492_SUFFIX = bytes.fromhex("6492" * 16)


def is_erc6492(signature: bytes) -> bool:
    return len(signature) > 32 and signature.endswith(ERC6492_SUFFIX)


def unwrap_erc6492(signature: bytes) -> bytes:
    try:
        _factory, _calldata, inner = abi_decode(["address", "bytes", "bytes"], signature[:-32])
    except Exception as exc:
        raise SignatureFormatError("malformed ERC-6492 wrapper") from exc
    return bytes(inner)


def try_recover(digest: bytes, signature: bytes, *, require_low_s: bool = False) -> bytes | None:
    """Local recovery (no I/O). None when the bytes are not an ECDSA signature."""
    if is_erc6492(signature):
        return None
    try:
        return recover_signer(digest, signature, require_low_s=require_low_s)
    except SignatureFormatError:
        return None


async def check_signature(
    rpc: JsonRpcClient,
    *,
    payer: str,
    payer_b: bytes,
    payer_code: str,
    digest: bytes,
    signature: bytes,
    recovered: bytes | None,
    invalid: ErrorReason,
    undeployed: ErrorReason,
) -> None:
    has_code = payer_code not in ("0x", "", None)
    if not has_code:
        if is_erc6492(signature):
            raise PaymentInvalidError(undeployed, "ERC-6492 signature of a wallet that is not deployed")
        if recovered != payer_b:
            raise PaymentInvalidError(invalid, "signature does not recover to the payer")
        return
    inner = unwrap_erc6492(signature) if is_erc6492(signature) else signature
    try:
        result = await rpc.call("eth_call", [{"to": payer, "data": contracts.is_valid_signature(digest, inner)}, "latest"])
    except RpcError:
        raise PaymentInvalidError(invalid, "ERC-1271 isValidSignature reverted") from None
    except RpcUnavailableError as exc:
        raise ChainUnavailableError(str(exc)) from exc
    if not isinstance(result, str) or not result.startswith("0x" + contracts.ERC1271_MAGIC.hex()):
        raise PaymentInvalidError(invalid, "ERC-1271 isValidSignature did not return the magic value")
