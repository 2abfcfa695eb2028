"""The console's login session and CSRF tokens: stateless, signed with a key derived from the
admin token (so every replica and worker accepts the same session, and changing the token logs
everyone out).

A session cookie is `<id>.<expiry>.<mac>`; the CSRF token of a session is a MAC of its id, sent
in every form that changes something and checked against the cookie's session."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass

COOKIE = "x402_console"


def _mac(key: bytes, text: str) -> str:
    digest = hmac.new(key, text.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


@dataclass(frozen=True)
class Sessions:
    key: bytes
    ttl_s: float

    @classmethod
    def for_token(cls, token: str, ttl_s: float) -> Sessions:
        return cls(hmac.new(token.encode(), b"x402-console-session-v1", hashlib.sha256).digest(), ttl_s)

    def issue(self, now: float) -> str:
        payload = f"{secrets.token_urlsafe(16)}.{int(now + self.ttl_s)}"
        return f"{payload}.{_mac(self.key, 'session:' + payload)}"

    def session_id(self, cookie: str | None, now: float) -> str | None:
        """The session's id if the cookie is ours and unexpired, else None."""
        sid, _, rest = (cookie or "").partition(".")
        expiry, _, mac = rest.partition(".")
        if not (sid and expiry.isdigit() and mac):
            return None
        if not hmac.compare_digest(mac, _mac(self.key, f"session:{sid}.{expiry}")) or int(expiry) < now:
            return None
        return sid

    def csrf(self, sid: str) -> str:
        return _mac(self.key, "csrf:" + sid)

    def csrf_ok(self, sid: str, given: str | None) -> bool:
        return bool(given) and hmac.compare_digest(self.csrf(sid), given or "")
