"""Calls paid through a batch-settlement channel (x402 `batch-settlement`, gateway/batch_channels.py).

- `deposit`: the first call of a channel (or a top-up) carries the escrow deposit and a voucher;
  the deposit is relayed through the facilitator and confirmed on chain before anything is served.
- `voucher`: every later call. Checked here, with no RPC: the channel config is the route's, the
  voucher is signed by the channel's payerAuthorizer (one EIP-712 digest, one ECDSA recovery),
  it continues exactly from what was charged (`charged + price`), it fits the mirrored balance,
  and no withdrawal is pending; the compare-and-set that takes the channel checks the last three
  atomically across replicas, and refuses a second call while one is in flight.
- `refund`: the payer asks for what it did not spend; the gateway claims what was charged and
  returns the rest in one transaction (claimWithSignature + refundWithSignature).

Nothing is charged when the upstream fails (the hold is released and the voucher's extra amount
stays unclaimable, because claims never go above what was charged). A call's hold on its channel
is short (`call_lease_s`) and renewed every third of it while the call runs: a replica killed
mid-call frees the channel within seconds, and a call however long keeps it. Budgets reserve and commit
per call like any paid call. A cumulative-amount mismatch answers a corrective 402 carrying the
channel's state and the last voucher the payer signed, as the spec asks.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_typing import Hash32
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from facilitator.errors import PaymentInvalidError
from facilitator.schemes.evm_batch.channel import (
    ZERO_ADDRESS,
    ChannelConfig,
    claim_batch_digest,
    parse_uint,
    recovers_to,
    refund_digest,
    voucher_digest,
)
from facilitator.schemes.evm_batch.operations import SignedVoucher, check_config
from facilitator.x402.headers import encode_payment_required
from facilitator.x402.reasons import ErrorReason as R
from facilitator.x402.types import PaymentPayload, PaymentRequired, PaymentRequirements, SettleResponse
from gateway.batch_channels import Channel, ChannelStore, ChannelStoreUnavailableError, HoldOutcome
from gateway.budget_hook import BudgetHook
from gateway.errors import GatewayError
from gateway.facilitator_client import FacilitatorClient
from gateway.metering import StreamMeter, usage_from_body
from gateway.paywall.call import PaidCall
from gateway.paywall.metered import metered_charge
from gateway.paywall.responses import Challenges, client_gone, payment_response_header
from gateway.proxy import UpstreamAnswer, relay, response_headers
from gateway.settings import BatchChannels
from gateway.sse_usage import forwarded_stream

log = logging.getLogger("gateway.batch")

DELIVERY_GRACE_S = 2.0  # how long after charging a call its answer may still be on its way

Forward = Callable[[PaidCall], Awaitable[tuple[UpstreamAnswer, bytes, bytes | None]]]


def chain_id_of(network: str) -> int:
    return int(network.split(":", 1)[1])


def authorizer_account(batch: BatchChannels) -> LocalAccount:
    return Account.from_key(batch.receiver_authorizer_key.get_secret_value())


def sign_digest(account: LocalAccount, digest: bytes) -> str:
    """The authorizer's signature of an EIP-712 digest (ClaimBatch, Refund), 0x + 65 bytes."""
    return "0x" + bytes(account.unsafe_sign_hash(Hash32(digest)).signature).hex()


def claim_row(config: dict[str, Any], signed_max: int, signature: str, total: int) -> dict[str, Any]:
    return {"voucher": {"channel": config, "maxClaimableAmount": str(signed_max)}, "signature": signature,
            "totalClaimed": str(total)}


def signed_claims(account: LocalAccount, chain_id: int, rows: list[tuple[Channel, int]]) -> dict[str, Any]:
    """A `claim` payload for (channel, totalClaimed) rows, the batch signed by the authorizer."""
    entries, wire = [], []
    for channel, total in rows:
        config = orjson.loads(channel.config)
        entries.append((bytes.fromhex(channel.id[2:]), channel.signed_max, total))
        wire.append(claim_row(config, channel.signed_max, channel.signature, total))
    return {"type": "claim", "claims": wire,
            "claimAuthorizerSignature": sign_digest(account, claim_batch_digest(chain_id, entries))}


