"""One backend fixture for every store contract suite: each suite runs once per backend (embedded
SQLite, a single Redis, Sentinel, Cluster) and opens its store by URL through its layer's own
opener, as the services do."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REDIS_TOPOLOGIES, redis_url_for

BACKENDS = ["sqlite", *REDIS_TOPOLOGIES]


@dataclass(frozen=True)
class Backend:
    name: str
    url: str
    prefix: str  # a key prefix of this test's own on the shared Redis


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    name = request.param
    url = f"sqlite://{tmp_path}/store.sqlite3" if name == "sqlite" else redis_url_for(request, name)
    return Backend(name, url, f"t{uuid.uuid4().hex[:8]}:")


Opener = Callable[..., Any]  # open_store, open_budget_store, open_records, open_sessions: (url, *, prefix)


@pytest.fixture
async def open_backend(backend: Backend) -> AsyncIterator[Callable[[Opener], Any]]:
    """`open_backend(open_x)`: layer X's store on this test's backend, closed after the test."""
    opened: list[Any] = []

    def open_(opener: Opener) -> Any:
        opened.append(opener(backend.url, prefix=backend.prefix))
        return opened[-1]

    yield open_
    for store in opened:
        await store.close()
