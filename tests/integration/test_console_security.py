"""The operator's console's gate, on a real gateway process (the dev configuration, budgets on
because an admin token is set): no page without a session, a wrong token refused, a cross-site
or token-less form post refused, and a Content-Security-Policy that lets no script run."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from tests.gateway_client import Processes

pytestmark = pytest.mark.integration

TOKEN = "console-security-token"
AGENT = "0x" + "ab" * 20
PAGES = ["/", "/agents", f"/agents/{AGENT}", "/groups", "/ledger", "/ledger/export?format=csv", "/settlements",
         "/reconciliation", "/no-such-page"]
POSTS = ["/logout", f"/agents/{AGENT}", f"/agents/{AGENT}/suspension", "/groups/team/suspension"]


@pytest.fixture(scope="module")
def console(devchain_file: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    procs = Processes(devchain_file, tmp_path_factory.mktemp("console_security"))
    try:
        upstream = procs.upstream()
        gateway = procs.gateway(upstream.url, "memory://", env={"BUDGETS_ADMIN_TOKEN": TOKEN})
        yield gateway.url + "/admin/console"
    finally:
        procs.stop_all()


def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def _login(http: aiohttp.ClientSession, base: str, token: str = TOKEN) -> aiohttp.ClientResponse:
    origin = base.split("/admin")[0]
    async with http.post(base + "/login", data={"token": token}, headers={"Origin": origin},
                         allow_redirects=False) as r:
        await r.read()
        return r


async def test_every_page_needs_a_session(console: str) -> None:
    async with aiohttp.ClientSession() as http:
        for page in PAGES:
            async with http.get(console + page, allow_redirects=False) as r:
                assert r.status == 303 and r.headers["Location"].endswith("/admin/console/login"), (page, r.status)
        origin = console.split("/admin")[0]
        for path in POSTS:
            async with http.post(console + path, data={"csrf": "x"}, headers={"Origin": origin},
                                 allow_redirects=False) as r:
                assert r.status == 401, (path, r.status)
        async with http.get(console, allow_redirects=False) as r:  # the console's address without its slash
            assert r.status == 308 and r.headers["Location"] == "/admin/console/"
        async with http.get(console + "/login") as r:  # the login page itself is open
            assert r.status == 200 and 'name="token"' in await r.text()


async def test_wrong_token_refused_right_token_sets_a_strict_cookie(console: str) -> None:
    async with _session() as http:
        r = await _login(http, console, "not-the-token")
        assert r.status == 401 and "x402_console" not in r.cookies
        async with http.get(console + "/agents", allow_redirects=False) as page:
            assert page.status == 303
        r = await _login(http, console)
        assert r.status == 303
        cookie = r.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "samesite=strict" in cookie.lower() and "Path=/admin/console" in cookie
        assert "Secure" not in cookie  # plain HTTP here; over TLS it is set
        async with http.get(console + "/agents", allow_redirects=False) as page:
            assert page.status == 200
        async with http.get(console + "/ledger/export?format=csv") as export:
            assert export.status == 200 and (await export.text()).startswith("ts,agent,group,route")


async def test_logout_needs_the_csrf_token_and_clears_the_cookie(console: str) -> None:
    async with _session() as http:
        assert (await _login(http, console)).status == 303
        origin = console.split("/admin")[0]
        async with http.get(console + "/") as page:
            csrf = re.search(r'name="csrf" value="([^"]+)"', await page.text())
        assert csrf is not None
        async with http.post(console + "/logout", data={}, headers={"Origin": origin}, allow_redirects=False) as r:
            assert r.status == 403  # a cross-site page cannot log the operator out either
        async with http.post(console + "/logout", data={"csrf": csrf.group(1)}, headers={"Origin": origin},
                             allow_redirects=False) as r:
            assert r.status == 303 and r.headers["Location"].endswith("/login")
            assert 'x402_console=""' in r.headers["Set-Cookie"] or "Max-Age=0" in r.headers["Set-Cookie"]
        async with http.get(console + "/", allow_redirects=False) as r:
            assert r.status == 303


async def test_a_forged_or_expired_cookie_is_no_session(console: str) -> None:
    async with aiohttp.ClientSession() as http:
        for value in ("abc.9999999999.forged", "abc.1.x", ""):
            async with http.get(console + "/", headers={"Cookie": f"x402_console={value}"},
                                allow_redirects=False) as r:
                assert r.status == 303


async def test_cross_site_and_tokenless_posts_refused(console: str) -> None:
    async with _session() as http:
        assert (await _login(http, console)).status == 303
        async with http.get(console + f"/agents/{AGENT}") as page:
            csrf = re.search(r'name="csrf" value="([^"]+)"', await page.text())
        assert csrf is not None
        target = console + f"/agents/{AGENT}/suspension"
        origin = console.split("/admin")[0]
        # Another site's form (its Origin, or the browser's Sec-Fetch-Site), even with a valid token:
        for headers in ({"Origin": "https://evil.example"}, {"Origin": origin, "Sec-Fetch-Site": "cross-site"},
                        {"Sec-Fetch-Site": "same-site"}, {}):
            async with http.post(target, data={"csrf": csrf.group(1), "action": "suspend"}, headers=headers,
                                 allow_redirects=False) as r:
                assert r.status == 403, (headers, r.status)
        # Our own origin without the session's CSRF token, or with another one:
        for data in ({"action": "suspend"}, {"action": "suspend", "csrf": "forged"}):
            async with http.post(target, data=data, headers={"Origin": origin}, allow_redirects=False) as r:
                assert r.status == 403, (data, r.status)
        # A login form posted from another site is refused too (login CSRF).
        async with http.post(console + "/login", data={"token": TOKEN}, headers={"Origin": "https://evil.example"},
                             allow_redirects=False) as r:
            assert r.status == 403


async def test_content_security_policy_lets_no_script_run(console: str) -> None:
    async with _session() as http:
        async with http.get(console + "/login") as r:
            csp_login = r.headers["Content-Security-Policy"]
        assert (await _login(http, console)).status == 303
        for page in ("/", "/agents", "/ledger"):
            async with http.get(console + page) as r:
                assert r.status == 200
                csp = r.headers["Content-Security-Policy"]
                html = await r.text()
                assert r.headers["X-Frame-Options"] == "DENY" and r.headers["X-Content-Type-Options"] == "nosniff"
                assert "<script" not in html
                assert not re.search(r"\son[a-z]+=", html)  # no inline event handlers either
        directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
        assert directives["default-src"] == "'none'"  # script-src falls back to it: no script at all
        assert "script-src" not in directives
        assert all("unsafe" not in v and "*" not in v and "http" not in v for v in directives.values())
        assert directives["frame-ancestors"] == "'none'" and directives["form-action"] == "'self'"
        assert csp_login == csp


async def test_console_can_be_turned_off(devchain_file: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    procs = Processes(devchain_file, tmp_path_factory.mktemp("console_off"))
    try:
        upstream = procs.upstream()
        gateway: Any = procs.gateway(upstream.url, "memory://",
                                     env={"BUDGETS_ADMIN_TOKEN": TOKEN, "GATEWAY_CONSOLE": "false"})
        async with aiohttp.ClientSession() as http:
            async with http.get(gateway.url + "/admin/console/login", allow_redirects=False) as r:
                assert r.status in (401, 404), r.status  # the admin API's own answer: no such console
            async with http.get(gateway.url + "/admin/v1/healthz") as r:
                assert r.status == 200  # the admin API itself stays
    finally:
        procs.stop_all()
