"""The batch-settlement channel store on the embedded SQLite store and Redis (single, Sentinel,
Cluster): one call at a time per channel, taken by a compare-and-set on what was charged; exact
18-decimal arithmetic; a dead call's hold expires; the manager's lease and claim journal."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from gateway.batch_channels import Channel, ChannelStore, HoldOutcome, open_channels
from tests.conftest import TestClock

OPG = 10**18


@pytest.fixture
def store(open_backend) -> ChannelStore:
    return open_backend(open_channels)


async def channel(store: ChannelStore, now: float, *, balance: int = 10 * OPG, claimed: int = 0) -> Channel:
    c = Channel(id="0x" + uuid.uuid4().hex * 2, network="eip155:84532", asset="0xtoken", payer="0xpayer",
                route="POST /v1/chat/completions", config="{}", requirement="{}", balance=balance, total_claimed=claimed)
    return await store.mirror(c, now=now)


async def test_one_call_at_a_time_and_cumulative_charges(store: ChannelStore, clock: TestClock) -> None:
    now = clock()
    c = await channel(store, now)
    assert (c.charged, c.held) == (0, 0)
    price = 3 * OPG + 1  # an 18-decimal odd amount
    holds = await asyncio.gather(*(store.hold(c.id, charged=0, voucher_max=price, signature="0xsig", amount=price,
                                              now=now, lease_s=60) for _ in range(8)))
    outcomes = [o for o, _ in holds]
    assert outcomes.count(HoldOutcome.OK) == 1 and outcomes.count(HoldOutcome.BUSY) == 7
    done = await store.commit(c.id, charge=price)
    assert (done.charged, done.held, done.signed_max, done.signature) == (price, 0, price, "0xsig")
    # the same voucher again (a replay) no longer continues from what was charged
    outcome, seen = await store.hold(c.id, charged=0, voucher_max=price, signature="0xsig", amount=price, now=now,
                                     lease_s=60)
    assert outcome == HoldOutcome.MISMATCH and seen is not None and seen.charged == price
    # above the balance
    outcome, _ = await store.hold(c.id, charged=price, voucher_max=10 * OPG + 1, signature="0x2", amount=price,
                                  now=now, lease_s=60)
    assert outcome == HoldOutcome.EXCEEDS
    assert (await store.hold("0x" + "00" * 32, charged=0, voucher_max=1, signature="", amount=1, now=now,
                             lease_s=1))[0] == HoldOutcome.MISSING


async def test_a_dead_calls_hold_expires_and_a_failed_call_charges_nothing(store: ChannelStore, clock: TestClock) -> None:
    now = clock()
    c = await channel(store, now)
    assert (await store.hold(c.id, charged=0, voucher_max=5, signature="0xa", amount=5, now=now, lease_s=2))[0] == "ok"
    assert (await store.hold(c.id, charged=0, voucher_max=5, signature="0xa", amount=5, now=now + 1, lease_s=2))[0] \
        == HoldOutcome.BUSY
    # its replica died: after the lease, the channel serves again, from the same charged amount
    outcome, held = await store.hold(c.id, charged=0, voucher_max=5, signature="0xa", amount=5, now=now + 3, lease_s=2)
    assert outcome == HoldOutcome.OK and held is not None and held.signed_max == 5  # the voucher was kept
    await store.release(c.id)
    got = await store.get(c.id)
    assert got is not None and (got.charged, got.held) == (0, 0)


async def test_mirror_withdrawal_and_claims(store: ChannelStore, clock: TestClock) -> None:
    now = clock()
    c = await channel(store, now, claimed=2 * OPG)
    assert c.charged == 2 * OPG  # a channel first seen: what was claimed on chain is the baseline
    c.withdraw_at = 12345
    await store.mirror(c, now=now)
    assert (await store.hold(c.id, charged=2 * OPG, voucher_max=3 * OPG, signature="0x", amount=OPG, now=now,
                             lease_s=5))[0] == HoldOutcome.WITHDRAWING
    await store.claimed(c.id, total=3 * OPG)
    await store.claimed(c.id, total=1)  # never lowered
    got = await store.get(c.id)
    assert got is not None and got.total_claimed == 3 * OPG and got.charged == 2 * OPG
    assert c.id in await store.ids()


async def test_manager_lease_and_journal(store: ChannelStore, clock: TestClock) -> None:
    now = clock()
    name = "lease-" + uuid.uuid4().hex
    assert await store.lease(name, "a", ttl_s=30, now=now)
    assert not await store.lease(name, "b", ttl_s=30, now=now)
    assert await store.lease(name, "a", ttl_s=30, now=now + 1)  # the owner extends it
    journal = "j-" + uuid.uuid4().hex
    assert await store.read_journal(journal) is None
    await store.journal(journal, '{"rows": []}')
    assert await store.read_journal(journal) == '{"rows": []}'
    await store.journal(journal, None)
    assert await store.read_journal(journal) is None


async def test_amounts_compare_as_numbers_past_64_bits_and_only_a_larger_voucher_is_kept(store: ChannelStore,
                                                                                          clock: TestClock) -> None:
    now = clock()
    big = 10**30  # beyond any machine integer; amounts of different lengths must compare as numbers
    c = await channel(store, now, balance=big)
    assert (await store.hold(c.id, charged=0, voucher_max=big + 1, signature="0xover", amount=1, now=now,
                             lease_s=5))[0] == HoldOutcome.EXCEEDS
    assert (await store.hold(c.id, charged=0, voucher_max=9 * 10**29, signature="0xa", amount=9 * 10**29, now=now,
                             lease_s=5))[0] == HoldOutcome.OK
    done = await store.commit(c.id, charge=9 * 10**29)
    assert (done.charged, done.signed_max, done.signature) == (9 * 10**29, 9 * 10**29, "0xa")
    # "95" > "100000…" as text, not as numbers: the older, smaller voucher is not kept over the larger one
    assert (await store.hold(c.id, charged=9 * 10**29, voucher_max=big, signature="0xb", amount=10**29, now=now,
                             lease_s=5))[0] == HoldOutcome.OK
    await store.release(c.id)
    assert (await store.hold(c.id, charged=9 * 10**29, voucher_max=95 * 10**28, signature="0xc", amount=5 * 10**28,
                             now=now, lease_s=5))[0] == HoldOutcome.OK
    done = await store.commit(c.id, charge=5 * 10**28)
    assert (done.charged, done.signed_max, done.signature, done.held) == (95 * 10**28, big, "0xb", 0)
    assert (await store.hold(c.id, charged=9 * 10**29, voucher_max=big, signature="0xd", amount=1, now=now,
                             lease_s=5))[0] == HoldOutcome.MISMATCH


async def test_an_answer_kept_with_its_charge_is_owed_until_delivered(store: ChannelStore, clock: TestClock) -> None:
    now = clock()
    c = await channel(store, now)
    assert (await store.hold(c.id, charged=0, voucher_max=5, signature="0xv1", amount=5, now=now, lease_s=5))[0] == "ok"
    done = await store.commit(c.id, charge=5, reply='{"body": "answer one"}', voucher="0xv1")
    assert done.charged == 5
    assert await store.owed_reply(c.id, voucher="0xv1") == '{"body": "answer one"}'
    assert await store.owed_reply(c.id, voucher="0xother") is None  # only for the voucher it was charged with
    await store.delivered(c.id, voucher="0xother")  # another voucher's mark leaves it owed
    assert await store.owed_reply(c.id, voucher="0xv1") is not None
    await store.delivered(c.id, voucher="0xv1")
    assert await store.owed_reply(c.id, voucher="0xv1") is None
    # the next call's answer replaces it; a commit without one keeps nothing
    assert (await store.hold(c.id, charged=5, voucher_max=10, signature="0xv2", amount=5, now=now, lease_s=5))[0] == "ok"
    await store.commit(c.id, charge=5, reply='{"body": "answer two"}', voucher="0xv2")
    assert (await store.hold(c.id, charged=10, voucher_max=15, signature="0xv3", amount=5, now=now, lease_s=5))[0] == "ok"
    await store.commit(c.id, charge=5)
    assert await store.owed_reply(c.id, voucher="0xv3") is None
    assert await store.owed_reply(c.id, voucher="0xv2") == '{"body": "answer two"}'


async def test_a_hold_is_its_calls_own_renewed_while_it_runs(store: ChannelStore, clock: TestClock) -> None:
    """A live call renews its hold however long it runs; a call whose hold lapsed and was taken by
    another is not charged (commit None, and no answer kept for its voucher), and neither its
    release nor its renewal touches the other call's hold."""
    now = clock()
    c = await channel(store, now)
    ok = HoldOutcome.OK
    assert (await store.hold(c.id, charged=0, voucher_max=5, signature="0xa", amount=5, now=now, lease_s=2,
                             holder="call-a"))[0] == ok
    assert await store.renew(c.id, holder="call-a", until=now + 10)
    assert not await store.renew(c.id, holder="call-x", until=now + 60)
    assert (await store.hold(c.id, charged=0, voucher_max=5, signature="0xb", amount=5, now=now + 5, lease_s=2,
                             holder="call-b"))[0] == HoldOutcome.BUSY  # renewed past its first lease
    # call-a stalls: its hold lapses, call-b takes the channel from the same charged amount
    assert (await store.hold(c.id, charged=0, voucher_max=5, signature="0xb", amount=5, now=now + 11, lease_s=2,
                             holder="call-b"))[0] == ok
    assert await store.commit(c.id, charge=5, holder="call-a", reply='{"body": "a"}', voucher="0xa") is None
    assert await store.owed_reply(c.id, voucher="0xa") is None
    await store.release(c.id, holder="call-a")
    assert not await store.renew(c.id, holder="call-a", until=now + 60)
    got = await store.get(c.id)
    assert got is not None and (got.charged, got.held, got.holder) == (0, 5, "call-b")
    done = await store.commit(c.id, charge=5, holder="call-b")
    assert done is not None and (done.charged, done.held) == (5, 0)
    assert await store.commit(c.id, charge=5, holder="call-b") is None  # committed once
    assert not await store.renew(c.id, holder="call-b", until=now + 60)  # over: nothing to renew
