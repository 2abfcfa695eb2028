"""Who is in a worker pool: a static list, or every A record of a name (a Kubernetes headless
Service), re-resolved on an interval by the pool."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from pathlib import Path

from gateway.settings import Upstream


def _hosts_lookup(path: str, name: str) -> list[str]:
    """The addresses a hosts-format file gives `name` (tests and hosts without cluster DNS)."""
    found: list[str] = []
    for line in Path(path).read_text().splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 2 and name in fields[1:]:
            try:
                ipaddress.IPv4Address(fields[0])
            except ValueError:
                continue
            found.append(fields[0])
    return found


async def resolve(upstream: Upstream) -> list[str] | None:
    """The members' base URLs now; None when the name could not be resolved (keep the last
    answer rather than drain every worker on a DNS hiccup)."""
    w = upstream.workers
    assert w is not None
    if w.dns is None:
        return list(upstream.urls)
    try:
        if w.hosts_file is not None:
            addresses = _hosts_lookup(w.hosts_file, w.dns)
        else:
            infos = await asyncio.get_running_loop().getaddrinfo(w.dns, w.port, family=socket.AF_INET,
                                                                 type=socket.SOCK_STREAM)
            addresses = [str(info[4][0]) for info in infos]
    except (OSError, UnicodeError):
        return None
    urls = [f"{w.scheme}://{a}:{w.port}" for a in sorted(set(addresses))]
    return sorted(set(urls) | set(upstream.urls))
