"""One EVM network as the facilitator sees it: RPC, contract addresses, known tokens, caches."""

from __future__ import annotations

from dataclasses import dataclass, field

from facilitator.evm import contracts
from facilitator.evm.eip712 import address_bytes
from facilitator.evm.nonces import Nonces
from facilitator.evm.rpc import JsonRpcClient
from facilitator.evm.statecache import ChainStateCache
from facilitator.evm.transactions import TransactionSender


@dataclass(frozen=True, slots=True)
class TokenInfo:
    address: str
    symbol: str
    decimals: int
    transfer_method: str  # "permit2" | "eip3009"
    eip712_name: str
    eip712_version: str


@dataclass(eq=False)
class EvmChain:
    network: str  # CAIP-2
    chain_id: int
    rpc: JsonRpcClient
    sender: TransactionSender
    permit2: str = contracts.PERMIT2
    exact_proxy: str = contracts.EXACT_PERMIT2_PROXY
    upto_proxy: str = contracts.UPTO_PERMIT2_PROXY
    tokens: dict[str, TokenInfo] = field(default_factory=dict)  # by lowercase address
    # Safe caches: contract code does not disappear from a token address, and a token's EIP-712
    # domain separator is fixed per (name, version, chain) for the token contracts x402 uses.
    asset_has_code: set[str] = field(default_factory=set)
    domain_ok: set[tuple[str, str, str]] = field(default_factory=set)
    # Verify's reads for recently seen payers (facilitator/evm/statecache.py); 0 disables.
    state_poll_s: float = 0.25

    def __post_init__(self) -> None:
        self.state = ChainStateCache(self.rpc, poll_s=self.state_poll_s)
        self.state.watch(self.permit2, *self.tokens)
        self.permit2_b = address_bytes(self.permit2)
        self.exact_proxy_b = address_bytes(self.exact_proxy)
        self.upto_proxy_b = address_bytes(self.upto_proxy)

    @classmethod
    def connect(cls, network: str, chain_id: int, rpc_url: str, *, nonces: Nonces | None = None, **kwargs) -> EvmChain:
        rpc = JsonRpcClient(rpc_url)
        sender = TransactionSender(rpc, chain_id, nonces=nonces)
        return cls(network=network, chain_id=chain_id, rpc=rpc, sender=sender, **kwargs)

    def token(self, address: str) -> TokenInfo | None:
        return self.tokens.get(address.lower())
