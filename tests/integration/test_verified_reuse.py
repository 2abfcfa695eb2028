"""In process, settle reuses the payment verify prepared for the very same objects, and still
checks again everything that can have changed since verify: the chain state (a balance spent in
between is refused, nothing is sent) and the validity window (a payment that expired in between
is refused)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from eth_account import Account

from devtools.devchain import calldata
from facilitator.app import build_facilitator
from facilitator.service import Facilitator
from facilitator.settings import devchain_overlay, load_settings
from facilitator.x402.reasons import ErrorReason as R
from facilitator.x402.types import SettleRequest, VerifyRequest
from tests.payments import (
    balance_of,
    facilitator_body,
    requirements_for,
    send_transactions,
    sign_async,
)

pytestmark = pytest.mark.integration

AGENT = 3  # its balance is moved away and back (restored in a finally)


def _facilitator(devchain: dict[str, Any]) -> Facilitator:
    return build_facilitator(load_settings(None, env={}, overrides=devchain_overlay(devchain) | {"store_url": "memory://"}))


async def _request(devchain: dict[str, Any], symbol: str, amount: int) -> VerifyRequest:
    req = requirements_for(devchain, symbol, amount)
    return VerifyRequest.model_validate(facilitator_body(await sign_async(devchain, req, agent=AGENT), req))


def _settle_request(v: VerifyRequest) -> SettleRequest:
    """The same payload and requirement objects, as LocalFacilitatorClient hands them over."""
    return SettleRequest.model_construct(x402_version=2, payment_payload=v.payment_payload,
                                         payment_requirements=v.payment_requirements)


def _transfer(devchain: dict[str, Any], symbol: str, key: str, to: str, amount: int) -> None:
    data = calldata("transfer(address,uint256)", ["address", "uint256"], [to, amount])
    send_transactions(devchain, [(Account.from_key(key), devchain["tokens"][symbol]["address"], data)])


@pytest.mark.parametrize("symbol", ["USDC", "OPG"])
async def test_settle_reuses_verify_and_a_balance_spent_in_between_is_refused(devchain: dict[str, Any], symbol: str) -> None:
    fac = _facilitator(devchain)
    payee = devchain["accounts"]["payee"]
    agent = devchain["accounts"]["agents"][AGENT]
    try:
        # Reused: verify keeps the prepared payment, settle takes it and settles it once.
        ok = await _request(devchain, symbol, 1_111)
        assert (await fac.verify(ok, keep=True)).is_valid
        assert len(fac.verified) == 1
        before = balance_of(devchain, symbol, payee["address"])
        settled = await fac.settle(_settle_request(ok), reuse=True)
        assert settled.success, settled
        assert len(fac.verified) == 0
        assert balance_of(devchain, symbol, payee["address"]) - before == 1_111

        # Verified, then the payer spends its balance before the settlement: refused, nothing sent.
        stale = await _request(devchain, symbol, 2_222)
        assert (await fac.verify(stale, keep=True)).is_valid
        everything = balance_of(devchain, symbol, agent["address"])
        _transfer(devchain, symbol, agent["private_key"], payee["address"], everything)
        try:
            before = balance_of(devchain, symbol, payee["address"])
            refused = await fac.settle(_settle_request(stale), reuse=True)
            assert not refused.success and refused.transaction == ""
            assert refused.error_reason in (R.INVALID_EXACT_EVM_INSUFFICIENT_BALANCE.value,
                                            R.PERMIT2_INSUFFICIENT_BALANCE.value)
            assert (refused.extra or {}).get("final") is True
            assert balance_of(devchain, symbol, payee["address"]) == before
        finally:
            _transfer(devchain, symbol, payee["private_key"], agent["address"], everything)
    finally:
        await fac.close()


async def test_a_payment_that_expired_after_verify_is_refused_at_settle(devchain: dict[str, Any]) -> None:
    now = [time.time()]
    fac = _facilitator(devchain)
    fac.clock = lambda: now[0]
    try:
        req = await _request(devchain, "USDC", 3_333)
        assert (await fac.verify(req, keep=True)).is_valid
        now[0] += 10 * 3600  # past validBefore
        refused = await fac.settle(_settle_request(req), reuse=True)
        assert not refused.success and refused.transaction == ""
        assert refused.error_reason == R.INVALID_EXACT_EVM_PAYLOAD_AUTHORIZATION_VALID_BEFORE.value
    finally:
        await fac.close()


async def test_other_objects_are_prepared_again(devchain: dict[str, Any]) -> None:
    """Over HTTP each request is parsed anew: equal objects never take another's prepared payment."""
    fac = _facilitator(devchain)
    try:
        req = await _request(devchain, "USDC", 4_444)
        assert (await fac.verify(req, keep=True)).is_valid
        copy = VerifyRequest.model_validate(req.model_dump(by_alias=True))
        assert fac.verified.take(copy.payment_payload, copy.payment_requirements) is None
        assert len(fac.verified) == 1
        settled = await fac.settle(_settle_request(copy), reuse=True)
        assert settled.success, settled
        again = await fac.settle(_settle_request(req), reuse=True)  # the kept one: same payment, first result
        assert again.success and again.transaction == settled.transaction
    finally:
        await fac.close()
