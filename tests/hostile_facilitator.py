"""A hostile (or merely broken) third-party facilitator, as a real HTTP server.

Verify and settle are forwarded to a real facilitator (`--real URL`) unless a mode says
otherwise, so a "successful" settle is real and balances can be checked. Modes are switched at
run time with `POST /_mode {"settle": "...", "verify": "..."}`; `GET /_stats` counts calls.

settle modes:
  proxy            forward to the real facilitator
  timeout          never answer (the gateway's timeout must fire)
  html502          HTML error page with status 502
  503-success      status 503 with a body that says success
  nonjson          200 with a non-JSON body
  truncated        200 with half of a real success body
  pending          200, success:false, settlement_pending, with a transaction hash
  invalid-state    200, success:false, invalid_transaction_state
  success-no-tx    200, success:true without a transaction hash
  wrong-network    200, success:true on another network
  proxy-then-sleep forward (the money moves), then hold the answer for `sleep_s` seconds
verify modes: proxy, valid (always valid, without checking anything), invalid
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import aiohttp
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

FAKE_TX = "0x" + "ab" * 32


def create_hostile_app(real_url: str) -> Starlette:
    state = {"settle": "proxy", "verify": "proxy", "sleep_s": 5.0, "stats": {"verify": 0, "settle": 0}}

    async def forward(path: str, body: bytes) -> tuple[int, bytes]:
        async with aiohttp.ClientSession() as http:
            async with http.post(real_url + path, data=body, headers={"Content-Type": "application/json"}) as r:
                return r.status, await r.read()

    def payer_of(doc: dict) -> str | None:
        inner = doc.get("paymentPayload", {}).get("payload", {})
        auth = inner.get("permit2Authorization") or inner.get("authorization") or {}
        return auth.get("from")

    async def verify(request: Request) -> Response:
        state["stats"]["verify"] += 1
        body = await request.body()
        mode = state["verify"]
        if mode == "valid":
            return Response(orjson.dumps({"isValid": True, "payer": payer_of(orjson.loads(body))}), media_type="application/json")
        if mode == "invalid":
            return Response(orjson.dumps({"isValid": False, "invalidReason": "invalid_payload"}), media_type="application/json")
        status, raw = await forward("/verify", body)
        return Response(raw, status_code=status, media_type="application/json")

    async def settle(request: Request) -> Response:
        state["stats"]["settle"] += 1
        body = await request.body()
        doc = orjson.loads(body)
        network = doc.get("paymentRequirements", {}).get("network", "eip155:84532")
        mode = state["settle"]
        js = lambda obj, status=200: Response(orjson.dumps(obj), status_code=status, media_type="application/json")  # noqa: E731
        if mode == "timeout":
            await asyncio.sleep(3600)
        if mode == "html502":
            return Response(b"<html><body><h1>502 Bad Gateway</h1></body></html>", status_code=502, media_type="text/html")
        if mode == "503-success":
            return js({"success": True, "transaction": FAKE_TX, "network": network}, 503)
        if mode == "nonjson":
            return Response(b"OK settled!", media_type="text/plain")
        if mode == "truncated":
            return Response(orjson.dumps({"success": True, "transaction": FAKE_TX, "network": network})[:30],
                            media_type="application/json")
        if mode == "pending":
            return js({"success": False, "errorReason": "settlement_pending", "transaction": FAKE_TX, "network": network})
        if mode == "invalid-state":
            return js({"success": False, "errorReason": "invalid_transaction_state", "transaction": "", "network": network})
        if mode == "success-no-tx":
            return js({"success": True, "transaction": "", "network": network})
        if mode == "wrong-network":
            return js({"success": True, "transaction": FAKE_TX, "network": "eip155:1"})
        status, raw = await forward("/settle", body)
        if mode == "proxy-then-sleep":
            await asyncio.sleep(state["sleep_s"])
        return Response(raw, status_code=status, media_type="application/json")

    async def set_mode(request: Request) -> Response:
        state.update(orjson.loads(await request.body()))
        return Response(orjson.dumps({k: v for k, v in state.items() if k != "stats"}), media_type="application/json")

    async def stats(request: Request) -> Response:
        return Response(orjson.dumps(state["stats"]), media_type="application/json")

    async def supported(request: Request) -> Response:
        async with aiohttp.ClientSession() as http:
            async with http.get(real_url + "/supported") as r:
                return Response(await r.read(), status_code=r.status, media_type="application/json")

    async def healthz(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    return Starlette(routes=[
        Route("/verify", verify, methods=["POST"]),
        Route("/settle", settle, methods=["POST"]),
        Route("/supported", supported, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/_mode", set_mode, methods=["POST"]),
        Route("/_stats", stats, methods=["GET"]),
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--real", required=True, help="URL of a real facilitator")
    args = p.parse_args(argv)
    uvicorn.run(create_hostile_app(args.real.rstrip("/")), host="127.0.0.1", port=args.port, log_level="warning",
                loop="uvloop", http="httptools")
    return 0


if __name__ == "__main__":
    sys.exit(main())
