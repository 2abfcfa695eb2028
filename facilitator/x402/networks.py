"""Network identifiers: CAIP-2 (x402 v2) and the legacy v1 names.

The v1 table is the SDK's ``V1_NETWORK_CHAIN_IDS`` (``x402/mechanisms/evm/v1/constants.py``)
plus the Solana names from ``x402/mechanisms/svm/constants.py``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType

from facilitator.x402.errors import UnknownNetworkError

__all__ = [
    "CAIP2_TO_V1_NETWORK",
    "SOLANA_DEVNET",
    "SOLANA_MAINNET",
    "SOLANA_TESTNET",
    "V1_NETWORK_TO_CAIP2",
    "chain_id_of",
    "is_caip2",
    "to_caip2",
    "to_v1_name",
]

SOLANA_MAINNET = "solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp"
SOLANA_DEVNET = "solana:EtWTRABZaYq6iMfeYKouRu166VU2xqa1"
SOLANA_TESTNET = "solana:4uhcVJyU9pJkvQyS88uRDiswHXSCkY3z"

_V1_EVM_CHAIN_IDS: dict[str, int] = {
    "base": 8453,
    "base-sepolia": 84532,
    "ethereum": 1,
    "polygon": 137,
    "polygon-amoy": 80002,
    "avalanche": 43114,
    "avalanche-fuji": 43113,
    "abstract": 2741,
    "abstract-testnet": 11124,
    "iotex": 4689,
    "sei": 1329,
    "sei-testnet": 1328,
    "peaq": 3338,
    "story": 1513,
    "educhain": 656476,
    "skale-base-sepolia": 1444673419,
    "megaeth": 4326,
    "monad": 143,
    "monad-testnet": 10143,
    "stable": 988,
    "stable-testnet": 2201,
    "celo": 42220,
    "flare": 14,
}

V1_NETWORK_TO_CAIP2: Mapping[str, str] = MappingProxyType(
    {name: f"eip155:{chain_id}" for name, chain_id in _V1_EVM_CHAIN_IDS.items()}
    | {"solana": SOLANA_MAINNET, "solana-devnet": SOLANA_DEVNET, "solana-testnet": SOLANA_TESTNET}
)
CAIP2_TO_V1_NETWORK: Mapping[str, str] = MappingProxyType({v: k for k, v in V1_NETWORK_TO_CAIP2.items()})

# CAIP-2: namespace [-a-z0-9]{3,8}, reference [-_a-zA-Z0-9]{1,32}.
_CAIP2_RE = re.compile(r"[-a-z0-9]{3,8}:[-_a-zA-Z0-9]{1,32}", re.ASCII)
_EIP155_RE = re.compile(r"eip155:([1-9][0-9]{0,19})", re.ASCII)


def is_caip2(network: str) -> bool:
    """True if ``network`` is syntactically a CAIP-2 chain id (no wildcards)."""
    return _CAIP2_RE.fullmatch(network) is not None


def chain_id_of(network: str) -> int:
    """``"eip155:8453"`` -> ``8453``. Anything that is not ``eip155:<positive decimal>`` raises."""
    match = _EIP155_RE.fullmatch(network)
    if match is None:
        raise UnknownNetworkError(network, f"not an eip155 CAIP-2 network: {network!r}")
    return int(match.group(1))


def to_caip2(network: str) -> str:
    """A v1 name or a CAIP-2 id -> CAIP-2.

    A known v1 name is mapped through the table; a well-formed CAIP-2 id is returned as is
    (v2 networks are not limited to the legacy table); anything else raises.
    """
    caip2 = V1_NETWORK_TO_CAIP2.get(network)
    if caip2 is not None:
        return caip2
    if is_caip2(network):
        return network
    raise UnknownNetworkError(network)


def to_v1_name(network: str) -> str:
    """CAIP-2 (or an already-v1 name) -> the legacy v1 name; raises if it has none."""
    name = CAIP2_TO_V1_NETWORK.get(network)
    if name is not None:
        return name
    if network in V1_NETWORK_TO_CAIP2:
        return network
    raise UnknownNetworkError(network, f"no v1 network name for {network!r}")
