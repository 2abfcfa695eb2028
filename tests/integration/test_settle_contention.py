"""A copy of a payment under re-check (another digest, same nonce: a forged or malleated copy sent
straight to /settle) neither refuses the genuine payment's verify nor fails its settlement: the
copy's outcome is awaited, and when it lets go the genuine one settles. Found by a fuzzer: the
genuine settle got a final "nonce already used" while nothing had been settled."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from facilitator.app import build_facilitator
from facilitator.settings import devchain_overlay, load_settings
from facilitator.x402.types import SettleRequest, VerifyRequest
from tests.payments import balance_of, facilitator_body, requirements_for, sign_async

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("symbol", ["USDC", "OPG"])
async def test_a_copy_under_recheck_is_awaited_not_taken_for_the_payment(devchain: dict[str, Any], symbol: str) -> None:
    fac = build_facilitator(load_settings(None, env={}, overrides=devchain_overlay(devchain) | {"store_url": "memory://"}))
    try:
        amount = 2_345 if symbol == "USDC" else 10**15
        req = requirements_for(devchain, symbol, amount)
        body = facilitator_body(await sign_async(devchain, req, agent=1), req)
        verify = VerifyRequest.model_validate(body)
        scheme = fac.registry.find(2, req["network"], req["scheme"])
        prepared = scheme.prepare(verify.payment_payload, verify.payment_requirements, now=time.time())
        # The copy holds the payment's record while it is re-checked.
        copy = "ff" * 32
        assert (await fac.store.claim(prepared.record_key, copy, now_ms=int(time.time() * 1000), lease_ms=60_000)).won
        assert (await fac.verify(verify)).is_valid  # not refused as "being settled"
        payee = devchain["accounts"]["payee"]["address"]
        before = balance_of(devchain, symbol, payee)
        settling = asyncio.ensure_future(fac.settle(SettleRequest.model_validate(body)))
        await asyncio.sleep(0.3)
        assert not settling.done()  # waiting for the copy's outcome, not failed
        await fac.store.release(prepared.record_key, copy)  # the copy failed its re-check and let go
        settled = await asyncio.wait_for(settling, 30)
        assert settled.success, settled
        assert balance_of(devchain, symbol, payee) - before == amount
    finally:
        await fac.close()


async def test_a_recheck_that_breaks_lets_the_payment_go(devchain: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    """An unexpected error in the settle-time re-check (a bug, not the payment's fault) frees the
    payment's record at once: nothing was signed, and its own retry must not wait out a lease."""
    fac = build_facilitator(load_settings(None, env={}, overrides=devchain_overlay(devchain) | {"store_url": "memory://"}))
    try:
        req = requirements_for(devchain, "USDC", 1_234)
        verify = VerifyRequest.model_validate(facilitator_body(await sign_async(devchain, req, agent=1), req))
        scheme = fac.registry.find(2, req["network"], req["scheme"])
        prepared = scheme.prepare(verify.payment_payload, verify.payment_requirements, now=time.time())

        async def broken(*, fresh: bool = True) -> None:
            raise RuntimeError("a bug in the re-check")

        prepared.confirm = broken  # type: ignore[method-assign]
        failed = await fac.settler.settle(fac.chains[req["network"]], prepared)
        assert not failed.success and failed.error_reason == "unexpected_settle_error"
        assert await fac.store.get(prepared.record_key) is None
        assert "settle_recheck_failed" in caplog.text
    finally:
        await fac.close()
