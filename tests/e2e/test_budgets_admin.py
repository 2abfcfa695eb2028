"""The budgets admin API over real HTTP (uvicorn in-process, mounted at /admin as the gateway
does), on the embedded SQLite store and on Redis."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import datetime as dt
import io
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvicorn
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.routing import Mount

from budgets.admin import create_admin_app
from budgets.admin_client import AdminApiError, AdminClient, Owner
from budgets.enforcer import BudgetEnforcer
from budgets.models import DefaultPolicy, Limit, Policy, Refusal
from budgets.redis_store import RedisBudgetStore
from budgets.sqlite_store import SQLiteBudgetStore

pytestmark = pytest.mark.e2e

TOKEN = "admin-" + "s3cret" * 4
NET = "eip155:84532"
ASSET = "0x" + "11" * 20  # "OPG", 18 decimals
DENIED = "0x" + "22" * 20  # an asset whose unlisted wallets are denied
OPG = 10**18
BIG = 20 * OPG + 1  # > 2^64: exact only as a string
AGENT = "0x" + "a1" * 20
ME = Owner.agent(AGENT)
ROUTE = "POST /v1/chat/completions"


@contextlib.asynccontextmanager
async def serve(app: Any) -> AsyncIterator[str]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.005)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


class Clock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        import time

        return time.time() + self.offset


@dataclass
class Admin:
    """`client` for the API's calls; `call` for raw requests whose status, headers or bytes a
    test looks at (any token, any body)."""

    url: str
    enforcer: BudgetEnforcer
    clock: Clock
    session: aiohttp.ClientSession
    client: AdminClient

    async def call(self, method: str, path: str, *, token: str | None = TOKEN, body: Any = None,
                   data: bytes | None = None) -> tuple[int, Any, aiohttp.typedefs.LooseHeaders]:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        if body is not None:
            data = json.dumps(body).encode()
        async with self.session.request(method, self.url + path, data=data, headers=headers) as resp:
            raw = await resp.read()
            ctype = resp.headers.get("Content-Type", "")
            doc = json.loads(raw) if raw and ctype.startswith("application/json") else raw.decode()
            return resp.status, doc, resp.headers

    async def policies(self) -> Any:
        return (await self.client.policies()).json()


def agent_path(agent: str = AGENT, network: str = NET, asset: str = ASSET) -> str:
    return f"/v1/agents/{agent}/policies/{network}/{asset}"


def new_agent() -> str:
    return "0x" + uuid.uuid4().hex + uuid.uuid4().hex[:8]


@pytest.fixture(params=["sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    if request.param == "sqlite":
        s: Any = SQLiteBudgetStore(str(tmp_path / "budgets.sqlite3"))
    else:
        s = RedisBudgetStore.from_url(request.getfixturevalue("redis_server").url, prefix=f"t{uuid.uuid4().hex[:8]}:")
    yield s
    await s.close()


def enforcer_for(store: Any, clock: Clock) -> BudgetEnforcer:
    default = Policy(network=NET, asset=ASSET, limits=[Limit(period="day", amount=OPG)])
    return BudgetEnforcer(store, defaults={(NET, ASSET): DefaultPolicy(mode="budget", policy=default),
                                           (NET, DENIED): DefaultPolicy(mode="deny")}, timezone="UTC", clock=clock)


@contextlib.asynccontextmanager
async def running(enforcer: BudgetEnforcer, clock: Clock, token: SecretStr | None) -> AsyncIterator[Admin]:
    admin_app = create_admin_app(enforcer, token, assets={(NET, ASSET): ("OPG", 18)})
    async with serve(Starlette(routes=[Mount("/admin", app=admin_app)])) as base:
        async with aiohttp.ClientSession() as session:
            url = base + "/admin"
            yield Admin(url, enforcer, clock, session, AdminClient(url, TOKEN, session=session))


@pytest.fixture
async def admin(store: Any) -> AsyncIterator[Admin]:
    clock = Clock()
    async with running(enforcer_for(store, clock), clock, SecretStr(TOKEN)) as a:
        yield a


async def spend(admin: Admin, agent: str, amount: int, rid: str | None = None) -> None:
    rid = rid or uuid.uuid4().hex
    hold = await admin.enforcer.reserve(agent, NET, ASSET, amount, ROUTE, "gpt-4o", rid)
    await admin.enforcer.commit(hold, amount, "0x" + "ab" * 32, rid)


# -- auth -------------------------------------------------------------------------------------------


async def test_missing_or_wrong_token_is_refused_and_changes_nothing(admin: Admin) -> None:
    assert (await admin.client.put_policy(ME, NET, ASSET, {"limits": [{"period": "day", "amount": "5"}]})).status == 201
    before = await admin.policies()
    for token, error in ((None, "unauthorized"), ("wrong", "invalid_token"), ("", "unauthorized")):
        for method, path, body in (("PUT", agent_path(), {"limits": []}), ("DELETE", agent_path(), None),
                                   ("POST", f"/v1/agents/{AGENT}/suspend", None),
                                   ("PUT", agent_path(), None),  # even a malformed body: auth comes first
                                   ("GET", "/v1/policies", None), ("GET", "/openapi.json", None),
                                   ("GET", "/v1/no-such-route", None)):
            got, doc, headers = await admin.call(method, path, token=token, body=body)
            # RFC 6750 §3.1: 401 both ways; only a presented token is named invalid_token.
            assert got == 401 and doc["error"] == error, (token, method, path, doc)
            challenge = 'Bearer error="invalid_token"' if error == "invalid_token" else "Bearer"
            assert headers["WWW-Authenticate"] == challenge
    status, _, _ = await admin.call("GET", "/v1/policies", token=None)
    assert await admin.policies() == before
    assert before["policies"][0]["policy"]["suspended"] is False
    assert (await admin.call("GET", "/v1/healthz", token=None))[:2] == (200, {"status": "ok"})


async def test_without_a_configured_token_everything_is_disabled(store: Any) -> None:
    clock = Clock()
    async with running(enforcer_for(store, clock), clock, None) as admin:
        for token in (None, TOKEN, ""):
            for method, path in (("GET", "/v1/policies"), ("PUT", agent_path()), ("GET", "/openapi.json"),
                                 ("GET", "/v1/ledger")):
                status, doc, _ = await admin.call(method, path, token=token, body={"limits": []})
                assert (status, doc) == (403, {"error": "admin_disabled", "message": "set BUDGETS_ADMIN_TOKEN"})
        assert await store.list_policies() == []
        assert (await admin.call("GET", "/v1/healthz", token=None))[0] == 200


# -- policies --------------------------------------------------------------------------------------


async def test_agent_and_group_policies_round_trip(admin: Admin) -> None:
    body = {"limits": [{"period": "day", "amount": str(BIG)}, {"period": "hour", "amount": 5 * OPG, "rolling": True}],
            "per_call_max": "200000000000000000", "allowed_models": ["gpt-4o"], "rate_limit": {"per_minute": 60,
            "burst": 10}, "group": "team-a"}  # fmt: skip
    reply = await admin.client.put_policy(Owner.agent(AGENT.upper().replace("0X", "0x")), NET,
                                          ASSET.upper().replace("0X", "0x"), body)
    doc = reply.json()
    assert reply.status == 201
    assert doc["kind"] == "agent" and doc["id"] == AGENT
    assert doc["policy"]["network"] == NET and doc["policy"]["asset"] == ASSET  # filled from the path
    assert [lim["amount"] for lim in doc["policy"]["limits"]] == [str(BIG), str(5 * OPG)]
    assert doc["display"] == {"limits": ["20.000000000000000001 OPG", "5 OPG"], "per_call_max": "0.2 OPG"}
    assert doc["policy"]["per_call_max"] == "200000000000000000"

    again = await admin.client.put_policy(ME, NET, ASSET, doc["policy"])  # the echo is a valid body
    assert again.status == 200 and again.json() == doc
    assert (await admin.client.get_policy(ME, NET, ASSET)).json() == doc

    team = Owner.group("team-a")
    group = {"network": NET, "asset": ASSET, "limits": [{"period": "month", "amount": "1000000"}]}
    reply = await admin.client.put_policy(team, NET, ASSET, group)
    gdoc = reply.json()
    assert reply.status == 201 and gdoc["kind"] == "group" and gdoc["id"] == "team-a"
    assert gdoc["display"]["limits"] == ["0.000000000001 OPG"]
    listed = (await admin.policies())["policies"]
    assert {(p["kind"], p["id"]) for p in listed} == {("agent", AGENT), ("group", "team-a")}
    only = (await admin.client.policies(group="team-a")).json()
    assert [p["id"] for p in only["policies"]] == ["team-a"]

    assert (await admin.client.delete_policy(team, NET, ASSET)).status == 204
    for gone in (admin.client.get_policy(team, NET, ASSET), admin.client.delete_policy(team, NET, ASSET)):
        with pytest.raises(AdminApiError) as refused:
            await gone
        assert (refused.value.status, refused.value.error) == (404, "not_found")
    assert (await admin.client.delete_policy(ME, NET, ASSET)).status == 204
    with pytest.raises(AdminApiError) as refused:
        await admin.client.get_policy(ME, NET, ASSET)
    assert (refused.value.status, refused.value.error) == (404, "not_found")
    assert (await admin.policies())["policies"] == []


async def test_a_policy_change_applies_at_once(admin: Admin) -> None:
    agent = new_agent()
    await admin.client.put_policy(Owner.agent(agent), NET, ASSET, {"limits": [{"period": "day", "amount": "100"}]})
    await admin.enforcer.precheck(agent, NET, ASSET, ROUTE, "m")  # the policy is now cached for 1 s
    await admin.client.put_policy(Owner.agent(agent), NET, ASSET, {"limits": [], "allowed_models": ["other"]})
    with pytest.raises(Refusal) as refused:
        await admin.enforcer.precheck(agent, NET, ASSET, ROUTE, "m")
    assert refused.value.reason == "model_not_allowed"


MALFORMED = [  # (path or None for the agent's, body, the field errors expected)
    (None, b"{not json", ["body"]),
    (None, b"", ["body"]),
    (None, b"[1, 2]", ["body"]),
    (None, b'{"limits": [{"period": "day", "amount": NaN}]}', ["body"]),
    (None, b'{"limits": [{"period": "day", "amount": 1e100000000}]}', ["body.limits.0.amount"]),
    (None, b'{"limits": [{"period": "day", "amount": ' + b"9" * 5000 + b"}]}", ["body"]),
    (None, b"[" * 100_000 + b"]" * 100_000, ["body"]),  # would overflow the C stack under py_ecc's recursion limit
    (None, {"limits": [{"period": "day", "amount": -5}]}, ["body.limits.0.amount"]),
    (None, {"limits": [{"period": "day", "amount": "-5"}]}, ["body.limits.0.amount"]),
    (None, {"limits": [{"period": "day", "amount": "1_000"}]}, ["body.limits.0.amount"]),
    (None, {"limits": [{"period": "day", "amount": 1.5}]}, ["body.limits.0.amount"]),
    (None, {"limits": [{"period": "day", "amount": True}]}, ["body.limits.0.amount"]),
    (None, {"limits": [{"period": "day", "amount": "1" * 79}]}, ["body.limits.0.amount"]),
    (None, {"limits": [{"period": "fortnight", "amount": "5"}]}, ["body.limits.0.period"]),
    (None, {"limits": [], "colour": "red"}, ["body.colour"]),
    (None, {"limits": [{"period": "day", "amount": "5", "extra": 1}]}, ["body.limits.0.extra"]),
    (None, {"network": "eip155:1"}, ["body.network"]),
    (None, {"asset": "0x" + "33" * 20}, ["body.asset"]),
    (None, {"rate_limit": {"per_minute": 0}}, ["body.rate_limit.per_minute"]),
    # Strict types: nothing is coerced into a budget nobody wrote.
    (None, {"limits": [{"period": "day", "amount": "5", "rolling": "yes"}]}, ["body.limits.0.rolling"]),
    (None, {"limits": [{"period": "day", "amount": "5", "rolling": 1}]}, ["body.limits.0.rolling"]),
    (None, {"suspended": "no"}, ["body.suspended"]),
    (None, {"suspended": 0}, ["body.suspended"]),
    (None, {"rate_limit": {"per_minute": "60"}}, ["body.rate_limit.per_minute"]),
    (None, {"allowed_models": "gpt-4o"}, ["body.allowed_models"]),
    (None, {"per_call_max": "abc", "group": "bad group!"}, ["body.per_call_max", "body.group"]),
    (f"/v1/agents/0x1234/policies/{NET}/{ASSET}", {}, ["path.address"]),
    (f"/v1/agents/{AGENT}/policies/ethereum/{ASSET}", {}, ["path.network"]),
    (f"/v1/agents/{AGENT}/policies/{NET}/usdc", {}, ["path.asset"]),
    (f"/v1/groups/bad%20group/policies/{NET}/{ASSET}", {}, ["path.group"]),
    (f"/v1/groups/team/policies/{NET}/{ASSET}", {"group": "other"}, ["body.group"]),
]  # fmt: skip


async def test_malformed_requests_get_422_with_field_errors(admin: Admin) -> None:
    for path, body, locs in MALFORMED:
        raw = body if isinstance(body, bytes) else None
        status, doc, _ = await admin.call("PUT", path or agent_path(), body=None if raw is not None else body, data=raw)
        assert status == 422, (path, body, doc)
        assert doc["error"] == "invalid_request"
        assert [e["loc"] for e in doc["errors"]] == locs and all(e["msg"] for e in doc["errors"]), (body, doc)
    status, doc, _ = await admin.call("PUT", agent_path(), data=b'{"limits": [' + b"{}, " * 500_000 + b"{}]}")
    assert (status, doc["error"]) == (413, "request_too_large")
    assert (await admin.policies())["policies"] == []


async def test_bad_query_parameters_get_422(admin: Admin) -> None:
    for path, loc in (("/v1/ledger?limit=0", "query.limit"), ("/v1/ledger?limit=100001", "query.limit"),
                      ("/v1/ledger?format=xml", "query.format"), ("/v1/ledger?start=yesterday", "query.start"),
                      ("/v1/ledger?agent=bob", "query.agent"), ("/v1/ledger?start=2000&end=1000", "query.start"),
                      (f"/v1/agents/{AGENT}/usage?network={NET}", "query"),
                      ("/v1/agents/0xzz/usage", "path.address"), ("/v1/policies?agent=0x1", "query.agent")):
        status, doc, _ = await admin.call("GET", path)
        assert status == 422 and [e["loc"] for e in doc["errors"]] == [loc], (path, doc)
    status, doc, _ = await admin.call("POST", f"/v1/agents/{AGENT}/suspend", body={"network": NET, "x": 1})
    assert status == 422 and doc["errors"] == [{"loc": "body.x", "msg": "unknown field"}]


# -- usage, suspension, ledger -------------------------------------------------------------------


async def test_usage_shows_spent_reserved_remaining_and_reset(admin: Admin) -> None:
    agent = new_agent()
    limits = [{"period": "day", "amount": str(50 * OPG)}, {"period": "hour", "amount": str(40 * OPG), "rolling": True}]
    await admin.client.put_policy(Owner.agent(agent), NET, ASSET,
                                  {"limits": limits, "group": "team-u", "rate_limit": {"per_minute": 60}})
    await admin.client.put_policy(Owner.group("team-u"), NET, ASSET,
                                  {"limits": [{"period": "week", "amount": str(100 * OPG)}]})
    await spend(admin, agent, BIG)
    held = await admin.enforcer.reserve(agent, NET, ASSET, 3 * OPG, ROUTE, "gpt-4o", "pending")

    doc = (await admin.client.usage(agent)).json()
    assert doc["agent"] == agent and doc["suspended"] is False
    assert doc["rate_limit"] == {"per_minute": 60, "burst": 0}
    rows = {(b["scope"], b["period"]): b for b in doc["budgets"]}
    assert set(rows) == {("agent", "day"), ("agent", "hour"), ("group", "week")}
    day = rows[("agent", "day")]
    assert (day["limit"], day["spent"], day["reserved"], day["remaining"]) == (
        str(50 * OPG), str(BIG), str(3 * OPG), str(50 * OPG - BIG - 3 * OPG))
    assert day["spent_display"] == "20.000000000000000001 OPG"
    assert day["remaining_display"] == "26.999999999999999999 OPG"
    now = dt.datetime.now(dt.UTC)
    midnight = (now + dt.timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    assert day["resets_at"] == midnight.isoformat().replace("+00:00", "Z")
    assert rows[("agent", "hour")]["rolling"] is True and rows[("agent", "hour")]["spent"] == str(BIG)
    week = rows[("group", "week")]
    assert week["scope_id"] == "team-u" and week["spent"] == str(BIG)
    assert dt.datetime.fromisoformat(week["resets_at"]).weekday() == 0  # ISO weeks end on Monday 00:00

    await admin.enforcer.release(held)
    doc = (await admin.client.usage(agent, network=NET, asset=ASSET)).json()
    assert {b["reserved"] for b in doc["budgets"]} == {"0"}

    stranger = new_agent()  # unlisted: the default budget applies, only when asked for an asset
    doc = (await admin.client.usage(stranger, network=NET, asset=ASSET)).json()
    assert doc["policies"][0]["listed"] is False and doc["budgets"][0]["limit"] == str(OPG)
    with pytest.raises(AdminApiError) as refused:
        await admin.client.usage(stranger)
    assert refused.value.status == 404 and "network and asset" in str(refused.value)
    with pytest.raises(AdminApiError) as refused:
        await admin.client.usage(stranger, network=NET, asset=DENIED)
    assert (refused.value.status, refused.value.error) == (404, "agent_not_allowed")


async def test_suspend_and_resume(admin: Admin) -> None:
    agent = new_agent()
    who = Owner.agent(agent)
    await admin.client.put_policy(who, NET, ASSET, {"limits": [{"period": "day", "amount": "100"}]})
    await admin.enforcer.precheck(agent, NET, ASSET, ROUTE, None)  # cached as active
    doc = (await admin.client.suspend(who)).json()
    assert doc["suspended"] is True and len(doc["policies"]) == 1
    with pytest.raises(Refusal) as refusal:
        await admin.enforcer.precheck(agent, NET, ASSET, ROUTE, None)
    assert refusal.value.reason == "agent_suspended"
    assert (await admin.client.usage(agent)).json()["suspended"] is True
    assert (await admin.client.get_policy(who, NET, ASSET)).json()["policy"]["suspended"] is True  # persisted

    doc = (await admin.client.resume(who, network=NET, asset=ASSET)).json()
    assert doc["suspended"] is False
    await admin.enforcer.precheck(agent, NET, ASSET, ROUTE, None)

    with pytest.raises(AdminApiError) as refused:
        await admin.client.suspend(who, network="eip155:1")
    assert refused.value.status == 404
    with pytest.raises(AdminApiError) as refused:
        await admin.client.suspend(Owner.agent(new_agent()))
    assert refused.value.status == 404 and "give it one first" in str(refused.value)
    assert "deny" in str(refused.value)


async def test_ledger_as_json_jsonl_and_csv(admin: Admin) -> None:
    agent, other = new_agent(), new_agent()
    for who in (agent, other):
        await admin.client.put_policy(Owner.agent(who), NET, ASSET,
                                      {"limits": [{"period": "day", "amount": str(100 * OPG)}]})
    admin.clock.offset = -2 * 86400  # an old entry: outside the default last 24 h
    await spend(admin, agent, 7, "old")
    admin.clock.offset = 0
    await spend(admin, agent, BIG, "big")
    await spend(admin, other, 5, "other")

    (e,) = (await admin.client.ledger(agent=agent)).json()["entries"]
    assert e["amount"] == str(BIG) and e["amount_display"] == "20.000000000000000001 OPG"
    assert (e["agent"], e["route"], e["model"], e["request_id"], e["network"], e["asset"]) == (
        agent, ROUTE, "gpt-4o", "big", NET, ASSET)
    assert e["ts"].endswith("Z") and abs(dt.datetime.fromisoformat(e["ts"]).timestamp() - e["ts_unix"]) < 1e-3

    doc = (await admin.client.ledger(agent=agent, start=0)).json()
    assert [x["request_id"] for x in doc["entries"]] == ["old", "big"]
    start = (dt.datetime.now(dt.UTC) - dt.timedelta(days=3)).isoformat().replace("+00:00", "Z")
    doc = (await admin.client.ledger(start=start, limit=2)).json()
    assert [x["request_id"] for x in doc["entries"]] == ["old", "big"]  # oldest first, limited

    # Narrowed by entry fields (the console's filters), before the limit; values compare case-blind.
    put = await admin.client.put_policy(Owner.agent(other), NET, ASSET, {"group": "ledger-team", "limits": []})
    assert put.status == 200
    await spend(admin, other, 6, "grouped")
    doc = (await admin.client.ledger(group="ledger-team", start=start)).json()
    assert [x["request_id"] for x in doc["entries"]] == ["grouped"]
    doc = (await admin.client.ledger(route=ROUTE.lower(), model="GPT-4o", asset=ASSET.upper().replace("0X", "0x"),
                                     network=NET, agent=agent, start=start, limit=1)).json()
    assert [x["request_id"] for x in doc["entries"]] == ["old"]
    assert (await admin.client.ledger(model="other", start=start)).json()["entries"] == []
    for bad, loc in (({"asset": "usdc"}, "query.asset"), ({"network": "base"}, "query.network"),
                     ({"group": "a b"}, "query.group")):
        reply = await admin.client.request("GET", "/v1/ledger", query=bad, check=False)
        assert reply.status == 422 and reply.json()["errors"][0]["loc"] == loc

    # Summed (what the console's overview reads): per asset, or per agent and asset, in buckets.
    base = int(admin.enforcer.clock() // 86400) * 86400 - 3 * 86400  # buckets align to multiples of bucket_s
    doc = (await admin.client.request("GET", "/v1/ledger/summary", query={
        "start": base, "end": base + 4 * 86400 - 1, "bucket_s": 86400, "agent": agent})).json()
    [row] = doc["rows"]
    assert (row["network"], row["asset"], row["calls"], row["amount"]) == (NET, ASSET, 2, str(7 + BIG))
    assert row["amount_display"] == "20.000000000000000008 OPG" and doc["truncated"] is False
    assert [(b["calls"], b["amount"]) for b in row["buckets"]] == [(0, "0"), (1, "7"), (0, "0"), (1, str(BIG))]
    assert [b["start_unix"] for b in row["buckets"]] == [base + i * 86400 for i in range(4)]
    doc = (await admin.client.request("GET", "/v1/ledger/summary", query={"start": start, "by": "agent"})).json()
    mine = {r["agent"]: (r["calls"], r["amount"]) for r in doc["rows"] if r["agent"] in (agent, other)}
    assert mine == {agent: (2, str(7 + BIG)), other: (2, "11")} and doc["rows"][0]["buckets"] is None
    for bad, loc in (({"by": "route"}, "query.by"), ({"bucket_s": "59"}, "query.bucket_s"),
                     ({"bucket_s": "60", "start": 0}, "query.bucket_s")):
        reply = await admin.client.request("GET", "/v1/ledger/summary", query=bad, check=False)
        assert reply.status == 422 and reply.json()["errors"][0]["loc"] == loc, reply.text

    reply = await admin.client.ledger(agent=agent, start=0, format="jsonl")
    assert reply.headers["Content-Type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in reply.text.splitlines()]
    assert [x["amount"] for x in lines] == ["7", str(BIG)]

    reply = await admin.client.ledger(format="csv")
    assert reply.headers["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(reply.text)))
    assert list(rows[0]) == ["ts", "agent", "group", "route", "model", "amount", "asset", "network", "tx_hash",
                             "request_id"]
    assert {(r["agent"], r["amount"]) for r in rows} >= {(agent, str(BIG)), (other, "5")}
    assert all(r["ts"].endswith("Z") for r in rows) and (agent, "7") not in {(r["agent"], r["amount"]) for r in rows}


async def test_store_unreachable_is_503(free_port: int) -> None:
    store = RedisBudgetStore.from_url(f"redis://127.0.0.1:{free_port}/0")
    clock = Clock()
    try:
        async with running(enforcer_for(store, clock), clock, SecretStr(TOKEN)) as admin:
            status, doc, headers = await admin.call("GET", "/v1/policies")
            assert status == 503 and doc["error"] == "budget_store_unavailable" and headers["Retry-After"] == "5"
            status, doc, _ = await admin.call("PUT", agent_path(), body={"limits": []})
            assert status == 503
    finally:
        await store.close()


async def test_openapi_document_describes_every_route(admin: Admin) -> None:
    assert (await admin.call("GET", "/openapi.json", token=None))[0] == 401
    doc = (await admin.client.openapi()).json()
    assert doc["openapi"].startswith("3.1")
    assert doc["servers"] == [{"url": "/admin"}]
    routes = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    pol, grp = "/v1/agents/{address}/policies/{network}/{asset}", "/v1/groups/{group}/policies/{network}/{asset}"
    assert routes == {("GET", "/openapi.json"), ("GET", "/v1/healthz"), ("GET", "/v1/assets"), ("GET", "/v1/policies"),
                      ("GET", pol), ("PUT", pol), ("DELETE", pol), ("GET", grp), ("PUT", grp), ("DELETE", grp),
                      ("GET", "/v1/agents/{address}/usage"), ("POST", "/v1/agents/{address}/suspend"),
                      ("POST", "/v1/agents/{address}/resume"), ("POST", "/v1/groups/{group}/suspend"),
                      ("POST", "/v1/groups/{group}/resume"), ("GET", "/v1/ledger"), ("GET", "/v1/reconcile"),
                      ("GET", "/v1/ledger/summary")}
    schemas = doc["components"]["schemas"]
    for path, ops in doc["paths"].items():
        for op in ops.values():
            assert op["responses"] and op["summary"]
            assert {p["name"] for p in op["parameters"] if p["in"] == "path"} == {
                seg[1:-1] for seg in path.split("/") if seg.startswith("{")}
            for ref in _refs(op):
                assert ref.removeprefix("#/components/schemas/") in schemas, ref
    assert doc["paths"][pol]["put"]["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Policy"}
    assert {"limits", "per_call_max", "rate_limit", "suspended", "group"} <= set(schemas["Policy"]["properties"])
    assert doc["paths"]["/v1/healthz"]["get"]["security"] == []
    assert {p["name"] for p in doc["paths"]["/v1/ledger"]["get"]["parameters"]} == {
        "agent", "start", "end", "limit", "format", "group", "route", "model", "asset", "network"}
    for schema in schemas.values():
        for ref in _refs(schema):
            assert ref.removeprefix("#/components/schemas/") in schemas, ref


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return ([node["$ref"]] if "$ref" in node else []) + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []
