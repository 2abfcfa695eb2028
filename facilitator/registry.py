"""The scheme registry: which handler verifies and settles a payment of a given (x402 version,
network, scheme), as x402-rs's `SchemeRegistry` and the official SDK's `x402Facilitator.register`
do it. Handlers are registered explicitly, under a CAIP-2 network ("eip155:84532") or a namespace
pattern ("eip155:*"); an exact network wins over a pattern. `/supported` lists what is
registered, nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from facilitator.errors import PaymentInvalidError
from facilitator.schemes.base import SchemeFacilitator
from facilitator.x402.errors import UnknownNetworkError
from facilitator.x402.networks import to_v1_name
from facilitator.x402.reasons import ErrorReason as R
from facilitator.x402.types import SupportedKind


@dataclass(frozen=True, slots=True)
class SchemeKey:
    x402_version: int
    network: str  # a CAIP-2 network, or a pattern "<namespace>:*"
    scheme: str

    @property
    def namespace(self) -> str:
        return self.network.split(":", 1)[0]

    @property
    def is_pattern(self) -> bool:
        return self.network.endswith(":*")

    def covers(self, network: str) -> bool:
        return network == self.network or (self.is_pattern and network.startswith(self.network[:-1]))

    def __str__(self) -> str:
        """x402-rs's ids: `v2-eip155-exact` for a pattern, `v2-eip155:84532-exact` for one network."""
        return f"v{self.x402_version}-{self.namespace if self.is_pattern else self.network}-{self.scheme}"


class SchemeRegistry:
    def __init__(self) -> None:
        self._handlers: dict[SchemeKey, SchemeFacilitator] = {}
        self._schemes: set[str] = set()

    def register(self, handler: SchemeFacilitator, *, x402_versions: Iterable[int] = (2,)) -> None:
        """`handler` serves its `scheme` on its `network` (a CAIP-2 network or a pattern) for
        each of `x402_versions` (v1 requests reach it converted to v2)."""
        for version in x402_versions:
            key = SchemeKey(version, handler.network, handler.scheme)
            if key in self._handlers:
                raise ValueError(f"scheme {key} is registered twice")
            self._handlers[key] = handler
            self._schemes.add(key.scheme)

    def get(self, x402_version: int, network: str, scheme: str) -> SchemeFacilitator | None:
        exact = self._handlers.get(SchemeKey(x402_version, network, scheme))
        if exact is not None:
            return exact
        return self._handlers.get(SchemeKey(x402_version, network.split(":", 1)[0] + ":*", scheme))

    def find(self, x402_version: int, network: str, scheme: str) -> SchemeFacilitator:
        """The handler for a payment; raises `invalid_network` when nothing is registered for its
        network, `unsupported_scheme` when something is but not this scheme (or version)."""
        handler = self.get(x402_version, network, scheme)
        if handler is None:
            if not any(key.covers(network) for key in self._handlers):
                raise PaymentInvalidError(R.INVALID_NETWORK, f"network {network} is not supported")
            raise PaymentInvalidError(R.UNSUPPORTED_SCHEME, f"scheme {scheme} is not supported")
        return handler

    def __iter__(self) -> Iterator[tuple[SchemeKey, SchemeFacilitator]]:
        return iter(self._handlers.items())

    def has_scheme(self, scheme: str) -> bool:
        """Registered on some network (bounds the metrics' scheme label)."""
        return scheme in self._schemes

    def namespaces(self) -> list[str]:
        return sorted({key.namespace for key in self._handlers})

    def kinds(self) -> list[SupportedKind]:
        """One kind per registration, v2 before v1, v1 kinds under their legacy network name (a
        network without one is not listed for v1)."""
        kinds: list[SupportedKind] = []
        ordered = sorted(self._handlers.items(), key=lambda kv: (kv[0].network, kv[0].scheme, -kv[0].x402_version))
        for key, handler in ordered:
            network = key.network
            if key.x402_version == 1:
                try:
                    network = to_v1_name(network)
                except UnknownNetworkError:
                    continue
            kinds.append(SupportedKind(x402_version=key.x402_version, scheme=key.scheme, network=network,
                                       extra=handler.supported_extra()))
        return kinds
