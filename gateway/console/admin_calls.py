"""The budgets admin API called in process: the console reads and changes budgets through the
very app the gateway mounts under its admin prefix (same checks, same documents), with the
admin token, without a network hop."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send


@dataclass(frozen=True)
class AdminReply:
    status: int
    doc: Any  # the JSON document (None when the body is empty or not JSON)


def _scope(method: str, path: str, query: dict[str, Any] | None, token: str, has_body: bool) -> Scope:
    q = urllib.parse.urlencode({k: v for k, v in (query or {}).items() if v not in (None, "")})
    headers = [(b"authorization", f"Bearer {token}".encode()), (b"accept", b"application/json")]
    if has_body:
        headers.append((b"content-type", b"application/json"))
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
            "path": path, "raw_path": path.encode(), "root_path": "", "query_string": q.encode(),
            "headers": headers, "client": ("127.0.0.1", 0), "server": ("console", 0)}


class AdminCalls:
    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token

    async def call(self, method: str, path: str, *, query: dict[str, Any] | None = None, body: Any = None) -> AdminReply:
        raw = orjson.dumps(body) if body is not None else b""
        sent = False
        status, chunks = 500, []

        async def receive() -> Message:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}

        async def send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(_scope(method, path, query, self.token, body is not None), receive, send)
        data = b"".join(chunks)
        try:
            doc = orjson.loads(data) if data else None
        except orjson.JSONDecodeError:
            doc = None
        return AdminReply(status, doc)

    async def get(self, path: str, **query: Any) -> AdminReply:
        return await self.call("GET", path, query=query)

    async def forward(self, path: str, query: dict[str, Any], receive: Receive, send: Send,
                      headers: dict[str, str]) -> None:
        """Stream the admin API's answer straight to the console's client (ledger exports),
        with `headers` added."""
        extra = [(k.lower().encode(), v.encode()) for k, v in headers.items()]

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(_scope("GET", path, query, self.token, False), receive, with_headers)
