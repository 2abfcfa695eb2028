"""The batch-settlement channel manager: every replica runs one, the store's lease lets one act
at a time (a replica that dies loses the lease after `lease_s`, another takes over).

Each pass:
1. a claim whose outcome is unknown (journaled before it was sent) is sent again unchanged until
   it is terminal: the facilitator keys a claim by its signed batch, so it lands at most once, and
   claims are cumulative on chain (a row at or below what is claimed is a no-op), so nothing is
   ever claimed twice;
2. every `sync_interval_s`, each channel's on-chain state is re-read through the facilitator (a
   zero-charge verify of its latest voucher): a pending timed withdrawal stops the channel from
   serving at once and makes its vouchers claimed now, long before the delay (>= 900 s) ends;
3. every `claim_interval_s` (or at once for a withdrawing channel) what was charged above what is
   claimed is claimed, up to `max_claims_per_batch` channels per transaction
   (claimWithSignature, signed by the route's receiver-authorizer key);
4. every `settle_interval_s` what was claimed is swept to payTo (`settle`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson

from facilitator.x402.reasons import ErrorReason as R
from facilitator.x402.types import PaymentRequirements, SettleResponse
from gateway.batch_calls import authorizer_account, chain_id_of, envelope, signed_claims
from gateway.batch_channels import Channel, ChannelStore
from gateway.facilitator_client import FacilitatorClient
from gateway.settings import BatchChannels

log = logging.getLogger("gateway.batch")
LEASE = "manager"
JOURNAL = "claim"


class ChannelManager:
    def __init__(self, store: ChannelStore, facilitator: FacilitatorClient, routes: dict[str, BatchChannels], *,
                 lease_s: float = 30.0, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.facilitator = facilitator
        self.routes = routes  # route id -> its batch settings
        self.owner = uuid.uuid4().hex
        self.lease_s = lease_s
        self.clock = clock
        self._next: dict[str, float] = {"sync": 0.0, "claim": 0.0, "settle": 0.0}
        self.claims_sent = 0  # transactions (a gauge for tests and benchmarks)

    def _interval(self, name: str) -> float:
        attr = {"sync": "sync_interval_s", "claim": "claim_interval_s", "settle": "settle_interval_s"}[name]
        return min(getattr(b, attr) for b in self.routes.values())

    async def run_forever(self) -> None:
        tick = max(0.05, min(self._interval(n) for n in self._next) / 4)
        while True:
            try:
                await self.tick()
            except Exception:  # the manager must outlive a store or facilitator outage
                log.exception("batch_manager_pass_failed")
            await asyncio.sleep(tick)

    async def tick(self, *, force: bool = False) -> bool:
        """One pass if the lease is ours; `force`: every step now. Returns whether it ran."""
        now = self.clock()
        if not await self.store.lease(LEASE, self.owner, ttl_s=self.lease_s, now=now):
            return False
        await self.finish_journaled()
        urgent = False
        if force or now >= self._next["sync"]:
            urgent = await self.sync()
            self._next["sync"] = now + self._interval("sync")
        if force or urgent or now >= self._next["claim"]:
            await self.claim()
            self._next["claim"] = now + self._interval("claim")
        if force or now >= self._next["settle"]:
            await self.sweep()
            self._next["settle"] = now + self._interval("settle")
        return True

    async def _channels(self) -> list[Channel]:
        found = [await self.store.get(id) for id in await self.store.ids()]
        return [c for c in found if c is not None and c.route in self.routes]

    # -- withdrawals ---------------------------------------------------------------------------

    async def sync(self) -> bool:
        """Mirror each channel's on-chain state; True when a withdrawal is pending somewhere."""
        urgent = False
        for channel in await self._channels():
            if not channel.signature or channel.balance == 0:
                continue
            requirement = PaymentRequirements.model_validate_json(channel.requirement)
            inner = {"type": "refund", "channelConfig": orjson.loads(channel.config),
                     "voucher": {"channelId": channel.id, "maxClaimableAmount": str(channel.signed_max),
                                 "signature": channel.signature}}
            verified = await self.facilitator.verify(envelope(inner, requirement), requirement)
            if verified.is_valid and verified.extra:
                channel.balance = int(verified.extra["balance"])
                channel.total_claimed = int(verified.extra["totalClaimed"])
                channel.withdraw_at = int(verified.extra["withdrawRequestedAt"])
                channel.refund_nonce = int(verified.extra["refundNonce"])
                mirrored = await self.store.mirror(channel, now=self.clock())
            elif verified.invalid_reason == R.INVALID_BATCH_SETTLEMENT_EVM_CUMULATIVE_EXCEEDS_BALANCE.value:
                # The balance fell below our voucher: escrow left (a withdrawal finished). Stop
                # serving; what is not claimed by now is not claimable (claims happen as soon as a
                # withdrawal starts, so this is reached only if they could not land in its delay).
                channel.withdraw_at = channel.withdraw_at or 1
                channel.balance = channel.total_claimed
                mirrored = await self.store.mirror(channel, now=self.clock())
            else:
                continue
            if mirrored.withdraw_at:
                log.warning("batch_withdrawal_pending", extra={"channel": channel.id, "since": mirrored.withdraw_at})
                urgent = urgent or mirrored.charged > mirrored.total_claimed
        return urgent

    # -- claims --------------------------------------------------------------------------------

    async def claim(self) -> int:
        """Claim what was charged above what is claimed (never above the channel's balance);
        returns the transactions sent."""
        groups: dict[tuple[str, str], list[Channel]] = {}
        for c in await self._channels():
            if _claimable(c) > c.total_claimed and c.signature and c.signed_max >= c.charged:
                groups.setdefault((c.route, c.network), []).append(c)
        sent = 0
        for (route, _network), channels in groups.items():
            size = self.routes[route].max_claims_per_batch
            for start in range(0, len(channels), size):
                chunk = channels[start:start + size]
                sent += 1
                if not await self._claim_rows(route, chunk) and len(chunk) > 1:
                    # Refused as a whole (one row cannot be claimed): the others go one by one.
                    for channel in chunk:
                        sent += 1
                        if not await self._claim_rows(route, [channel]):
                            await self._unclaimable(channel)
        return sent

    async def _claim_rows(self, route: str, channels: list[Channel]) -> bool:
        """Journal, then send one claim of these channels; False when refused for good."""
        batch = self.routes[route]
        rows = [(c, _claimable(c)) for c in channels]
        requirement = PaymentRequirements.model_validate_json(rows[0][0].requirement)
        inner = signed_claims(authorizer_account(batch), chain_id_of(rows[0][0].network), rows)
        entry = {"payload": inner, "requirement": requirement.model_dump(by_alias=True, exclude_none=True),
                 "rows": [[c.id, total] for c, total in rows]}
        await self.store.journal(JOURNAL, orjson.dumps(entry).decode())
        return await self._send_claim(entry)

    async def _unclaimable(self, channel: Channel) -> None:
        """A channel whose own claim is refused serves no more calls until its state is re-read."""
        log.error("batch_channel_unclaimable", extra={"channel": channel.id, "charged": str(channel.charged)})
        channel.withdraw_at = channel.withdraw_at or 1
        await self.store.mirror(channel, now=self.clock())

    async def finish_journaled(self) -> None:
        """A claim sent before (by any replica) whose outcome was not recorded: send it again."""
        raw = await self.store.read_journal(JOURNAL)
        if raw is not None:
            await self._send_claim(orjson.loads(raw))

    async def _send_claim(self, entry: dict[str, Any]) -> bool:
        """True when it landed or may have (pending: stays journaled); False when refused for good."""
        requirement = PaymentRequirements.model_validate(entry["requirement"])
        self.claims_sent += 1
        settled = await self.facilitator.settle(envelope(entry["payload"], requirement), requirement)
        if settled.success:
            for channel_id, total in entry["rows"]:
                await self.store.claimed(channel_id, total=int(total))
            await self.store.journal(JOURNAL, None)
            log.info("batch_claimed", extra={"channels": len(entry["rows"]), "tx": settled.transaction})
            return True
        if _final(settled):
            # Nothing moved and nothing will (refused before sending, or reverted).
            await self.store.journal(JOURNAL, None)
            log.error("batch_claim_failed", extra={"reason": settled.error_reason, "detail": settled.error_message})
            return False
        # Unknown outcome (pending, facilitator unreachable): stays journaled, sent again next pass.
        log.warning("batch_claim_pending", extra={"reason": settled.error_reason, "tx": settled.transaction})
        return True

    # -- settle --------------------------------------------------------------------------------

    async def sweep(self) -> list[SettleResponse]:
        targets: dict[tuple[str, str, str], PaymentRequirements] = {}
        for c in await self._channels():
            if c.total_claimed > 0:
                requirement = PaymentRequirements.model_validate_json(c.requirement)
                targets.setdefault((c.network, requirement.pay_to.lower(), c.asset), requirement)
        results = []
        for requirement in targets.values():
            inner = {"type": "settle", "receiver": requirement.pay_to, "token": requirement.asset}
            settled = await self.facilitator.settle(envelope(inner, requirement), requirement)
            if settled.success and settled.amount not in ("0", ""):
                log.info("batch_settled", extra={"amount": settled.amount, "tx": settled.transaction})
            results.append(settled)
        return results


def _claimable(channel: Channel) -> int:
    """What a claim may raise totalClaimed to: what was charged, but never above the balance the
    escrow holds (after a finished withdrawal, less is claimable than was charged)."""
    return min(channel.charged, channel.balance)


def _final(settled: SettleResponse) -> bool:
    return bool((settled.extra or {}).get("final")) or (
        settled.error_reason is not None and settled.error_reason.startswith("invalid_batch_settlement_evm_"))
