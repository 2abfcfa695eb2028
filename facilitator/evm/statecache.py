"""Chain state a verify reads, cached per payer and invalidated by new blocks.

A verify reads a payer's code, balance, Permit2 allowance and nonce bitmap word (or EIP-3009
authorization state). For a payer seen recently those reads come from here, with no round trip.
One poll loop per chain keeps the cache honest: each new block range is scanned with one
`eth_getLogs` over the tokens and Permit2, and every address a Transfer, Approval, authorization
or nonce-invalidation event names is dropped from the cache. Our own settlements drop their payer
when they end, and while one is in flight its amount is subtracted from what the cache (or a
fresh read) says the payer holds.

How fresh a cached read is: as fresh as the last poll (`poll_s`). A verify is advisory; the
settlement's re-check always reads the chain itself. When the poll loop cannot reach the node
(or has fallen behind by more than `stale_after_s`), nothing is served from the cache.

A read is stored only if no invalidation of its payer happened while it was in flight, so a read
that raced with a block changing the payer's state is never kept.

A repeat payer's verify makes no round trip at all: its payment's nonce (fresh for every payment,
so never cached) is an `optional` read, left unread when everything else about the payer is
cached. That is safe because a nonce used on-chain after the payer's state was read emits an
event naming the payer (a Transfer from it, AuthorizationUsed, UnorderedNonceInvalidation), which
drops the payer; our own settlements are refused from the settlement store before any read; and
the settlement's re-check reads the nonce from the chain. What a warm verify cannot see is a nonce
burned before we first read the payer: it passes verify and fails at settlement (nothing is
served). The reference facilitator's Permit2 verify never reads the nonce at all.

Our own settlements keep their payer warm: a settlement that succeeded applies its effects
(balance and allowance debited, nonce marked) to what is cached, and the poll loop does not drop
the payer for the events of our own transaction. Effects are applied only if nothing about the
payer was read or dropped since the settlement began (such a read may already include the
transfer); otherwise the payer is dropped as before. This assumes one node (or
nodes that agree on `latest`); behind a load balancer of lagging nodes, set `poll_s` to 0 to
disable the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, defaultdict
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from facilitator.evm.eip712 import keccak
from facilitator.evm.rpc import Call, JsonRpcClient, RpcError, RpcUnavailableError
from facilitator.x402.types import is_evm_address

log = logging.getLogger("facilitator.statecache")


def _topic(signature: str) -> str:
    return "0x" + keccak(signature.encode()).hex()


# Events that change what a verify reads: balances, allowances (also Permit2's approval of the
# token), EIP-3009 authorization states and Permit2 nonces (a Permit2 transfer itself emits the
# token's Transfer from the payer; only an explicit invalidation has its own event).
WATCHED_TOPICS = [_topic(e) for e in (
    "Transfer(address,address,uint256)", "Approval(address,address,uint256)", "AuthorizationUsed(address,bytes32)",
    "AuthorizationCanceled(address,bytes32)", "UnorderedNonceInvalidation(address,uint256,uint256)",
)]
MAX_RANGE = 2_000  # blocks scanned in one eth_getLogs; a longer gap clears the whole cache
MAX_WATCHED = 512  # contracts whose events one eth_getLogs filters on (Permit2 and the tokens payments name)
OWN_TXS = 10_000  # our settlement transactions remembered, so that their own events do not drop their payer
MAX_UINT = 2**256 - 1


class Unread:
    """An `optional` read the cache chose not to make (`ChainStateCache.read`)."""

    def __repr__(self) -> str:
        return "UNREAD"


UNREAD = Unread()


@dataclass(frozen=True, slots=True)
class Effect:
    """What a settled transaction did to one cached read (a uint256 eth_call result):
    `debit` subtracts, `debit_unless_max` too unless the value is 2^256-1 (an unlimited
    allowance), `set_bit` sets bit `value`."""

    call: Call
    op: Literal["debit", "debit_unless_max", "set_bit"]
    value: int


def _key(call: Call) -> bytes:
    return orjson.dumps([call.method, call.params])


class ChainStateCache:
    def __init__(self, rpc: JsonRpcClient, *, poll_s: float = 0.25, stale_after_s: float = 2.0,
                 max_entries: int = 100_000) -> None:
        self.rpc = rpc
        self.poll_s = poll_s
        self.stale_after_s = stale_after_s
        self.max_entries = max_entries
        self.watched: set[str] = set()  # contracts whose events invalidate (tokens, Permit2), lowercase
        self._values: dict[bytes, tuple[str, Any]] = {}  # read key -> (payer, result)
        self._by_payer: dict[str, set[bytes]] = defaultdict(set)
        # payer -> invalidations so far, kept only for payers cached or being read: a read is stored
        # only if its payer's generation did not change while it was in flight.
        self._generation: dict[str, int] = {}
        self._reading: dict[str, int] = {}
        self._inflight: dict[tuple[str, str], int] = defaultdict(int)  # (asset, payer) -> amount being settled
        # payer -> tick of the last read stored or drop, for cached payers: a settlement applies its
        # effects only if its payer's entry did not change while it ran
        self._changed: dict[str, int] = {}
        self._tick = 0
        self._own: OrderedDict[str, str] = OrderedDict()  # our settlement tx hash -> its payer (lowercase)
        self._block: int | None = None  # last block whose logs were applied
        self._synced_at = 0.0  # monotonic time of the last successful poll
        self._task: asyncio.Task[None] | None = None
        self._new_block = asyncio.Condition()
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.poll_s > 0

    def usable(self) -> bool:
        return self._block is not None and time.monotonic() - self._synced_at <= self.stale_after_s

    def watch(self, *addresses: str) -> bool:
        """Watch these contracts' events from now on; False (nothing watched) for an address that
        is not one, or past MAX_WATCHED (payments name any token: a caller given False reads the
        chain, not the cache, for it)."""
        lowered = {a.lower() for a in addresses}
        if not all(is_evm_address(a) for a in lowered):
            return False
        if len(self.watched | lowered) > MAX_WATCHED:
            return lowered <= self.watched
        self.watched |= lowered
        return True

    def start(self) -> None:
        if not self.enabled:
            return
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._new_block = asyncio.Condition()
            self._task = asyncio.create_task(self._run())

    # -- reads -----------------------------------------------------------------------------------

    async def read(self, payer: str, calls: list[Call], *, optional: Collection[int] = ()) -> list[Any | RpcError]:
        """The results of `calls` (all about `payer`), from the cache where it can answer, the rest
        in one batch. The calls at the `optional` indexes are left UNREAD when they are the only
        ones the cache cannot answer. Raises RpcUnavailableError like JsonRpcClient.batch."""
        self.start()
        payer = payer.lower()
        if not self.usable():
            return await self.rpc.batch(calls)
        keys = [_key(c) for c in calls]
        out: list[Any] = [None] * len(calls)
        missing: list[int] = []
        for i, key in enumerate(keys):
            hit = self._values.get(key)
            if hit is None:
                missing.append(i)
            else:
                out[i] = hit[1]
        if all(i in optional for i in missing):
            self.hits += 1
            for i in missing:
                out[i] = UNREAD
            return out
        self.misses += 1
        generation = self._generation.setdefault(payer, 0)
        self._reading[payer] = self._reading.get(payer, 0) + 1
        try:
            results = await self.rpc.batch([calls[i] for i in missing])
        finally:
            self._reading[payer] -= 1
            if not self._reading[payer]:
                del self._reading[payer]
        keep = self._generation.get(payer) == generation and self.usable()
        if keep and len(self._values) >= self.max_entries:
            self.clear()
            keep = False
        if not keep and payer not in self._by_payer and payer not in self._reading:
            self._generation.pop(payer, None)
        for i, result in zip(missing, results, strict=True):
            out[i] = result
            if keep and not isinstance(result, RpcError):
                self._values[keys[i]] = (payer, result)
                self._by_payer[payer].add(keys[i])
        if keep:
            self._tick += 1
            self._changed[payer] = self._tick
        return out

    # -- our own settlements -------------------------------------------------------------------

    def inflight(self, asset: str, payer: str) -> int:
        return self._inflight.get((asset.lower(), payer.lower()), 0)

    def add_inflight(self, asset: str, payer: str, amount: int) -> int | None:
        """A settlement begins. Returns its stamp for `settled()`."""
        payer = payer.lower()
        self._inflight[(asset.lower(), payer)] += amount
        return self._changed.get(payer)

    def own_tx(self, tx_hash: str, payer: str) -> None:
        """Our settlement's transaction, before it is broadcast: its events do not drop `payer`
        (its effects are applied by `settled()`, or the payer is dropped there)."""
        self._own[tx_hash.lower()] = payer.lower()
        while len(self._own) > OWN_TXS:
            self._own.popitem(last=False)

    def settled(self, asset: str, payer: str, amount: int, *, stamp: int | None = None,
                effects: Sequence[Effect] = (), tx_hashes: Sequence[str] = ()) -> None:
        """A settlement ended (mined, reverted, pending or refused): its amount is no longer
        subtracted. Its `effects` (one of `tx_hashes`, the transactions signed for it, was mined
        with them) are applied to what is cached about the payer if nothing about the payer
        changed since `add_inflight` returned `stamp`; otherwise (or without effects) what we
        cached about the payer is dropped, and the events of those transactions drop it again."""
        payer = payer.lower()
        key = (asset.lower(), payer)
        left = self._inflight.get(key, 0) - amount
        if left > 0:
            self._inflight[key] = left
        else:
            self._inflight.pop(key, None)
        if effects and stamp is not None and self._changed.get(payer) == stamp and self._apply(payer, effects):
            return
        for tx_hash in tx_hashes:
            self._own.pop(tx_hash.lower(), None)
        self.invalidate(payer)

    def _apply(self, payer: str, effects: Sequence[Effect]) -> bool:
        updates: list[tuple[bytes, str]] = []
        for effect in effects:
            key = _key(effect.call)
            hit = self._values.get(key)
            if hit is None:
                continue  # not cached: a later read gets it from the chain
            if not isinstance(hit[1], str):
                return False
            value = int(hit[1], 16) if hit[1] not in ("0x", "") else 0
            if effect.op == "set_bit":
                value |= 1 << effect.value
            elif effect.op == "debit_unless_max" and value == MAX_UINT:
                continue
            else:
                value -= effect.value
                if value < 0:
                    return False  # not what the chain can hold: our picture of the payer is wrong
            updates.append((key, "0x" + value.to_bytes(32, "big").hex()))
        for key, result in updates:
            self._values[key] = (payer, result)
        return True

    def invalidate(self, address: str) -> None:
        address = address.lower()
        if address not in self._generation:
            return  # neither cached nor being read: nothing to drop
        self._changed.pop(address, None)
        keys = self._by_payer.pop(address, ())
        for key in keys:
            self._values.pop(key, None)
        if address in self._reading:
            self._generation[address] += 1
        else:
            del self._generation[address]

    def clear(self) -> None:
        for payer in list(self._by_payer):
            self.invalidate(payer)
        for payer in list(self._reading):
            self._generation[payer] = self._generation.get(payer, 0) + 1
        self._values.clear()

    # -- the poll loop -------------------------------------------------------------------------

    async def synced_to(self, block: int, timeout_s: float = 10.0) -> bool:
        """Wait until the logs of `block` have been applied (tests, and callers that just moved
        state themselves)."""
        self.start()

        async def reached() -> None:
            async with self._new_block:
                await self._new_block.wait_for(lambda: self._block is not None and self._block >= block)

        try:
            await asyncio.wait_for(reached(), timeout_s)
            return True
        except TimeoutError:
            return False

    async def _run(self) -> None:
        while True:
            try:
                await self.poll_once()
            except (RpcError, RpcUnavailableError, ValueError, TypeError) as exc:
                log.warning("state_cache_poll_failed", extra={"error": str(exc)})
            await asyncio.sleep(self.poll_s)

    async def poll_once(self) -> None:
        head = int(await self.rpc.call("eth_blockNumber", []), 16)
        if self._block is None or head < self._block or head - self._block > MAX_RANGE:
            self.clear()  # first poll, a reorg below our mark, or a gap too long to scan
        elif head > self._block and self.watched:
            logs = await self.rpc.call("eth_getLogs", [{
                "fromBlock": hex(self._block + 1), "toBlock": hex(head),
                "address": sorted(self.watched), "topics": [WATCHED_TOPICS],
            }])
            for entry in logs or []:
                ours = self._own.get(str(entry.get("transactionHash", "")).lower())
                for topic in (entry.get("topics") or [])[1:3]:
                    if isinstance(topic, str) and len(topic) == 66:
                        address = "0x" + topic[-40:].lower()
                        if address != ours:
                            self.invalidate(address)
        self._block = head
        self._synced_at = time.monotonic()
        async with self._new_block:
            self._new_block.notify_all()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
