"""Bad input never gets a 5xx, never gets content, and never blocks a genuine payment (issue 9 §3).

gateway --(HTTP)--> `x402-facilitator serve` (a remote facilitator: where the 500 came from),
both on the test Redis, on the session's dev chain. Two genuine payments are signed by the
official client (Permit2 via OPG, EIP-3009 via USDC) and kept unsent; hypothesis mutates them
(derandomized, a fixed number of examples) and each batch of mutations is sent concurrently.
Every answer must be a 4xx without content; the provider must see no call; then both genuine
payments are sent and must be served and settled, each charged once. A second run mutates two
payments that were already served: still no content for any changed copy.

A mutation that is still the genuine payment (same signed fields up to case and leading zeros,
the same offer: e.g. an unknown field added, `resource` changed) is not sent: the gateway
would rightly serve it. `decode_payment_header` decides which header the gateway reads.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from facilitator.x402.errors import WireFormatError
from facilitator.x402.headers import decode_payment_header
from facilitator.x402.matching import requirement_mismatch
from facilitator.x402.types import (
    UINT256_MAX,
    ExactEip3009Payload,
    ExactPermit2Payload,
    PaymentPayloadV1,
    PaymentRequirements,
)
from tests.gateway_client import (
    CHAT,
    CHAT_BODY,
    CHAT_PRICE,
    MALFORMED,
    Balances,
    Processes,
    call,
    facilitator_env,
    malformed_answer,
    sign_for,
    upstream_stats,
)

pytestmark = pytest.mark.e2e

BATCHES = 100  # hypothesis examples; each one a batch sent concurrently
BATCH_SIZE = 25  # -> 2,500 mutated payments
SETTLED_BATCHES = 40  # -> 1,000 mutations of payments already served
OTHER_ADDRESS = "0x" + "5a" * 20
PRICIER_BODY = {**CHAT_BODY, "model": "gpt-4o"}  # another price: a genuine payment does not bind to it
AGENTS = {"OPG": 3, "USDC": 2}  # who signs the genuine payments


@pytest.fixture(scope="module")
def stack(devchain: dict, devchain_file: str, redis_server: Any, tmp_path_factory: pytest.TempPathFactory):
    """(gateway, facilitator, upstream): the gateway talks to the facilitator over HTTP."""
    procs = Processes(devchain_file, tmp_path_factory.mktemp("gateway-fuzz"))
    try:
        prefix = f"gwfuzz:{uuid.uuid4().hex[:8]}:"
        upstream = procs.upstream()
        facilitator = procs.facilitator(redis_server.url, facilitator_env(devchain, 2, prefix))
        gateway = procs.gateway(upstream.url, redis_server.url, facilitator_url=facilitator.url,
                                env={"GATEWAY_STORE_PREFIX": prefix + "gw:"})
        yield gateway, facilitator, upstream
    finally:
        procs.stop_all()


def chat_calls(upstream: Any) -> int:
    return upstream_stats(upstream)["by_path"].get(CHAT, 0)


def b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def header_of(doc: Any) -> str:
    return b64(json.dumps(doc, separators=(",", ":")))


def assert_served(reply: Any) -> None:
    assert reply.status == 200, reply
    assert b"Echo:" in reply.body, reply
    assert reply.settle is not None and reply.settle.success and reply.settle.transaction, reply.headers


# -- the values reported in the issue ----------------------------------------------------------------

REPORTED = [
    (("permit2Authorization", "deadline"), 18446744073709551616),
    (("permit2Authorization", "deadline"), -(2**255)),
    (("permit2Authorization", "witness", "validAfter"), 10**30),
]


def with_inner(payment: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(payment)
    node = doc["payload"]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


async def test_reported_out_of_range_values_are_400_and_leave_the_payment_usable(devchain: dict, stack: tuple) -> None:
    gateway, _, upstream = stack
    payment = await sign_for(devchain, gateway.url + CHAT, CHAT_BODY, symbol="OPG", agent=AGENTS["OPG"])
    balances = Balances(devchain, "OPG", AGENTS["OPG"])
    calls = chat_calls(upstream)
    for path, value in REPORTED:
        reply = await call(gateway.url + CHAT, CHAT_BODY, payment=header_of(with_inner(payment, path, value)))
        assert reply.status == 400, reply
        doc = reply.json()
        assert doc["error"] == "invalid_payload" and ".".join(path) in doc["message"], doc
    assert chat_calls(upstream) == calls

    reply = await call(gateway.url + CHAT, CHAT_BODY, payment=payment)  # not blocked by any of them
    assert_served(reply)
    assert balances.moved() == (CHAT_PRICE["OPG"],) * 2


def test_requests_the_http_parser_refuses_get_json_from_both_services(stack: tuple) -> None:
    gateway, facilitator, _ = stack
    for service in (gateway, facilitator):
        for request in MALFORMED:
            status, doc = malformed_answer(service.url, request)
            assert status == 400 and doc["error"] == "invalid_request" and doc["message"], (service.url, request, doc)


@pytest.mark.parametrize("endpoint", ["/verify", "/settle"])
async def test_facilitator_answers_400_naming_the_field(devchain: dict, stack: tuple, endpoint: str) -> None:
    gateway, facilitator, _ = stack
    payment = await sign_for(devchain, gateway.url + CHAT, CHAT_BODY, symbol="OPG", agent=AGENTS["OPG"])
    for path, value in REPORTED:
        body = {"x402Version": 2, "paymentPayload": with_inner(payment, path, value),
                "paymentRequirements": payment["accepted"]}
        async with aiohttp.ClientSession() as http:
            async with http.post(facilitator.url + endpoint, data=json.dumps(body),
                                 headers={"Content-Type": "application/json"}) as r:
                status, doc = r.status, await r.json()
        assert status == 400, doc
        assert doc["error"] == "invalid_payload" and doc["message"], doc
        assert doc["errors"][0]["loc"] == ".".join(("paymentPayload", "payload", *path)), doc


# -- the fuzz test ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    content: str  # what was changed: tree, semantic, signature, extra-fields, v1-shape, random-bytes, ...
    encoding: str  # how it was written: json, pretty, truncated, b64-cut, ..., raw
    headers: tuple[tuple[str, str], ...]
    pricier: bool = False  # sent with PRICIER_BODY instead of CHAT_BODY

    @property
    def placement(self) -> str:
        return "+".join(name.upper() for name, _ in self.headers)

    @property
    def body(self) -> dict[str, Any]:
        return PRICIER_BODY if self.pricier else CHAT_BODY

    def __repr__(self) -> str:  # what a failure shows: the kind and the headers, shortened
        shown = {k: (v if len(v) < 2000 else v[:2000] + f"...({len(v)} chars)") for k, v in self.headers}
        return f"Case({self.content}/{self.encoding}, {shown}, body={self.body['model']})"


def _normal(value: Any) -> Any:
    """A view of JSON in which case and leading zeros do not count (as for the signature check)."""
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normal(v) for v in value]
    if isinstance(value, str):
        return int(value) if value.isascii() and value.isdigit() else value.lower()
    return value


def _signature_view(signature: str) -> Any:
    """(r, s, yParity) of a 65-byte (v 0/1/27/28) or 64-byte EIP-2098 signature: the forms that
    recover to the same signer; anything else as it is."""
    raw = bytes.fromhex(signature[2:])
    if len(raw) == 65 and raw[64] in (0, 1, 27, 28):
        return raw[:32], int.from_bytes(raw[32:64], "big"), raw[64] % 27
    if len(raw) == 64:
        vs = int.from_bytes(raw[32:], "big")
        return raw[:32], vs & ((1 << 255) - 1), vs >> 255
    return signature.lower()


def _signed_view(inner: dict[str, Any]) -> Any:
    """What the signature covers and who signed, as the facilitator dispatches (unknown fields dropped)."""
    try:
        if "permit2Authorization" in inner:
            wire = ExactPermit2Payload.model_validate(inner).to_wire()
        elif "authorization" in inner:
            wire = ExactEip3009Payload.model_validate(inner).to_wire()
        else:
            return _normal(inner)
    except ValueError:
        return None
    return _normal({k: v for k, v in wire.items() if k != "signature"}), _signature_view(wire["signature"])


class Oracle:
    """Whether a request still carries one of the genuine payments (then it must not be sent)."""

    def __init__(self, genuine: list[dict[str, Any]]) -> None:
        self.genuine = [(_signed_view(g["payload"]), PaymentRequirements.model_validate(g["accepted"])) for g in genuine]

    def is_genuine(self, case: Case) -> bool:
        if case.pricier:
            return False  # another price: nothing genuine binds to it
        try:
            decoded = decode_payment_header(dict(case.headers))
        except WireFormatError:
            return False
        if decoded is None:
            return False
        view = _signed_view(decoded.payload)
        for signed, accepted in self.genuine:
            if view == signed and (isinstance(decoded, PaymentPayloadV1)
                                   or requirement_mismatch(decoded.accepted, accepted) is None):
                return True
        return False


# strategies ---------------------------------------------------------------------------------------------

BIG_INTS = [2**53, 2**63, 2**64, 18446744073709551616, 10**30, UINT256_MAX, 2**256, -1, -(2**63) - 1, -(2**255), -(2**256)]
ODD_STRINGS = ["", " ", "0", "-1", "+1", "1.0", "1e30", "0x", "0x00", "0x" + "00" * 32, "0x" + "ff" * 65, "0x" + "11" * 65,
               str(UINT256_MAX), str(UINT256_MAX + 1), str(2**64), "0" * 100, OTHER_ADDRESS, "eip155:1", "eip155:8453",
               "solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp", "base", "base-sepolia", "upto", "exact", "EXACT", "é" * 8,
               "\u0000", "\\", "null", "{}", "A" * 20_000]


def _nested(depth: int, kind: str) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value] if kind == "list" else {"a": value}
    return value


def _json_values() -> st.SearchStrategy[Any]:
    leaves = st.one_of(
        st.sampled_from(BIG_INTS), st.integers(), st.floats(), st.booleans(), st.none(),
        st.sampled_from(ODD_STRINGS), st.text(max_size=20),
    )
    deep = st.builds(_nested, st.integers(10, 200), st.sampled_from(["list", "dict"]))
    small = st.recursive(leaves, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                         max_leaves=6)
    return st.one_of(leaves, deep, small)


JSON_VALUES = _json_values()


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


def _apply(doc: Any, path: tuple, op: str, value: Any, name: str = "x") -> Any:
    """A copy of `doc` with the node at `path` replaced, deleted, renamed or given a new member."""
    doc = copy.deepcopy(doc)
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    if op == "delete":
        del parent[last]
    elif op == "rename" and isinstance(parent, dict):
        parent[name if name != last else f"{name}_"] = parent.pop(last)
    elif op == "add" and isinstance(parent[last], (dict, list)):
        if isinstance(parent[last], dict):
            parent[last][name] = value
        else:
            parent[last].append(value)
    else:
        parent[last] = value
    return doc


# Signed and bound fields, and values a payment for something else would carry.
SEMANTIC = {
    ("accepted", "amount"): ["1", "0", "4999999999999999", str(CHAT_PRICE["OPG"] * 2), str(CHAT_PRICE["USDC"])],
    ("accepted", "payTo"): [OTHER_ADDRESS],
    ("accepted", "network"): ["eip155:1", "eip155:8453", "eip155:84532", "solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp"],
    ("accepted", "scheme"): ["upto", "exact2", "Exact"],
    ("accepted", "asset"): [OTHER_ADDRESS],
    ("accepted", "maxTimeoutSeconds"): [1, 301, 3600],
    ("payload", "permit2Authorization", "permitted", "amount"): ["1", str(CHAT_PRICE["OPG"] + 1), str(CHAT_PRICE["OPG"] - 1)],
    ("payload", "permit2Authorization", "witness", "to"): [OTHER_ADDRESS],
    ("payload", "permit2Authorization", "spender"): [OTHER_ADDRESS],
    ("payload", "permit2Authorization", "nonce"): ["0", "1", str(UINT256_MAX)],
    ("payload", "permit2Authorization", "deadline"): ["0", "1", str(UINT256_MAX), "99999999999"],
    ("payload", "permit2Authorization", "witness", "validAfter"): ["0", str(10**30), "99999999999"],
    ("payload", "authorization", "value"): ["1", str(CHAT_PRICE["USDC"] + 1)],
    ("payload", "authorization", "to"): [OTHER_ADDRESS],
    ("payload", "authorization", "from"): [OTHER_ADDRESS],
    ("payload", "authorization", "validBefore"): ["0", str(UINT256_MAX)],
    ("payload", "authorization", "validAfter"): [str(10**30), "99999999999"],
    ("payload", "authorization", "nonce"): ["0x" + "00" * 32, "0x" + "ab" * 32],
}


def _flip_signature(doc: dict[str, Any], index: int, xor: int) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    sig = bytearray(bytes.fromhex(doc["payload"]["signature"][2:]))
    sig[index % len(sig)] ^= xor
    doc["payload"]["signature"] = "0x" + sig.hex()
    return doc


def _set(doc: dict[str, Any], path: tuple, value: Any) -> dict[str, Any]:
    return _apply(doc, path, "replace", value)


def cases(genuine: list[dict[str, Any]]) -> st.SearchStrategy[Case]:
    base = st.sampled_from(genuine)
    printable = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
    known_keys = ["authorization", "permit2Authorization", "x402Version", "payload", "accepted", "signature",
                  "scheme", "network", "amount", "from", "nonce", "extensions", "__proto__"]
    key_names = st.one_of(st.sampled_from(known_keys), st.text(printable, min_size=1, max_size=12))

    @st.composite
    def tree_mutation(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
        doc = draw(base)
        for _ in range(draw(st.integers(1, 3))):
            paths = _paths(doc)
            if not paths:
                break
            op = draw(st.sampled_from(["replace", "replace", "delete", "rename", "add"]))
            doc = _apply(doc, draw(st.sampled_from(paths)), op, draw(JSON_VALUES), draw(key_names))
        return "tree", doc

    @st.composite
    def semantic(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
        """Another amount, recipient, network, scheme, asset, nonce, time: a payment for something else."""
        doc = draw(base)
        options = [(p, v) for p, vs in SEMANTIC.items() for v in vs if _has(doc, p)]
        path, value = draw(st.sampled_from(options))
        doc = _set(doc, path, value)
        if draw(st.booleans()):  # and something the signature does not cover
            doc = _set(doc, ("resource", "url"), "https://elsewhere.example/x")
        return "semantic", doc

    @st.composite
    def forged_signature(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
        doc = draw(base)
        how = draw(st.sampled_from(["flip", "flip", "forged", "short", "long"]))
        if how == "flip":
            return "signature", _flip_signature(doc, draw(st.integers(0, 64)), draw(st.integers(1, 255)))
        sig = doc["payload"]["signature"]
        value = {"forged": "0x" + "11" * 65, "short": sig[:-2], "long": sig + "00"}[how]
        return "signature", _set(doc, ("payload", "signature"), value)

    @st.composite
    def extra_fields(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
        # unknown fields anywhere, on top of a change that breaks the payment
        _, doc = draw(st.one_of(forged_signature(), semantic()))
        for _ in range(draw(st.integers(1, 3))):
            paths = [p for p in _paths(doc) if isinstance(_get(doc, p), dict)] or [()]
            where = draw(st.sampled_from(paths))
            target = _get(doc, where) if where else doc
            target[draw(key_names)] = draw(JSON_VALUES)
        return "extra-fields", doc

    @st.composite
    def v1_shape(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
        """The (changed) payment as a v1 PaymentPayload."""
        _, doc = draw(st.one_of(forged_signature(), semantic(), tree_mutation()))
        accepted = doc["accepted"] if isinstance(doc.get("accepted"), dict) else {}
        network = draw(st.sampled_from(["base", "base-sepolia", accepted.get("network", "x"), ""]))
        return "v1-shape", {"x402Version": 1, "scheme": accepted.get("scheme", "exact"), "network": network,
                            "payload": doc.get("payload")}

    docs = st.one_of(tree_mutation(), semantic(), forged_signature(), extra_fields(), v1_shape())
    json_encodings = ["json", "json", "json", "json", "pretty", "truncated", "byte", "b64-cut", "b64-char", "b64-nopad",
                      "b64-urlsafe"]

    @st.composite
    def encoded(draw: st.DrawFn) -> tuple[str, str, str]:
        """(content, encoding, header value): a mutated document, well or badly encoded."""
        content, doc = draw(docs)
        text = json.dumps(doc, separators=(",", ":"))  # NaN/Infinity come out as JS literals
        how = draw(st.sampled_from(json_encodings))
        value = b64(text)
        if how == "pretty":
            value = b64(json.dumps(doc, indent=draw(st.integers(0, 4))))
        elif how == "truncated":
            value = b64(text[: draw(st.integers(0, len(text) - 1))])
        elif how == "byte":
            i = draw(st.integers(0, len(text)))
            value = b64(text[:i].encode() + draw(st.binary(min_size=1, max_size=3)) + text[i:].encode())
        elif how == "b64-cut":
            value = value[: draw(st.integers(1, len(value) - 1))]
        elif how == "b64-char":
            i = draw(st.integers(0, len(value)))
            value = value[:i] + draw(st.sampled_from(list("!@#$%^&*-_.~ "))) + value[i:]
        elif how == "b64-nopad":
            value = value.rstrip("=") + ("" if value.endswith("=") else "A")
        elif how == "b64-urlsafe":
            value = value.replace("+", "-").replace("/", "_") + ("" if "+" in value or "/" in value else "-_")
        return content, how, value

    raw = st.one_of(
        st.tuples(st.just("random-bytes"), st.binary(max_size=400).map(b64)),
        st.tuples(st.just("random-text"), st.text(printable, max_size=400)),
        st.tuples(st.just("json-not-object"), JSON_VALUES.map(lambda v: b64(json.dumps(v)))),
        st.tuples(st.just("deep-nesting"), st.builds(_nested, st.integers(15, 500), st.sampled_from(["list", "dict"]))
                  .map(lambda v: b64(json.dumps(v)))),
        st.tuples(st.just("huge-header"), st.integers(12_000, 30_000).map(lambda n: b64('{"a":"' + "x" * n + '"}'))),
    )

    @st.composite
    def case(draw: st.DrawFn) -> Case:
        choice = draw(st.sampled_from(["doc", "doc", "doc", "doc", "raw", "both", "pricier"]))
        if choice == "raw":
            content, value = draw(raw)
            return Case(content, "raw", (("PAYMENT-SIGNATURE", value),))
        if choice == "pricier":  # the genuine payment itself, for a call that costs more
            return Case("genuine-for-pricier-call", "json", (("PAYMENT-SIGNATURE", header_of(draw(base))),), pricier=True)
        content, encoding, value = draw(encoded())
        if choice == "both":  # the changed one in PAYMENT-SIGNATURE (read first), the genuine one in X-PAYMENT
            return Case(content, encoding, (("PAYMENT-SIGNATURE", value), ("X-PAYMENT", header_of(draw(base)))))
        name = draw(st.sampled_from(["PAYMENT-SIGNATURE", "PAYMENT-SIGNATURE", "X-PAYMENT", "payment-signature"]))
        return Case(content, encoding, ((name, value),))

    return case()


def _has(doc: Any, path: tuple) -> bool:
    try:
        _get(doc, path)
        return True
    except (KeyError, IndexError, TypeError):
        return False


def _get(doc: Any, path: tuple) -> Any:
    for key in path:
        doc = doc[key]
    return doc


@dataclass
class Tally:
    sent: int = 0
    skipped_genuine: int = 0
    statuses: Counter = field(default_factory=Counter)
    contents: Counter = field(default_factory=Counter)
    encodings: Counter = field(default_factory=Counter)
    placements: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    failed: Counter = field(default_factory=Counter)  # (what was changed, status) of each failure


async def _send(http: aiohttp.ClientSession, url: str, case: Case) -> tuple[int | str, bytes, bool]:
    headers = {"Content-Type": "application/json", **dict(case.headers)}
    try:
        async with http.post(url, data=json.dumps(case.body), headers=headers) as r:
            return r.status, await r.read(), "PAYMENT-RESPONSE" in r.headers
    except (TimeoutError, aiohttp.ClientError) as exc:
        return f"no answer: {type(exc).__name__}", b"", False


def fuzz(loop: asyncio.AbstractEventLoop, url: str, genuine: list[dict[str, Any]], batches: int) -> Tally:
    """Send `batches` x BATCH_SIZE mutations of the genuine payments (each batch concurrently)."""
    oracle = Oracle(genuine)
    tally = Tally()

    async def send_batch(batch: list[Case]) -> list[tuple[Case, int | str, bytes, bool]]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            replies = await asyncio.gather(*(_send(http, url, c) for c in batch))
        return [(c, *r) for c, r in zip(batch, replies, strict=True)]

    @settings(max_examples=batches, derandomize=True, database=None, deadline=None,
              phases=[Phase.generate], print_blob=False,  # no shrinking: failures list their inputs
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                                     HealthCheck.large_base_example])
    @given(batch=st.lists(cases(genuine), min_size=BATCH_SIZE, max_size=BATCH_SIZE))
    def run(batch: list[Case]) -> None:
        to_send = [c for c in batch if not oracle.is_genuine(c)]
        tally.skipped_genuine += len(batch) - len(to_send)
        for case, status, body, receipt in loop.run_until_complete(send_batch(to_send)):
            tally.sent += 1
            tally.statuses[status] += 1
            tally.contents[case.content] += 1
            tally.encodings[case.encoding] += 1
            tally.placements[case.placement] += 1
            if not (isinstance(status, int) and 400 <= status < 500) or b"Echo:" in body or receipt:
                # asserted after the run: every failing input is counted, not only the first
                tally.failures.append(f"{case!r} -> {status} {body[:200]!r}")
                tally.failed[f"{case.content} -> {status}"] += 1

    run()
    return tally


def report(tally: Tally, title: str, capsys: pytest.CaptureFixture[str], record_property: Any) -> None:
    """The counts, in every run's output (not only with -s) and in the JUnit properties."""
    summary = (f"{title}: {tally.sent} mutated payments sent, {tally.skipped_genuine} still-genuine mutations not sent; "
               f"status histogram {dict(sorted(tally.statuses.items(), key=str))}; "
               f"changed {dict(sorted(tally.contents.items()))}; encoded {dict(sorted(tally.encodings.items()))}; "
               f"headers {dict(sorted(tally.placements.items()))}; failures {len(tally.failures)}"
               + (f" {dict(sorted(tally.failed.items()))}" if tally.failed else ""))
    record_property("fuzz_summary", summary)
    with capsys.disabled():
        print("\n" + summary)
    assert not tally.failures, f"{len(tally.failures)} mutated payments were not refused with a 4xx:\n" + "\n".join(
        tally.failures[:10])


