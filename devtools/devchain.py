"""Local EVM dev chain: anvil with the canonical Permit2, the x402 contracts, two test tokens, and a
TEE registry and inference settlement relay (our own, OpenGradient's ABI).

`DevChain().start()` spawns anvil from ``node_modules``, etches Permit2's runtime at its canonical
address, deploys our x402 exact/upto proxies and the batch-settlement escrow with its two deposit
collectors and copies their runtime to the canonical x402 addresses (and a Multicall3 stand-in to
Multicall3's address, for the official SDK's batched reads), deploys OPG (Permit2 path) and
USDC (EIP-3009 path), and funds deterministic accounts: facilitator signers, one payee and N agents
(each holding 1,000,000 OPG and USDC, with Permit2 approved for both). On Base's chain id (8453) the
token stand-ins sit at OPG's and USDC's real Base addresses (CANONICAL_TOKENS). `DevChain.description`
is the JSON-able summary other components consume.
The contracts are compiled by devtools.solidity; RPC goes through the facilitator's JSON-RPC client
(devtools.rpc).
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from eth_abi import decode as abi_decode
from eth_abi import encode as abi_encode
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import function_signature_to_4byte_selector, keccak, to_checksum_address

from devtools.rpc import BlockingRpc, RpcError, RpcUnavailableError
from devtools.solidity import ANVIL_BIN, DevChainError, find_node_modules, load_contracts, permit2_runtime
from facilitator.evm import contracts

PERMIT2_ADDRESS = contracts.PERMIT2
EXACT_PROXY_ADDRESS = contracts.EXACT_PERMIT2_PROXY
UPTO_PROXY_ADDRESS = contracts.UPTO_PERMIT2_PROXY
BATCH_SETTLEMENT_ADDRESS = contracts.BATCH_SETTLEMENT
ERC3009_COLLECTOR_ADDRESS = contracts.ERC3009_DEPOSIT_COLLECTOR
PERMIT2_COLLECTOR_ADDRESS = contracts.PERMIT2_DEPOSIT_COLLECTOR
MULTICALL3_ADDRESS = "0xcA11bde05977b3631167028862bE2a173976CA11"  # where every public chain has Multicall3
DEFAULT_CHAIN_ID = 84532
FORBIDDEN_CHAIN_ID = 31337  # the etched Permit2 caches its domain separator for this id

AGENT_TOKEN_UNITS = 1_000_000
ETH_BALANCE_WEI = 10**24  # 1,000,000 ETH per account
MAX_UINT256 = 2**256 - 1
TOKENS: dict[str, dict[str, Any]] = {
    "OPG": {"contract": "OpgToken", "decimals": 18, "transfer_method": "permit2",
            "eip712_name": "OpenGradient", "eip712_version": "1"},
    "USDC": {"contract": "UsdcToken", "decimals": 6, "transfer_method": "eip3009",
             "eip712_name": "USD Coin", "eip712_version": "2"},
}
# Where the real tokens live, by chain id: on these chains the stand-ins are placed at the same
# addresses, so clients that hard-code them (OpenGradient's SDK: OPG on Base) work unchanged.
CANONICAL_TOKENS: dict[int, dict[str, str]] = {
    8453: {"OPG": "0xFbC2051AE2265686a469421b2C5A2D5462FbF5eB", "USDC": "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"},
}
TEE_OPERATORS = 3
DEV_PCR_HASH = keccak(text="devtools-tee-pcr")  # the stand-in enclaves' measurement, approved at setup
_COPIED_SLOTS = 16  # a fresh token's state (name, symbol, ...) lives in its first storage slots
_DEPLOY_GAS = 5_000_000
_CALL_GAS = 200_000
_MAX_FEE = 100 * 10**9
_PRIORITY_FEE = 10**9


def permit2_domain_separator(chain_id: int, permit2: str = PERMIT2_ADDRESS) -> bytes:
    typehash = keccak(text="EIP712Domain(string name,uint256 chainId,address verifyingContract)")
    return keccak(abi_encode(["bytes32", "bytes32", "uint256", "address"],
                             [typehash, keccak(text="Permit2"), chain_id, permit2]))


# ---------------------------------------------------------------------------------------------
# Accounts and descriptions


def derive_account(role: str, index: int = 0) -> LocalAccount:
    """Deterministic dev key: keccak256("x402-devchain:{role}:{index}")."""
    return Account.from_key(keccak(text=f"x402-devchain:{role}:{index}"))


def _account_entry(account: LocalAccount) -> dict[str, str]:
    return {"address": account.address, "private_key": "0x" + bytes(account.key).hex()}


def load_description(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a description file written by `x402-facilitator devchain --out FILE`."""
    description = json.loads(Path(path).read_text())
    missing = {"rpc_url", "chain_id", "network", "contracts", "tokens", "accounts"} - description.keys()
    if missing:
        raise DevChainError(f"{path}: not a dev chain description (missing {sorted(missing)})")
    return description


