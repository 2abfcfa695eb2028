"""Quote rates: fixed ones never go stale; a feed is refreshed over HTTP and refused when old."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import aiohttp
import pytest
from aiohttp import web

from gateway.quotes import QuoteBook, StaleQuoteError
from gateway.settings import Quote


async def test_fixed_rates_never_go_stale() -> None:
    now = [1000.0]
    book = QuoteBook(Quote(rates={"OPG": "0.10"}), clock=lambda: now[0])
    now[0] += 10**9
    assert book.rate("OPG") == Decimal("0.10")
    with pytest.raises(StaleQuoteError):
        book.rate("USDC")


async def test_a_feed_is_refreshed_and_refused_when_older_than_max_age() -> None:
    prices = {"OPG": "0.12"}

    async def feed(request: web.Request) -> web.Response:
        return web.json_response({"prices": prices})

    app = web.Application()
    app.router.add_get("/prices", feed)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    now = [1000.0]
    book = QuoteBook(Quote(feed_url=f"http://127.0.0.1:{port}/prices", refresh_s=0.05, max_age_s=60),
                     clock=lambda: now[0])
    with pytest.raises(StaleQuoteError):  # nothing fetched yet, no fixed fallback: no quote
        book.rate("OPG")
    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(book.refresh_forever(session))
        try:
            for _ in range(100):
                await asyncio.sleep(0.02)
                if book._fed:
                    break
            assert book.rate("OPG") == Decimal("0.12")
            version = book.version
            prices["OPG"] = "0.15"
            for _ in range(100):
                await asyncio.sleep(0.02)
                if book.version != version:
                    break
            assert book.rate("OPG") == Decimal("0.15")  # a new price bumps the version (offers re-quoted)
            task.cancel()
            now[0] += 61  # the feed stopped answering for longer than max_age_s
            with pytest.raises(StaleQuoteError):
                book.rate("OPG")
        finally:
            task.cancel()
            await runner.cleanup()
