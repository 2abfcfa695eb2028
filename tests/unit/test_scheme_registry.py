"""The scheme registry: lookup by (x402 version, network, scheme), exact networks before patterns,
the wire reasons when nothing is registered, and `/supported` derived from what is."""

from __future__ import annotations

from typing import Any

import pytest

from facilitator.app import build_facilitator
from facilitator.errors import PaymentInvalidError
from facilitator.registry import SchemeKey, SchemeRegistry
from facilitator.schemes.base import PreparedPayment, SchemeFacilitator
from facilitator.settings import FacilitatorSettings
from facilitator.x402.reasons import ErrorReason as R
from facilitator.x402.types import PaymentPayload, PaymentRequirements


class Stub:
    amount_is_maximum = False

    def __init__(self, scheme: str, network: str, extra: dict[str, Any] | None = None) -> None:
        self.scheme = scheme
        self.network = network
        self._extra = extra

    def prepare(
        self, payload: PaymentPayload, requirements: PaymentRequirements, *, now: float, settle: bool = False
    ) -> PreparedPayment:
        raise NotImplementedError

    def supported_extra(self) -> dict[str, Any] | None:
        return self._extra


def registry(*handlers: SchemeFacilitator, x402_versions: tuple[int, ...] = (2,)) -> SchemeRegistry:
    reg = SchemeRegistry()
    for handler in handlers:
        reg.register(handler, x402_versions=x402_versions)
    return reg


def test_an_exact_network_wins_over_a_pattern() -> None:
    pattern, base = Stub("exact", "eip155:*"), Stub("exact", "eip155:8453")
    reg = registry(pattern, base)
    assert reg.find(2, "eip155:8453", "exact") is base
    assert reg.find(2, "eip155:84532", "exact") is pattern


def test_a_pattern_covers_its_namespace_only() -> None:
    reg = registry(Stub("exact", "eip155:*"))
    with pytest.raises(PaymentInvalidError) as exc:
        reg.find(2, "solana:EtWTRABZaYq6iMfeYKouRu166VU2xqa1", "exact")
    assert exc.value.reason is R.INVALID_NETWORK


def test_no_handler_answers_the_existing_reasons() -> None:
    reg = registry(Stub("exact", "eip155:84532"))
    with pytest.raises(PaymentInvalidError) as exc:
        reg.find(2, "eip155:8453", "exact")
    assert exc.value.reason is R.INVALID_NETWORK
    with pytest.raises(PaymentInvalidError) as exc:
        reg.find(2, "eip155:84532", "upto")
    assert exc.value.reason is R.UNSUPPORTED_SCHEME


def test_the_version_is_part_of_the_key() -> None:
    reg = registry(Stub("upto", "eip155:84532"))
    reg.register(Stub("exact", "eip155:84532"), x402_versions=(1, 2))
    assert reg.get(1, "eip155:84532", "exact") is reg.get(2, "eip155:84532", "exact")
    assert reg.get(1, "eip155:84532", "upto") is None
    with pytest.raises(PaymentInvalidError) as exc:
        reg.find(1, "eip155:84532", "upto")
    assert exc.value.reason is R.UNSUPPORTED_SCHEME


def test_a_key_is_registered_once() -> None:
    reg = registry(Stub("exact", "eip155:8453"))
    with pytest.raises(ValueError, match="v2-eip155:8453-exact"):
        reg.register(Stub("exact", "eip155:8453"))


def test_ids_read_like_x402_rs() -> None:
    assert str(SchemeKey(2, "eip155:*", "exact")) == "v2-eip155-exact"
    assert str(SchemeKey(1, "eip155:8453", "exact")) == "v1-eip155:8453-exact"


def test_kinds_are_the_registrations() -> None:
    reg = registry(Stub("upto", "eip155:8453", {"facilitatorAddress": "0xabc"}))
    reg.register(Stub("exact", "eip155:8453"), x402_versions=(1, 2))
    reg.register(Stub("exact", "eip155:999999"), x402_versions=(1, 2))  # no v1 name: v2 only
    kinds = [k.model_dump(by_alias=True, exclude_none=True) for k in reg.kinds()]
    assert kinds == [
        {"x402Version": 2, "scheme": "exact", "network": "eip155:8453"},
        {"x402Version": 1, "scheme": "exact", "network": "base"},
        {"x402Version": 2, "scheme": "upto", "network": "eip155:8453", "extra": {"facilitatorAddress": "0xabc"}},
        {"x402Version": 2, "scheme": "exact", "network": "eip155:999999"},
    ]
    assert reg.has_scheme("upto") and not reg.has_scheme("batch")


async def test_supported_is_derived_from_the_registry() -> None:
    """One more registration is all it takes to be served and listed."""
    settings = FacilitatorSettings.model_validate({
        "store_url": "memory://",
        "signer_keys": ["0x" + "11" * 32],
        "networks": [{"network": "eip155:84532", "rpc_url": "http://127.0.0.1:9"}],
    })
    fac = build_facilitator(settings)
    try:
        signer = fac.signers.addresses[0]
        before = fac.supported()
        assert [(k.x402_version, k.scheme, k.network) for k in before.kinds] == [
            (2, "batch-settlement", "eip155:84532"), (2, "exact", "eip155:84532"), (1, "exact", "base-sepolia"),
            (2, "upto", "eip155:84532"),
        ]
        assert before.kinds[0].extra is None  # batch-settlement: servers hold their receiverAuthorizer
        assert before.kinds[3].extra == {"facilitatorAddress": signer}
        assert before.signers == {"eip155:*": [signer]}
        batch = Stub("batch", "eip155:*", {"facilitatorAddress": signer})
        fac.registry.register(batch)
        assert fac.registry.find(2, "eip155:84532", "batch") is batch
        assert (2, "batch", "eip155:*") in [(k.x402_version, k.scheme, k.network) for k in fac.supported().kinds]
    finally:
        await fac.close()
