"""How the gateway talks to a facilitator: in-process (our own) or over HTTP (ours or any x402
facilitator).

The HTTP client trusts nothing: only a 200 whose body is a well-formed SettleResponse with
`success: true`, a transaction hash and the right network counts as settled. A timeout, an HTML
502, a 503 carrying a success body, non-JSON, truncated JSON, `settlement_pending` — all are
failures (with the hash kept when one is known, so the payment can be reconciled).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from typing import Protocol

import orjson
from pydantic import ValidationError
from pydantic_core import PydanticSerializationError

from facilitator.http11 import Http11Client, HttpError
from facilitator.service import Facilitator
from facilitator.x402.reasons import ErrorReason as R
from facilitator.x402.types import (
    PaymentPayload,
    PaymentPayloadV1,
    PaymentRequirements,
    PaymentRequirementsV1,
    SettleRequest,
    SettleResponse,
    VerifyRequest,
    VerifyResponse,
)

TX_HASH = re.compile(r"^0x[0-9a-fA-F]{64}$")
TX_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
AnyPayload = PaymentPayload | PaymentPayloadV1
AnyRequirements = PaymentRequirements | PaymentRequirementsV1


class FacilitatorClient(Protocol):
    # Whether a `final` mark on a failed settlement can be believed (our own facilitator, in
    # process): a remote one's failure with a transaction hash is kept PENDING, never free.
    trusted: bool

    async def verify(self, payload: AnyPayload, requirements: AnyRequirements) -> VerifyResponse: ...

    async def settle(self, payload: AnyPayload, requirements: AnyRequirements) -> SettleResponse: ...

    async def ready(self) -> bool: ...

    async def upto_signers(self) -> dict[str, str]:
        """network -> the facilitatorAddress an `upto` payment must name (from /supported)."""
        ...

    def can_sign(self, address: str) -> bool:
        """Whether this facilitator holds the key a payment's witness names (upto settles must be
        sent by that signer). A remote facilitator is asked; it decides."""
        ...

    async def close(self) -> None: ...


def _request_body(payload: AnyPayload, requirements: AnyRequirements) -> bytes | None:
    """The /verify and /settle body, or None when the payment cannot be written as JSON.

    pydantic writes integers of any size (orjson refuses those beyond 64 bits); the decoder
    already refuses such values, and None keeps any other surprise a refusal, not a 500."""
    try:
        return b'{"x402Version":%d,"paymentPayload":%s,"paymentRequirements":%s}' % (
            payload.x402_version,
            payload.__pydantic_serializer__.to_json(payload, by_alias=True, exclude_none=True),
            requirements.__pydantic_serializer__.to_json(requirements, by_alias=True, exclude_none=True),
        )
    except (PydanticSerializationError, ValueError, TypeError):
        return None


def checked_settlement(resp: SettleResponse, network: str) -> SettleResponse:
    """A SettleResponse we may act on as paid, or the failure it really is."""
    if not resp.success:
        return resp
    if not TX_HASH.match(resp.transaction or "") and resp.amount != "0":
        return resp.model_copy(update={"success": False, "error_reason": R.INVALID_TRANSACTION_STATE.value,
                                       "error_message": "success without a transaction hash"})
    if resp.network != network:
        return resp.model_copy(update={"success": False, "error_reason": R.INVALID_TRANSACTION_STATE.value,
                                       "error_message": f"settled on {resp.network}, expected {network}"})
    return resp


class LocalFacilitatorClient:
    """Our facilitator, in-process: no HTTP hop. Trusted: its `extra.final` on a failed
    settlement means no money moved (a remote answer could claim that falsely)."""

    trusted = True

    def __init__(self, facilitator: Facilitator, *, reconcile_interval_s: float = 5.0) -> None:
        self.facilitator = facilitator
        self._interval = reconcile_interval_s
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Run the facilitator's reconciler in this process (what its own service does)."""
        from facilitator.app import reconcile_forever

        if self._task is None:
            self._task = asyncio.create_task(reconcile_forever(self.facilitator, self._interval))

    # The payload and requirements are validated models already: hand them over as they are
    # (dumping and re-validating them cost ~100 µs per call). A payment verified here is settled
    # with the very same objects, so the facilitator keeps what verify prepared for settle.
    async def verify(self, payload: AnyPayload, requirements: AnyRequirements) -> VerifyResponse:
        return await self.facilitator.verify(VerifyRequest.model_construct(
            x402_version=payload.x402_version, payment_payload=payload, payment_requirements=requirements),
            keep=True)

    async def settle(self, payload: AnyPayload, requirements: AnyRequirements) -> SettleResponse:
        return await self.facilitator.settle(SettleRequest.model_construct(
            x402_version=payload.x402_version, payment_payload=payload, payment_requirements=requirements),
            reuse=True)

    def can_sign(self, address: str) -> bool:
        return self.facilitator.signers.get(address) is not None

    async def upto_signers(self) -> dict[str, str]:
        return {k.network: k.extra["facilitatorAddress"] for k in self.facilitator.supported().kinds
                if k.scheme == "upto" and k.x402_version == 2 and k.extra and k.extra.get("facilitatorAddress")}

    async def ready(self) -> bool:
        try:
            await self.facilitator.store.ping()
            for chain in self.facilitator.chains.values():
                await chain.rpc.call("eth_chainId", [])
            return True
        except Exception:  # noqa: BLE001 - readiness: any failure of the store or a chain means not ready
            return False

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.facilitator.close()


