"""The dev chain's build inputs: node_modules (anvil, solc-js, OpenZeppelin, Permit2) and our contracts.

The contracts compiled are the x402 proxies the facilitator settles through (product contracts, in
``facilitator/contracts``) and the OPG/USDC stand-ins (dev tooling, in ``devtools/contracts``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import facilitator


class DevChainError(RuntimeError):
    """The dev chain could not be built or started, or is not in the expected state."""


ANVIL_BIN = Path("@foundry-rs/anvil-linux-amd64/bin/anvil")
PERMIT2_SOURCE = Path("@uniswap/v4-periphery/lib/permit2/test/utils/DeployPermit2.sol")
DEVTOOLS_CONTRACTS = Path(__file__).resolve().parent / "contracts"
PRODUCT_CONTRACTS = Path(facilitator.__file__).resolve().parent / "contracts"
SOURCE_DIRS = (PRODUCT_CONTRACTS, DEVTOOLS_CONTRACTS)
COMPILER = DEVTOOLS_CONTRACTS / "compile.mjs"


def find_node_modules() -> Path:
    """$X402_NODE_MODULES, else the first node_modules with anvil above the cwd or this file."""
    if env := os.environ.get("X402_NODE_MODULES"):
        path = Path(env).resolve()
        if not (path / ANVIL_BIN).is_file():
            raise DevChainError(f"X402_NODE_MODULES={env} has no {ANVIL_BIN}")
        return path
    for start in (Path.cwd(), Path(__file__).resolve().parent):
        for directory in (start, *start.parents):
            if (directory / "node_modules" / ANVIL_BIN).is_file():
                return directory / "node_modules"
    raise DevChainError(f"no node_modules/{ANVIL_BIN} found; run `npm install` or set X402_NODE_MODULES")


def _package_version(node_modules: Path, package: str) -> str:
    return json.loads((node_modules / package / "package.json").read_text())["version"]


def _sources_key(node_modules: Path) -> str:
    digest = hashlib.sha256()
    sources = sorted((path for directory in SOURCE_DIRS for path in directory.glob("*.sol")), key=lambda p: p.name)
    for path in [*sources, COMPILER]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    for package in ("solc", "@openzeppelin/contracts"):
        digest.update(f"{package}@{_package_version(node_modules, package)}\0".encode())
    return digest.hexdigest()


def load_contracts(node_modules: Path | None = None, *, force: bool = False) -> dict[str, dict[str, Any]]:
    """{ContractName: {abi, bytecode, deployedBytecode}}, compiled with solc-js and cached in
    ``<project root>/build/contracts.json`` keyed by a hash of the sources and compiler version."""
    node_modules = node_modules or find_node_modules()
    key = _sources_key(node_modules)
    cache = node_modules.parent / "build" / "contracts.json"
    if not force and cache.is_file():
        try:
            cached = json.loads(cache.read_text())
            if cached.get("cache_key") == key:
                return cached["contracts"]
        except (OSError, ValueError):
            pass
    node = shutil.which("node")
    if node is None:
        raise DevChainError("`node` is not on PATH; it is needed to compile the contracts")
    sources = [arg for directory in SOURCE_DIRS for arg in ("--sources", str(directory))]
    proc = subprocess.run(
        [node, str(COMPILER), *sources, "--node-modules", str(node_modules)],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise DevChainError(f"solc compilation failed:\n{proc.stderr}")
    contracts = json.loads(proc.stdout)
    payload = {"cache_key": key, "solc": _package_version(node_modules, "solc"), "contracts": contracts}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(payload))
        os.replace(tmp, cache)
    except OSError:
        pass  # read-only checkout: compile again next time
    return contracts


def permit2_runtime(node_modules: Path) -> str:
    """The Permit2 runtime Uniswap's own tests etch (0x-hex), read from node_modules."""
    source = (node_modules / PERMIT2_SOURCE).read_text()
    literals = re.findall(r'hex"([0-9a-fA-F]+)"', source)
    if len(literals) != 1:
        raise DevChainError(f"expected one hex literal in {PERMIT2_SOURCE}, found {len(literals)}")
    return "0x" + literals[0]