def envelope(inner: dict[str, Any], requirement: PaymentRequirements) -> PaymentPayload:
    return PaymentPayload(x402_version=2, payload=inner, accepted=requirement)


class HeldStream(StreamingResponse):
    """A stream that holds its channel until it ends. Its body charges (or releases) in its own
    `finally`; but a client gone before the body began (Starlette then never starts it) would
    leave the hold and the budget taken: `unstarted` frees them."""

    def __init__(self, content: AsyncIterator[bytes], unstarted: Callable[[], Awaitable[None]], **kwargs: Any) -> None:
        self.began = False
        self._unstarted = unstarted

        async def body() -> AsyncIterator[bytes]:
            self.began = True
            try:
                async for chunk in content:
                    yield chunk
            finally:  # a client gone mid-stream: the body's own `finally` (its charge) runs now
                close = getattr(content, "aclose", None)
                if close is not None:
                    await close()

        super().__init__(body(), **kwargs)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.began:
                await asyncio.shield(self._unstarted())
            else:  # ended, or cut (the client left, a send failed): its `finally` charges now, not at GC
                close = getattr(self.body_iterator, "aclose", None)
                if close is not None:
                    await asyncio.shield(close())


class HoldRenewal:
    """Keeps a call's hold on its channel alive, every third of the lease, until stopped (for at
    most MAX_CALL_S: should a call's end ever go unseen, its channel is not kept forever). Nothing
    runs for a call shorter than a third of the lease (a timer, then one task)."""

    MAX_CALL_S = 3600.0

    def __init__(self, store: ChannelStore, channel_id: str, holder: str, lease_s: float) -> None:
        self.store = store
        self.channel_id = channel_id
        self.holder = holder
        self.lease_s = lease_s
        self._until = time.monotonic() + self.MAX_CALL_S
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(lease_s / 3, self._start)

    def _start(self) -> None:
        self._timer = None
        self._task = asyncio.ensure_future(self._renew())

    async def _renew(self) -> None:
        while time.monotonic() < self._until:
            try:
                if not await self.store.renew(self.channel_id, holder=self.holder, until=time.time() + self.lease_s):
                    log.warning("batch_hold_not_ours", extra={"channel": self.channel_id, "request_id": self.holder})
                    return
            except ChannelStoreUnavailableError as exc:  # next time; the hold may lapse meanwhile
                log.warning("batch_hold_not_renewed", extra={"channel": self.channel_id, "error": str(exc)})
            await asyncio.sleep(self.lease_s / 3)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            self._task.cancel()
            self._task = None


