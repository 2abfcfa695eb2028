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
REFUSED = {R.INVALID_EXACT_EVM_INSUFFICIENT_BALANCE.value, R.PERMIT2_INSUFFICIENT_BALANCE.value}
NONCE_USED = {R.INVALID_EXACT_EVM_NONCE_ALREADY_USED.value, R.PERMIT2_INVALID_NONCE.value}


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


def _balance_call(devchain: dict[str, Any], symbol: str, who: str) -> Any:
    """The balanceOf read a verify makes (as the cache keys it)."""
    from facilitator.evm import contracts
    from facilitator.evm.eip712 import address_bytes, checksum_address
    from facilitator.evm.rpc import Call

    token = checksum_address(devchain["tokens"][symbol]["address"])
    return Call("eth_call", [{"to": token, "data": contracts.balance_of(address_bytes(who))}, "latest"])


def _cached_balance(chain: Any, symbol: str, devchain: dict[str, Any], who: str) -> int | None:
    from facilitator.evm.statecache import _key

    hit = chain.state._values.get(_key(_balance_call(devchain, symbol, who)))
    return None if hit is None else int(hit[1], 16)


async def _settle(fac: Facilitator, payment: VerifyRequest, chain: Any, devchain: dict[str, Any]) -> None:
    """Settle `payment` through `fac` and wait until `chain`'s cache scanned its block."""
    settled = await fac.settle(SettleRequest.model_validate(payment.model_dump(by_alias=True)))
    assert settled.success, settled
    assert await chain.state.synced_to(await _head(devchain))


@pytest.mark.parametrize("symbol", ["USDC", "OPG"])
async def test_a_repeat_payers_new_payment_is_verified_without_a_round_trip(devchain: dict[str, Any], symbol: str) -> None:
    """Every payment has a fresh nonce: for a payer whose state is cached, its nonce is left to
    the settlement's re-check, so the second payment's verify reads nothing."""
    fac = _facilitator(devchain)
    chain = next(iter(fac.chains.values()))
    try:
        first, second = await _request(devchain, symbol, 1_000), await _request(devchain, symbol, 1_000)
        assert await chain.state.synced_to(0)
        assert (await fac.verify(first)).is_valid
        misses, calls = chain.state.misses, _count_batches(chain)
        assert (await fac.verify(second)).is_valid
        assert chain.state.misses == misses and calls() == 0
    finally:
        await fac.close()


def _count_batches(chain: Any) -> Any:
    """Counts JSON-RPC batches sent from now on; returns the counter."""
    real = chain.rpc.batch
    sent = [0]

    async def counted(calls: Any) -> Any:
        sent[0] += 1
        return await real(calls)

    chain.rpc.batch = counted
    return lambda: sent[0]


@pytest.mark.parametrize("symbol", ["USDC", "OPG"])
async def test_a_nonce_used_elsewhere_after_the_payer_was_cached_is_refused(devchain: dict[str, Any], symbol: str) -> None:
    """Another facilitator settles the payment: its Transfer from the payer drops the payer from
    our cache, so our verify reads the chain again and sees the nonce used."""
    ours, other = _facilitator(devchain), _facilitator(devchain, poll_s=0)
    chain = next(iter(ours.chains.values()))
    try:
        warm, payment = await _request(devchain, symbol, 1_000), await _request(devchain, symbol, 1_000)
        assert await chain.state.synced_to(0)
        assert (await ours.verify(warm)).is_valid
        await _settle(other, payment, chain, devchain)
        refused = await ours.verify(payment)
        assert not refused.is_valid and refused.invalid_reason in NONCE_USED, refused
    finally:
        await ours.close()
        await other.close()


@pytest.mark.parametrize("symbol", ["USDC", "OPG"])
async def test_our_own_settlement_keeps_its_payer_warm_and_exact(devchain: dict[str, Any], symbol: str) -> None:
    """A settlement applies its effects to the cached state (balance debited) and its own events
    do not drop the payer: the next payment verifies with no round trip, and what the cache holds
    is what the chain holds."""
    fac = _facilitator(devchain)
    chain = next(iter(fac.chains.values()))
    agent = devchain["accounts"]["agents"][AGENT]["address"]
    try:
        payment, following = await _request(devchain, symbol, 1_000), await _request(devchain, symbol, 1_000)
        assert await chain.state.synced_to(0)
        assert (await fac.verify(payment)).is_valid
        await _settle(fac, payment, chain, devchain)
        assert _cached_balance(chain, symbol, devchain, agent) == balance_of(devchain, symbol, agent)
        calls = _count_batches(chain)
        assert (await fac.verify(following)).is_valid
        assert calls() == 0
        replay = await fac.verify(payment)  # our own settled payment: refused from the store
        assert not replay.is_valid and replay.invalid_reason in NONCE_USED
    finally:
        await fac.close()