@pytest.fixture
def loop() -> Any:
    """An event loop of the test's own: hypothesis drives a sync test, each batch runs on this loop."""
    loop = asyncio.new_event_loop()
    try:
        yield loop
    finally:
        loop.close()


def test_mutated_payments_get_4xx_no_content_and_do_not_block_the_genuine_ones(
    devchain: dict, stack: tuple, loop: asyncio.AbstractEventLoop, capsys: pytest.CaptureFixture[str],
    record_property: Any,
) -> None:
    gateway, _, upstream = stack
    url = gateway.url + CHAT
    genuine = {symbol: loop.run_until_complete(sign_for(devchain, url, CHAT_BODY, symbol=symbol, agent=agent))
               for symbol, agent in AGENTS.items()}
    balances = {symbol: Balances(devchain, symbol, agent) for symbol, agent in AGENTS.items()}
    calls = chat_calls(upstream)

    tally = fuzz(loop, url, list(genuine.values()), BATCHES)
    report(tally, "gateway fuzz, remote facilitator, unsettled payments", capsys, record_property)
    assert tally.sent >= 2_000, tally
    assert chat_calls(upstream) == calls, "a mutated payment reached the provider"

    for symbol, payment in genuine.items():  # not blocked by anything above
        reply = loop.run_until_complete(call(url, CHAT_BODY, payment=payment))
        assert_served(reply)
        assert balances[symbol].moved() == (CHAT_PRICE[symbol],) * 2
    assert chat_calls(upstream) == calls + len(genuine)