class BatchCalls:
    def __init__(self, store: ChannelStore, facilitator: FacilitatorClient, budgets: BudgetHook,
                 challenges: Challenges, forward: Forward, background: set[asyncio.Task[Any]], *,
                 keep_bytes: int = 1 << 20) -> None:
        self.background = background  # charges of metered streams whose client left
        self.keep_bytes = keep_bytes  # answers kept (until delivered) for a resend of their voucher
        # The crash tests' fault hook (as settle.py's): the process dies right after a call was charged.
        self.exit_after_charge = float(os.environ.get("GATEWAY_FAULT_EXIT_AFTER_SETTLE") or 0)
        self.store = store
        self.facilitator = facilitator
        self.budgets = budgets
        self.challenges = challenges
        self.forward = forward

    async def call(self, call: PaidCall) -> Response:
        assert isinstance(call.payload, PaymentPayload) and isinstance(call.requirement, PaymentRequirements)
        requirement, inner = call.requirement, call.payload.payload
        batch = call.offer.route.batch
        assert batch is not None
        kind = inner.get("type")
        reason = {"deposit": R.INVALID_BATCH_SETTLEMENT_EVM_DEPOSIT_PAYLOAD,
                  "refund": R.INVALID_BATCH_SETTLEMENT_EVM_REFUND_PAYLOAD}.get(str(kind),
                                                                                R.INVALID_BATCH_SETTLEMENT_EVM_VOUCHER_PAYLOAD)
        try:
            if kind not in ("deposit", "voucher", "refund"):
                raise PaymentInvalidError(R.INVALID_BATCH_SETTLEMENT_EVM_PAYLOAD_TYPE, f"payload type {kind!r}")
            config = ChannelConfig.from_wire(inner.get("channelConfig"), reason)
            voucher = SignedVoucher.from_wire(inner.get("voucher"), reason)
            check_config(config, voucher.channel_id, requirement, chain_id_of(requirement.network))
        except PaymentInvalidError as exc:
            raise GatewayError(exc.reason.value, exc.message, offer=call.offer) from None
        channel_id = "0x" + voucher.channel_id.hex()
        await self.budgets.precheck(config.payer, call.network, requirement.asset, call.offer.route_id, call.offer.model)
        if config.payer_authorizer == ZERO_ADDRESS:
            # ERC-1271 payers: their signatures can only be checked on chain.
            raise GatewayError(R.INVALID_BATCH_SETTLEMENT_EVM_VOUCHER_SIGNATURE.value,
                               "this gateway needs a payerAuthorizer (an EOA that signs vouchers)", offer=call.offer)
        digest = voucher_digest(chain_id_of(requirement.network), voucher.channel_id, voucher.max_claimable)
        if not recovers_to(digest, voucher.signature, config.payer_authorizer):
            raise GatewayError(R.INVALID_BATCH_SETTLEMENT_EVM_VOUCHER_SIGNATURE.value,
                               "the voucher is not signed by the channel's payerAuthorizer", offer=call.offer)
        if kind == "refund":
            return await self.refund(call, batch, config, voucher, channel_id)
        price = int(requirement.amount)
        settled: SettleResponse | None = None
        if kind == "deposit":
            try:
                _, settled = await self.deposit(call, config, voucher, channel_id)
            except _Corrective as corrective:
                return corrective.response
        mismatch = "the voucher must be for what was charged plus this call's price"
        if voucher.max_claimable < price:
            channel = await self.store.get(channel_id) or self._fresh(call, config, channel_id)
            return self.corrective(call, channel, mismatch)
        # One round trip: the compare-and-set is the check (a voucher continues from what was charged).
        outcome, held = await self._hold(call, channel_id, voucher, price, batch)
        if outcome == HoldOutcome.MISSING and kind == "voucher":
            await self.adopt(call, channel_id)  # no record here: the chain's state is the baseline
            outcome, held = await self._hold(call, channel_id, voucher, price, batch)
        if outcome == HoldOutcome.MISMATCH and held is not None:
            return await self.owed(call, held, voucher) or self.corrective(call, held, mismatch)
        if outcome != HoldOutcome.OK:
            raise GatewayError(*_REFUSALS[outcome], offer=call.offer)
        renewal = HoldRenewal(self.store, channel_id, call.request_id, batch.call_lease_s)
        return await self.serve(call, config.payer, channel_id, "0x" + voucher.signature.hex(), price, settled, renewal)

    async def _hold(self, call: PaidCall, channel_id: str, voucher: SignedVoucher, price: int,
                    batch: BatchChannels) -> tuple[HoldOutcome, Channel | None]:
        return await self.store.hold(channel_id, charged=voucher.max_claimable - price, voucher_max=voucher.max_claimable,
                                     signature="0x" + voucher.signature.hex(), amount=price, now=time.time(),
                                     lease_s=batch.call_lease_s, holder=call.request_id)

    # -- the channel a call is for -------------------------------------------------------------

    async def deposit(self, call: PaidCall, config: ChannelConfig, voucher: SignedVoucher,
                      channel_id: str) -> tuple[Channel, SettleResponse]:
        """Relay the deposit and wait for it on chain; the channel is then what the chain says."""
        assert isinstance(call.payload, PaymentPayload) and isinstance(call.requirement, PaymentRequirements)
        deposit = call.payload.payload.get("deposit")
        minimum = int(call.requirement.extra.get("minDeposit", "0"))
        try:
            if not isinstance(deposit, dict):
                raise PaymentInvalidError(R.INVALID_BATCH_SETTLEMENT_EVM_DEPOSIT_PAYLOAD, "deposit must be an object")
            amount = parse_uint(deposit.get("amount"), R.INVALID_BATCH_SETTLEMENT_EVM_DEPOSIT_PAYLOAD, "deposit.amount")
        except PaymentInvalidError as exc:
            raise GatewayError(exc.reason.value, exc.message, offer=call.offer) from None
        if amount < minimum:
            raise GatewayError(R.INVALID_BATCH_SETTLEMENT_EVM_DEPOSIT_BELOW_MIN_DEPOSIT.value,
                               f"a deposit must be at least {minimum}", offer=call.offer)
        known = await self.store.get(channel_id)
        charged = known.charged if known is not None else 0
        if voucher.max_claimable != charged + int(call.requirement.amount):
            # Checked before anything moves: a deposit whose call cannot be served is not relayed.
            if known is not None and (kept := await self.owed(call, known, voucher)) is not None:
                raise _Corrective(kept)
            channel = known or self._fresh(call, config, channel_id)
            raise _Corrective(self.corrective(call, channel, "the voucher must be for what was charged plus this "
                                              "call's price"))
        settled = await self.facilitator.settle(call.payload, call.requirement)
        if not settled.success:
            raise GatewayError(settled.error_reason or R.INVALID_BATCH_SETTLEMENT_EVM_DEPOSIT_TRANSACTION_FAILED.value,
                               settled.error_message or "the deposit did not go through", offer=call.offer)
        state = (settled.extra or {}).get("channelState") or {}
        channel = self._fresh(call, config, channel_id)
        _take_state(channel, state)
        return await self.store.mirror(channel, now=time.time()), settled

    async def adopt(self, call: PaidCall, channel_id: str) -> Channel:
        """A channel this gateway has no record of (never seen, or state lost): its on-chain state,
        read once through the facilitator, is the baseline (charged = totalClaimed)."""
        assert isinstance(call.payload, PaymentPayload) and isinstance(call.requirement, PaymentRequirements)
        verified = await self.facilitator.verify(call.payload, call.requirement)
        if not verified.is_valid and verified.invalid_reason != R.INVALID_BATCH_SETTLEMENT_EVM_CUMULATIVE_BELOW_CLAIMED:
            raise GatewayError(verified.invalid_reason or R.INVALID_BATCH_SETTLEMENT_EVM_CHANNEL_NOT_FOUND.value,
                               verified.invalid_message or "the channel could not be read", offer=call.offer)
        config = ChannelConfig.from_wire(call.payload.payload["channelConfig"], R.INVALID_BATCH_SETTLEMENT_EVM_VOUCHER_PAYLOAD)
        channel = self._fresh(call, config, channel_id)
        if verified.extra:
            _take_state(channel, verified.extra)
        return await self.store.mirror(channel, now=time.time())

    @staticmethod
    def _fresh(call: PaidCall, config: ChannelConfig, channel_id: str) -> Channel:
        assert isinstance(call.requirement, PaymentRequirements)
        requirement = call.requirement.model_dump(by_alias=True, exclude_none=True)
        return Channel(id=channel_id, network=call.network, asset=call.requirement.asset.lower(), payer=config.payer,
                       route=call.offer.route_id, config=orjson.dumps(config.to_wire()).decode(),
                       requirement=orjson.dumps(requirement).decode())

    # -- serving -------------------------------------------------------------------------------

    async def serve(self, call: PaidCall, payer: str, channel_id: str, signature: str, price: int,
                    deposit: SettleResponse | None, renewal: HoldRenewal) -> Response:
        """Forward the held call and charge it: the price, or on a metered route what was used
        (at most the price, the voucher's per-call maximum)."""
        assert isinstance(call.requirement, PaymentRequirements)
        hold = None
        try:
            hold = await self.budgets.reserve(payer, call.network, call.requirement.asset, price, call.offer.route_id,
                                              call.offer.model, call.request_id)
            upstream, first, content = await self.forward(call)
        except BaseException:
            renewal.stop()
            await asyncio.shield(self._nothing(call, channel_id, hold))
            raise
        metered = call.offer.token_price is not None
        if metered and content is None:  # a metered stream: charged after its last token
            stream = self._metered_stream(call, channel_id, hold, deposit, first, upstream, renewal)

            async def unstarted() -> None:  # the client left before the stream began: nothing to charge
                renewal.stop()
                upstream.release()
                await self._nothing(call, channel_id, hold)

            return HeldStream(forwarded_stream(call.request, stream), unstarted, status_code=upstream.status,
                              headers=dict(response_headers(upstream)) | {"Cache-Control": "no-store"})
        charge, details = (metered_charge(call.offer, call.requirement, usage_from_body(content or b""))
                           if metered else (price, {}))
        reply = ""
        if content is not None and len(content) <= self.keep_bytes:
            reply = orjson.dumps({"status": upstream.status, "headers": response_headers(upstream),
                                  "body": base64.b64encode(content).decode(), "charge": str(charge),
                                  "deposit": deposit.model_dump(by_alias=True, exclude_none=True) if deposit else None,
                                  "at": time.time()}).decode()  # fmt: skip
        charged = await asyncio.shield(self._charge(call, channel_id, hold, charge, deposit, details, renewal, reply,
                                                    signature))
        if charged is None:
            upstream.release()
            return await self.hold_lost(call, channel_id)
        channel = charged
        if self.exit_after_charge and random.random() < self.exit_after_charge:
            os._exit(70)
        headers = dict(response_headers(upstream)) | payment_response_header(call.payload,
                                                                            receipt_fields(call, channel, charge, deposit))
        if content is not None:
            if reply:  # owed until it went out to its end
                return OwedAnswer(content, status_code=upstream.status, headers=headers,
                                  delivered=lambda: self._delivered(channel_id, signature))
            return Response(content, status_code=upstream.status, headers=headers)
        return StreamingResponse(forwarded_stream(call.request, relay(first, upstream)), status_code=upstream.status,
                                 headers=headers)

    async def owed(self, call: PaidCall, channel: Channel, voucher: SignedVoucher) -> Response | None:
        """A resend of the channel's latest voucher whose answer was kept and never delivered (its
        replica died after charging it, or the agent was cut off): that answer, once more, with
        no new charge and no upstream call. None for anything else (a replay of a delivered call
        is refused by the corrective 402)."""
        signature = "0x" + voucher.signature.hex()
        if channel.signed_max != voucher.max_claimable or channel.signature != signature:
            return None
        kept = await self.store.owed_reply(channel.id, voucher=signature)
        if kept is None:
            return None
        doc = orjson.loads(kept)
        # Just charged: its replica may be sending it right now, and marks it delivered once sent.
        # A resend within that moment is told apart from a replay by waiting for the mark.
        deadline = time.monotonic() + min(max(float(doc.get("at", 0)) + DELIVERY_GRACE_S - time.time(), 0),
                                          DELIVERY_GRACE_S)
        while time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            if await self.store.owed_reply(channel.id, voucher=signature) is None:
                return None
        deposit = SettleResponse.model_validate(doc["deposit"]) if doc.get("deposit") else None
        receipt = receipt_fields(call, channel, int(doc["charge"]), deposit)
        log.warning("batch_owed_reply_served", extra={"channel": channel.id, "request_id": call.request_id})
        return OwedAnswer(base64.b64decode(doc["body"]), status_code=int(doc["status"]),
                          headers=dict(doc["headers"]) | payment_response_header(call.payload, receipt),
                          delivered=lambda: self._delivered(channel.id, signature))

    async def _delivered(self, channel_id: str, signature: str) -> None:
        try:
            await self.store.delivered(channel_id, voucher=signature)
        except ChannelStoreUnavailableError:  # it stays owed: a resend would get it once more, never charged
            log.warning("batch_reply_not_marked_delivered", extra={"channel": channel_id})

    async def _charge(self, call: PaidCall, channel_id: str, hold: Any, charge: int, deposit: SettleResponse | None,
                      details: dict[str, Any], renewal: HoldRenewal, reply: str = "",
                      signature: str = "") -> Channel | None:
        """None: the call's hold lapsed and another call took the channel; nothing was charged."""
        try:
            channel = await self.store.commit(channel_id, charge=charge, holder=call.request_id, reply=reply,
                                              voucher=signature)
        finally:
            renewal.stop()
        if channel is None:
            log.error("batch_hold_lost", extra={"channel": channel_id, "request_id": call.request_id})
            if hold is not None:
                await self.budgets.release(hold)
            return None
        await self.budgets.commit(hold, charge, deposit.transaction if deposit else "", call.request_id,
                                  {"scheme": "batch-settlement", "channel": channel_id, **details})
        return channel

    async def hold_lost(self, call: PaidCall, channel_id: str) -> Response:
        """The call ran past its hold (not renewed: the store was away, or the process stalled)
        and another call took the channel: it was not charged, and its answer is not served."""
        channel = await self.store.get(channel_id)
        if channel is None:
            raise GatewayError(R.INVALID_BATCH_SETTLEMENT_EVM_CHANNEL_NOT_FOUND.value, "the channel is gone",
                               offer=call.offer)
        return self.corrective(call, channel, "this call's hold on the channel lapsed and another call took it: it "
                                              "was not charged; sign the next voucher from what was charged")

    async def _metered_stream(self, call: PaidCall, channel_id: str, hold: Any, deposit: SettleResponse | None,
                              first: bytes, upstream: UpstreamAnswer,
                              renewal: HoldRenewal) -> AsyncIterator[bytes]:
        """The stream flows as it comes (the channel stays held, so the voucher's maximum backs
        it); its usage is charged when it ends, reported in a final `event: x402.payment`."""
        assert isinstance(call.requirement, PaymentRequirements)
        meter, cut, finished = StreamMeter(), False, False
        try:
            try:
                async for chunk in relay(first, upstream):
                    meter.feed(chunk)
                    yield chunk
            except (aiohttp.ClientError, TimeoutError):
                cut = True
            finished = True
        finally:
            charge, details = metered_charge(call.offer, call.requirement, meter.usage,
                                             cut=cut or not finished or not meter.complete)
            task = asyncio.ensure_future(self._charge(call, channel_id, hold, charge, deposit, details, renewal))
            if not finished:  # the client left: the charge completes in the background
                self.background.add(task)
                task.add_done_callback(self.background.discard)
        channel = await asyncio.shield(task)
        if channel is None:  # delivered and not charged (the hold lapsed, logged): no receipt to give
            return
        receipt = receipt_fields(call, channel, charge, deposit)
        yield b"event: x402.payment\ndata: " + orjson.dumps(receipt | details) + b"\n\n"

    async def _nothing(self, call: PaidCall, channel_id: str, hold: Any) -> None:
        await self.store.release(channel_id, holder=call.request_id)
        if hold is not None:
            await self.budgets.release(hold)

    # -- cooperative refund --------------------------------------------------------------------

    async def refund(self, call: PaidCall, batch: BatchChannels, config: ChannelConfig, voucher: SignedVoucher,
                     channel_id: str) -> Response:
        """Claim what was charged and return the rest (or the amount asked for), in one
        transaction; the route's upstream is not called."""
        assert isinstance(call.payload, PaymentPayload) and isinstance(call.requirement, PaymentRequirements)
        channel = await self.store.get(channel_id) or await self.adopt(call, channel_id)
        if voucher.max_claimable != channel.charged:
            return self.corrective(call, channel, "a refund's voucher must be for exactly what was charged")
        # Fresh on-chain state (the refund nonce, a withdrawal), and the channel held meanwhile.
        verified = await self.facilitator.verify(call.payload, call.requirement)
        if not verified.is_valid:
            raise GatewayError(verified.invalid_reason or R.INVALID_BATCH_SETTLEMENT_EVM_REFUND_PAYLOAD.value,
                               verified.invalid_message or "refund not possible", offer=call.offer)
        _take_state(channel, verified.extra or {})
        channel = await self.store.mirror(channel, now=time.time())
        outcome, _ = await self.store.hold(channel_id, charged=channel.charged, voucher_max=voucher.max_claimable,
                                           signature="0x" + voucher.signature.hex(), amount=1, now=time.time(),
                                           lease_s=batch.call_lease_s, holder=call.request_id)
        if outcome not in (HoldOutcome.OK, HoldOutcome.WITHDRAWING):
            raise GatewayError(*_REFUSALS[outcome], offer=call.offer)
        renewal = HoldRenewal(self.store, channel_id, call.request_id, batch.call_lease_s)
        try:
            settled = await self._refund(call, batch, channel, voucher)
        finally:
            renewal.stop()
            await asyncio.shield(self.store.release(channel_id, holder=call.request_id))
        return Response(orjson.dumps({"refunded": settled.amount, "channel": channel_id}), media_type="application/json",
                        headers=payment_response_header(call.payload, settled))

    async def _refund(self, call: PaidCall, batch: BatchChannels, channel: Channel,
                      voucher: SignedVoucher) -> SettleResponse:
        assert isinstance(call.payload, PaymentPayload) and isinstance(call.requirement, PaymentRequirements)
        requested = call.payload.payload.get("amount")
        unclaimed = channel.balance - channel.charged
        try:
            amount = unclaimed if requested is None else min(
                parse_uint(requested, R.INVALID_BATCH_SETTLEMENT_EVM_REFUND_AMOUNT_INVALID, "amount"), unclaimed)
        except PaymentInvalidError as exc:
            raise GatewayError(exc.reason.value, exc.message, offer=call.offer) from None
        if amount <= 0:
            raise GatewayError(R.INVALID_BATCH_SETTLEMENT_EVM_REFUND_NO_BALANCE.value, "nothing is left to refund",
                               offer=call.offer)
        account = authorizer_account(batch)
        chain_id = chain_id_of(channel.network)
        claims = (signed_claims(account, chain_id, [(channel, channel.charged)])
                  if channel.charged > channel.total_claimed else {"claims": []})
        inner = dict(call.payload.payload) | {
            "amount": str(amount), "refundNonce": str(channel.refund_nonce), "claims": claims["claims"],
            "refundAuthorizerSignature": sign_digest(account, refund_digest(chain_id, bytes.fromhex(channel.id[2:]),
                                                                            channel.refund_nonce, amount)),
        }  # fmt: skip
        if claims["claims"]:
            inner["claimAuthorizerSignature"] = claims["claimAuthorizerSignature"]
        settled = await self.facilitator.settle(envelope(inner, call.requirement), call.requirement)
        if not settled.success:
            raise GatewayError(settled.error_reason or R.INVALID_BATCH_SETTLEMENT_EVM_REFUND_PAYLOAD.value,
                               settled.error_message or "the refund did not go through", offer=call.offer)
        await self.store.claimed(channel.id, total=channel.charged)
        state = (settled.extra or {}).get("channelState") or {}
        await self.store.refunded(channel.id, balance=int(state.get("balance", channel.balance - amount)),
                                  refund_nonce=int(state.get("refundNonce", channel.refund_nonce + 1)))
        log.info("batch_refund", extra={"channel": channel.id, "amount": str(amount), "tx": settled.transaction})
        return settled

    # -- corrective 402 ------------------------------------------------------------------------

    def corrective(self, call: PaidCall, channel: Channel, message: str) -> Response:
        """`invalid_batch_settlement_evm_cumulative_amount_mismatch` with the channel's state and
        the last voucher the payer signed, so an honest client resynchronises and retries."""
        assert isinstance(call.requirement, PaymentRequirements)
        extra = call.requirement.extra | {"channelState": channel.snapshot()}
        if channel.signature:
            extra["voucherState"] = {"signedMaxClaimable": str(channel.signed_max), "signature": channel.signature}
        # The corrected option first: a client resynchronises from the first batch-settlement one.
        accepts = [call.requirement.model_copy(update={"extra": extra}),
                   *(r for r in call.offer.requirements if r is not call.requirement)]
        error = R.INVALID_BATCH_SETTLEMENT_EVM_CUMULATIVE_AMOUNT_MISMATCH.value
        header = encode_payment_required(PaymentRequired(x402_version=2, error=error,
                                                         resource=self.challenges.resource(call.request, call.offer),
                                                         accepts=accepts))
        body = {"x402Version": 2, "error": error, "message": message}
        return Response(orjson.dumps(body), status_code=402, media_type="application/json",
                        headers={"PAYMENT-REQUIRED": header, "Cache-Control": "no-store"})