class HttpFacilitatorClient:
    trusted = False

    def __init__(self, url: str, *, timeout_s: float = 30.0, headers: dict[str, str] | None = None) -> None:
        self.url = url.rstrip("/")
        self._timeout_s = timeout_s
        self._headers = headers or {}
        self._http: Http11Client | None = None

    def _client(self) -> Http11Client:
        if self._http is None:  # made on first use: its connections belong to the running loop
            try:
                self._http = Http11Client(self.url, limit=256, timeout_s=self._timeout_s)
            except ValueError as exc:
                raise HttpError(str(exc)) from None
        return self._http

    async def _exchange(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        client = self._client()
        answer = await client.request(method, body, path=client.path.rstrip("/") + path, headers=self._headers)
        return answer.status, answer.body

    async def _post(self, path: str, body: bytes) -> tuple[int, bytes]:
        return await self._exchange("POST", path, body)

    async def verify(self, payload: AnyPayload, requirements: AnyRequirements) -> VerifyResponse:
        body = _request_body(payload, requirements)
        if body is None:
            return VerifyResponse(is_valid=False, invalid_reason=R.INVALID_PAYLOAD.value,
                                  invalid_message="the payment cannot be encoded as JSON")
        try:
            status, raw = await self._post("/verify", body)
        except HttpError as exc:
            return VerifyResponse(is_valid=False, invalid_reason=R.UNEXPECTED_VERIFY_ERROR.value,
                                  invalid_message=f"facilitator unreachable: {exc}")
        if status != 200:
            return VerifyResponse(is_valid=False, invalid_reason=R.UNEXPECTED_VERIFY_ERROR.value,
                                  invalid_message=f"facilitator answered HTTP {status}")
        try:
            return VerifyResponse.model_validate_json(raw)
        except ValidationError:
            return VerifyResponse(is_valid=False, invalid_reason=R.UNEXPECTED_VERIFY_ERROR.value,
                                  invalid_message="facilitator answered a malformed VerifyResponse")

    async def settle(self, payload: AnyPayload, requirements: AnyRequirements) -> SettleResponse:
        network = _caip2(requirements)
        body = _request_body(payload, requirements)
        if body is None:  # nothing was sent: certainly not settled
            return SettleResponse(success=False, error_reason=R.INVALID_PAYLOAD.value,
                                  error_message="the payment cannot be encoded as JSON", transaction="", network=network)
        try:
            status, raw = await self._post("/settle", body)
        except HttpError as exc:
            # It may have settled: the caller keeps the payment unresolved, not "free to retry".
            return SettleResponse(success=False, error_reason=R.UNEXPECTED_SETTLE_ERROR.value,
                                  error_message=f"facilitator unreachable or timed out: {exc}",
                                  transaction="", network=network)
        try:
            parsed = SettleResponse.model_validate_json(raw)
        except ValidationError:
            parsed = None
        if status != 200 or parsed is None:
            tx = parsed.transaction if parsed is not None and TX_HASH.match(parsed.transaction or "") else ""
            return SettleResponse(success=False, error_reason=R.UNEXPECTED_SETTLE_ERROR.value,
                                  error_message=f"facilitator answered HTTP {status}"
                                  + ("" if parsed is not None else " with a malformed body"),
                                  transaction=tx, network=network)
        return checked_settlement(parsed, network)

    def can_sign(self, address: str) -> bool:
        return True

    async def upto_signers(self) -> dict[str, str]:
        try:
            status, raw = await self._exchange("GET", "/supported")
            doc = orjson.loads(raw) if status == 200 else {}
        except (HttpError, orjson.JSONDecodeError):
            return {}
        out: dict[str, str] = {}
        for kind in doc.get("kinds", []) if isinstance(doc, dict) else []:
            extra = kind.get("extra") or {}
            if (kind.get("scheme") == "upto" and kind.get("x402Version") == 2
                    and TX_ADDRESS.match(str(extra.get("facilitatorAddress", "")))):
                out.setdefault(kind["network"], extra["facilitatorAddress"])
        return out

    async def ready(self) -> bool:
        try:
            status, _ = await self._exchange("GET", "/supported")
        except HttpError:
            return False
        return status == 200

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None


def _caip2(requirements: AnyRequirements) -> str:
    if isinstance(requirements, PaymentRequirementsV1):
        from facilitator.x402.networks import to_caip2

        return to_caip2(requirements.network)
    return requirements.network
