"""A channel's on-chain state as the escrow reports it, read in one batch with whatever else a
check needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from facilitator.errors import ChainUnavailableError, PaymentInvalidError
from facilitator.evm import contracts
from facilitator.evm.chain import EvmChain
from facilitator.evm.rpc import Call, RpcUnavailableError
from facilitator.schemes.evm_batch import calldata
from facilitator.x402.reasons import ErrorReason as R


@dataclass(frozen=True, slots=True)
class ChannelState:
    channel_id: bytes
    balance: int
    total_claimed: int
    withdraw_requested_at: int  # 0: no timed withdrawal pending
    refund_nonce: int

    def to_wire(self) -> dict[str, Any]:
        """The snapshot of verify's `extra` and settle's `extra.channelState` (spec field names)."""
        return {
            "channelId": "0x" + self.channel_id.hex(),
            "balance": str(self.balance),
            "totalClaimed": str(self.total_claimed),
            "withdrawRequestedAt": self.withdraw_requested_at,
            "refundNonce": str(self.refund_nonce),
        }


async def read_channel(chain: EvmChain, channel_id: bytes, *extra: Call) -> tuple[ChannelState, list[Any]]:
    """The channel's state and the results of `extra` calls (RpcError where one reverted), in one
    round trip. A failed channel read is `rpc_read_failed`; an unreachable node ChainUnavailable."""
    reads = [
        Call("eth_call", [{"to": contracts.BATCH_SETTLEMENT, "data": data}, "latest"])
        for data in calldata.channel_reads(channel_id)
    ]
    try:
        results = await chain.rpc.batch([*reads, *extra])
    except RpcUnavailableError as exc:
        raise ChainUnavailableError(str(exc)) from exc
    channel, pending, nonce = results[:3]
    if not all(isinstance(r, str) and len(r) >= 66 for r in (channel, pending, nonce)):
        raise PaymentInvalidError(R.INVALID_BATCH_SETTLEMENT_EVM_RPC_READ_FAILED, "the escrow's channel views could not be read")
    assert isinstance(channel, str) and isinstance(pending, str) and isinstance(nonce, str)
    balance, total_claimed = calldata.decode_pair(channel)
    _, initiated_at = calldata.decode_pair(pending)
    state = ChannelState(channel_id, balance, total_claimed, initiated_at, contracts.decode_uint(nonce))
    return state, list(results[3:])
