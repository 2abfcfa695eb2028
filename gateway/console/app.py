"""The console as a Starlette app, mounted by the gateway at {admin_prefix}/console: the gate
(every page needs a login session; every POST a same-origin request and the session's CSRF
token), the security headers of every answer, login and logout. The pages are in views.py."""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.console.admin_calls import AdminCalls
from gateway.console.forms import read_form
from gateway.console.reconcile import Reconciler, unavailable
from gateway.console.session import COOKIE, Sessions
from gateway.console.views import Views

HERE = Path(__file__).parent
OPEN_PATHS = ("/login", "/static/")
# No script at all; styles and images from the gateway only; forms post to the gateway only.
CSP = ("default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; "
       "base-uri 'none'")
SECURITY_HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"), (b"referrer-policy", b"same-origin"),
                    (b"cache-control", b"no-store"), (b"cross-origin-opener-policy", b"same-origin"),
                    (b"cross-origin-resource-policy", b"same-origin")]


def _sub_path(scope: Scope) -> str:
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def same_origin(headers: Headers) -> bool:
    """A state-changing request must come from the console's own pages: a browser says where a
    form was posted from (Sec-Fetch-Site, Origin); one that says "another site" is refused."""
    site = headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = headers.get("origin")
    if origin is None or origin == "null":
        return origin is None and site is not None  # no Origin at all: only a browser that sent Sec-Fetch-Site
    return urlsplit(origin).netloc.lower() == headers.get("host", "").lower()


class ConsoleGate:
    """Ahead of routing (so unknown paths are hidden too): security headers on every answer; no
    session -> a redirect to the login page (GET) or 401; a POST from another site -> 403."""

    def __init__(self, app: ASGIApp, sessions: Sessions, clock: Callable[[], float]) -> None:
        self.app, self.sessions, self.clock = app, sessions, clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        request = Request(scope)
        path = _sub_path(scope)
        if request.method not in ("GET", "HEAD") and not same_origin(request.headers):
            await PlainTextResponse("cross-site request refused", 403)(scope, receive, secured)
            return
        if not path.startswith(OPEN_PATHS):
            sid = self.sessions.session_id(request.cookies.get(COOKIE), self.clock())
            if sid is None:
                if request.method in ("GET", "HEAD"):
                    target = scope.get("root_path", "") + "/login"
                    response: Response = RedirectResponse(target, 303)
                else:
                    response = PlainTextResponse("log in first", 401)
                await response(scope, receive, secured)
                return
            scope.setdefault("state", {})["console_sid"] = sid
        await self.app(scope, receive, secured)


def templates() -> Environment:
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]),
                      trim_blocks=True, lstrip_blocks=True)
    env.globals["zip"] = zip
    return env


def create_console_app(admin_app: ASGIApp, token: str, *, gateway: Callable[[], Any], settings: Any,
                       reconciler: Reconciler | None = None, clock: Callable[[], float] = time.time) -> Starlette:
    """`gateway`: the gateway's state (GatewayState, read at request time); `settings`: its
    GatewaySettings. `reconciler`: the Reconciliation page's source (default: not available)."""
    sessions = Sessions.for_token(token, settings.console_session_s)
    calls = AdminCalls(admin_app, token)
    env = templates()
    views = Views(calls, env, sessions, gateway, settings, reconciler or unavailable, clock)

    def login_page(request: Request, error: str = "", status: int = 200) -> Response:
        html = env.get_template("login.html").render(base=request.scope.get("root_path", ""), error=error)
        return HTMLResponse(html, status)

    async def login(request: Request) -> Response:
        if request.method == "GET":
            return login_page(request)
        form = await read_form(request) or {}
        given = form.get("token", "").encode()
        if not given or not hmac.compare_digest(given, token.encode()):
            await asyncio.sleep(0.25)  # slows a guessing loop down; the token is the real defence
            return login_page(request, "wrong admin token", 401)
        base = request.scope.get("root_path", "")
        response = RedirectResponse(base + "/", 303)
        response.set_cookie(COOKIE, sessions.issue(clock()), max_age=int(settings.console_session_s), path=base or "/",
                            httponly=True, samesite="strict", secure=_tls(request, settings))
        return response

    async def logout(request: Request) -> Response:
        form = await read_form(request) or {}
        if not sessions.csrf_ok(request.scope["state"]["console_sid"], form.get("csrf")):
            return PlainTextResponse("missing or wrong CSRF token", 403)
        base = request.scope.get("root_path", "")
        response = RedirectResponse(base + "/login", 303)
        response.delete_cookie(COOKIE, path=base or "/", httponly=True, samesite="strict",
                               secure=_tls(request, settings))
        return response

    routes = [
        Route("/login", login, methods=["GET", "POST"]),
        Route("/logout", logout, methods=["POST"]),
        Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
        *views.routes(),
    ]
    app = Starlette(routes=routes)
    app.add_middleware(ConsoleGate, sessions=sessions, clock=clock)
    return app


def _tls(request: Request, settings: Any) -> bool:
    """Secure cookies when the console is reached over TLS (or the gateway's public URL is https)."""
    return request.scope.get("scheme") == "https" or str(settings.public_url or "").startswith("https://")
