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
that raced with a block changing the payer's state is never kept. This assumes one node (or
nodes that agree on `latest`); behind a load balancer of lagging nodes, set `poll_s` to 0 to
disable the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from typing import Any

import orjson

from facilitator.evm.eip712 import keccak
from facilitator.evm.rpc import Call, JsonRpcClient, RpcError, RpcUnavailableError

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

    def watch(self, *addresses: str) -> None:
        self.watched.update(a.lower() for a in addresses)

    def start(self) -> None:
        if not self.enabled:
            return
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._new_block = asyncio.Condition()
            self._task = asyncio.create_task(self._run())

    # -- reads -----------------------------------------------------------------------------------

    async def read(self, payer: str, calls: list[Call]) -> list[Any | RpcError]:
        """The results of `calls` (all about `payer`), from the cache where it can answer, the rest
        in one batch. Raises RpcUnavailableError like JsonRpcClient.batch."""
        self.start()
        payer = payer.lower()
        if not self.usable():
            return await self.rpc.batch(calls)
        keys = [orjson.dumps([c.method, c.params]) for c in calls]
        out: list[Any] = [None] * len(calls)
        missing: list[int] = []
        for i, key in enumerate(keys):
            hit = self._values.get(key)
            if hit is None:
                missing.append(i)
            else:
                out[i] = hit[1]
        if not missing:
            self.hits += 1
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
        return out

    # -- our own settlements -------------------------------------------------------------------

    def inflight(self, asset: str, payer: str) -> int:
        return self._inflight.get((asset.lower(), payer.lower()), 0)

    def add_inflight(self, asset: str, payer: str, amount: int) -> None:
        self._inflight[(asset.lower(), payer.lower())] += amount

    def settled(self, asset: str, payer: str, amount: int) -> None:
        """A settlement ended (mined, reverted, pending or refused): its amount is no longer
        subtracted, and what we cached about the payer is dropped, since it may have changed."""
        key = (asset.lower(), payer.lower())
        left = self._inflight.get(key, 0) - amount
        if left > 0:
            self._inflight[key] = left
        else:
            self._inflight.pop(key, None)
        self.invalidate(payer)

    def invalidate(self, address: str) -> None:
        address = address.lower()
        if address not in self._generation:
            return  # neither cached nor being read: nothing to drop
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
                for topic in (entry.get("topics") or [])[1:3]:
                    if isinstance(topic, str) and len(topic) == 66:
                        self.invalidate("0x" + topic[-40:])
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
