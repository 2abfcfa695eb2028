"""Reading OpenGradient's TEE registry: `getActiveTEEs(uint8 teeType) returns TEEInfo[]`
(x402-protocol.md §7.6), one eth_call per refresh."""

from __future__ import annotations

from dataclasses import dataclass

from eth_abi import decode as abi_decode
from eth_abi import encode as abi_encode
from eth_utils import function_signature_to_4byte_selector, to_checksum_address

from facilitator.evm.rpc import JsonRpcClient

_OHTTP = "(uint8,uint16,uint16,uint16,bytes,bytes,uint256)"
TEE_INFO = f"(address,address,string,bytes,bytes,bytes32,uint8,bool,uint256,uint256,{_OHTTP})"
_SELECTOR = function_signature_to_4byte_selector("getActiveTEEs(uint8)")


@dataclass(frozen=True, slots=True)
class RegisteredTee:
    owner: str
    payment_address: str
    endpoint: str
    public_key: bytes  # DER SubjectPublicKeyInfo
    tls_certificate: bytes  # DER
    pcr_hash: bytes
    tee_type: int
    enabled: bool
    registered_at: int
    last_heartbeat_at: int


def decode_tees(result: bytes) -> list[RegisteredTee]:
    (infos,) = abi_decode([f"{TEE_INFO}[]"], result)
    return [RegisteredTee(to_checksum_address(i[0]), to_checksum_address(i[1]), i[2], bytes(i[3]), bytes(i[4]),
                          bytes(i[5]), i[6], i[7], i[8], i[9]) for i in infos]


async def active_tees(rpc: JsonRpcClient, registry: str, tee_type: int) -> list[RegisteredTee]:
    """Raises facilitator.evm.rpc.RpcError / RpcUnavailableError; the caller keeps what it had."""
    data = "0x" + (_SELECTOR + abi_encode(["uint8"], [tee_type])).hex()
    result = await rpc.call("eth_call", [{"to": registry, "data": data}, "latest"])
    return decode_tees(bytes.fromhex(result[2:]))
