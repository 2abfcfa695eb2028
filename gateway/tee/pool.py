"""The enclaves of one `tee` upstream: found in the registry, reached over TLS pinned to each
one's registered certificate, checked on every answer.

- Membership: `getActiveTEEs(tee_type)` every `refresh_s`; an enclave that leaves the active set
  (disabled, PCR revoked, heartbeat stale on chain) is dropped at the next refresh, and one whose
  last heartbeat is older than `heartbeat_max_age_s` is skipped at once (registry unreachable or not).
  A failed refresh keeps the last set (heartbeat ages still apply).
- TLS: only the registered certificate is trusted for an enclave (no CA, no hostname: OpenGradient's
  `build_ssl_context_from_der`); any other certificate fails the handshake, so nothing is sent.
- Spread and failover: round robin over eligible enclaves; a connect error (refused, TLS) moves on
  to the next enclave (nothing ran). A response whose proof fails is the call's failure, never
  retried elsewhere (the agent is not charged; it may resend).
- Faults (connect errors, bad proofs) count per enclave; `eject_after` in a row take it out of
  rotation for `eject_s`; a verified answer resets the count.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import ssl
import time
from dataclasses import dataclass, field

import aiohttp

from facilitator.evm.rpc import JsonRpcClient, RpcError, RpcUnavailableError
from gateway.metrics import GatewayMetrics
from gateway.settings import TeeSettings, Upstream
from gateway.tee.proof import EnclaveKey
from gateway.tee.registry import RegisteredTee, active_tees

log = logging.getLogger(__name__)
_CONNECT_COOLDOWN_S = 5.0


class NoEnclaveError(Exception):
    """No active enclave accepted the connection."""


class EnclaveCallFailedError(Exception):
    """The enclave accepted the call, then failed (timeout, reset): not retried."""


def pinned_context(certificate_der: bytes) -> ssl.SSLContext:
    """Trusts this one certificate and nothing else; the hostname is not checked (enclaves are
    often addressed by IP), the pinned certificate is the trust anchor."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=certificate_der)
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # a pinned leaf is trusted by itself
    return ctx


@dataclass(eq=False)
class Enclave:
    tee_id: str
    endpoint: str  # base URL, no trailing slash
    key: EnclaveKey
    certificate: bytes
    ssl: ssl.SSLContext
    payment_address: str
    last_heartbeat_at: int
    faults: int = 0  # in a row
    ejected_until: float = 0.0
    down_until: float = 0.0  # connect cooldown
    reasons: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_registry(cls, tee: RegisteredTee) -> Enclave:
        key = EnclaveKey.from_der(tee.public_key)
        return cls(key.tee_id, tee.endpoint.rstrip("/"), key, tee.tls_certificate, pinned_context(tee.tls_certificate),
                   tee.payment_address, tee.last_heartbeat_at)

    def same_registration(self, tee: RegisteredTee) -> bool:
        return self.endpoint == tee.endpoint.rstrip("/") and self.certificate == tee.tls_certificate


