"""Fixtures shared by the e2e modules: one set of processes per module (stopped at its end) and
the stand-in provider among them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.gateway_client import Processes


@pytest.fixture(scope="module")
def procs(request: pytest.FixtureRequest, devchain_file: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processes]:
    p = Processes(devchain_file, tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]))
    yield p
    p.stop_all()


@pytest.fixture(scope="module")
def upstream(procs: Processes) -> Any:
    return procs.upstream()
