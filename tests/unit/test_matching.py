"""One accepted-vs-offered rule (facilitator.x402.matching) for the gateway's binding and the
facilitator's check, and one payer extraction (facilitator.x402.identity)."""

from __future__ import annotations

from typing import Any

import pytest

from facilitator.errors import PaymentInvalidError
from facilitator.service import check_accepted
from facilitator.x402.identity import claimed_payer, payment_identity, permit2_key
from facilitator.x402.matching import RequirementMismatchError, find_offered, requirement_mismatch
from facilitator.x402.reasons import ErrorReason as R
from facilitator.x402.types import PaymentPayload, PaymentRequirements

USDC = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
OPG = "0x240b09731D96979f50B2C649C9CE10FcF9C7987F"
PAY_TO = "0xfa3F54AE9C4287CA09a486dfaFaCe7d1d4095d93"
PAYER = "0x857b06519E91e3A54538791bDbb0E22373e36b66"


def req(**update: Any) -> PaymentRequirements:
    base = PaymentRequirements(scheme="exact", network="eip155:84532", asset=USDC, amount="1000", pay_to=PAY_TO,
                               max_timeout_seconds=300, extra={"name": "USDC", "version": "2"})
    return base.model_copy(update=update)


@pytest.mark.parametrize(("update", "field"), [
    ({"scheme": "upto"}, "scheme"),
    ({"network": "eip155:8453"}, "network"),
    ({"asset": OPG}, "asset"),
    ({"amount": "999"}, "amount"),
    ({"amount": "01000"}, "amount"),  # the same number written otherwise is another requirement
    ({"pay_to": USDC}, "payTo"),
    ({"max_timeout_seconds": 301}, "maxTimeoutSeconds"),
    ({"extra": {"name": "USDC"}}, "extra.version"),
    ({"extra": {"name": "USDC", "version": "1"}}, "extra.version"),
])
def test_the_first_differing_field_is_named(update: dict[str, Any], field: str) -> None:
    assert requirement_mismatch(req(**update), req()) == field


def test_addresses_ignore_case_and_clients_may_add_extra() -> None:
    accepted = req(asset=USDC.lower(), pay_to=PAY_TO.upper().replace("0X", "0x"),
                   extra={"name": "USDC", "version": "2", "client": "x"})
    assert requirement_mismatch(accepted, req()) is None


def test_find_offered_names_the_difference_from_the_closest_offer() -> None:
    offers = [req(asset=OPG, amount="5"), req()]
    assert find_offered(req(), offers) is offers[1]
    with pytest.raises(RequirementMismatchError) as exc:
        find_offered(req(amount="1"), offers)
    assert exc.value.field == "amount"  # compared with the USDC offer, not the first one


def test_the_facilitator_checks_with_the_same_rule() -> None:
    payload = PaymentPayload(payload={}, accepted=req(max_timeout_seconds=60))
    with pytest.raises(PaymentInvalidError) as exc:
        check_accepted(payload, req())
    assert exc.value.reason is R.INVALID_PAYMENT_REQUIREMENTS
    assert "maxTimeoutSeconds" in exc.value.message
    check_accepted(PaymentPayload(payload={}, accepted=req()), req())


def test_claimed_payer_follows_the_dispatch_rule() -> None:
    permit2 = {"permit2Authorization": {"from": PAYER, "nonce": "7"}}
    assert claimed_payer(permit2) == PAYER
    assert claimed_payer({"authorization": {"from": PAYER, "nonce": "0x01"}}) == PAYER
    assert claimed_payer({"authorization": {"from": 5}}) is None
    assert claimed_payer({"permit2Authorization": "x", "authorization": {"from": PAYER}}) is None
    assert claimed_payer({}) is None


def test_payment_identity_uses_the_same_payer() -> None:
    assert payment_identity({"permit2Authorization": {"from": PAYER, "nonce": "007"}}, "eip155:1", USDC) == (
        PAYER, permit2_key("eip155:1", PAYER, 7))
    payer, key = payment_identity({"permit2Authorization": {"from": PAYER, "nonce": "0x7"}}, "eip155:1", USDC)
    assert payer == "" and key.startswith("eip155:1:payload:")  # no on-chain identity: the content's
