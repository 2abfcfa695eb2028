"""Shared fixtures: one dev chain (anvil + Permit2 + x402 proxies + tokens) per test session."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def devchain() -> Iterator[dict[str, Any]]:
    """Start one DevChain (4 agents) for the session; yields its description dict.

    anvil is terminated by pid at the end of the session (DevChain.stop)."""
    from facilitator.devchain import DevChain

    chain = DevChain(agents=4)
    chain.start()
    try:
        yield chain.description
    finally:
        chain.stop()