def receipt_fields(call: PaidCall, channel: Channel, charge: int, deposit: SettleResponse | None) -> dict[str, Any]:
    """PAYMENT-RESPONSE of a voucher call, in its wire form (a SettleResponse's, built without the
    model on every call; a unit test holds them byte for byte): `transaction`/`amount` are the
    deposit's when this call carried one, else empty (nothing moved on chain)."""
    fields: dict[str, Any] = {"success": True, "payer": channel.payer,
                              "transaction": deposit.transaction if deposit else "", "network": call.network}
    amount = deposit.amount if deposit else ""
    if amount is not None:
        fields["amount"] = amount
    fields["extra"] = {"chargedAmount": str(charge), "channelState": channel.snapshot()}
    return fields


class OwedAnswer(Response):
    """A charged answer kept for its voucher: marked delivered once sent, unless the client was
    already gone (uvicorn drops the sends of a closed connection silently) or the replica dies
    first; then a resend of the voucher gets it."""

    def __init__(self, content: bytes, *, status_code: int, headers: dict[str, str],
                 delivered: Callable[[], Awaitable[None]]) -> None:
        super().__init__(content, status_code=status_code, headers=headers)
        self.delivered = delivered

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gone = await client_gone(receive)
        await super().__call__(scope, receive, send)
        if not gone:
            await self.delivered()