class TeePool:
    def __init__(self, name: str, upstream: Upstream, metrics: GatewayMetrics | None = None) -> None:
        assert upstream.tee is not None
        self.name = name
        self.config = upstream
        self.settings: TeeSettings = upstream.tee
        self.metrics = metrics
        self.enclaves: dict[str, Enclave] = {}
        self.refreshed_at = 0.0
        self._rr = itertools.count()
        self._rpc = JsonRpcClient(self.settings.rpc_url, timeout_s=min(10.0, self.settings.refresh_s * 2))
        self._task: asyncio.Task[None] | None = None
        self._timeout = aiohttp.ClientTimeout(total=None, connect=upstream.connect_timeout_s, sock_read=upstream.timeout_s)

    # -- membership ---------------------------------------------------------------------------

    async def start(self, session: aiohttp.ClientSession) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._rpc.close()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.refresh_s)
            try:
                await self.refresh()
            except Exception:  # a bad round must not end the loop
                log.exception("tee pool %s: refresh failed", self.name)

    async def refresh(self) -> None:
        try:
            tees = await active_tees(self._rpc, self.settings.registry, self.settings.tee_type)
        except (RpcError, RpcUnavailableError, ValueError) as exc:
            log.warning("tee pool %s: registry not read (%s); keeping %d enclave(s)", self.name, exc, len(self.enclaves))
            return
        fresh: dict[str, Enclave] = {}
        for tee in tees:
            if not tee.enabled or not tee.endpoint.startswith("https://") or not tee.tls_certificate:
                continue  # no pinning possible without TLS and a certificate
            try:
                enclave = Enclave.from_registry(tee)
            except (ValueError, ssl.SSLError) as exc:
                log.warning("tee pool %s: unusable registry entry %s: %s", self.name, tee.endpoint, exc)
                continue
            known = self.enclaves.get(enclave.tee_id)
            if known is not None and known.same_registration(tee):
                known.last_heartbeat_at = tee.last_heartbeat_at
                enclave = known
            fresh[enclave.tee_id] = enclave
        for gone in self.enclaves.keys() - fresh.keys():
            log.info("tee pool %s: enclave %s left the active set", self.name, gone)
            self._gauge(gone, 0)
        self.enclaves = fresh
        self.refreshed_at = time.time()
        for enclave in fresh.values():
            self._gauge(enclave.tee_id, 1 if self._eligible(enclave, time.monotonic(), time.time()) else 0)
        if self.metrics is not None:
            self.metrics.tee_enclaves.labels(self.name).set(len(fresh))

    def _gauge(self, tee_id: str, value: int) -> None:
        if self.metrics is not None:
            self.metrics.tee_in_rotation.labels(self.name, tee_id).set(value)

    def _eligible(self, enclave: Enclave, mono: float, wall: float) -> bool:
        fresh = wall - enclave.last_heartbeat_at <= self.settings.heartbeat_max_age_s
        return fresh and enclave.ejected_until <= mono

    def eligible(self) -> list[Enclave]:
        mono, wall = time.monotonic(), time.time()
        return [e for e in self.enclaves.values() if self._eligible(e, mono, wall)]

    # -- a call -------------------------------------------------------------------------------

    def _order(self) -> list[Enclave]:
        candidates = self.eligible()
        if not candidates:
            return []
        start = next(self._rr) % len(candidates)
        rotated = candidates[start:] + candidates[:start]
        mono = time.monotonic()
        up = [e for e in rotated if e.down_until <= mono]
        return up + [e for e in rotated if e not in up]  # all cooling down: try them anyway

    async def open(self, session: aiohttp.ClientSession, method: str, path_qs: str, headers: dict[str, str],
                   body: bytes) -> tuple[aiohttp.ClientResponse, Enclave]:
        errors: list[str] = []
        for enclave in self._order():
            try:
                resp = await session.request(method, enclave.endpoint + path_qs, headers=headers, data=body or None,
                                             timeout=self._timeout, allow_redirects=False, auto_decompress=False,
                                             ssl=enclave.ssl)
            except aiohttp.ClientConnectorCertificateError:
                # Not the registered certificate: refused in the handshake, nothing was sent.
                self.fault(enclave, "tls_certificate")
                errors.append(f"{enclave.tee_id[:10]}: certificate is not the registered one")
                continue
            except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError) as exc:
                enclave.down_until = time.monotonic() + _CONNECT_COOLDOWN_S
                self.fault(enclave, "connect")
                errors.append(f"{enclave.tee_id[:10]}: {type(exc).__name__}")
                continue
            except (TimeoutError, aiohttp.ClientError) as exc:
                self.fault(enclave, "call_failed")
                raise EnclaveCallFailedError(type(exc).__name__) from exc
            enclave.down_until = 0.0
            return resp, enclave
        raise NoEnclaveError("; ".join(errors) or "no active enclave in the registry")

    def fault(self, enclave: Enclave, reason: str) -> None:
        enclave.faults += 1
        enclave.reasons[reason] = enclave.reasons.get(reason, 0) + 1
        if self.metrics is not None:
            self.metrics.tee_faults.labels(self.name, enclave.tee_id, reason).inc()
            self.metrics.tee_calls.labels(self.name, enclave.tee_id, "fault").inc()
        log.warning("tee pool %s: enclave %s fault %s (%d in a row)", self.name, enclave.tee_id, reason, enclave.faults)
        if enclave.faults >= self.settings.eject_after:
            enclave.faults = 0
            enclave.ejected_until = time.monotonic() + self.settings.eject_s
            self._gauge(enclave.tee_id, 0)
            log.warning("tee pool %s: enclave %s out of rotation for %.0f s", self.name, enclave.tee_id,
                        self.settings.eject_s)

    def verified(self, enclave: Enclave) -> None:
        enclave.faults = 0
        if self.metrics is not None:
            self.metrics.tee_calls.labels(self.name, enclave.tee_id, "verified").inc()

    async def healthy(self, session: aiohttp.ClientSession) -> bool:
        return bool(self.eligible())
