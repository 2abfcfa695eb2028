"""The operator's console in a real browser: Debian's headless Chromium driven by Selenium
(chromium and chromium-driver come from scripts/setup.sh), against a real gateway process on the
dev chain (its default configuration, budgets on because an admin token is set), paid by an agent
signing with the official x402 client.

One walk through: log in, find the agent, change its daily limit, see a paid call in the ledger
and its remaining budget drop, suspend it and see its next call refused, export the ledger. A
screenshot of every page is saved; the directory is printed."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import shutil
import time
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import pytest

from tests.budget_helpers import CHAT, CHAT_PRICE_OPG, Admin, derived, fund, opg_requirement, post, sign_payments
from tests.gateway_client import Processes

pytestmark = pytest.mark.e2e

TOKEN = "console-browser-token"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,900"]


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.fail("chromium / chromium-driver missing: run scripts/setup.sh")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path_factory.mktemp("console_downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium_profile')}"]:
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.implicitly_wait(0)
    driver.downloads = downloads
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def gateway(devchain_file: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    procs = Processes(devchain_file, tmp_path_factory.mktemp("console_browser"))
    try:
        upstream = procs.upstream()
        yield procs.gateway(upstream.url, "memory://", env={
            "BUDGETS_ADMIN_TOKEN": TOKEN, "GATEWAY_EXPLORER_TX_URL": "https://explorer.invalid/tx/{tx}"})
    finally:
        procs.stop_all()


def wait_for(check: Callable[[], Any], what: str, timeout_s: float = 10.0) -> Any:
    end = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_operator_steers_an_agent_in_the_console(browser: Any, gateway: Any, devchain: dict[str, Any],
                                                 tmp_path_factory: pytest.TempPathFactory) -> None:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.expected_conditions import staleness_of
    from selenium.webdriver.support.ui import WebDriverWait

    shots = tmp_path_factory.mktemp("console_screenshots")
    base = gateway.url + "/admin/console"
    agent = derived("console-agent")
    address = agent.address.lower()
    fund(devchain, agent)
    opg = devchain["tokens"]["OPG"]["address"].lower()
    admin = Admin(gateway.url, TOKEN)
    # The operator gave the agent a policy earlier (1 OPG a day, in group "team-a").
    asyncio.run(_put_policy(admin, address, devchain["network"], opg, 10**18))

    def shot(name: str) -> None:
        browser.save_screenshot(str(shots / f"{name}.png"))

    def text(css: str) -> str:
        return str(browser.find_element(By.CSS_SELECTOR, css).text)

    def navigates(action: Callable[[], Any]) -> None:
        """Click or submit, then wait until the browser has left the page (a form's answer may be
        slow: a wrong token waits on purpose) and the next one is loaded."""
        old = browser.find_element(By.TAG_NAME, "html")
        action()
        WebDriverWait(browser, 15).until(staleness_of(old))
        WebDriverWait(browser, 15).until(lambda b: b.execute_script("return document.readyState") == "complete")

    def text_becomes(css: str, expected: str) -> None:
        """After a click that posts a form, the old page may still be there: wait for the new one."""
        def seen() -> bool:
            try:
                return text(css) == expected
            except (StaleElementReferenceException, NoSuchElementException):
                return False
        wait_for(seen, f"{css} = {expected!r}")

    def call() -> Any:
        return asyncio.run(_paid_call(gateway.url, devchain, agent))

    # Log in (a wrong token first).
    browser.get(base + "/agents")
    assert browser.current_url.endswith("/admin/console/login")
    shot("login")
    browser.find_element(By.ID, "token").send_keys("wrong")
    navigates(browser.find_element(By.CSS_SELECTOR, "form button").click)
    assert "wrong admin token" in text("#token-error")
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    navigates(browser.find_element(By.CSS_SELECTOR, "form button").click)
    wait_for(lambda: browser.find_elements(By.ID, "volume"), "the overview")

    # Find the agent: search by part of its address.
    browser.get(base + "/agents")
    search = browser.find_element(By.ID, "q")
    search.send_keys(address[2:12])
    navigates(search.submit)
    rows = browser.find_elements(By.CSS_SELECTOR, "#agents tbody tr[data-agent]")
    assert [r.get_attribute("data-agent") for r in rows] == [address]
    assert "team-a" in rows[0].text and "1 OPG" in rows[0].text
    shot("agents")

    # Change its daily limit: a bad value first (shown inline), then 0.5 OPG.
    navigates(rows[0].find_element(By.CSS_SELECTOR, "th a").click)
    day = browser.find_element(By.ID, "OPG-limit_day")
    day.clear()
    day.send_keys("0.5x")
    navigates(day.submit)
    assert "a number of tokens" in text("#OPG-limit_day-error")
    assert browser.find_element(By.ID, "OPG-limit_day").get_attribute("aria-invalid") == "true"
    day = browser.find_element(By.ID, "OPG-limit_day")
    day.clear()
    day.send_keys("0.5")
    navigates(day.submit)
    assert "policy saved" in text("[role=status]")
    assert "0 OPG of 0.5 OPG" in text("#budgets") and "0.5 OPG left" in text("#budgets")
    assert asyncio.run(admin.usage(address))["limit"] == 5 * 10**17

    # Its group gets a budget of its own (2 OPG a day), from the group's page.
    browser.get(base + "/groups/team-a")
    browser.find_element(By.XPATH, "//summary[contains(., 'OPG')]").click()
    group_day = browser.find_element(By.ID, "OPG-limit_day")
    group_day.send_keys("2")
    navigates(group_day.submit)
    assert "policy saved" in text("[role=status]")

    # A paid call: it appears in the ledger, and the remaining budget drops by its price.
    reply = call()
    assert reply.status == 200, reply
    tx = reply.settle.transaction
    asyncio.run(admin.wait_usage(address, spent=CHAT_PRICE_OPG))
    browser.get(f"{base}/ledger?agent={address}")
    row = browser.find_element(By.CSS_SELECTOR, f"#ledger tr[data-agent='{address}']")
    assert "0.005 OPG" in row.text and str(CHAT_PRICE_OPG) in row.text and "POST /v1/chat/completions" in row.text
    link = row.find_element(By.CSS_SELECTOR, "a[href^='https://explorer.invalid/tx/']")
    assert link.get_attribute("href") == f"https://explorer.invalid/tx/{tx}"
    shot("ledger")
    browser.get(f"{base}/agents/{address}")
    assert "0.495 OPG left" in text("#budgets") and "0.005 OPG of 2 OPG; 1.995 OPG left" in text("#budgets")
    assert tx[:10] in text("#recent-calls")

    # Suspend it: its next call is refused, and the refusal shows on its page.
    navigates(browser.find_element(By.CSS_SELECTOR, "button[aria-label^='Suspend']").click)
    text_becomes("#agent-state", "suspended")
    refused = call()
    assert refused.status == 402 and refused.error == "agent_suspended", refused
    browser.get(f"{base}/agents/{address}")
    wait_for(lambda: "agent_suspended" in text("#recent-refusals") or browser.refresh(), "the refusal")
    shot("agent")

    # Export the ledger (CSV, through the admin API's export).
    browser.get(f"{base}/ledger?agent={address}")
    browser.find_element(By.ID, "export-csv").click()
    exported = wait_for(lambda: list(browser.downloads.glob("ledger-*.csv")), "the CSV download")
    rows_csv = list(csv.DictReader(io.StringIO(exported[0].read_text())))
    assert [(r["agent"].lower(), r["amount"], r["tx_hash"]) for r in rows_csv] == [(address, str(CHAT_PRICE_OPG), tx)]

    # The other pages render, and are screenshot.
    for name, path in [("overview", "/"), ("groups", "/groups"), ("group", "/groups/team-a"), ("settlements", "/settlements"),
                       ("reconciliation", "/reconciliation")]:
        browser.get(base + path)
        assert browser.find_element(By.TAG_NAME, "h1").text
        shot(name)
    browser.get(base + "/")
    assert "OPG" in text("#main table") and browser.find_elements(By.CSS_SELECTOR, "svg.chart polyline")
    browser.get(base + "/groups")
    assert address in text("#main") and "team-a" in text("#main") and "day 2 OPG" in text("#main")
    browser.get(base + "/reconciliation")
    # the last day's blocks against the ledger, per asset (the in-process facilitator's chain)
    assert "OPG" in text("#reconcile") and "blocks " in text("#reconcile"), text("#main")
    shot("reconciliation")
    browser.set_window_size(390, 844)  # a phone
    browser.get(base + "/")
    shot("overview-phone")
    assert browser.execute_script("return document.documentElement.scrollWidth") <= 390 + 1
    browser.set_window_size(1280, 900)
    out = os.environ.get("CONSOLE_SCREENSHOTS")  # e.g. build/console: kept beyond the test run
    if out:
        shutil.copytree(shots, out, dirs_exist_ok=True)
    print(f"\nconsole screenshots: {shots}" + (f" (copied to {out})" if out else ""))


async def _put_policy(admin: Admin, agent: str, network: str, asset: str, daily: int) -> None:
    from budgets.admin_client import AdminClient, Owner

    async with AdminClient(admin.base, admin.token) as client:
        await client.put_policy(Owner.agent(agent), network, asset,
                                {"limits": [{"period": "day", "amount": str(daily)}], "group": "team-a"})


async def _paid_call(url: str, devchain: dict[str, Any], agent: Any) -> Any:
    requirement = await opg_requirement(url + CHAT, devchain)
    [payment] = await sign_payments(agent, requirement, 1, url + CHAT)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        return await post(http, url + CHAT, payment=payment)
