"""One error for "the store cannot be reached", and one place that turns a backend's own errors
(RedisError, sqlite3.Error) into it. Each layer keeps its own subclass (facilitator's
`StoreUnavailableError`, `BudgetStoreUnavailableError`, `RecordStoreUnavailableError`,
`SessionStoreUnavailableError`) so its callers catch exactly its own store's failures."""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Awaitable, Callable, Coroutine
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

from redis.exceptions import RedisError

P = ParamSpec("P")
T = TypeVar("T")


class StoreUnavailableError(Exception):
    """A store could not be reached, or failed: callers fail closed."""


class BackendErrors:
    """Raises `error` in place of a RedisError or sqlite3.Error: as a context manager
    (`with errors: …`) or as a decorator of an async method. Holds no state, so one instance per
    module serves every call."""

    __slots__ = ("error",)

    def __init__(self, error: type[Exception]) -> None:
        self.error = error

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if isinstance(exc, RedisError):
            raise self.error(f"redis: {exc}") from exc
        if isinstance(exc, sqlite3.Error):
            raise self.error(str(exc)) from exc

    def __call__(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            with self:
                return await fn(*args, **kwargs)

        return wrapper
