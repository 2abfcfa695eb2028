"""A settlement recorded but never broadcast (the process died in between) is finished by the
reconciler from its recorded bytes: settled once, with the recorded transaction."""

from __future__ import annotations

import time
from typing import Any

import pytest

from facilitator.app import build_facilitator
from facilitator.service import normalize
from facilitator.settings import devchain_overlay, load_settings
from facilitator.store.base import SettlementState
from facilitator.x402.types import SettleRequest, SettleResponse
from tests.payments import balance_of, facilitator_body, requirements_for, sign_async

pytestmark = pytest.mark.integration


class ProcessDied(Exception):
    pass


async def test_reconciler_broadcasts_a_recorded_transaction_that_never_left(devchain: dict[str, Any]) -> None:
    fac = build_facilitator(load_settings(None, env={}, overrides=devchain_overlay(devchain) | {"store_url": "memory://"}))
    try:
        req = requirements_for(devchain, "USDC", 4321)
        body = SettleRequest.model_validate(facilitator_body(await sign_async(devchain, req, agent=2), req))
        payload, requirements, _ = normalize(body.payment_payload, body.payment_requirements)
        chain = fac.chains[requirements.network]
        scheme = fac.registry.find(2, requirements.network, "exact")
        prepared = scheme.prepare(payload, requirements, now=time.time(), settle=True)
        await prepared.confirm()
        plan = prepared.plan()
        now_ms = int(time.time() * 1000)
        assert (await fac.store.claim(prepared.record_key, prepared.digest, now_ms=now_ms, lease_ms=60_000)).won
        signer = fac.signers.next()

        async def persist_then_die(signed: Any) -> None:
            ok = SettleResponse(success=True, payer=plan.payer, transaction=signed.tx_hash, network=chain.network,
                                amount=str(plan.amount))
            await fac.store.mark_submitted(prepared.record_key, prepared.digest, tx_hash=signed.tx_hash, raw_tx=signed.raw,
                                           signer=signer.address, response=ok.model_dump_json(by_alias=True, exclude_none=True),
                                           now_ms=now_ms)
            raise ProcessDied  # after recording, before broadcasting

        payee = devchain["accounts"]["payee"]["address"]
        before = balance_of(devchain, "USDC", payee)
        with pytest.raises(ProcessDied):
            await chain.sender.send(signer, to=plan.tx_to, data=plan.tx_data, gas=plan.gas, persist=persist_then_die)
        record = await fac.store.get(prepared.record_key)
        assert record is not None and record.state == SettlementState.SUBMITTED
        assert balance_of(devchain, "USDC", payee) == before  # nothing left the process

        assert await fac.settler.reconcile_once(fac.chains, older_than_s=-1) == 1
        settled = await fac.store.get(prepared.record_key)
        assert settled is not None and settled.state == SettlementState.SETTLED and settled.tx_hash == record.tx_hash
        assert balance_of(devchain, "USDC", payee) - before == 4321
        again = await fac.settle(body)  # presented again: the first result, nothing more moves
        assert again.success and again.transaction == record.tx_hash
        assert balance_of(devchain, "USDC", payee) - before == 4321
    finally:
        await fac.close()
