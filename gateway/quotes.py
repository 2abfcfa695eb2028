"""Quote-currency prices of the accepted assets (how many USD one whole OPG is worth).

Fixed rates from the configuration never go stale. With a feed URL (a JSON object
`{symbol: price}`, or `{"prices": {symbol: price}}`), rates are refreshed in the background and a
rate older than `max_age_s` is refused: the gateway stops quoting rather than charge a stale price.
"""

from __future__ import annotations

import asyncio
import logging
import time
from decimal import Decimal, InvalidOperation

import aiohttp
import orjson

from gateway.settings import Quote

log = logging.getLogger("gateway.quotes")


class StaleQuoteError(Exception):
    pass


class QuoteBook:
    def __init__(self, quote: Quote, *, clock=time.time) -> None:
        self.config = quote
        self.clock = clock
        self._fixed = {s: Decimal(r) for s, r in quote.rates.items()}
        self._fed: dict[str, Decimal] = {}
        self._fed_at = 0.0
        self.version = 0  # bumps when rates change, so cached offers are recomputed

    def rate(self, symbol: str) -> Decimal:
        if self.config.feed_url:
            if symbol in self._fed and self.clock() - self._fed_at <= self.config.max_age_s:
                return self._fed[symbol]
            if symbol not in self._fixed:
                raise StaleQuoteError(f"no fresh {self.config.currency} price for {symbol}")
        rate = self._fixed.get(symbol)
        if rate is None:
            raise StaleQuoteError(f"no {self.config.currency} price for {symbol}")
        return rate

    @property
    def fed_at(self) -> float | None:
        """When the feed last answered with prices (unix seconds); None before it has."""
        return self._fed_at or None

    def update(self, prices: dict[str, Decimal]) -> None:
        if prices != self._fed:
            self.version += 1
        self._fed, self._fed_at = prices, self.clock()

    async def refresh_forever(self, session: aiohttp.ClientSession) -> None:
        assert self.config.feed_url
        while True:
            try:
                async with session.get(self.config.feed_url, timeout=aiohttp.ClientTimeout(total=10)) as r:
                    doc = orjson.loads(await r.read()) if r.status == 200 else None
                prices = doc.get("prices", doc) if isinstance(doc, dict) else None
                if isinstance(prices, dict):
                    parsed = {s: Decimal(str(v)) for s, v in prices.items() if isinstance(s, str)}
                    self.update({s: v for s, v in parsed.items() if v.is_finite() and v > 0})
                else:
                    log.warning("quote_feed_unusable", extra={"status": r.status})
            except (TimeoutError, aiohttp.ClientError, orjson.JSONDecodeError, InvalidOperation, OSError) as exc:
                log.warning("quote_feed_failed", extra={"error": type(exc).__name__})
            await asyncio.sleep(self.config.refresh_s)
