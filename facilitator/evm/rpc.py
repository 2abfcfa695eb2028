"""A small async JSON-RPC client with batching, over facilitator/http11.py.

web3's AsyncHTTPProvider makes one HTTP request per call; a verify needs four or five reads, so
we send them as one JSON-RPC batch (one round trip). The transport is our own kept-alive HTTP/1.1
client: a fifth of aiohttp's CPU per exchange (facilitator/http11.py says why).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from facilitator.http11 import Http11Client, HttpError


class RpcError(Exception):
    """The node answered with a JSON-RPC error object (definitive: the node saw the request)."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.data = data


class RpcUnavailableError(Exception):
    """No usable answer: connection refused, timeout, HTTP error, garbage. The request may or
    may not have reached the node."""


@dataclass(frozen=True, slots=True)
class Call:
    method: str
    params: list[Any]


class JsonRpcClient:
    def __init__(self, url: str, *, timeout_s: float = 10.0, pool_size: int = 64) -> None:
        self.url = url
        self._timeout_s = timeout_s
        self._pool_size = pool_size
        self._http: Http11Client | None = None
        self._ids = itertools.count(1)

    def _client(self) -> Http11Client:
        if self._http is None:  # made on first use: its connections belong to the running loop
            try:
                self._http = Http11Client(self.url, limit=self._pool_size, timeout_s=self._timeout_s)
            except ValueError as exc:
                raise RpcUnavailableError(str(exc)) from None
        return self._http

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def _post(self, body: bytes) -> Any:
        try:
            answer = await self._client().post(body)
        except HttpError as exc:
            raise RpcUnavailableError(f"RPC request failed: {exc}") from exc
        if answer.status != 200:
            raise RpcUnavailableError(f"HTTP {answer.status} from RPC")
        try:
            return orjson.loads(answer.body)
        except orjson.JSONDecodeError as exc:
            raise RpcUnavailableError("RPC answered non-JSON") from exc

    async def call(self, method: str, params: list[Any]) -> Any:
        reply = await self._post(orjson.dumps({"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": params}))
        return _result_of(reply)

    async def batch(self, calls: Sequence[Call]) -> list[Any | RpcError]:
        """Results in call order; an item that failed is returned as its RpcError (not raised),
        so one reverted eth_call does not hide the others."""
        if not calls:
            return []
        first = next(self._ids)
        ids = list(range(first, first + len(calls)))
        for _ in range(len(calls) - 1):
            next(self._ids)
        body = orjson.dumps(
            [{"jsonrpc": "2.0", "id": i, "method": c.method, "params": c.params} for i, c in zip(ids, calls, strict=True)]
        )
        reply = await self._post(body)
        if not isinstance(reply, list):
            # Some nodes answer a whole batch with one error object.
            raise RpcUnavailableError(f"RPC batch answered {type(reply).__name__}, not a list")
        by_id = {item.get("id"): item for item in reply if isinstance(item, dict)}
        out: list[Any | RpcError] = []
        for i in ids:
            item = by_id.get(i)
            if item is None:
                raise RpcUnavailableError("RPC batch reply is missing an item")
            try:
                out.append(_result_of(item))
            except RpcError as exc:
                out.append(exc)
        return out


def _result_of(reply: Any) -> Any:
    if not isinstance(reply, dict):
        raise RpcUnavailableError("RPC reply is not an object")
    error = reply.get("error")
    if error is not None:
        if isinstance(error, dict):
            raise RpcError(int(error.get("code", -1)), str(error.get("message", "")), error.get("data"))
        raise RpcError(-1, str(error))
    if "result" not in reply:
        raise RpcUnavailableError("RPC reply has neither result nor error")
    return reply["result"]
