"""The funds watch of upto sessions.

A session serves on a promise: its permit is settled only when the session ends, and until then
the payer can move its tokens, revoke Permit2's allowance or burn the permit's nonce. On every new
block each replica re-reads, in one JSON-RPC batch per network, what backs every open session:
the payer's balance and Permit2 allowance of the asset (once per payer and asset) and the
permit's nonce bit. When they no longer cover the payer's sessions on that asset (accrued + held,
plus one more call), those sessions are drained: no new call is served, and the reaper settles
each at once for what it accrued, while the funds may still be there. What cannot be caught
(tokens moved within one block of a call) is bounded by `sessions.max_exposure`.

Reads that fail or revert drain nothing (unknown is not "gone"); the next block asks again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

import orjson

from facilitator.evm import contracts
from facilitator.evm.rpc import Call, JsonRpcClient, RpcError, RpcUnavailableError
from gateway.metrics import GatewayMetrics
from gateway.sessions import Session, SessionState, SessionStore
from gateway.settings import UptoSessions

log = logging.getLogger("gateway.session_funds")


@dataclass(frozen=True, slots=True)
class Drain:
    session: str
    reason: str  # balance | allowance | nonce_used


def permit_nonce(session: Session) -> int:
    return int(orjson.loads(session.payment)["payload"]["payload"]["permit2Authorization"]["nonce"])


def _uint(result: object) -> int | None:
    if isinstance(result, RpcError) or not isinstance(result, str):
        return None
    try:
        return contracts.decode_uint(result)
    except ValueError:
        return None


def reads_for(sessions: list[Session]) -> tuple[list[Call], list[tuple[str, str]]]:
    """The batch for one network: balance and allowance per (payer, asset), then each session's
    nonce word; and the (payer, asset) groups in the order their reads come."""
    groups = sorted({(s.payer.lower(), s.asset.lower()) for s in sessions})
    permit2 = bytes.fromhex(contracts.PERMIT2[2:])
    calls: list[Call] = []
    for payer, asset in groups:
        owner = bytes.fromhex(payer[2:])
        calls.append(Call("eth_call", [{"to": asset, "data": contracts.balance_of(owner)}, "latest"]))
        calls.append(Call("eth_call", [{"to": asset, "data": contracts.allowance(owner, permit2)}, "latest"]))
    for s in sessions:
        owner = bytes.fromhex(s.payer.lower()[2:])
        calls.append(Call("eth_call", [{"to": contracts.PERMIT2,
                                        "data": contracts.nonce_bitmap(owner, permit_nonce(s) >> 8)}, "latest"]))
    return calls, groups


def uncovered(sessions: list[Session], groups: list[tuple[str, str]], results: list[object]) -> list[Drain]:
    """Which sessions the chain no longer backs, from `reads_for`'s results."""
    need: dict[tuple[str, str], int] = defaultdict(int)
    next_call: dict[tuple[str, str], int] = defaultdict(int)
    for s in sessions:
        g = (s.payer.lower(), s.asset.lower())
        need[g] += s.accrued + s.held
        next_call[g] = max(next_call[g], s.per_call)
    short: dict[tuple[str, str], str] = {}
    for i, g in enumerate(groups):
        balance, allowance = _uint(results[2 * i]), _uint(results[2 * i + 1])
        covers = need[g] + next_call[g]
        if balance is not None and balance < covers:
            short[g] = "balance"
        elif allowance is not None and allowance < covers:
            short[g] = "allowance"
    out = []
    for j, s in enumerate(sessions):
        bitmap = _uint(results[2 * len(groups) + j])
        if bitmap is not None and (bitmap >> (permit_nonce(s) & 0xFF)) & 1:
            out.append(Drain(s.id, "nonce_used"))  # the permit can never be settled: stop serving on it
        elif (s.payer.lower(), s.asset.lower()) in short:
            out.append(Drain(s.id, short[(s.payer.lower(), s.asset.lower())]))
    return out


class FundsWatch:
    def __init__(self, store: SessionStore, rpcs: Mapping[str, JsonRpcClient], routes: Mapping[str, UptoSessions],
                 metrics: GatewayMetrics, *, poll_s: float) -> None:
        self.store = store
        self.rpcs = rpcs
        self.routes = routes
        self.metrics = metrics
        self.poll_s = poll_s
        self._seen: dict[str, str] = {}  # network -> the last block checked

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.check_once()
            except Exception:  # the next poll tries again; a session is still bounded by max_exposure
                log.exception("session_funds_check_failed")

    async def check_once(self) -> list[Drain]:
        now = time.time()
        ids = await self.store.open_ids(now=now)
        if not ids:
            return []
        watched = [s for s in await asyncio.gather(*(self.store.get(i) for i in ids))
                   if s is not None and s.state == SessionState.OPEN and s.network in self.rpcs
                   and (cfg := self.routes.get(s.route)) is not None and cfg.watch_funds]
        by_network: dict[str, list[Session]] = defaultdict(list)
        for s in watched:
            by_network[s.network].append(s)
        drained: list[Drain] = []
        for network, sessions in by_network.items():
            drained += await self._check(network, sessions, now)
        return drained

    async def _check(self, network: str, sessions: list[Session], now: float) -> list[Drain]:
        rpc = self.rpcs[network]
        try:
            block = await rpc.call("eth_blockNumber", [])
            if block == self._seen.get(network):
                return []  # nothing changed on-chain since the last look
            calls, groups = reads_for(sessions)
            results = await rpc.batch(calls)
        except (RpcUnavailableError, RpcError) as exc:
            log.warning("session_funds_unreadable", extra={"network": network, "error": str(exc)})
            return []
        self._seen[network] = block
        drains = uncovered(sessions, groups, results)
        for d in drains:
            if await self.store.drain(d.session, now=now):
                self.metrics.session_drains.labels(network, d.reason).inc()
                log.warning("session_drained", extra={"session": d.session, "reason": d.reason, "block": block})
        return drains
