"""`x402-budgets` driven through main([...]) against a live admin app (uvicorn in a thread, the
embedded SQLite store): tables, --json, exit codes."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import json
import threading
import uuid
from collections.abc import Coroutine, Iterator
from typing import Any

import pytest
import uvicorn
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.routing import Mount

from budgets.admin import create_admin_app
from budgets.cli import main, parse_amount
from budgets.enforcer import BudgetEnforcer
from budgets.models import DefaultPolicy, Refusal
from budgets.sqlite_store import SQLiteBudgetStore

TOKEN = "cli-" + "t0ken" * 5
NET = "eip155:84532"
ASSET = "0x" + "11" * 20
OPG = 10**18
ROUTE = "POST /v1/chat/completions"


class ThreadedAdmin:
    """The admin app on uvicorn in its own thread and event loop."""

    def __init__(self, enforcer: BudgetEnforcer) -> None:
        app = Starlette(routes=[Mount("/admin", app=create_admin_app(enforcer, SecretStr(TOKEN),
                                                                      assets={(NET, ASSET): ("OPG", 18)}))])
        self.enforcer = enforcer
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self.server.serve(),), daemon=True)

    def __enter__(self) -> ThreadedAdmin:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the admin server did not start")
            self.thread.join(0.005)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}/admin"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(5)
        self.loop.close()

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run on the server's loop (the SQLite connection is used from one thread at a time)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(5)


@pytest.fixture(scope="module")
def admin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedAdmin]:
    store = SQLiteBudgetStore(str(tmp_path_factory.mktemp("cli") / "budgets.sqlite3"))
    enforcer = BudgetEnforcer(store, defaults={(NET, ASSET): DefaultPolicy(mode="deny")}, timezone="UTC")
    with ThreadedAdmin(enforcer) as running:
        yield running
    asyncio.run(store.close())


def cli(admin: ThreadedAdmin, *argv: str, token: str | None = TOKEN) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(["--url", admin.url, *(["--token", token] if token is not None else []), *argv], out=out, err=err)
    assert TOKEN not in out.getvalue() + err.getvalue()
    return code, out.getvalue(), err.getvalue()


def agent() -> str:
    return "0x" + uuid.uuid4().hex + uuid.uuid4().hex[:8]


def spend(admin: ThreadedAdmin, who: str, amount: int) -> None:
    async def go() -> None:
        rid = uuid.uuid4().hex
        hold = await admin.enforcer.reserve(who, NET, ASSET, amount, ROUTE, "gpt-4o", rid)
        await admin.enforcer.commit(hold, amount, "0x" + "cd" * 32, rid)

    admin.run(go())


def rows(table: str) -> list[list[str]]:
    return [line.split() for line in table.strip().splitlines()]


def test_set_show_and_list(admin: ThreadedAdmin) -> None:
    a = agent()
    code, out, err = cli(admin, "set", a, "--network", NET, "--asset", ASSET, "--daily", "5OPG",
                         "--per-call", "0.2", "--decimals", "18", "--models", "gpt-4o,claude")
    assert code == 0, err
    header, row = out.strip().splitlines()
    assert header.split()[:6] == ["KIND", "ID", "NETWORK", "ASSET", "LIMITS", "PER-CALL"]
    assert row.split() == ["agent", a, NET, "OPG", "5", "OPG/day", "0.2", "OPG", "-", "gpt-4o,claude", "*", "-",
                           "active"]
    assert header.index("LIMITS") == row.index("5 OPG/day")  # aligned columns

    # only the options given change: the daily limit and models stay
    code, out, _ = cli(admin, "--json", "set", a, "--network", NET, "--asset", ASSET, "--rate", "60/min",
                       "--burst", "5", "--hourly", "1000", "--rolling", "--member-of", "team-cli")
    assert code == 0
    doc = json.loads(out)
    assert doc["policy"]["limits"] == [{"period": "day", "amount": str(5 * OPG), "rolling": False},
                                       {"period": "hour", "amount": "1000", "rolling": True}]
    assert doc["policy"]["rate_limit"] == {"per_minute": 60, "burst": 5}
    assert doc["policy"]["allowed_models"] == ["gpt-4o", "claude"] and doc["policy"]["group"] == "team-cli"

    code, out, _ = cli(admin, "set", "--group", "team-cli", "--network", NET, "--asset", ASSET, "--weekly", "100OPG")
    assert code == 0 and rows(out)[1][:6] == ["group", "team-cli", NET, "OPG", "100", "OPG/week"]

    code, out, _ = cli(admin, "show", a)
    assert code == 0 and "5 OPG/day, 0.000000000000001 OPG/hour rolling" in out and "60/min +5" in out
    code, out, _ = cli(admin, "--json", "show", a, "--network", NET, "--asset", ASSET)
    assert code == 0 and json.loads(out)["policy"]["per_call_max"] == str(2 * 10**17)
    code, out, _ = cli(admin, "show", "--group", "team-cli")
    assert code == 0 and rows(out)[1][:2] == ["group", "team-cli"]

    code, out, _ = cli(admin, "list")
    ids = {r[1] for r in rows(out)[1:]}
    assert code == 0 and {a, "team-cli"} <= ids
    code, out, _ = cli(admin, "--json", "list")
    assert {(p["kind"], p["id"]) for p in json.loads(out)["policies"]} >= {("agent", a), ("group", "team-cli")}

    code, out, _ = cli(admin, "--json", "set", a, "--network", NET, "--asset", ASSET, "--hourly", "none",
                       "--rate", "none", "--models", "*", "--member-of", "none")
    p = json.loads(out)["policy"]
    assert [lim["period"] for lim in p["limits"]] == ["day"]
    assert (p["rate_limit"], p["allowed_models"], p["group"]) == (None, None, None)


def test_usage_suspend_resume(admin: ThreadedAdmin) -> None:
    a = agent()
    assert cli(admin, "set", a, "--network", NET, "--asset", ASSET, "--daily", "5OPG")[0] == 0
    spend(admin, a, 3 * OPG // 2)
    code, out, _ = cli(admin, "usage", a)
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0] == f"agent {a}" and "listed" in lines[1]
    assert lines[2].split() == ["NETWORK", "ASSET", "SCOPE", "ID", "PERIOD", "LIMIT", "SPENT", "RESERVED", "REMAINING",
                                "RESETS", "AT"]
    assert lines[3].split()[:14] == [NET, "OPG", "agent", a, "day", "5", "OPG", "1.5", "OPG", "0", "OPG", "3.5", "OPG",
                                     lines[3].split()[13]]
    assert lines[3].split()[13].endswith("T00:00:00Z")
    code, out, _ = cli(admin, "--json", "usage", a, "--network", NET, "--asset", ASSET)
    (budget,) = json.loads(out)["budgets"]
    assert (budget["spent"], budget["remaining"]) == (str(3 * OPG // 2), str(7 * OPG // 2))

    code, out, _ = cli(admin, "suspend", a)
    assert (code, out.strip()) == (0, f"agent {a} suspended on {NET} OPG")
    with pytest.raises(Refusal) as refused:
        admin.run(admin.enforcer.precheck(a, NET, ASSET, ROUTE, None))
    assert refused.value.reason == "agent_suspended"
    assert "SUSPENDED" in cli(admin, "usage", a)[1]
    code, out, _ = cli(admin, "--json", "resume", a)
    assert code == 0 and json.loads(out)["suspended"] is False
    admin.run(admin.enforcer.precheck(a, NET, ASSET, ROUTE, None))

    code, out, err = cli(admin, "suspend", agent())
    assert code == 1 and out == "" and "has no policy" in err


def test_ledger_formats(admin: ThreadedAdmin) -> None:
    a = agent()
    cli(admin, "set", a, "--network", NET, "--asset", ASSET, "--daily", "100OPG")
    big = 20 * OPG + 1
    spend(admin, a, big)
    spend(admin, a, 5)
    code, out, _ = cli(admin, "ledger", "--agent", a, "--since", "1h")
    table = out.strip().splitlines()
    assert code == 0 and table[0].split() == ["TIME", "AGENT", "GROUP", "ROUTE", "MODEL", "AMOUNT", "TX"]
    assert "20.000000000000000001 OPG" in table[1] and "0.000000000000000005 OPG" in table[2]
    assert table[3] == f"2 entries; total 20.000000000000000006 OPG ({big + 5}) on {NET}"
    code, out, _ = cli(admin, "--json", "ledger", "--agent", a)
    assert [e["amount"] for e in json.loads(out)["entries"]] == [str(big), "5"]
    tomorrow = (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    code, out, _ = cli(admin, "ledger", "--agent", a, "--format", "jsonl", "--since", "7d", "--until", tomorrow)
    assert [json.loads(line)["amount"] for line in out.splitlines()] == [str(big), "5"]
    code, out, _ = cli(admin, "ledger", "--agent", a, "--format", "csv", "--limit", "1")
    (row,) = csv.DictReader(io.StringIO(out))
    assert (row["agent"], row["amount"], row["model"]) == (a, str(big), "gpt-4o")
    assert cli(admin, "ledger", "--agent", agent())[1] == "0 entries\n"


@pytest.mark.parametrize("argv", [
    ["set", "--network", NET, "--asset", ASSET, "--daily", "5"],  # neither AGENT nor --group
    ["set", "0x" + "ab" * 20, "--group", "g", "--network", NET, "--asset", ASSET],  # both
    ["set", "0x" + "ab" * 20, "--network", NET, "--daily", "5"],  # no --asset
    ["set", "0x" + "ab" * 20, "--network", NET, "--asset", ASSET, "--daily", "0.5"],  # fraction, no --decimals
    ["set", "0x" + "ab" * 20, "--network", NET, "--asset", ASSET, "--daily", "5USDC"],  # wrong unit
    ["set", "0x" + "ab" * 20, "--network", NET, "--asset", ASSET, "--rolling"],
    ["set", "0x" + "ab" * 20, "--network", NET, "--asset", ASSET, "--rate", "fast"],
    ["usage", "0x" + "ab" * 20, "--network", NET],
    ["ledger", "--since", "yesterday"],
    ["ledger", "--format", "xml"],
    ["frobnicate"],
    [],
])  # fmt: skip
def test_usage_errors_exit_2(admin: ThreadedAdmin, argv: list[str]) -> None:
    code, out, err = cli(admin, *argv)
    assert code == 2 and out == "" and "error" in err


def test_api_errors_exit_1(admin: ThreadedAdmin) -> None:
    code, _, err = cli(admin, "list", token="wrong")
    assert code == 1 and "wrong admin token" in err and "wrong" not in err.replace("wrong admin token", "")
    code, _, err = cli(admin, "list", token=None)
    assert code == 1 and "BUDGETS_ADMIN_TOKEN" in err
    code, _, err = cli(admin, "show", "0x1234", "--network", NET, "--asset", ASSET)
    assert code == 1 and "path.address" in err
    code, _, err = cli(admin, "show", agent())
    assert code == 1 and "has no policy" in err
    code, _, err = cli(admin, "set", "--group", "bad group!", "--network", NET, "--asset", ASSET, "--daily", "5")
    assert code == 1 and "path.group" in err
    code, _, err = main(["--url", "http://127.0.0.1:9/admin", "--token", TOKEN, "list"], out=io.StringIO(),
                        err=(e := io.StringIO())), None, None
    assert code == 1 and "cannot reach" in e.getvalue()


def test_amounts() -> None:
    assert parse_amount("5000", decimals=None, unit=None) == 5000
    assert parse_amount("0.2", decimals=6, unit=None) == 200_000
    assert parse_amount("5OPG", decimals=None, unit=("OPG", 18)) == 5 * OPG
    assert parse_amount("0.2 usdc", decimals=None, unit=("USDC", 6)) == 200_000
    assert parse_amount("123456789.123456789123456789", decimals=18, unit=None) == 123456789123456789123456789
