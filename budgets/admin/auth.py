"""The admin API's bearer-token check: pure ASGI, ahead of routing, so unknown paths are hidden
from callers without the token too."""

from __future__ import annotations

import hmac

from pydantic import SecretStr
from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from budgets.admin.errors import error_response

OPEN_PATHS = frozenset({"/v1/healthz"})


def _route_path(scope: Scope) -> str:
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root + "/") else path


class BearerAuth:
    def __init__(self, app: ASGIApp, token: SecretStr | None) -> None:
        self.app = app
        self.token = token.get_secret_value().encode() if token is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _route_path(scope) in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(Headers(scope=scope).get("authorization"))
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _refusal(self, header: str | None) -> Response | None:
        if self.token is None:
            return error_response(403, "admin_disabled", "set BUDGETS_ADMIN_TOKEN")
        scheme, _, given = (header or "").partition(" ")
        # RFC 6750 §3.1: no credentials get a bare challenge; wrong ones name invalid_token. Both 401.
        if scheme.lower() != "bearer" or not given.strip():
            return error_response(401, "unauthorized", "send Authorization: Bearer <token>",
                                  {"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.strip().encode("latin-1"), self.token):
            return error_response(401, "invalid_token", "wrong admin token",
                                  {"WWW-Authenticate": 'Bearer error="invalid_token"'})
        return None
