"""The admin API as a Starlette app, mounted by the gateway under its admin prefix: the route
table's handlers behind the bearer-token check, errors rendered by the exception handlers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from budgets.admin.auth import BearerAuth
from budgets.admin.errors import EXCEPTION_HANDLERS
from budgets.admin.handlers import AdminApi
from budgets.admin.responses import ResponseBodies
from budgets.admin.routes import ROUTES
from budgets.amounts import Assets
from budgets.enforcer import BudgetEnforcer
from budgets.reconcile import Reconciler

Endpoint = Callable[[Request], Awaitable[Response]]


def create_admin_app(enforcer: BudgetEnforcer, token: SecretStr | None, *, assets: Assets | None = None,
                     reconciler: Reconciler | None = None) -> Starlette:
    """`assets`: (network, asset) -> (symbol, decimals) for the display forms; a None token
    disables every route but /v1/healthz (403 admin_disabled). `reconciler`: what
    /v1/reconcile compares the ledger with (None: 404 reconcile_unavailable)."""
    known = {(n, a.lower()): v for (n, a), v in (assets or {}).items()}
    api = AdminApi(enforcer, ResponseBodies(known), reconciler)
    by_path: dict[str, dict[str, Endpoint]] = {}
    for method, path, handler, _ in ROUTES:
        by_path.setdefault(path, {})[method] = getattr(api, handler)
    routes = [Route(path, _dispatch(methods), methods=list(methods)) for path, methods in by_path.items()]
    return Starlette(routes=routes, middleware=[Middleware(BearerAuth, token=token)],
                     exception_handlers=EXCEPTION_HANDLERS)


async def _not_allowed(request: Request) -> Response:
    raise HTTPException(405)


def _dispatch(methods: dict[str, Endpoint]) -> Endpoint:
    """One endpoint per path, choosing the handler by method (HEAD is served by GET)."""

    async def endpoint(request: Request) -> Response:
        return await methods.get(request.method, methods.get("GET", _not_allowed))(request)

    return endpoint
