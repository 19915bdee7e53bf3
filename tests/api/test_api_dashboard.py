"""The web dashboard: its files and /api/engine over HTTP, and the three views in a browser.

The browser test drives Debian's Chromium (``apt-get install chromium``) with Playwright's
Python package and downloads no browser. It is skipped when either is missing. With
``IRONSHADOW_DASHBOARD_SCREENSHOTS=DIR`` set, it saves a PNG of each view into DIR.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_harness import EngineApiThread, http_client, running_engine

from conftest import (
    free_port,
    kill_worker_repeatedly,
    logged_worker_pids,
    name_owned_by,
    scaled,
)
from ironshadow.engine import StorageConfig
from mqtt_client import TestClient

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
SCREENSHOT_DIR = os.environ.get("IRONSHADOW_DASHBOARD_SCREENSHOTS")


def test_dashboard_page_and_files() -> None:
    with running_engine() as engine, http_client(engine) as client:
        page = client.get("/")
        script = client.get("/static/app.js")
        chart_library = client.get("/static/vendor/uPlot.esm.js")
        icon = client.get("/static/icon.svg")
        missing = client.get("/static/nothing.js")

    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="/static/app.js">' in page.text
    assert script.status_code == 200
    assert "javascript" in script.headers["content-type"]
    assert chart_library.status_code == 200
    assert '<link rel="icon" type="image/svg+xml" href="/static/icon.svg">' in page.text
    assert icon.status_code == 200
    assert icon.headers["content-type"] == "image/svg+xml"
    assert missing.status_code == 404


def test_dashboard_loads_nothing_from_other_hosts() -> None:
    static = Path(__file__).parents[2] / "src" / "ironshadow" / "api" / "static"
    own_files = [
        path for path in static.rglob("*") if path.is_file() and "vendor" not in path.parts
    ]
    assert own_files
    for path in own_files:
        # The SVG namespace names the format; nothing is loaded from it.
        text = path.read_text().replace('xmlns="http://www.w3.org/2000/svg"', "")
        assert "http://" not in text, path
        assert "https://" not in text, path


def test_engine_status_counts_clients_and_updates(tmp_path: Path) -> None:
    with running_engine(storage=StorageConfig(tmp_path)) as engine, http_client(engine) as client:
        TestClient(engine.mqtt_port, client_id="mill-1")
        update = {"state": {"reported": {"rpm": 900}}}
        assert client.post("/things/mill-1/shadow", json=update).status_code == 200
        response = client.get("/api/engine")
        status = response.json()

    assert response.headers["Cache-Control"] == "no-store"
    assert status["connections"]["mqtt"] == 1
    assert status["connections"]["offlineSessions"] == 0
    assert status["counters"]["shadowUpdates"] == 1
    assert status["readingPaused"] is False
    assert status["store"]["pressure"] is False
    assert status["store"]["pendingWrites"] >= 0
    assert status["historyKept"] is True


def test_engine_status_memory_only_has_no_store() -> None:
    with running_engine() as engine, http_client(engine) as client:
        status = client.get("/api/engine").json()
        schema = client.get("/openapi.json").json()

    assert status["store"] is None
    assert status["historyKept"] is False
    assert schema["paths"]["/api/engine"]["get"]["operationId"] == "GetEngineStatus"
    assert "/" not in schema["paths"]


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


def report(device: TestClient, thing: str, **values: Any) -> None:
    payload = json.dumps({"state": {"reported": values}})
    device.publish(f"$aws/things/{thing}/shadow/update", payload, qos=1)


def screenshot(page: Any, name: str) -> None:
    if SCREENSHOT_DIR:
        page.screenshot(path=str(Path(SCREENSHOT_DIR) / f"dashboard-{name}.png"), full_page=True)


def test_dashboard_views_follow_mqtt_device(browser: Any, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    timeout_ms = scaled(10) * 1000
    with running_engine(storage=StorageConfig(tmp_path)) as engine:
        # Neighbours, so that the fleet view has more than one row.
        for number, temperature in ((1, 61.5), (3, 58.0)):
            neighbour = TestClient(engine.mqtt_port, client_id=f"press-{number}")
            report(neighbour, f"press-{number}", temperature=temperature, speed=2)
        # An offline device: it reported once, so the engine keeps its shadow.
        offline = TestClient(engine.mqtt_port, client_id="press-4")
        report(offline, "press-4", temperature=40.0)
        offline.disconnect()

        device = TestClient(engine.mqtt_port, client_id="press-2")
        device.subscribe("$aws/things/press-2/shadow/update/delta", qos=1)
        report(device, "press-2", temperature=20.5, speed=1)

        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.set_default_timeout(timeout_ms)
        page.goto(_url(engine, "/"))

        row = page.locator('#things tr[data-thing="press-2"]')
        expect(row.locator("td.status")).to_have_text("connected", timeout=timeout_ms)
        expect(page.locator('#things tr[data-thing="press-4"] td.status')).to_have_text(
            "offline", timeout=timeout_ms
        )
        expect(row.locator("td.delta-marker")).to_have_text("")

        row.locator("a").click()
        reported = page.locator('#reported tr[data-field="temperature"] td.value')
        expect(reported).to_have_text("20.5", timeout=timeout_ms)
        expect(page.locator("#shadow-version")).to_have_text("shadow version 1")

        report(device, "press-2", temperature=23.0)
        expect(reported).to_have_text("23", timeout=timeout_ms)
        expect(page.locator('[data-chart="temperature"] canvas')).to_have_count(1)

        page.fill("#desired-field", "speed")
        page.fill("#desired-value", "3")
        page.click("#desired-form button[type=submit]")
        delta = device.expect(10)
        assert json.loads(delta.payload)["state"] == {"speed": 3}
        expect(page.locator("#desired-message")).to_have_text("Accepted: version 3")
        expect(page.locator('#delta tr[data-field="speed"] td.value')).to_have_text(
            "3", timeout=timeout_ms
        )

        # An update the shadow service rejects shows its message.
        page.fill("#desired-field", "a.b.c.d.e.f.g")
        page.click("#desired-form button[type=submit]")
        expect(page.locator("#desired-message")).to_contain_text(
            "Rejected (400)", timeout=timeout_ms
        )
        screenshot(page, "thing")

        page.click('header a[data-view="fleet"]')
        expect(row.locator("td.delta-marker")).to_have_text("● pending", timeout=timeout_ms)
        page.fill("#prefix", "press-4")
        expect(page.locator("#things tr[data-thing]")).to_have_count(1, timeout=timeout_ms)
        page.fill("#prefix", "")
        page.select_option("#status", "connected")
        expect(page.locator("#things tr[data-thing]")).to_have_count(3, timeout=timeout_ms)
        page.select_option("#status", "all")
        expect(page.locator("#things tr[data-thing]")).to_have_count(4, timeout=timeout_ms)
        screenshot(page, "fleet")

        page.click('header a[data-view="engine"]')
        expect(page.locator("#engine-mqtt")).to_have_text("3", timeout=timeout_ms)
        expect(page.locator("#engine-pressure")).to_have_text("normal", timeout=timeout_ms)
        # Rates appear from the second reading on; until then the card shows a placeholder.
        expect(page.locator("#engine-received")).to_have_text(
            re.compile(r"^[0-9.,]+$"), timeout=timeout_ms
        )
        if SCREENSHOT_DIR:
            # Traffic for the chart of the picture; the test itself needs none.
            for step in range(20):
                report(device, "press-2", temperature=23.0 + step / 10)
                page.wait_for_timeout(250)
        screenshot(page, "engine")
        page.close()


@dataclass
class Workers:
    """``ironshadow serve --workers 2`` in a subprocess, with its log in a file."""

    mqtt_port: int
    base_url: str
    log_path: Path


@contextlib.contextmanager
def two_workers(tmp_path: Path, *flags: str) -> Iterator[Workers]:
    """Start ``ironshadow serve --workers 2`` on free ports, wait until its HTTP port replies,
    and check that it stops cleanly on SIGTERM afterwards."""
    mqtt_port, http_port = free_port(), free_port()
    log_path = tmp_path / "engine.log"
    with log_path.open("wb") as log:
        engine = subprocess.Popen(
            [
                sys.executable, "-m", "ironshadow", "serve",
                "--workers", "2",
                "--mqtt-port", str(mqtt_port),
                "--http-port", str(http_port),
                "--data-dir", str(tmp_path / "data"),
                *flags,
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            base_url = f"http://127.0.0.1:{http_port}"
            _wait_for_http(base_url, engine)
            yield Workers(mqtt_port, base_url, log_path)
        finally:
            engine.terminate()
            assert engine.wait(scaled(30)) == 0


def test_engine_view_lists_workers(browser: Any, tmp_path: Path) -> None:
    """With two worker processes the engine view adds up the workers and shows each one's
    clients in a row of its own, and marks a worker that does not reply."""
    from playwright.sync_api import expect

    timeout_ms = scaled(10) * 1000
    with two_workers(tmp_path, "--memory-only") as engine:
        mqtt_port, base_url, log_path = engine.mqtt_port, engine.base_url, engine.log_path
        # A plain TCP client is handed to the worker that owns its id: two on worker 0,
        # one on worker 1.
        owners = [0, 0, 1]
        names = [name_owned_by(owner, 2, f"lathe{number}") for number, owner in enumerate(owners)]
        for name in names:
            TestClient(mqtt_port, client_id=name)

        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(timeout_ms)
        page.goto(base_url + "/#/engine")
        expect(page.locator("#engine-mqtt")).to_have_text("3", timeout=timeout_ms)
        rows = page.locator("#workers tr[data-worker]")
        expect(rows).to_have_count(2, timeout=timeout_ms)
        for worker in (0, 1):
            row = page.locator(f'#workers tr[data-worker="{worker}"]')
            expect(row.locator("td.clients")).to_have_text(str(owners.count(worker)))
            expect(row.locator("td.pressure")).to_have_text("normal")
            # Rates appear from the second reading on.
            expect(row.locator("td.received")).to_have_text(
                re.compile(r"^[0-9.,]+$"), timeout=timeout_ms
            )
        screenshot(page, "engine-workers")

        # Worker 1 stays down for 8 s after five exits in a row.
        assert kill_worker_repeatedly(log_path.read_text, 1, 5) == 8.0
        row = page.locator('#workers tr[data-worker="1"]')
        expect(row.locator("td.pressure")).to_have_text("not replying")
        expect(row.locator("td.clients")).to_have_text("\u2013")
        expect(page.locator("p.message.error")).to_have_text(
            "Worker 1 did not reply (restarting or stuck); the figures leave it out."
        )
        expect(page.locator('#workers tr[data-worker="0"] td.pressure')).to_have_text("normal")
        screenshot(page, "engine-worker-down")

        # The fleet view lists worker 0's things and reports that worker 1's are missing.
        page.click('header a[data-view="fleet"]')
        notice = page.locator("#fleet-notice")
        expect(notice).to_contain_text(
            "Worker 1 did not respond, so its things are missing from this list. Worker 1: no "
            "bus link to it is open"
        )
        expect(page.locator("#things tbody tr[data-thing]")).to_have_count(2)
        for name in names[:2]:
            expect(page.locator(f'#things tr[data-thing="{name}"]')).to_have_count(1)
        screenshot(page, "fleet-worker-down")
        # Worker 1 comes back without its thing: the memory-only engine forgot the client.
        expect(notice).to_have_text("", timeout=2 * timeout_ms)
        expect(page.locator("#things tbody tr[data-thing]")).to_have_count(2)
        page.click('header a[data-view="engine"]')

        # With every worker stopped, the page reports each reading given up after 5 s.
        row = page.locator('#workers tr[data-worker="1"]')
        expect(row.locator("td.pressure")).to_have_text("normal", timeout=2 * timeout_ms)
        pids = [logged_worker_pids(log_path.read_text(), worker)[-1] for worker in (0, 1)]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            expect(page.locator("p.message.error")).to_contain_text(
                "Reading /api/engine failed: no reply within 5 s (figures below from",
                timeout=timeout_ms,
            )
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        expect(page.locator("p.message.error")).to_have_text("", timeout=timeout_ms)

        page.close()

        # The thing view of a stopped worker's thing shows why it is empty. The page is
        # loaded in a new browser context (its own connections) while worker 0 is stopped,
        # so that its connections are worker 1's.
        os.kill(pids[0], signal.SIGSTOP)
        try:
            page = browser.new_context().new_page()
            page.set_default_timeout(timeout_ms)
            page.goto(base_url + f"/#/thing/{names[2]}")
            # Worker 1 forgot the thing at its restart. The 404 shows below the heading.
            expect(page.locator(".status")).to_have_text("unknown", timeout=timeout_ms)
            expect(page.locator("#thing-notice.muted")).to_have_text(
                f"Thing not found: '{names[2]}' has no shadow and has never connected"
            )
        finally:
            os.kill(pids[0], signal.SIGCONT)
        stopped = pids[1]
        os.kill(stopped, signal.SIGSTOP)
        try:
            # A read over a connection of worker 1 waits 5 s and closes it. The browser may
            # hold up to 6 such connections to the host, and a read after them goes over a
            # new connection, which worker 0 accepts: up to 6 times 5 s and the 2 s refresh.
            expect(page.locator("#thing-notice")).to_have_text(
                re.compile(
                    f"Reading the thing failed: Thing '{names[2]}' belongs to worker 1, which "
                    r"did not respond: (no reply within 4 s|it has not run for \d+ s \(stopped "
                    r"or stuck\))\. Retry the request shortly\."
                ),
                timeout=6 * timeout_ms,
            )
            expect(page.locator(".status")).to_have_text("unavailable")
            expect(page.locator("#thing-notice.error")).to_have_count(1)
            # The heading contains the name, the status and the shadow version only.
            expect(page.locator("h1")).to_have_text(f"{names[2]} unavailable  no shadow yet")
        finally:
            os.kill(stopped, signal.SIGCONT)
        expect(page.locator("#thing-notice.muted")).to_contain_text(
            "has no shadow and has never connected", timeout=timeout_ms
        )
        expect(page.locator(".status")).to_have_text("unknown")
        page.close()


def test_thing_view_recovers_after_owner_stop(browser: Any, tmp_path: Path) -> None:
    """A thing view opened while the thing's worker is stopped shows why it is empty, and
    reads the shadow and the history again by itself once the worker runs."""
    from playwright.sync_api import expect

    timeout_ms = scaled(10) * 1000
    with two_workers(tmp_path) as engine:
        mqtt_port, base_url, log_path = engine.mqtt_port, engine.base_url, engine.log_path
        thing = name_owned_by(1, 2, "oven")
        device = TestClient(mqtt_port, client_id=thing)
        report(device, thing, temperature=21)  # QoS 1: stored once acknowledged
        device.close()

        pid = logged_worker_pids(log_path.read_text(), 1)[-1]
        os.kill(pid, signal.SIGSTOP)
        try:
            # Once worker 1 counts as stopped, worker 0 rejects its requests with 503 at once.
            deadline = time.monotonic() + scaled(20)
            while "has not run its event loop" not in log_path.read_text():
                assert time.monotonic() < deadline, "the supervisor did not log worker 1"
                time.sleep(0.1)
            page = browser.new_page()
            page.set_default_timeout(timeout_ms)
            page.goto(base_url + f"/#/thing/{thing}")
            expect(page.locator(".status")).to_have_text("unavailable")
            expect(page.locator("#thing-notice.error")).to_contain_text("belongs to worker 1")
            expect(page.locator("section p.muted")).to_contain_text("History not loaded: ")
        finally:
            os.kill(pid, signal.SIGCONT)
        cell = page.locator('#reported tr[data-field="temperature"] td.value')
        expect(cell).to_have_text("21", timeout=timeout_ms)
        expect(page.locator("section p.muted")).to_have_text(
            "History of the last 60 minutes, then live."
        )
        expect(page.locator('[data-chart="temperature"]')).to_have_count(1)
        expect(page.locator("#thing-notice")).to_have_text("")
        page.close()


def _wait_for_http(base_url: str, engine: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + scaled(20)
    while time.monotonic() < deadline:
        assert engine.poll() is None, f"the engine exited with {engine.returncode}"
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(base_url + "/api/engine", timeout=2, trust_env=False).is_success:
                return
        time.sleep(0.1)
    raise AssertionError(f"{base_url} did not answer within 20 s")


def _url(engine: EngineApiThread, path: str) -> str:
    return engine.base_url + path


def test_thing_view_shows_named_shadows(browser: Any) -> None:
    from playwright.sync_api import expect

    timeout_ms = scaled(10) * 1000
    with running_engine() as engine:
        device = TestClient(engine.mqtt_port, client_id="mill-5")
        named = "$aws/things/mill-5/shadow/name/spindle"
        device.subscribe(f"{named}/update/delta", qos=1)
        report(device, "mill-5", temperature=30.0)
        payload = json.dumps({"state": {"reported": {"rpm": 1200}}})
        device.publish(f"{named}/update", payload, qos=1)

        page = browser.new_page()
        page.set_default_timeout(timeout_ms)
        failed: list[str] = []

        def note_failure(response: Any) -> None:
            if not response.ok:
                failed.append(response.url)

        page.on("response", note_failure)
        page.goto(_url(engine, "/#/thing/mill-5"))
        expect(page.locator('#reported tr[data-field="temperature"] td.value')).to_have_text("30")
        # The engine keeps shadows in memory only, so the page does not ask for history.
        expect(page.locator("section p.muted")).to_have_text(
            "No history: the engine runs with --memory-only true, so the charts start now."
        )
        menu = page.locator("#shadow-name")
        expect(menu.locator("option")).to_have_text(["classic", "spindle"])

        menu.select_option("spindle")
        expect(page).to_have_url(re.compile(r"#/thing/mill-5/shadow/spindle$"))
        rpm = page.locator('#reported tr[data-field="rpm"] td.value')
        expect(rpm).to_have_text("1200")
        expect(page.locator('#reported tr[data-field="temperature"]')).to_have_count(0)

        # A change of the named shadow arrives over the feed; one of the classic shadow
        # does not show here.
        report(device, "mill-5", temperature=31.0)
        payload = json.dumps({"state": {"reported": {"rpm": 1500}}})
        device.publish(f"{named}/update", payload, qos=1)
        expect(rpm).to_have_text("1500")
        expect(page.locator("#shadow-version")).to_have_text("shadow version 2")

        # The form sets desired values of the named shadow.
        page.fill("#desired-field", "rpm")
        page.fill("#desired-value", "1800")
        page.click("#desired-form button[type=submit]")
        delta = device.expect(10)
        assert delta.topic == f"{named}/update/delta"
        assert json.loads(delta.payload)["state"] == {"rpm": 1800}
        page.close()
    assert failed == []


def test_openapi_page_renders_from_vendored_files(browser: Any) -> None:
    from playwright.sync_api import expect

    with running_engine() as engine:
        page = browser.new_page()
        other_hosts = []
        page.on(
            "request",
            lambda request: other_hosts.append(request.url)
            if not request.url.startswith(engine.base_url)
            else None,
        )
        page.goto(_url(engine, "/docs"))
        # Swagger UI draws one block per operation once it has read /openapi.json.
        operation = page.locator(".opblock-summary-path", has_text="/things/{thing}/shadow")
        expect(operation.first).to_be_visible(timeout=scaled(10) * 1000)
        page.close()
    assert other_hosts == []


def test_chart_spans_a_minute_at_first(browser: Any) -> None:
    """A chart with one point, or points within a minute, shows the last minute rather
    than the span that uPlot picks for a single time."""
    with running_engine() as engine:
        page = browser.new_page()
        page.goto(_url(engine, "/"))
        spans = page.evaluate(
            """async () => {
                const { TimeChart } = await import("/static/chart.js");
                const box = document.createElement("div");
                document.body.append(box);
                const chart = new TimeChart(box, "test", ["a"], 100);
                const span = async () => {
                    await new Promise((done) => requestAnimationFrame(done));
                    return [chart.plot.scales.x.min, chart.plot.scales.x.max];
                };
                chart.append(1000, [5]);
                const one = await span();
                chart.append(1010, [null]);
                chart.append(1020, [6]);
                const three = await span();
                chart.append(1200, [7]);
                const wide = await span();
                chart.destroy();
                return { one, three, wide };
            }"""
        )
        page.close()
    assert spans["one"] == [940, 1000]
    assert spans["three"] == [960, 1020]
    assert spans["wide"] == [1000, 1200]
