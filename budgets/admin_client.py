"""AdminClient: the budgets admin API over HTTP (aiohttp), shared by the `x402-budgets` CLI and
the tests. Paths are relative to the API's base URL (the gateway's admin prefix, e.g.
http://127.0.0.1:8402/admin). A refusal (status >= 400) or an unreachable API raises
AdminApiError; `request(..., check=False)` returns any status for callers that look at it.

Kept apart from budgets.admin (the server) so that the CLI does not import Starlette.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

from budgets.amounts import Assets


class AdminApiError(Exception):
    """The API refused (`status` >= 400, `error` its code, `errors` its field errors) or could not
    be reached (`status` 0)."""

    def __init__(self, message: str, errors: list[dict[str, Any]] | None = None, *, status: int = 0,
                 error: str | None = None) -> None:
        super().__init__(message)
        self.errors = errors or []
        self.status = status
        self.error = error


@dataclass(frozen=True)
class Reply:
    status: int
    raw: bytes
    headers: CIMultiDictProxy[str]

    def json(self) -> Any:
        return json.loads(self.raw) if self.raw else None

    @property
    def text(self) -> str:
        return self.raw.decode()


def segment(value: str) -> str:
    """One path segment, percent-encoded (a CAIP-2 network keeps its colon)."""
    return urllib.parse.quote(value, safe=":")


@dataclass(frozen=True)
class Owner:
    """Whose policy: an agent wallet or a group."""

    kind: Literal["agent", "group"]
    id: str

    @classmethod
    def agent(cls, address: str) -> Owner:
        return cls("agent", address)

    @classmethod
    def group(cls, name: str) -> Owner:
        return cls("group", name)

    @property
    def path(self) -> str:
        return f"/v1/{self.kind}s/{segment(self.id)}"

    def policy_path(self, network: str, asset: str) -> str:
        return f"{self.path}/policies/{segment(network)}/{segment(asset)}"


class AdminClient:
    """`session`: share one (its owner closes it); otherwise the client opens its own, closed by
    `aclose` or leaving `async with`. `timeout_s` bounds connecting and each read, not a whole
    (possibly long) ledger export."""

    def __init__(self, url: str, token: str | None, *, session: aiohttp.ClientSession | None = None,
                 timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self._session = session
        self._owns_session = session is None
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout_s, sock_read=timeout_s)
        self._assets: Assets | None = None

    async def __aenter__(self) -> AdminClient:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    # -- HTTP --------------------------------------------------------------------------------------

    async def request(self, method: str, path: str, *, query: dict[str, Any] | None = None, body: Any = None,
                      check: bool = True) -> Reply:
        """`body` is sent as JSON; None values in `query` are left out. With `check`, a status
        >= 400 raises AdminApiError."""
        try:
            async with self._request(method, path, query, body) as resp:
                reply = Reply(resp.status, await resp.read(), resp.headers)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._unreachable(exc) from None
        if check and reply.status >= 400:
            raise _refusal(reply.status, reply.raw)
        return reply

    async def stream(self, method: str, path: str, *, query: dict[str, Any] | None = None,
                     chunk_size: int = 65536) -> AsyncIterator[bytes]:
        """The response body in chunks as it arrives (a status >= 400 raises AdminApiError)."""
        try:
            async with self._request(method, path, query, None) as resp:
                if resp.status >= 400:
                    raise _refusal(resp.status, await resp.read())
                async for chunk in resp.content.iter_chunked(chunk_size):
                    yield chunk
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._unreachable(exc) from None

    def _request(self, method: str, path: str, query: dict[str, Any] | None,
                 body: Any) -> AbstractAsyncContextManager[aiohttp.ClientResponse]:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        q = {k: v for k, v in (query or {}).items() if v is not None}
        url = self.url + path + (f"?{urllib.parse.urlencode(q)}" if q else "")
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Accept": "application/json"} | ({"Content-Type": "application/json"} if data is not None else {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return self._session.request(method, URL(url, encoded=True), data=data, headers=headers,
                                     timeout=self._timeout)

    def _unreachable(self, exc: BaseException) -> AdminApiError:
        return AdminApiError(f"cannot reach {self.url}: {_reason(exc)}")

    # -- the API -----------------------------------------------------------------------------------

    async def assets(self) -> Assets:
        """(network, lowercase asset) -> (symbol, decimals), fetched once."""
        if self._assets is None:
            doc = (await self.request("GET", "/v1/assets")).json()
            self._assets = {(a["network"], a["asset"].lower()): (a["symbol"], a["decimals"]) for a in doc["assets"]}
        return self._assets

    async def openapi(self) -> Reply:
        return await self.request("GET", "/openapi.json")

    async def policies(self, *, agent: str | None = None, group: str | None = None) -> Reply:
        return await self.request("GET", "/v1/policies", query={"agent": agent, "group": group})

    async def get_policy(self, owner: Owner, network: str, asset: str) -> Reply:
        return await self.request("GET", owner.policy_path(network, asset))

    async def put_policy(self, owner: Owner, network: str, asset: str, policy: dict[str, Any]) -> Reply:
        """201 created, 200 replaced."""
        return await self.request("PUT", owner.policy_path(network, asset), body=policy)

    async def delete_policy(self, owner: Owner, network: str, asset: str) -> Reply:
        return await self.request("DELETE", owner.policy_path(network, asset))

    async def usage(self, agent: str, *, network: str | None = None, asset: str | None = None) -> Reply:
        return await self.request("GET", f"{Owner.agent(agent).path}/usage", query={"network": network, "asset": asset})

    async def suspend(self, owner: Owner, *, network: str | None = None, asset: str | None = None) -> Reply:
        return await self.request("POST", f"{owner.path}/suspend", body=_where(network, asset))

    async def resume(self, owner: Owner, *, network: str | None = None, asset: str | None = None) -> Reply:
        return await self.request("POST", f"{owner.path}/resume", body=_where(network, asset))

    async def ledger(self, **query: Any) -> Reply:
        """Query: agent, limit, format (json, jsonl, csv), start, end (ISO 8601 or unix seconds)."""
        return await self.request("GET", "/v1/ledger", query=query)

    def ledger_stream(self, **query: Any) -> AsyncIterator[bytes]:
        return self.stream("GET", "/v1/ledger", query=query)

    async def reconcile(self, from_block: int, to_block: int, *, network: str | None = None) -> Reply:
        return await self.request("GET", "/v1/reconcile", query={"from": from_block, "to": to_block, "network": network})


def _where(network: str | None, asset: str | None) -> dict[str, str] | None:
    """A suspend/resume body: only the network and asset given (none: all the owner's policies)."""
    return {k: v for k, v in {"network": network, "asset": asset}.items() if v} or None


def _refusal(status: int, raw: bytes) -> AdminApiError:
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        return AdminApiError(f"HTTP {status}: {raw[:200].decode(errors='replace')}", status=status)
    message = doc.get("message") or ("invalid request" if status == 422 else doc.get("error")) or f"HTTP {status}"
    return AdminApiError(message, doc.get("errors"), status=status, error=doc.get("error"))


def _reason(exc: BaseException) -> str:
    """Why a request got no answer, in the socket's words ("[Errno 111] Connection refused")."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    cause = exc.os_error if isinstance(exc, aiohttp.ClientConnectorError) else None
    if cause is not None and cause.errno is not None and cause.errno > 0:
        return f"[Errno {cause.errno}] {os.strerror(cause.errno)}"
    return str(cause or exc) or type(exc).__name__
