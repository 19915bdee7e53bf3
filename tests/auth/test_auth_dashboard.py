"""The dashboard's sign-in view in Debian's Chromium, driven by Playwright, against an engine
process whose data folder contains users.

Playwright downloads no browser here: the test launches /usr/bin/chromium and is skipped when
it or Playwright's Python package is missing.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import scaled

from .auth_harness import add_user, remove_user, serving
from .conftest import USERS

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PASSWORDS = {name: password for name, _, password in USERS}


@pytest.fixture
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium package")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def base_url(data_dir: Path) -> Iterator[str]:
    """Start an engine on ``data_dir`` and return its HTTP address once /healthz responds."""
    with serving(data_dir) as process:
        url = f"http://127.0.0.1:{process.http_port}"
        deadline = time.monotonic() + scaled(15)
        while True:
            try:
                if httpx.get(url + "/healthz", trust_env=False).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"{url}/healthz did not answer in 15 s"
            time.sleep(0.05)
        yield url


def report(base_url: str, thing: str, **values: Any) -> None:
    """Update a thing's reported state over REST as the application user."""
    with httpx.Client(base_url=base_url, trust_env=False, timeout=scaled(10)) as client:
        token = client.post(
            "/auth/token", json={"username": "dashboard", "password": PASSWORDS["dashboard"]}
        ).json()["token"]
        response = client.post(
            f"/things/{thing}/shadow",
            json={"state": {"reported": values}},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert response.status_code == 200, response.text


def wait_for_user(base_url: str, name: str, password: str) -> None:
    """Wait until the engine accepts a new user, as it reads the users file once a second."""
    deadline = time.monotonic() + scaled(10)
    credentials = {"username": name, "password": password}
    while httpx.post(base_url + "/auth/token", json=credentials, trust_env=False).is_error:
        assert time.monotonic() < deadline, f"the engine did not accept user {name!r} in 10 s"
        time.sleep(0.05)


def sign_in(page: Any, username: str, password: str) -> None:
    page.fill("#login-username", username)
    page.fill("#login-password", password)
    page.click("#login-form button[type=submit]")


def test_dashboard_sign_in_and_out(browser: Any, base_url: str) -> None:
    from playwright.sync_api import expect

    timeout_ms = scaled(10) * 1000
    report(base_url, "press-1", temperature=21.5)
    report(base_url, "press-2", temperature=19.0)
    page = browser.new_page()
    page.set_default_timeout(timeout_ms)

    page.goto(base_url + "/")
    expect(page.locator("#login-form")).to_be_visible()
    expect(page.locator("#things")).to_have_count(0)
    expect(page.locator("#session")).to_be_hidden()

    sign_in(page, "dashboard", "wrong password")
    expect(page.locator("#login-message")).to_have_text("Wrong user name or password.")
    expect(page.locator("#things")).to_have_count(0)

    sign_in(page, "dashboard", PASSWORDS["dashboard"])
    expect(page.locator('#things tr[data-thing="press-1"]')).to_be_visible()
    expect(page.locator('#things tr[data-thing="press-2"]')).to_be_visible()
    expect(page.locator("#session-user")).to_have_text("dashboard (application)")
    cookies = {cookie["name"]: cookie for cookie in page.context.cookies()}
    session = cookies["ironshadow_session"]
    assert session["httpOnly"] is True
    assert session["sameSite"] == "Strict"
    # The cookie is out of reach of the page's scripts.
    assert "ironshadow_session" not in page.evaluate("document.cookie")

    # A reload keeps the session.
    page.reload()
    expect(page.locator('#things tr[data-thing="press-1"]')).to_be_visible()

    page.click("#sign-out")
    expect(page.locator("#login-form")).to_be_visible()
    expect(page.locator("#session")).to_be_hidden()
    assert "ironshadow_session" not in {cookie["name"] for cookie in page.context.cookies()}

    # A device lands on its own thing, and the feed and shadow requests it makes are allowed.
    sign_in(page, "press-1", PASSWORDS["press-1"])
    expect(page).to_have_url(base_url + "/#/thing/press-1")
    expect(page.locator('#reported tr[data-field="temperature"] td.value')).to_have_text("21.5")
    report(base_url, "press-1", temperature=22.5)
    expect(page.locator('#reported tr[data-field="temperature"] td.value')).to_have_text("22.5")
    expect(page.locator("#session-user")).to_have_text("press-1 (device)")

    # The OpenAPI page needs no sign-in and offers the bearer token scheme.
    page.goto(base_url + "/docs")
    expect(page.locator("button.authorize")).to_be_visible()
    page.close()


def test_dashboard_signs_out_removed_user(
    browser: Any, base_url: str, data_dir: Path
) -> None:
    from playwright.sync_api import expect

    timeout_ms = scaled(10) * 1000
    add_user(data_dir, "night-shift", "application", "night-shift-secret")
    wait_for_user(base_url, "night-shift", "night-shift-secret")
    page = browser.new_page()
    page.set_default_timeout(timeout_ms)
    page.goto(base_url + "/#/engine")
    sign_in(page, "night-shift", "night-shift-secret")
    expect(page.locator("#engine-mqtt")).to_have_text("0")

    remove_user(data_dir, "night-shift")

    expect(page.locator("#login-form")).to_be_visible()
    expect(page.locator("#login-message")).to_have_text(
        "Signed out: Revoked token: user 'night-shift' no longer exists. Get a new token from "
        "POST /auth/token or sign in again."
    )
    page.close()
