"""Verify's state cache: a payer seen recently is verified without a chain round trip, and a
state change on chain (a balance spent between two verifies) is seen once its block is scanned:
the second verify is refused. Our own settlements in flight count against the payer's balance."""

from __future__ import annotations

from typing import Any

import pytest
from eth_account import Account

from devtools.devchain import calldata
from devtools.rpc import BlockingRpc
from facilitator.app import build_facilitator
from facilitator.service import Facilitator
from facilitator.settings import devchain_overlay, load_settings
from facilitator.x402.reasons import ErrorReason as R
from facilitator.x402.types import VerifyRequest
from tests.payments import (
    balance_of,
    facilitator_body,
    requirements_for,
    send_transactions,
    sign_async,
)

pytestmark = pytest.mark.integration

AGENT = 3  # its balance is moved away and back (restored in a finally)
REFUSED = {R.INVALID_EXACT_EVM_INSUFFICIENT_BALANCE.value, R.PERMIT2_INSUFFICIENT_BALANCE.value}


def _facilitator(devchain: dict[str, Any], poll_s: float = 0.02) -> Facilitator:
    overrides = devchain_overlay(devchain) | {"store_url": "memory://", "state_poll_s": poll_s}
    return build_facilitator(load_settings(None, env={}, overrides=overrides))


async def _request(devchain: dict[str, Any], symbol: str, amount: int) -> VerifyRequest:
    req = requirements_for(devchain, symbol, amount)
    return VerifyRequest.model_validate(facilitator_body(await sign_async(devchain, req, agent=AGENT), req))


def _transfer(devchain: dict[str, Any], symbol: str, key: str, to: str, amount: int) -> int:
    """Send a token transfer; returns the block it was mined in."""
    data = calldata("transfer(address,uint256)", ["address", "uint256"], [to, amount])
    send_transactions(devchain, [(Account.from_key(key), devchain["tokens"][symbol]["address"], data)])
    rpc = BlockingRpc(devchain["rpc_url"])
    try:
        return int(rpc.call("eth_blockNumber"), 16)
    finally:
        rpc.close()


@pytest.mark.parametrize("symbol", ["USDC", "OPG"])
async def test_a_balance_spent_between_two_verifies_is_refused(devchain: dict[str, Any], symbol: str) -> None:
    fac = _facilitator(devchain)
    chain = next(iter(fac.chains.values()))
    payee, agent = devchain["accounts"]["payee"], devchain["accounts"]["agents"][AGENT]
    try:
        req = await _request(devchain, symbol, 1_000)
        assert await chain.state.synced_to(0)
        assert (await fac.verify(req)).is_valid  # cold: one batch
        misses = chain.state.misses
        assert (await fac.verify(req)).is_valid  # warm: from the cache, no round trip
        assert chain.state.misses == misses and chain.state.hits >= 1

        everything = balance_of(devchain, symbol, agent["address"])
        block = _transfer(devchain, symbol, agent["private_key"], payee["address"], everything)
        try:
            assert await chain.state.synced_to(block)
            refused = await fac.verify(req)
            assert not refused.is_valid and refused.invalid_reason in REFUSED, refused
        finally:
            block = _transfer(devchain, symbol, payee["private_key"], agent["address"], everything)
        assert await chain.state.synced_to(block)
        assert (await fac.verify(req)).is_valid  # the balance came back: seen too
    finally:
        await fac.close()


async def test_settlements_in_flight_count_against_the_balance(devchain: dict[str, Any]) -> None:
    fac = _facilitator(devchain)
    chain = next(iter(fac.chains.values()))
    agent = devchain["accounts"]["agents"][AGENT]
    usdc = devchain["tokens"]["USDC"]["address"]
    try:
        req = await _request(devchain, "USDC", 1_000)
        assert await chain.state.synced_to(0)
        assert (await fac.verify(req)).is_valid
        balance = balance_of(devchain, "USDC", agent["address"])
        chain.state.add_inflight(usdc, agent["address"], balance - 999)  # leaves 999 for a payment of 1,000
        refused = await fac.verify(req)
        assert not refused.is_valid and refused.invalid_reason in REFUSED
        chain.state.settled(usdc, agent["address"], balance - 999)
        assert chain.state.inflight(usdc, agent["address"]) == 0
        assert (await fac.verify(req)).is_valid
    finally:
        await fac.close()


async def test_poll_zero_turns_the_cache_off(devchain: dict[str, Any]) -> None:
    fac = _facilitator(devchain, poll_s=0)
    chain = next(iter(fac.chains.values()))
    try:
        req = await _request(devchain, "USDC", 1_000)
        assert (await fac.verify(req)).is_valid
        assert (await fac.verify(req)).is_valid
        assert chain.state.hits == chain.state.misses == 0
    finally:
        await fac.close()


async def test_a_read_that_raced_with_an_invalidation_is_not_kept(devchain: dict[str, Any]) -> None:
    """A block that changed the payer was scanned while its read was in flight: the read may
    predate the change, so it answers this verify but is not cached."""
    fac = _facilitator(devchain)
    chain = next(iter(fac.chains.values()))
    agent = devchain["accounts"]["agents"][AGENT]
    try:
        req = await _request(devchain, "USDC", 1_000)
        assert await chain.state.synced_to(0)
        real_batch = chain.rpc.batch

        async def batch_meanwhile_invalidated(calls: Any) -> Any:
            chain.state.invalidate(agent["address"])  # as the poll loop would, mid-read
            return await real_batch(calls)

        chain.rpc.batch = batch_meanwhile_invalidated  # type: ignore[method-assign]
        assert (await fac.verify(req)).is_valid
        chain.rpc.batch = real_batch  # type: ignore[method-assign]
        misses = chain.state.misses
        assert (await fac.verify(req)).is_valid
        assert chain.state.misses == misses + 1  # read again: nothing was kept
        assert (await fac.verify(req)).is_valid
        assert chain.state.misses == misses + 1  # now it is
    finally:
        await fac.close()
