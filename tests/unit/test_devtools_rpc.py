"""devtools.rpc: blocking calls over the facilitator's JSON-RPC client, against a stand-in node over real HTTP."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from devtools.rpc import BlockingRpc
from facilitator.evm.rpc import RpcError, RpcUnavailableError


def _answer(request: dict[str, Any]) -> dict[str, Any]:
    if request["method"] == "eth_fail":
        return {"jsonrpc": "2.0", "id": request["id"], "error": {"code": 3, "message": "reverted", "data": "0x01"}}
    return {"jsonrpc": "2.0", "id": request["id"], "result": [request["method"], *request["params"]]}


class _Node(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        reply = [_answer(r) for r in body] if isinstance(body, list) else _answer(body)
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def node_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Node)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_call_and_batch(node_url: str) -> None:
    with BlockingRpc(node_url) as rpc:
        assert rpc.call("eth_getCode", "0xabc", "latest") == ["eth_getCode", "0xabc", "latest"]
        assert rpc.batch([("a", [1]), ("b", [])]) == [["a", 1], ["b"]]
        assert rpc.batch([]) == []


def test_a_node_error_is_the_clients_rpc_error(node_url: str) -> None:
    with BlockingRpc(node_url) as rpc:
        with pytest.raises(RpcError) as info:
            rpc.call("eth_fail")
        assert (info.value.code, info.value.message, info.value.data) == (3, "reverted", "0x01")
        with pytest.raises(RpcError):
            rpc.batch([("eth_chainId", []), ("eth_fail", [])])
        assert rpc.call("eth_chainId") == ["eth_chainId"]  # still usable


async def test_usable_inside_a_running_event_loop(node_url: str) -> None:
    with BlockingRpc(node_url) as rpc:
        assert rpc.call("eth_blockNumber") == ["eth_blockNumber"]


def test_no_node_is_unavailable() -> None:
    with BlockingRpc("http://127.0.0.1:9", timeout=2) as rpc, pytest.raises(RpcUnavailableError):
        rpc.call("eth_chainId")
