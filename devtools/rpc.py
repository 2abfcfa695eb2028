"""Blocking calls over the project's JSON-RPC client (facilitator.evm.rpc), for dev tooling and tests.

The dev chain, the demos and the test helpers are synchronous and are also called from inside a
running event loop (the demos, async tests), where no second loop may run. So the async client
runs on one private event loop in a daemon thread, and each call blocks on its result there.
Errors are the client's own: `RpcError` (the node answered an error object) and
`RpcUnavailableError` (no usable answer).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import aiohttp

from facilitator.evm.rpc import Call, JsonRpcClient, RpcError, RpcUnavailableError

__all__ = ["BlockingRpc", "RpcError", "RpcUnavailableError"]

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_loop_pid = 0


def _background_loop() -> asyncio.AbstractEventLoop:
    """The private loop, started on first use (and again in a forked child, which has no thread)."""
    global _loop, _loop_pid
    with _lock:
        if _loop is None or _loop_pid != os.getpid():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="devtools-rpc", daemon=True).start()
            _loop, _loop_pid = loop, os.getpid()
        return _loop


class BlockingRpc:
    """`call(method, *params)` and `batch([(method, params), ...])`, blocking, on one pooled
    keep-alive connection to `url`."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self.url = url
        self._timeout = timeout
        self._client: JsonRpcClient | None = JsonRpcClient(url, timeout_s=timeout, pool_size=1)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, _background_loop()).result(self._timeout + 5)

    def _request(self, send: Any) -> Any:
        if self._client is None:
            self._client = JsonRpcClient(self.url, timeout_s=self._timeout, pool_size=1)
        for attempt in (0, 1):
            try:
                return self._run(send(self._client))
            except RpcUnavailableError as exc:
                # A keep-alive connection the node closed: retry once on a fresh one.
                if attempt or not isinstance(exc.__cause__, aiohttp.ServerDisconnectedError):
                    raise
        raise AssertionError("unreachable")

    def call(self, method: str, *params: Any) -> Any:
        return self._request(lambda client: client.call(method, list(params)))

    def batch(self, calls: Sequence[tuple[str, list[Any]]]) -> list[Any]:
        """Results in call order; the first item the node refused is raised as its RpcError.
        A node may run a batch's calls concurrently, so none may depend on another."""
        results = self._request(lambda client: client.batch([Call(m, list(p)) for m, p in calls]))
        for result in results:
            if isinstance(result, RpcError):
                raise result
        return results

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None and _loop is not None and _loop_pid == os.getpid() and _loop.is_running():
            self._run(client.close())

    def __enter__(self) -> BlockingRpc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
