"""The console's pure parts: session cookies and CSRF tokens, the same-origin rule for posts,
the policy form (token units to base units, field errors inline), and the SVG chart."""

from __future__ import annotations

from starlette.datastructures import Headers

from gateway.console.app import same_origin
from gateway.console.charts import Series, time_series
from gateway.console.forms import PolicyForm, token_units
from gateway.console.session import Sessions

T0 = 1_800_000_000.0


def test_session_cookie_is_signed_and_expires() -> None:
    s = Sessions.for_token("tok", ttl_s=60)
    cookie = s.issue(T0)
    sid = s.session_id(cookie, T0 + 59)
    assert sid and s.session_id(cookie, T0 + 61) is None  # expired
    head, expiry, mac = cookie.split(".")
    assert s.session_id(f"{head}.{int(expiry) + 3600}.{mac}", T0) is None  # lifetime stretched: MAC fails
    assert s.session_id(cookie, T0) and Sessions.for_token("other", 60).session_id(cookie, T0) is None  # new token
    for junk in (None, "", "a.b", "a.b.c", "..", f"{head}.x.{mac}"):
        assert s.session_id(junk, T0) is None
    assert s.csrf_ok(sid, s.csrf(sid)) and not s.csrf_ok(sid, None) and not s.csrf_ok(sid, "x")
    assert not s.csrf_ok(sid, s.csrf("another-session"))


def test_same_origin_posts_only() -> None:
    def ok(**h: str) -> bool:
        return same_origin(Headers({"host": "gw:8402", **{k.replace("_", "-"): v for k, v in h.items()}}))

    assert ok(origin="http://gw:8402") and ok(origin="https://GW:8402", sec_fetch_site="same-origin")
    assert ok(sec_fetch_site="same-origin")  # a browser that sent no Origin still names the site
    assert not ok(origin="http://evil:8402") and not ok(origin="null") and not ok()
    assert not ok(origin="http://gw:8402", sec_fetch_site="cross-site")
    assert not ok(origin="http://gw:8402", sec_fetch_site="same-site")  # a sibling subdomain is another site


def test_policy_form_token_units_and_errors() -> None:
    existing = {"network": "eip155:1", "asset": "0x" + "a" * 40, "suspended": True, "group": "g",
                "limits": [{"period": "day", "amount": "1000000000000000000", "rolling": True}],
                "per_call_max": "5000000000000000", "rate_limit": {"per_minute": 60, "burst": 0}}
    form = PolicyForm.from_policy(existing, 18)
    assert form.values["limit_day"] == "1" and form.values["per_call_max"] == "0.005"
    assert form.values["rate_per_minute"] == "60" and form.values["group"] == "g"
    form.values |= {"limit_day": "0.5", "limit_hour": "0.1", "allowed_models": "gpt-4o, gpt-4o-mini"}
    body = form.to_body(existing, 18)
    assert body is not None
    assert body["limits"] == [{"period": "hour", "amount": str(10**17), "rolling": False},
                              {"period": "day", "amount": str(5 * 10**17), "rolling": True}]  # rolling kept
    assert body["suspended"] is True and body["allowed_models"] == ["gpt-4o", "gpt-4o-mini"]
    assert body["rate_limit"] == {"per_minute": 60, "burst": 0} and body["allowed_routes"] is None

    bad = PolicyForm({"limit_day": "0.0000001", "limit_week": "-1", "limit_month": "lots", "rate_per_minute": "1.5",
                      "rate_burst": "3"})
    assert bad.to_body(None, 6) is None
    assert bad.errors == {"limit_day": "at most 6 decimal places", "limit_week": "must be zero or more",
                          "limit_month": "a number of tokens, e.g. 5 or 0.25", "rate_per_minute": "a whole number",
                          "rate_burst": "a burst needs calls per minute"}


def test_admin_api_field_errors_land_on_their_fields() -> None:
    form = PolicyForm({"limit_week": "1", "group": "bad group"})
    body = form.to_body(None, 0)
    assert body is not None
    form.admin_errors([{"loc": "body.limits.0.amount", "msg": "too big"}, {"loc": "body.group", "msg": "bad id"},
                       {"loc": "body.rate_limit.burst", "msg": "no"}, {"loc": "body", "msg": "other"}], body)
    assert form.errors == {"limit_week": "too big", "group": "bad id", "rate_burst": "no", "form": "other"}


def test_token_units() -> None:
    assert [token_units(a, d) for a, d in [(5 * 10**18, 18), (5 * 10**15, 18), (0, 6), (1, 6), (10, 0)]] == \
        ["5", "0.005", "0", "0.000001", "10"]


def test_chart_is_plain_svg_with_escaped_labels() -> None:
    svg = time_series("calls <b>", [Series("paid & <x>", [0, 2, 1]), Series("refused", [1, 0, 0])], ["a", "b", "c"])
    assert svg.startswith("<svg") and svg.count("<polyline") == 2
    assert "<b>" not in svg and "&lt;b&gt;" in svg and "paid &amp; &lt;x&gt;" in svg
    assert "style=" not in svg and "<script" not in svg and "href" not in svg  # nothing the CSP would block
    assert time_series("empty", [], []).endswith("</svg>")