async def test_a_read_stored_while_settling_drops_the_payer_instead_of_applying(devchain: dict[str, Any]) -> None:
    """A read of the payer stored after its settlement began may already include the transfer:
    the settlement's effects are not applied on top of it; the payer is dropped."""
    fac = _facilitator(devchain)
    chain = next(iter(fac.chains.values()))
    agent = devchain["accounts"]["agents"][AGENT]["address"]
    usdc = devchain["tokens"]["USDC"]["address"]
    try:
        req = await _request(devchain, "USDC", 1_000)
        assert await chain.state.synced_to(0)
        assert (await fac.verify(req)).is_valid
        stamp = chain.state.add_inflight(usdc, agent, 1_000)
        assert stamp is not None
        chain.state.invalidate(agent)
        assert (await fac.verify(req)).is_valid  # read again while the settlement runs
        before = _cached_balance(chain, "USDC", devchain, agent)
        assert before is not None
        plan_effects = _balance_debit(chain, devchain, "USDC", agent, 1_000)
        chain.state.settled(usdc, agent, 1_000, stamp=stamp, effects=plan_effects, tx_hashes=["0x" + "ab" * 32])
        assert _cached_balance(chain, "USDC", devchain, agent) is None  # dropped, not debited twice
    finally:
        await fac.close()


def _balance_debit(chain: Any, devchain: dict[str, Any], symbol: str, who: str, amount: int) -> tuple[Any, ...]:
    from facilitator.evm.statecache import Effect

    return (Effect(_balance_call(devchain, symbol, who), "debit", amount),)


async def _head(devchain: dict[str, Any]) -> int:
    rpc = BlockingRpc(devchain["rpc_url"])
    try:
        return int(rpc.call("eth_blockNumber"), 16)
    finally:
        rpc.close()


async def test_a_permit2_nonce_burned_by_its_payer_after_caching_is_refused(devchain: dict[str, Any]) -> None:
    """A hostile payer signs a payment, then burns its nonce on Permit2 (invalidateUnorderedNonces)
    while its state is cached: the UnorderedNonceInvalidation event drops it, and the verify that a
    warm payer would have answered without reading the nonce reads it and refuses."""
    fac = _facilitator(devchain)
    chain = next(iter(fac.chains.values()))
    agent = devchain["accounts"]["agents"][AGENT]
    try:
        warm, payment = await _request(devchain, "OPG", 1_000), await _request(devchain, "OPG", 1_000)
        assert await chain.state.synced_to(0)
        assert (await fac.verify(warm)).is_valid
        nonce = int(payment.payment_payload.payload["permit2Authorization"]["nonce"])
        data = calldata("invalidateUnorderedNonces(uint256,uint256)", ["uint256", "uint256"],
                        [nonce >> 8, 1 << (nonce & 0xFF)])
        send_transactions(devchain, [(Account.from_key(agent["private_key"]), devchain["contracts"]["permit2"], data)])
        assert await chain.state.synced_to(await _head(devchain))
        refused = await fac.verify(payment)
        assert not refused.is_valid and refused.invalid_reason == R.PERMIT2_INVALID_NONCE.value, refused
    finally:
        await fac.close()


@pytest.mark.parametrize("asset", ["0x" + "ab" * 19, "0x" + "ab" * 40, "0x", "USDC", "0x" + "zz" * 20])
async def test_an_asset_that_is_not_an_address_is_refused_and_never_watched(devchain: dict[str, Any], asset: str) -> None:
    """Found by a fuzzer: such an asset went into the cache's log filter, after which the node
    refused every poll until a restart (one request stopped the cache for everyone)."""
    fac = _facilitator(devchain)
    chain = next(iter(fac.chains.values()))
    try:
        good = await _request(devchain, "USDC", 1_000)
        bad = good.model_copy(deep=True)
        bad.payment_requirements.asset = asset
        bad.payment_payload.accepted.asset = asset  # type: ignore[union-attr]
        watched = set(chain.state.watched)
        verdict = await fac.verify(bad)
        assert not verdict.is_valid and verdict.invalid_reason == R.INVALID_PAYMENT_REQUIREMENTS.value, verdict
        assert chain.state.watched == watched
        assert (await fac.verify(good)).is_valid  # the cache still works for everyone
        assert await chain.state.synced_to(await _head(devchain))
    finally:
        await fac.close()


def test_the_cache_watches_addresses_only_and_a_bounded_number() -> None:
    from facilitator.evm.statecache import MAX_WATCHED, ChainStateCache

    cache = ChainStateCache.__new__(ChainStateCache)  # no chain needed to watch
    cache.watched = set()
    assert not cache.watch("0x" + "ab" * 19) and not cache.watch("0x" + "zz" * 20) and cache.watched == set()
    tokens = [f"0x{i:040x}" for i in range(MAX_WATCHED)]
    assert all(cache.watch(t) for t in tokens)
    assert not cache.watch(f"0x{MAX_WATCHED:040x}")  # one too many: read from the chain instead
    assert cache.watch(tokens[0].upper().replace("0X", "0x"))  # one already watched, any case
