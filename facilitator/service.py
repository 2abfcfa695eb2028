"""The facilitator: finds the scheme for a request, runs it, and turns every outcome into a wire
response. This is the one place where domain errors become `isValid:false` / `success:false`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from facilitator.errors import ChainUnavailableError, PaymentInvalidError
from facilitator.evm.chain import EvmChain
from facilitator.evm.signer import SignerPool
from facilitator.metrics import FacilitatorMetrics
from facilitator.registry import SchemeRegistry
from facilitator.schemes.base import PreparedPayment
from facilitator.settlement import Settler
from facilitator.store.base import SettlementState, SettlementStore, StoreUnavailableError
from facilitator.verified import VerifiedPayments
from facilitator.x402.errors import UnknownNetworkError
from facilitator.x402.identity import claimed_payer
from facilitator.x402.matching import requirement_mismatch
from facilitator.x402.networks import to_caip2
from facilitator.x402.reasons import ErrorReason as R
from facilitator.x402.types import (
    PaymentPayload,
    PaymentPayloadV1,
    PaymentRequirements,
    PaymentRequirementsV1,
    SettleRequest,
    SettleResponse,
    SupportedResponse,
    VerifyRequest,
    VerifyResponse,
)

log = logging.getLogger("facilitator.service")


class RequestMismatchError(PaymentInvalidError):
    pass


def normalize(
    payload: PaymentPayload | PaymentPayloadV1, requirements: PaymentRequirements | PaymentRequirementsV1
) -> tuple[PaymentPayload, PaymentRequirements, int]:
    """v1 requests become their v2 equivalent (CAIP-2 network, `amount`, `accepted`)."""
    if isinstance(payload, PaymentPayload) and isinstance(requirements, PaymentRequirements):
        return payload, requirements, 2
    if isinstance(payload, PaymentPayloadV1) and isinstance(requirements, PaymentRequirementsV1):
        try:
            network = to_caip2(requirements.network)
            payload_network = to_caip2(payload.network)
        except UnknownNetworkError as exc:
            raise PaymentInvalidError(R.INVALID_NETWORK, str(exc)) from None
        req = PaymentRequirements(
            scheme=requirements.scheme,
            network=network,
            asset=requirements.asset,
            amount=requirements.max_amount_required,
            pay_to=requirements.pay_to,
            max_timeout_seconds=requirements.max_timeout_seconds,
            extra=requirements.extra or {},
        )
        accepted = req.model_copy(update={"scheme": payload.scheme, "network": payload_network})
        return PaymentPayload(x402_version=2, payload=payload.payload, accepted=accepted), req, 1
    raise PaymentInvalidError(R.INVALID_X402_VERSION, "paymentPayload and paymentRequirements versions differ")


def check_accepted(payload: PaymentPayload, requirements: PaymentRequirements) -> None:
    """The requirement the client says it accepted must be the one we are asked to check, by the
    rule the gateway binds payments with (the signed fields are checked again against the
    signature by the scheme)."""
    field = requirement_mismatch(payload.accepted, requirements)
    if field is not None:
        raise RequestMismatchError(
            R.INVALID_PAYMENT_REQUIREMENTS, f"paymentPayload.accepted differs from paymentRequirements ({field})"
        )


class Facilitator:
    def __init__(
        self,
        chains: dict[str, EvmChain],
        signers: SignerPool,
        store: SettlementStore,
        registry: SchemeRegistry,
        *,
        metrics: FacilitatorMetrics | None = None,
        receipt_timeout_s: float = 20.0,
        claim_lease_s: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.chains = chains
        self.signers = signers
        self.store = store
        self.metrics = metrics or FacilitatorMetrics()
        self.clock = clock
        self.registry = registry
        self.settler = Settler(store, signers, receipt_timeout_s=receipt_timeout_s, lease_s=claim_lease_s, clock=clock)
        self.verified = VerifiedPayments()

    def _labels(self, requirements: PaymentRequirements | PaymentRequirementsV1) -> tuple[str, str]:
        """Bounded metric labels: only configured networks and known schemes, never raw input."""
        network = requirements.network
        if isinstance(requirements, PaymentRequirementsV1):
            try:
                network = to_caip2(network)
            except UnknownNetworkError:
                network = "unknown"
        scheme = requirements.scheme if self.registry.has_scheme(requirements.scheme) else "unknown"
        return scheme, network if network in self.chains else "unknown"

    async def verify(self, request: VerifyRequest, *, keep: bool = False) -> VerifyResponse:
        """`keep`: an in-process caller that will settle these very request objects; the
        prepared payment is kept for that settlement (facilitator/verified.py)."""
        started = time.perf_counter()
        scheme_name, network = self._labels(request.payment_requirements)
        payer = claimed_payer(request.payment_payload.payload)
        try:
            payload, requirements, version = normalize(request.payment_payload, request.payment_requirements)
            scheme = self.registry.find(version, requirements.network, requirements.scheme)
            prepared = scheme.prepare(payload, requirements, now=self.clock())
            payer = prepared.payer
            check_accepted(payload, requirements)
            record = await self.store.get(prepared.record_key)
            # Another copy of this nonce that is only being re-checked (it may well be a forgery
            # that lets go) does not make this one invalid; one that was sent, or this very
            # payment in settlement, does.
            if record is not None and (record.digest == prepared.digest or record.state != SettlementState.CLAIMED):
                raise PaymentInvalidError(R(prepared.nonce_used_reason), "payment already settled or being settled")
            await prepared.confirm(fresh=False)
            if keep and not scheme.amount_is_maximum:  # upto settles another amount: prepared again
                self.verified.keep(request.payment_payload, request.payment_requirements, prepared, requirements.network)
            resp = VerifyResponse(is_valid=True, payer=payer, extra=prepared.verify_extra)
        except PaymentInvalidError as exc:
            resp = VerifyResponse(is_valid=False, invalid_reason=exc.reason.value, invalid_message=exc.message, payer=payer)
        except (ChainUnavailableError, StoreUnavailableError) as exc:
            log.warning("verify_dependency_unavailable", extra={"error": str(exc)})
            resp = VerifyResponse(
                is_valid=False, invalid_reason=R.UNEXPECTED_VERIFY_ERROR.value,
                invalid_message=f"dependency unavailable: {type(exc).__name__}", payer=payer,
            )  # fmt: skip
        except Exception:
            log.exception("verify_unexpected_error")
            resp = VerifyResponse(is_valid=False, invalid_reason=R.UNEXPECTED_VERIFY_ERROR.value, payer=payer)
        m = self.metrics
        m.verify_seconds.labels(scheme_name, network).observe(time.perf_counter() - started)
        m.verify_total.labels(scheme_name, network, "valid" if resp.is_valid else "invalid", resp.invalid_reason or "").inc()
        return resp

    async def settle(self, request: SettleRequest, *, reuse: bool = False) -> SettleResponse:
        """`reuse`: take the payment `verify(keep=True)` prepared for these very objects, if any;
        its validity window is checked again here and its chain state by the settler."""
        started = time.perf_counter()
        scheme_name, network = self._labels(request.payment_requirements)
        kept = self.verified.take(request.payment_payload, request.payment_requirements) if reuse else None
        if kept is not None:
            resp = await self._settle_kept(*kept)
        else:
            resp = await self._settle(request, network)
        m = self.metrics
        m.settle_seconds.labels(scheme_name, network).observe(time.perf_counter() - started)
        m.settle_total.labels(scheme_name, network, "success" if resp.success else "failure", resp.error_reason or "").inc()
        return resp

    async def _settle_kept(self, prepared: PreparedPayment, network: str) -> SettleResponse:
        try:
            prepared.check_time(self.clock())
        except PaymentInvalidError as exc:
            return _settle_failure(exc, prepared.payer, network)
        return await self._run_settler(self.chains[network], prepared, network)

    async def _settle(self, request: SettleRequest, network: str) -> SettleResponse:
        payer = claimed_payer(request.payment_payload.payload)
        try:
            payload, requirements, version = normalize(request.payment_payload, request.payment_requirements)
            scheme = self.registry.find(version, requirements.network, requirements.scheme)
            prepared = scheme.prepare(payload, requirements, now=self.clock(), settle=True)
            payer = prepared.payer
            if not scheme.amount_is_maximum:
                check_accepted(payload, requirements)
            chain = self.chains[requirements.network]
        except Exception as exc:  # noqa: BLE001 - every failure is a wire answer; _settle_failure logs the unexpected
            return _settle_failure(exc, payer, network)
        return await self._run_settler(chain, prepared, network)

    async def _run_settler(self, chain: EvmChain, prepared: PreparedPayment, network: str) -> SettleResponse:
        try:
            return await self.settler.settle(chain, prepared)
        except Exception as exc:  # noqa: BLE001 - every failure is a wire answer; _settle_failure logs the unexpected
            return _settle_failure(exc, prepared.payer, network)

    def supported(self) -> SupportedResponse:
        """What the registry holds; every registered namespace is settled by our signers."""
        signers = {f"{namespace}:*": self.signers.addresses for namespace in self.registry.namespaces()}
        return SupportedResponse(kinds=self.registry.kinds(), extensions=[], signers=signers)

    async def close(self) -> None:
        closed: set[int] = set()
        for chain in self.chains.values():
            await chain.sender.receipts.close()
            await chain.state.close()
            await chain.rpc.close()
            nonces = chain.sender.nonces
            if id(nonces) not in closed and hasattr(nonces, "close"):
                closed.add(id(nonces))
                await nonces.close()
        await self.store.close()


def _settle_failure(exc: Exception, payer: str | None, network: str) -> SettleResponse:
    """A settlement that raised, as its wire answer."""
    if isinstance(exc, PaymentInvalidError):
        return SettleResponse(
            success=False, error_reason=exc.reason.value, error_message=exc.message, payer=payer,
            transaction="", network=network, extra={"final": True},
        )  # fmt: skip
    if isinstance(exc, (ChainUnavailableError, StoreUnavailableError)):
        # Before any broadcast (the settler absorbs store failures after one): nothing moved.
        log.warning("settle_dependency_unavailable", extra={"error": str(exc)})
        return SettleResponse(
            success=False, error_reason=R.UNEXPECTED_SETTLE_ERROR.value,
            error_message=f"dependency unavailable: {type(exc).__name__}", payer=payer, transaction="",
            network=network, extra={"final": True},
        )  # fmt: skip
    log.error("settle_unexpected_error", exc_info=exc)
    return SettleResponse(
        success=False, error_reason=R.UNEXPECTED_SETTLE_ERROR.value, payer=payer, transaction="", network=network
    )