class _Corrective(Exception):
    """Carries a ready corrective 402 out of deposit()."""

    def __init__(self, response: Response) -> None:
        self.response = response


def _take_state(channel: Channel, state: dict[str, Any]) -> None:
    channel.balance = int(state.get("balance", channel.balance))
    channel.total_claimed = int(state.get("totalClaimed", channel.total_claimed))
    channel.withdraw_at = int(state.get("withdrawRequestedAt", channel.withdraw_at))
    channel.refund_nonce = int(state.get("refundNonce", channel.refund_nonce))


_REFUSALS: dict[HoldOutcome, tuple[str, str]] = {
    HoldOutcome.MISSING: (R.INVALID_BATCH_SETTLEMENT_EVM_CHANNEL_NOT_FOUND.value, "no such channel"),
    HoldOutcome.BUSY: (R.INVALID_BATCH_SETTLEMENT_EVM_CHANNEL_BUSY.value,
                       "another call of this channel is in flight: retry when it is answered"),
    HoldOutcome.EXCEEDS: (R.INVALID_BATCH_SETTLEMENT_EVM_CUMULATIVE_EXCEEDS_BALANCE.value,
                          "the voucher is above the channel's balance: deposit more"),
    HoldOutcome.WITHDRAWING: (R.INVALID_BATCH_SETTLEMENT_EVM_CHANNEL_NOT_FOUND.value,
                              "a withdrawal from this channel is pending: it serves no more calls"),
    HoldOutcome.MISMATCH: (R.INVALID_BATCH_SETTLEMENT_EVM_CUMULATIVE_AMOUNT_MISMATCH.value,
                           "the voucher does not continue from what was charged"),
}
