"""The admin API's errors and the one place they become JSON responses: Starlette exception
handlers for what the handlers raise, and `error_response` for the auth check, which answers
before routing (outside Starlette's exception middleware)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from budgets.store import BudgetStoreUnavailableError

HTTP_ERRORS = {404: "not_found", 405: "method_not_allowed"}  # Starlette's own (unknown path, method)


class AdminError(Exception):
    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status, self.error, self.message = status, error, message


class InvalidRequestError(Exception):
    """422 with field errors: [{"loc": "body.limits.0.amount", "msg": "..."}]."""

    def __init__(self, errors: list[dict[str, str]]) -> None:
        super().__init__("invalid request")
        self.errors = errors


def invalid(loc: str, msg: str) -> InvalidRequestError:
    return InvalidRequestError([{"loc": loc, "msg": msg}])


def json_response(doc: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type="application/json",
                    headers={"Cache-Control": "no-store", **(headers or {})})


def error_response(status: int, error: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return json_response({"error": error, "message": message}, status, headers)


def _admin_error(request: Request, exc: AdminError) -> Response:
    return error_response(exc.status, exc.error, exc.message)


def _invalid_request(request: Request, exc: InvalidRequestError) -> Response:
    return json_response({"error": "invalid_request", "errors": exc.errors}, 422)


def _store_unavailable(request: Request, exc: BudgetStoreUnavailableError) -> Response:
    return error_response(503, "budget_store_unavailable", "the budget store is unreachable", {"Retry-After": "5"})


def _http_error(request: Request, exc: HTTPException) -> Response:
    return error_response(exc.status_code, HTTP_ERRORS.get(exc.status_code, "http_error"), str(exc.detail),
                          dict(exc.headers or {}))


EXCEPTION_HANDLERS: dict[Any, Callable[[Request, Any], Response]] = {
    AdminError: _admin_error,
    InvalidRequestError: _invalid_request,
    BudgetStoreUnavailableError: _store_unavailable,
    HTTPException: _http_error,
}