def test_mutations_of_settled_payments_get_no_content(
    devchain: dict, stack: tuple, loop: asyncio.AbstractEventLoop, capsys: pytest.CaptureFixture[str],
    record_property: Any,
) -> None:
    """Once a payment is settled and served, its payer and nonce are public: a changed copy (another
    signature, amount, recipient, ...) is a new attempt and gets no content (issue 9 §2)."""
    gateway, _, upstream = stack
    url = gateway.url + CHAT
    genuine = {symbol: loop.run_until_complete(sign_for(devchain, url, CHAT_BODY, symbol=symbol, agent=agent))
               for symbol, agent in AGENTS.items()}
    served = {}
    for symbol, payment in genuine.items():
        served[symbol] = loop.run_until_complete(call(url, CHAT_BODY, payment=payment))
        assert_served(served[symbol])
    calls = chat_calls(upstream)

    tally = fuzz(loop, url, list(genuine.values()), SETTLED_BATCHES)
    report(tally, "gateway fuzz, remote facilitator, settled payments", capsys, record_property)
    assert chat_calls(upstream) == calls, "a mutated payment reached the provider"

    for symbol, payment in genuine.items():  # the very payment that was served: its recorded result
        again = loop.run_until_complete(call(url, CHAT_BODY, payment=payment))
        assert again.status == 200 and again.body == served[symbol].body, again
