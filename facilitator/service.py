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
from facilitator.schemes.base import SchemeFacilitator
from facilitator.schemes.evm_exact import ExactEvmScheme
from facilitator.schemes.evm_upto import UptoEvmScheme
from facilitator.settlement import Settler
from facilitator.store.base import SettlementStore, StoreUnavailableError
from facilitator.x402.errors import UnknownNetworkError
from facilitator.x402.networks import to_caip2
from facilitator.x402.reasons import ErrorReason as R
from facilitator.x402.types import (
    PaymentPayload,
    PaymentPayloadV1,
    PaymentRequirements,
    PaymentRequirementsV1,
    SettleRequest,
    SettleResponse,
    SupportedKind,
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
    """The requirement the client says it accepted must be the one we are asked to check, field
    for field (the signed fields are checked again against the signature by the scheme)."""
    a = payload.accepted
    if (
        a.scheme != requirements.scheme
        or a.network != requirements.network
        or a.asset.lower() != requirements.asset.lower()
        or int(a.amount) != int(requirements.amount)
        or a.pay_to.lower() != requirements.pay_to.lower()
    ):
        raise RequestMismatchError(R.INVALID_PAYMENT_REQUIREMENTS, "paymentPayload.accepted differs from paymentRequirements")


class Facilitator:
    def __init__(
        self,
        chains: dict[str, EvmChain],
        signers: SignerPool,
        store: SettlementStore,
        *,
        metrics: FacilitatorMetrics | None = None,
        receipt_timeout_s: float = 20.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.chains = chains
        self.signers = signers
        self.store = store
        self.metrics = metrics or FacilitatorMetrics()
        self.clock = clock
        self.settler = Settler(store, signers, receipt_timeout_s=receipt_timeout_s, clock=clock)
        self.schemes: dict[tuple[str, str], SchemeFacilitator] = {}
        for network, chain in chains.items():
            self.schemes[(network, "exact")] = ExactEvmScheme(chain)
            self.schemes[(network, "upto")] = UptoEvmScheme(chain, signers.addresses)

    def _labels(self, requirements: PaymentRequirements | PaymentRequirementsV1) -> tuple[str, str]:
        """Bounded metric labels: only configured networks and known schemes, never raw input."""
        network = requirements.network
        if isinstance(requirements, PaymentRequirementsV1):
            try:
                network = to_caip2(network)
            except UnknownNetworkError:
                network = "unknown"
        scheme = requirements.scheme if requirements.scheme in ("exact", "upto") else "unknown"
        return scheme, network if network in self.chains else "unknown"

    def _scheme(self, requirements: PaymentRequirements) -> SchemeFacilitator:
        scheme = self.schemes.get((requirements.network, requirements.scheme))
        if scheme is None:
            if not any(net == requirements.network for net, _ in self.schemes):
                raise PaymentInvalidError(R.INVALID_NETWORK, f"network {requirements.network} is not supported")
            raise PaymentInvalidError(R.UNSUPPORTED_SCHEME, f"scheme {requirements.scheme} is not supported")
        return scheme

    async def verify(self, request: VerifyRequest) -> VerifyResponse:
        started = time.perf_counter()
        scheme_name, network = self._labels(request.payment_requirements)
        payer = _claimed_payer(request.payment_payload)
        try:
            payload, requirements, _ = normalize(request.payment_payload, request.payment_requirements)
            scheme = self._scheme(requirements)
            prepared = scheme.prepare(payload, requirements, now=self.clock())
            payer = prepared.payer
            check_accepted(payload, requirements)
            record = await self.store.get(prepared.record_key)
            if record is not None:
                raise PaymentInvalidError(R(prepared.nonce_used_reason), "payment already settled or being settled")
            await prepared.confirm()
            resp = VerifyResponse(is_valid=True, payer=payer)
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

    async def settle(self, request: SettleRequest) -> SettleResponse:
        started = time.perf_counter()
        scheme_name, network = self._labels(request.payment_requirements)
        payer = _claimed_payer(request.payment_payload)
        try:
            payload, requirements, _ = normalize(request.payment_payload, request.payment_requirements)
            scheme = self._scheme(requirements)
            prepared = scheme.prepare(payload, requirements, now=self.clock(), settle=True)
            payer = prepared.payer
            if requirements.scheme != "upto":  # upto settles carry the actual amount, not the accepted max
                check_accepted(payload, requirements)
            resp = await self.settler.settle(self.chains[requirements.network], prepared)
        except PaymentInvalidError as exc:
            resp = SettleResponse(
                success=False, error_reason=exc.reason.value, error_message=exc.message, payer=payer,
                transaction="", network=network, extra={"final": True},
            )  # fmt: skip
        except (ChainUnavailableError, StoreUnavailableError) as exc:
            # Before any broadcast (the settler absorbs store failures after one): nothing moved.
            log.warning("settle_dependency_unavailable", extra={"error": str(exc)})
            resp = SettleResponse(
                success=False, error_reason=R.UNEXPECTED_SETTLE_ERROR.value,
                error_message=f"dependency unavailable: {type(exc).__name__}", payer=payer, transaction="",
                network=network, extra={"final": True},
            )  # fmt: skip
        except Exception:
            log.exception("settle_unexpected_error")
            resp = SettleResponse(
                success=False, error_reason=R.UNEXPECTED_SETTLE_ERROR.value, payer=payer, transaction="", network=network
            )
        m = self.metrics
        m.settle_seconds.labels(scheme_name, network).observe(time.perf_counter() - started)
        m.settle_total.labels(scheme_name, network, "success" if resp.success else "failure", resp.error_reason or "").inc()
        return resp

    def supported(self) -> SupportedResponse:
        kinds: list[SupportedKind] = []
        for (network, scheme_name), scheme in sorted(self.schemes.items()):
            kinds.append(SupportedKind(x402_version=2, scheme=scheme_name, network=network, extra=scheme.supported_extra()))
            if scheme_name == "exact":
                try:
                    from facilitator.x402.networks import to_v1_name

                    kinds.append(SupportedKind(x402_version=1, scheme=scheme_name, network=to_v1_name(network)))
                except UnknownNetworkError:
                    pass
        return SupportedResponse(kinds=kinds, extensions=[], signers={"eip155:*": self.signers.addresses})

    async def close(self) -> None:
        closed: set[int] = set()
        for chain in self.chains.values():
            await chain.rpc.close()
            nonces = chain.sender.nonces
            if id(nonces) not in closed and hasattr(nonces, "close"):
                closed.add(id(nonces))
                await nonces.close()
        await self.store.close()




def _claimed_payer(payload: PaymentPayload | PaymentPayloadV1) -> str | None:
    inner = payload.payload
    auth = inner.get("permit2Authorization") or inner.get("authorization")
    if isinstance(auth, dict) and isinstance(auth.get("from"), str):
        return auth["from"]
    return None
