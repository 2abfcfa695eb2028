"""What every store of the project shares, through the storage layer: it is opened by URL, answers
`ping` on every backend, and an unreachable backend raises its layer's own unavailable error, a
`storage.StoreUnavailableError`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import storage
from budgets.sqlite_store import open_budget_store
from budgets.store import BudgetStoreUnavailableError
from facilitator.store import StoreUnavailableError, open_store
from gateway.records import RecordStoreUnavailableError, open_records
from gateway.refusals import RefusalStoreUnavailableError, open_refusals
from gateway.sessions import SessionStoreUnavailableError, open_sessions

LAYERS: dict[str, tuple[Callable[..., Any], type[Exception]]] = {
    "settlements": (open_store, StoreUnavailableError),
    "budgets": (open_budget_store, BudgetStoreUnavailableError),
    "records": (open_records, RecordStoreUnavailableError),
    "sessions": (open_sessions, SessionStoreUnavailableError),
    "refusals": (open_refusals, RefusalStoreUnavailableError),
}


@pytest.mark.parametrize("layer", LAYERS)
async def test_every_store_answers_ping(open_backend, layer: str) -> None:
    await open_backend(LAYERS[layer][0]).ping()


@pytest.mark.parametrize("layer", LAYERS)
async def test_an_unreachable_store_raises_its_layers_error(layer: str) -> None:
    opener, error = LAYERS[layer]
    store = opener("redis://127.0.0.1:1/0", prefix="x:")  # nothing listens there
    with pytest.raises(error) as raised:
        await store.ping()
    assert isinstance(raised.value, storage.StoreUnavailableError)
    await store.close()


@pytest.mark.parametrize("layer", LAYERS)
async def test_a_failing_sqlite_store_raises_its_layers_error(layer: str) -> None:
    opener, error = LAYERS[layer]
    store = opener("memory://", prefix="x:")
    await store.close()  # every statement now fails with sqlite3.ProgrammingError
    with pytest.raises(error) as raised:
        await store.ping()
    assert isinstance(raised.value, storage.StoreUnavailableError)


def test_store_urls() -> None:
    assert storage.parse_store_url("memory://") == storage.StoreURL("sqlite", "memory://", ":memory:")
    assert storage.parse_store_url("sqlite:///var/x.sqlite3").path == "/var/x.sqlite3"
    assert storage.parse_store_url("sqlite://rel/x.sqlite3").path == "rel/x.sqlite3"
    for url in ("redis://h:1/0", "rediss://h:1/0", "redis+sentinel://h:1/m", "redis+cluster://h:1,h:2"):
        assert storage.parse_store_url(url).kind == "redis"
    with pytest.raises(ValueError, match="unsupported budget store URL scheme: 'postgres'"):
        storage.parse_store_url("postgres://x", what="budget store")
