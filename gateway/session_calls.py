"""Calls under an upto session, and the reaper that settles sessions (see gateway/sessions.py).

Per call: hold the call's worst case against the session's remaining cap (and the agent's
budget), forward, meter the usage, turn the hold into the metered cost. A response carries
`X-Upto-Session`, what this call cost and what remains; nothing is settled per call. The reaper
on every replica settles due sessions once, for the accrued sum, through the facilitator (whose
settlement of a permit is idempotent), and tracks each to a terminal state.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from decimal import Decimal

import aiohttp
import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from facilitator.x402.reasons import ErrorReason as R
from facilitator.x402.types import PaymentPayload, PaymentRequirements, SettleResponse
from gateway.budget_hook import BudgetHook, Hold
from gateway.errors import GatewayError
from gateway.errors import GatewayReason as G
from gateway.facilitator_client import FacilitatorClient
from gateway.metering import StreamMeter, to_base_units, usage_from_body
from gateway.metrics import GatewayMetrics
from gateway.paywall.call import load_payment
from gateway.paywall.metered import capped_body, metered_charge
from gateway.pricing import Offer, PricingError
from gateway.proxy import (
    UpstreamAnswer,
    UpstreamFailedError,
    Upstreams,
    UpstreamUnavailableError,
    read_all,
    response_headers,
)
from gateway.sessions import HoldOutcome, Session, SessionState, SessionStore, exposure_key, new_session_id
from gateway.settings import GatewaySettings, UptoSessions
from gateway.sse_usage import forwarded_stream

log = logging.getLogger("gateway.sessions")
SESSION_HEADER = "X-Upto-Session"
SETTLE_LEASE_S = 60.0


class SessionCalls:
    def __init__(self, store: SessionStore, settings: GatewaySettings, facilitator: FacilitatorClient,
                 budgets: BudgetHook, metrics: GatewayMetrics, upstreams: Upstreams,
                 background: set[asyncio.Task[object]]) -> None:
        self.store = store
        self.settings = settings
        self.facilitator = facilitator
        self.budgets = budgets
        self.metrics = metrics
        self.upstreams = upstreams
        self.background = background  # accruals of streams whose client left

    # -- opening ---------------------------------------------------------------------------------

    async def open(self, offer: Offer, payload: PaymentPayload, requirement: PaymentRequirements, payer: str) -> str:
        cfg = offer.route.sessions
        assert cfg is not None
        auth = payload.payload["permit2Authorization"]
        now = time.time()
        session = Session(
            id=new_session_id(), payer=payer, network=requirement.network, asset=requirement.asset.lower(),
            cap=int(requirement.amount), accrued=0, held=0, calls=0, deadline=float(auth["deadline"]), last_used=now,
            state=SessionState.OPEN, route=offer.route_id,
            per_call=self.worst_case(offer, requirement.asset, int(requirement.amount)),
            payment=orjson.dumps({"payload": payload.model_dump(by_alias=True, exclude_none=True),
                                  "requirements": requirement.model_dump(by_alias=True, exclude_none=True)}).decode(),
        )  # fmt: skip
        await self.store.open(session, first_hold=0, due_at=self._due_at(session, offer, now))
        log.info("session_opened", extra={"session": session.id, "route": offer.route_id, "cap": str(session.cap)})
        return session.id

    @staticmethod
    def worst_case(offer: Offer, asset: str, cap: int) -> int:
        rate, decimals = next((r, d) for a, r, d in offer.rates if a == asset.lower())
        return min(to_base_units(offer.price, rate, decimals), cap)

    @staticmethod
    def _due_at(session: Session, offer: Offer, now: float) -> float:
        cfg = offer.route.sessions
        assert cfg is not None
        return min(now + cfg.idle_s, session.deadline - cfg.settle_margin_s)

    # -- a call ----------------------------------------------------------------------------------

    async def call(self, request: Request, offer: Offer, body: bytes, session_id: str, request_id: str,
                   *, opened: bool = False) -> Response:
        cfg = offer.route.sessions
        assert cfg is not None
        session = await self.store.get(session_id)
        if session is None or session.route != offer.route_id:
            raise GatewayError(G.SESSION_UNKNOWN, "no such upto session on this route: sign a new permit", offer=offer)
        worst = session.per_call
        rate, decimals = next((r, d) for a, r, d in offer.rates if a == session.asset.lower())
        if worst < to_base_units(offer.price, rate, decimals):  # the cap is below max_per_call
            try:
                body = capped_body(offer, body, ceiling=Decimal(worst) * rate / (Decimal(10) ** decimals))
            except PricingError as exc:
                exc.headers[SESSION_HEADER] = session_id
                raise
        now = time.time()
        # Every call must be over before the session is settled (deadline - settle_margin): a call
        # still running then would be served after its payment was taken.
        finish_by = session.deadline - cfg.settle_margin_s - 1.0
        # The payer's exposure first (all its sessions on this asset, every replica): a session
        # serves on a promise, so what is unsettled at any time stays within the operator's limit.
        exposed = exposure_key(session.payer, session.network, session.asset)
        limit = to_base_units(cfg.exposure_limit(), rate, decimals)
        if not await self.store.expose(exposed, session_id, worst, limit=limit) and (
                not await self._forget_stale(exposed) or not await self.store.expose(exposed, session_id, worst, limit=limit)):
            for other in await self.store.exposure(exposed):
                await self.store.drain(other, now=now)  # settle what is exposed, so a new permit can be served
            raise GatewayError(G.SESSION_EXHAUSTED, "this wallet's unsettled upto sessions reached the operator's "
                               "exposure limit; they are being settled: sign a new permit to open a new session",
                               offer=offer)
        outcome = await self.store.hold(session_id, worst, now=now, serve_until=session.deadline - cfg.serve_margin_s,
                                        due_at=self._due_at(session, offer, now))
        if outcome != HoldOutcome.OK:
            await self.store.expose(exposed, session_id, -worst, limit=None)
            raise GatewayError(f"session_{outcome.value}", "the upto session cannot pay for this call: sign a new permit "
                               "to open a new session", offer=offer)
        try:
            hold = await self.budgets.reserve(session.payer, session.network, session.asset, worst, offer.route_id,
                                              offer.model, request_id)
        except BaseException:
            await self._finish_call(session, offer, worst, 0)
            raise
        try:
            upstream = await asyncio.wait_for(self.upstreams.open(request, offer.route.upstream, body, request_id),
                                              max(0.1, finish_by - time.time()))
        except TimeoutError:
            await self._nothing(session, offer, worst, hold)
            raise GatewayError(G.SESSION_DEADLINE, "the call could not finish before the session is settled; not "
                               "charged: sign a new permit", status=504, headers={SESSION_HEADER: session_id},
                               outcome="not_charged") from None
        except (UpstreamUnavailableError, UpstreamFailedError) as exc:
            await self._nothing(session, offer, worst, hold)
            raise GatewayError(G.UPSTREAM_UNAVAILABLE, f"the upstream failed ({exc}); not charged", status=502,
                               headers={SESSION_HEADER: session_id}, outcome="not_charged") from None
        if upstream.status >= 400:
            try:
                err = await read_all(upstream, self.settings.max_body_bytes)
            except UpstreamFailedError:
                err = b""
            upstream.release()
            await self._nothing(session, offer, worst, hold)
            return self._with_session(Response(err, status_code=upstream.status, headers=dict(response_headers(upstream))),
                                      session_id)
        out_headers = dict(response_headers(upstream)) | {SESSION_HEADER: session_id, "Cache-Control": "no-store"}
        if upstream.headers.get("content-type", "").startswith("text/event-stream"):
            return StreamingResponse(forwarded_stream(request, self._stream(upstream, session, offer, worst, hold,
                                                                            request_id, finish_by)),
                                     status_code=upstream.status, headers=out_headers)
        try:
            content = await asyncio.wait_for(read_all(upstream, self.settings.max_body_bytes),
                                             max(0.1, finish_by - time.time()))
        except (TimeoutError, UpstreamFailedError):
            upstream.release()
            await self._nothing(session, offer, worst, hold)
            raise GatewayError(G.UPSTREAM_ERROR, "the upstream failed; not charged", status=502,
                               headers={SESSION_HEADER: session_id}, outcome="not_charged") from None
        upstream.release()
        charge, details = await self._accrue(session, offer, worst, hold, usage_from_body(content), request_id, cut=False)
        out_headers |= {"X-Upto-Session-Charge": str(charge), "X-Upto-Session-Accrued": str(details["accrued"]),
                        "X-Upto-Session-Cap": str(session.cap)}
        return Response(content, status_code=upstream.status, headers=out_headers)

    async def _stream(self, upstream: UpstreamAnswer, session: Session, offer: Offer, worst: int, hold: Hold,
                      request_id: str, finish_by: float):
        meter = StreamMeter()
        finished = cut = deadline_cut = False
        try:
            try:
                while True:
                    remaining = finish_by - time.time()
                    if remaining <= 0:
                        deadline_cut = True  # the session is about to be settled: end the stream here
                        break
                    chunk = await asyncio.wait_for(upstream.content.readany(), remaining)
                    if not chunk:
                        break
                    meter.feed(chunk)
                    yield chunk
            except TimeoutError:
                deadline_cut = True
            except aiohttp.ClientError:
                cut = True
            finished = True
        finally:
            upstream.release()
            if not finished:  # the client left: account for what it used, in the background
                task = asyncio.ensure_future(self._accrue(session, offer, worst, hold, meter.usage, request_id, cut=True))
                self.background.add(task)
                task.add_done_callback(self.background.discard)
        charge, details = await asyncio.shield(self._accrue(session, offer, worst, hold, meter.usage, request_id,
                                                            cut=cut or deadline_cut or not meter.complete,
                                                            floor=deadline_cut))
        event = {"session": session.id, "charged": str(charge), "accrued": str(details["accrued"]), "cap": str(session.cap),
                 "settlement": "deferred", **{k: v for k, v in details.items() if k != "accrued"}}
        yield b"event: x402.payment\ndata: " + orjson.dumps(event) + b"\n\n"

    async def _accrue(self, session: Session, offer: Offer, worst: int, hold: Hold, usage, request_id: str,
                      *, cut: bool, floor: bool = False) -> tuple[int, dict]:
        """`floor`: the gateway itself ended the call (the session's settlement time came): the
        agent pays only the per-call part, not the ceiling."""
        ceiling = PaymentRequirements.model_construct(amount=str(worst), asset=session.asset)
        charge, details = metered_charge(offer, ceiling, usage, cut=cut, policy="floor" if floor else None)
        now = await self._finish_call(session, offer, worst, charge)
        details = details | {"session": session.id}
        await self.budgets.commit(hold, charge, f"session:{session.id}", request_id, details)
        fresh = await self.store.get(session.id)
        accrued = fresh.accrued if fresh else charge
        if fresh is not None and fresh.cap - fresh.accrued - fresh.held < fresh.per_call:
            await self.store.reschedule(session.id, now)  # the cap is used up: settle now
        self.metrics.payments.labels(offer.route_id, "session_call", details.get("usage_policy", "")).inc()
        return charge, details | {"accrued": accrued}

    async def _nothing(self, session: Session, offer: Offer, worst: int, hold: Hold) -> None:
        await self._finish_call(session, offer, worst, 0)
        await self.budgets.release(hold)

    async def _forget_stale(self, exposed: str) -> bool:
        """Drop exposure left by sessions that are settled or gone (a replica died between its
        exposure's update and the session's); True if there was any."""
        stale = False
        for other in await self.store.exposure(exposed):
            s = await self.store.get(other)
            if s is None or s.state in (SessionState.SETTLED, SessionState.FAILED):
                await self.store.unexpose(exposed, other)
                stale = True
        return stale

    async def _finish_call(self, session: Session, offer: Offer, held: int, charge: int) -> float:
        """The call's hold becomes its charge, in the session and in the payer's exposure."""
        now = time.time()
        await self.store.finish_call(session.id, held, charge, now=now, due_at=self._due_at(session, offer, now))
        await self.store.expose(exposure_key(session.payer, session.network, session.asset), session.id,
                                charge - held, limit=None)
        return now

    @staticmethod
    def _with_session(response: Response, session_id: str) -> Response:
        response.headers[SESSION_HEADER] = session_id
        return response

    # -- settling ------------------------------------------------------------------------------

    async def reap_once(self, sessions_cfg: Mapping[str, UptoSessions]) -> int:
        """Settle every due session this replica can claim. Returns how many it settled."""
        now = time.time()
        settled = 0
        for session_id in await self.store.due(now=now):
            session = await self.store.get(session_id)
            if session is None or session.state in (SessionState.SETTLED, SessionState.FAILED):
                if session is not None:
                    await self.store.finish_settlement(session_id, state=session.state, tx=session.tx,
                                                       result=session.result, retry_at=None)
                    await self.store.unexpose(exposure_key(session.payer, session.network, session.asset), session_id)
                continue
            cfg = sessions_cfg.get(session.route)
            if cfg is None:
                continue
            idle = now - session.last_used >= cfg.idle_s
            near_deadline = now >= session.deadline - cfg.settle_margin_s
            used_up = session.cap - session.accrued - session.held < session.per_call
            if not (idle or near_deadline or used_up or session.state == SessionState.SETTLING):
                await self.store.reschedule(session_id, min(session.last_used + cfg.idle_s,
                                                            session.deadline - cfg.settle_margin_s))
                continue
            if not self.facilitator.can_sign(_signer_of(session)):
                # The permit names a signer this replica has no key for: its holder settles it.
                await self.store.reschedule(session_id, now + 2.0)
                continue
            claimed = await self.store.claim_settlement(session_id, now=now, force=near_deadline, lease_s=SETTLE_LEASE_S)
            if claimed is None:
                await self.store.reschedule(session_id, now + 0.5)  # calls in flight, or another replica settles
                continue
            settled += await self._settle(claimed)
        return settled

    async def _settle(self, session: Session) -> int:
        payload, requirement = load_payment(session.payment)
        assert isinstance(requirement, PaymentRequirements)
        final_requirement = requirement.model_copy(update={"amount": str(session.accrued)})
        try:
            result = await asyncio.wait_for(self.facilitator.settle(payload, final_requirement),
                                            self.settings.settle_timeout_s)
        except TimeoutError:
            result = SettleResponse(success=False, error_reason=R.UNEXPECTED_SETTLE_ERROR.value, transaction="",
                                    network=requirement.network, error_message="timed out")
        dump = result.model_dump_json(by_alias=True, exclude_none=True)
        final = (self.facilitator.trusted and bool((result.extra or {}).get("final"))
                 and result.error_reason != R.UPTO_FACILITATOR_MISMATCH.value)  # another replica holds the key
        exposed = exposure_key(session.payer, session.network, session.asset)
        if result.success:
            await self.store.finish_settlement(session.id, state=SessionState.SETTLED, tx=result.transaction, result=dump,
                                               retry_at=None)
            await self.store.unexpose(exposed, session.id)
            self.metrics.revenue.labels(requirement.network, requirement.asset.lower()).inc(session.accrued)
            log.info("session_settled", extra={"session": session.id, "amount": str(session.accrued),
                                               "tx": result.transaction, "calls": session.calls})
            return 1
        if final:
            await self.store.finish_settlement(session.id, state=SessionState.FAILED, tx=result.transaction, result=dump,
                                               retry_at=None)
            await self.store.unexpose(exposed, session.id)
            self.metrics.session_losses.labels(requirement.network, requirement.asset.lower()).inc(session.accrued)
            log.error("session_settlement_failed", extra={"session": session.id, "reason": result.error_reason,
                                                          "amount": str(session.accrued)})
            return 0
        # Unknown outcome: stay SETTLING (no new calls) and try the same amount again later; the
        # facilitator returns the first result if it did settle.
        await self.store.finish_settlement(session.id, state=SessionState.SETTLING, tx=result.transaction, result=dump,
                                           retry_at=time.time() + 5)
        log.warning("session_settlement_retry", extra={"session": session.id, "reason": result.error_reason})
        return 0

    async def reap_forever(self, sessions_cfg: Mapping[str, UptoSessions], interval_s: float = 0.5) -> None:
        while True:
            try:
                await self.reap_once(sessions_cfg)
            except Exception:
                log.exception("session_reaper_failed")
            await asyncio.sleep(interval_s)


def _signer_of(session: Session) -> str:
    """The facilitator address the session's permit names (witness.facilitator)."""
    payload = orjson.loads(session.payment)["payload"]["payload"]
    return payload["permit2Authorization"]["witness"].get("facilitator", "")