def write_description(description: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write atomically (a reader polling for the file never sees half of it), mode 0600."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(description, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Calldata and ports


def calldata(signature: str, types: list[str] | None = None, args: list[Any] | None = None) -> bytes:
    """Selector of `signature` followed by the ABI-encoded args."""
    return function_signature_to_4byte_selector(signature) + (abi_encode(types, args or []) if types else b"")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_is_free(host: str, port: int) -> bool:
    # checked before spawning: otherwise our readiness poll could be answered by the other node
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as anvil does: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


# ---------------------------------------------------------------------------------------------
# The chain


class DevChain:
    """An anvil process with Permit2, the x402 proxies, OPG/USDC and funded accounts.

    Use as ``with DevChain(agents=4) as chain: chain.description`` or call start()/stop().
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        chain_id: int = DEFAULT_CHAIN_ID,
        agents: int = 3,
        facilitators: int = 3,
        host: str = "127.0.0.1",
        node_modules: str | os.PathLike[str] | None = None,
    ) -> None:
        if chain_id == FORBIDDEN_CHAIN_ID:
            raise DevChainError("chain id 31337 breaks the etched Permit2's domain separator; use e.g. 84532")
        if agents < 0 or facilitators < 1:
            raise DevChainError("need agents >= 0 and facilitators >= 1")
        self.host = host
        self.port = port
        self.chain_id = chain_id
        self.node_modules = Path(node_modules).resolve() if node_modules else find_node_modules()
        self.deployer = derive_account("deployer")
        self.facilitators = [derive_account("facilitator", i) for i in range(facilitators)]
        self.payee = derive_account("payee")
        self.agents = [derive_account("agent", i) for i in range(agents)]
        self.tee_operators = [derive_account("tee-operator", i) for i in range(TEE_OPERATORS)]
        self.contracts: dict[str, dict[str, Any]] = {}
        self.token_addresses: dict[str, str] = {}
        self.tee_registry = self.settlement_relay = ""
        self._rpc: BlockingRpc | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._stderr: Any = None
        self._nonces: dict[str, int] = {}

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def rpc_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def rpc(self) -> BlockingRpc:
        """The JSON-RPC client of the running chain."""
        if self._rpc is None:
            raise DevChainError("the dev chain is not started")
        return self._rpc

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> DevChain:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> dict[str, Any]:
        """Start anvil and set everything up; returns `description`."""
        if self._process is not None:
            raise DevChainError("already started")
        self.contracts = load_contracts(self.node_modules)
        self._nonces = {}
        self._spawn_anvil()
        try:
            self._setup()
        except (RpcError, RpcUnavailableError) as exc:
            self.stop()
            raise DevChainError(f"dev chain setup failed: {exc}") from exc
        except BaseException:
            self.stop()
            raise
        return self.description

    def stop(self) -> None:
        """Terminate anvil (by pid) and wait for it; safe to call twice."""
        atexit.unregister(self.stop)
        if self._rpc is not None:
            self._rpc.close()
            self._rpc = None
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def _spawn_anvil(self, attempts: int = 3) -> None:
        anvil = self.node_modules / ANVIL_BIN
        chosen_port = self.port
        if chosen_port is not None and not _port_is_free(self.host, chosen_port):
            raise DevChainError(f"port {chosen_port} on {self.host} is in use")
        for attempt in range(attempts):
            self.port = chosen_port or free_port(self.host)
            self._stderr = tempfile.TemporaryFile()
            self._process = subprocess.Popen(
                [str(anvil), "--host", self.host, "--port", str(self.port),
                 "--chain-id", str(self.chain_id), "--silent"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._stderr,
                start_new_session=True,  # a terminal's Ctrl-C goes to us; we stop anvil ourselves
            )
            atexit.register(self.stop)
            self._rpc = BlockingRpc(self.rpc_url)
            error = self._wait_ready(deadline=time.monotonic() + 10)
            if error is None:
                return
            self.stop()
            if chosen_port is not None or attempt == attempts - 1:
                raise DevChainError(f"anvil did not start on {self.rpc_url}: {error}")

    def _wait_ready(self, deadline: float) -> str | None:
        assert self._process is not None
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._stderr.seek(0)
                return f"exited with {self._process.returncode}: {self._stderr.read().decode(errors='replace')}"
            try:
                if int(self.rpc.call("eth_chainId"), 16) != self.chain_id:
                    return "wrong chain id (is another node on this port?)"
                return None
            except RpcUnavailableError:
                time.sleep(0.01)
        return "no eth_chainId answer within 10 s"

    # -- setup ---------------------------------------------------------------------------------

    def _setup(self) -> None:
        rpc = self.rpc
        everyone = [self.deployer, *self.facilitators, self.payee, *self.agents, *self.tee_operators]
        rpc.batch([("anvil_setCode", [PERMIT2_ADDRESS, permit2_runtime(self.node_modules)])]
                  + [("anvil_setBalance", [a.address, hex(ETH_BALANCE_WEI)]) for a in everyone])

        deploys = {
            "exact": self._deploy_tx("X402ExactPermit2Proxy", ["address"], [PERMIT2_ADDRESS]),
            "upto": self._deploy_tx("X402UptoPermit2Proxy", ["address"], [PERMIT2_ADDRESS]),
            # the collectors' SETTLEMENT immutable is the canonical escrow address their code is copied next to
            "batch": self._deploy_tx("X402BatchSettlement"),
            "erc3009_collector": self._deploy_tx("X402Erc3009DepositCollector", ["address"], [BATCH_SETTLEMENT_ADDRESS]),
            "permit2_collector": self._deploy_tx("X402Permit2DepositCollector", ["address", "address"],
                                                 [BATCH_SETTLEMENT_ADDRESS, PERMIT2_ADDRESS]),
            "multicall3": self._deploy_tx("Multicall3Standin"),
            **{symbol: self._deploy_tx(spec["contract"]) for symbol, spec in TOKENS.items()},
            "tee_registry": self._deploy_tx("TEERegistry"),
            "settlement_relay": self._deploy_tx("InferenceSettlementRelay"),
        }
        receipts = self._send_and_wait(list(deploys.values()))
        deployed = {name: to_checksum_address(r["contractAddress"]) for name, r in zip(deploys, receipts, strict=True)}
        self.token_addresses = {symbol: deployed[symbol] for symbol in TOKENS}
        self.tee_registry, self.settlement_relay = deployed["tee_registry"], deployed["settlement_relay"]
        for symbol, address in CANONICAL_TOKENS.get(self.chain_id, {}).items():
            self._move(deployed[symbol], address)
            self.token_addresses[symbol] = to_checksum_address(address)

        canonical = {"exact": EXACT_PROXY_ADDRESS, "upto": UPTO_PROXY_ADDRESS, "batch": BATCH_SETTLEMENT_ADDRESS,
                     "erc3009_collector": ERC3009_COLLECTOR_ADDRESS, "permit2_collector": PERMIT2_COLLECTOR_ADDRESS,
                     "multicall3": MULTICALL3_ADDRESS}
        codes = rpc.batch([("eth_getCode", [deployed[name], "latest"]) for name in canonical])
        rpc.batch([("anvil_setCode", [address, code]) for address, code in zip(canonical.values(), codes, strict=True)])

        txs = [self._call_tx(self.deployer, self.tee_registry, calldata(
            "setPCRApproved(bytes32,bool)", ["bytes32", "bool"], [DEV_PCR_HASH, True]))]
        for symbol, spec in TOKENS.items():
            token = self.token_addresses[symbol]
            amount = AGENT_TOKEN_UNITS * 10 ** spec["decimals"]
            for agent in self.agents:
                txs.append(self._call_tx(self.deployer, token, calldata(
                    "mint(address,uint256)", ["address", "uint256"], [agent.address, amount])))
                txs.append(self._call_tx(agent, token, calldata(
                    "approve(address,uint256)", ["address", "uint256"], [PERMIT2_ADDRESS, MAX_UINT256])))
        self._send_and_wait(txs)
        self._check()

    def _move(self, deployed: str, target: str) -> None:
        """Copy a freshly deployed contract (runtime code and its first storage slots) to `target`.
        OpenZeppelin's EIP712 rebuilds its domain separator when `address(this)` is not the
        deploying address, so signatures bind to `target`."""
        reads = [("eth_getCode", [deployed, "latest"])]
        reads += [("eth_getStorageAt", [deployed, hex(slot), "latest"]) for slot in range(_COPIED_SLOTS)]
        code, *slots = self.rpc.batch(reads)
        self.rpc.batch([("anvil_setCode", [target, code])]
                       + [("anvil_setStorageAt", [target, hex(i), "0x" + value[2:].rjust(64, "0")])
                          for i, value in enumerate(slots) if int(value, 16)])

    def _next_nonce(self, account: LocalAccount) -> int:
        nonce = self._nonces.get(account.address, 0)  # all accounts are fresh: the chain is ours
        self._nonces[account.address] = nonce + 1
        return nonce

    def _sign(self, account: LocalAccount, tx: dict[str, Any]) -> str:
        tx |= {"chainId": self.chain_id, "nonce": self._next_nonce(account), "type": 2,
               "maxFeePerGas": _MAX_FEE, "maxPriorityFeePerGas": _PRIORITY_FEE, "value": 0}
        return "0x" + bytes(account.sign_transaction(tx).raw_transaction).hex()

    def _deploy_tx(self, contract: str, types: list[str] | None = None, args: list[Any] | None = None) -> str:
        code = bytes.fromhex(self.contracts[contract]["bytecode"][2:])
        if types:
            code += abi_encode(types, args or [])
        return self._sign(self.deployer, {"data": code, "gas": _DEPLOY_GAS})

    def _call_tx(self, account: LocalAccount, to: str, data: bytes) -> str:
        return self._sign(account, {"to": to, "data": data, "gas": _CALL_GAS})

    def _send_and_wait(self, raw_txs: list[str], timeout: float = 30.0) -> list[dict[str, Any]]:
        hashes = self.rpc.batch([("eth_sendRawTransaction", [tx]) for tx in raw_txs])
        deadline = time.monotonic() + timeout
        resend_at = time.monotonic() + 2.0
        while True:
            receipts = self.rpc.batch([("eth_getTransactionReceipt", [h]) for h in hashes])
            if all(receipts):
                break
            if time.monotonic() > deadline:
                raise DevChainError("setup transactions were not mined in time")
            if time.monotonic() > resend_at:
                # anvil may run a batch's sends out of order under load: send the missing ones again
                for raw, receipt in zip(raw_txs, receipts, strict=True):
                    if not receipt:
                        try:
                            self.rpc.call("eth_sendRawTransaction", raw)
                        except (RpcError, RpcUnavailableError):  # already known / nonce too low: the receipt decides
                            pass
                resend_at = time.monotonic() + 2.0
            time.sleep(0.005)
        failed = [h for h, r in zip(hashes, receipts, strict=True) if int(r["status"], 16) != 1]
        if failed:
            raise DevChainError(f"setup transactions reverted: {failed}")
        return receipts

    def _check(self) -> None:
        sep_call = {"to": PERMIT2_ADDRESS, "data": "0x3644e515"}
        permit2_call = "0x" + calldata("PERMIT2()").hex()
        settlement_call = "0x" + calldata("SETTLEMENT()").hex()
        separator, exact_permit2, upto_permit2, collector_permit2, *settlements = self.rpc.batch([
            ("eth_call", [sep_call, "latest"]),
            ("eth_call", [{"to": EXACT_PROXY_ADDRESS, "data": permit2_call}, "latest"]),
            ("eth_call", [{"to": UPTO_PROXY_ADDRESS, "data": permit2_call}, "latest"]),
            ("eth_call", [{"to": PERMIT2_COLLECTOR_ADDRESS, "data": permit2_call}, "latest"]),
            ("eth_call", [{"to": ERC3009_COLLECTOR_ADDRESS, "data": settlement_call}, "latest"]),
            ("eth_call", [{"to": PERMIT2_COLLECTOR_ADDRESS, "data": settlement_call}, "latest"]),
        ])
        if bytes.fromhex(separator[2:]) != permit2_domain_separator(self.chain_id):
            raise DevChainError(f"Permit2 DOMAIN_SEPARATOR mismatch on chain {self.chain_id}")
        expected = [("exact", exact_permit2, PERMIT2_ADDRESS), ("upto", upto_permit2, PERMIT2_ADDRESS),
                    ("permit2 collector", collector_permit2, PERMIT2_ADDRESS)]
        expected += [("deposit collector", result, BATCH_SETTLEMENT_ADDRESS) for result in settlements]
        for name, result, want in expected:
            (address,) = abi_decode(["address"], bytes.fromhex(result[2:]))
            if to_checksum_address(address) != want:
                raise DevChainError(f"{name} points at {address}, not {want}")

    # -- description ---------------------------------------------------------------------------

    @property
    def description(self) -> dict[str, Any]:
        if not self.token_addresses:
            raise DevChainError("the dev chain is not started")
        return {
            "rpc_url": self.rpc_url,
            "chain_id": self.chain_id,
            "network": f"eip155:{self.chain_id}",
            "contracts": {"permit2": PERMIT2_ADDRESS, "exact_proxy": EXACT_PROXY_ADDRESS,
                          "upto_proxy": UPTO_PROXY_ADDRESS, "tee_registry": self.tee_registry,
                          "settlement_relay": self.settlement_relay,
                          "batch_settlement": BATCH_SETTLEMENT_ADDRESS,
                          "erc3009_deposit_collector": ERC3009_COLLECTOR_ADDRESS,
                          "permit2_deposit_collector": PERMIT2_COLLECTOR_ADDRESS},
            "tokens": {
                symbol: {"address": self.token_addresses[symbol],
                         **{k: v for k, v in spec.items() if k != "contract"}}
                for symbol, spec in TOKENS.items()
            },
            "accounts": {
                "facilitator": [_account_entry(a) for a in self.facilitators],
                "payee": _account_entry(self.payee),
                "agents": [_account_entry(a) for a in self.agents],
                # The registry's and the relay's owner (registers enclaves, anchors proofs) and
                # the enclaves' operators (heartbeats): devtools/tee_registry.py.
                "tee_admin": _account_entry(self.deployer),
                "tee_operators": [_account_entry(a) for a in self.tee_operators],
            },
        }
