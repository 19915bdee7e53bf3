"""Measure how long a reported value takes to appear in the dashboard's thing view.

The script starts ``ironshadow serve`` on free loopback ports (default embedded stores in a
temporary data folder), opens the thing view of one device in Debian's Chromium through
Playwright, and then, ``--samples`` times, publishes a new reported temperature for that
device over MQTT and waits until the page shows it. The latency of a sample is the time from
just before the PUBLISH is written to the moment a MutationObserver in the page sees the new
text; both ends read the same wall clock, so the figure covers the whole path: MQTT, shadow
update, write-behind store, ``/ws`` feed, and the page's rendering.

Samples are at least ``--gap`` apart (default 0.5 s), more than the feed's default
coalescing interval (1 / 4 s per shadow), so that the figure shows the path and not the
deliberate coalescing delay. With ``--load-devices N`` the samples run a second time while
``ironshadow swarm`` keeps N other devices reporting at ``--load-frequency``.

Usage (from the repository root)::

    .venv/bin/python benchmarks/dashboard.py --samples 100 --load-devices 2000
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from support import (
    BenchmarkError,
    RunningBroker,
    add_ironshadow_cmd_argument,
    find_free_port,
    format_table,
    make_ironshadow_spec,
    positive_float,
    positive_int,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
THING = "dashboard-probe"
CELL = '#reported tr[data-field="temperature"] td.value'

# Records, for each text the temperature cell shows, the wall-clock time (epoch
# milliseconds) at which it first appeared.
OBSERVER = """
(selector) => {
  window.probeSeen = {};
  const note = () => {
    const cell = document.querySelector(selector);
    if (cell && !(cell.textContent in window.probeSeen)) {
      window.probeSeen[cell.textContent] = performance.timeOrigin + performance.now();
    }
  };
  new MutationObserver(note).observe(document.body,
    {subtree: true, childList: true, characterData: true});
  note();
}
"""


def report(device: paho.Client, value: float) -> None:
    payload = json.dumps({"state": {"reported": {"temperature": value}}})
    device.publish(f"$aws/things/{THING}/shadow/update", payload, qos=1).wait_for_publish(10)


def measure(page: Any, device: paho.Client, samples: int, gap_s: float, first: int) -> list[float]:
    """Return the latency of each sample in milliseconds."""
    latencies = []
    for index in range(samples):
        # Distinct values that the page prints as they are written (below 1,000, so no
        # thousands separator, and with two decimals).
        value = first + index + 0.25
        sent_ms = time.time() * 1000
        report(device, value)
        text = json.dumps(str(value))
        handle = page.wait_for_function(f"window.probeSeen[{text}]", timeout=30_000)
        latencies.append(handle.json_value() - sent_ms)
        time.sleep(gap_s)
    return latencies


def summary(name: str, latencies: list[float]) -> list[str]:
    ordered = sorted(latencies)

    def at(share: float) -> float:
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))]

    return [
        name,
        str(len(ordered)),
        f"{statistics.median(ordered):.1f}",
        f"{at(0.95):.1f}",
        f"{at(0.99):.1f}",
        f"{ordered[-1]:.1f}",
    ]


def start_swarm(mqtt_port: int, devices: int, frequency: str) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "ironshadow", "swarm",
        "--port", str(mqtt_port),
        "--devices", str(devices),
        "--frequency", frequency,
        "--duration", "60m",
        "--json",
    ]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=positive_int, default=100)
    parser.add_argument("--gap", type=positive_float, default=0.5, help="seconds between samples")
    parser.add_argument("--load-devices", type=int, default=0,
                        help="also measure while this many swarm devices report")
    parser.add_argument("--load-frequency", default="1s")
    parser.add_argument("--warm-up", type=positive_float, default=5.0,
                        help="seconds of swarm load before the loaded samples")
    add_ironshadow_cmd_argument(parser)
    args = parser.parse_args()
    if not CHROMIUM.exists():
        raise BenchmarkError(f"{CHROMIUM} is missing: install Debian's chromium package")
    from playwright.sync_api import sync_playwright

    http_port = find_free_port()
    spec = make_ironshadow_spec(args.ironshadow_cmd, f"--http-port {http_port}")
    rows = []
    with RunningBroker(
        spec, start_timeout_s=30, stop_timeout_s=30, tempdir_prefix="dashboard"
    ) as broker, sync_playwright() as playwright:
        device = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=THING)
        device.connect("127.0.0.1", broker.port)
        device.loop_start()
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            report(device, 0.5)
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{http_port}/#/thing/{THING}")
            page.wait_for_selector(CELL, timeout=30_000)
            page.evaluate(OBSERVER, CELL)
            rows.append(summary("idle", measure(page, device, args.samples, args.gap, 0)))
            if args.load_devices:
                swarm = start_swarm(broker.port, args.load_devices, args.load_frequency)
                try:
                    time.sleep(args.warm_up)
                    if swarm.poll() is not None:
                        raise BenchmarkError(f"ironshadow swarm exited with {swarm.returncode}")
                    latencies = measure(page, device, args.samples, args.gap, 500)
                    name = f"{args.load_devices} devices every {args.load_frequency}"
                    rows.append(summary(name, latencies))
                finally:
                    swarm.terminate()
                    swarm.wait(30)
            broker.check_running()
        finally:
            browser.close()
            device.loop_stop()
            device.disconnect()
    columns = [("load", 28), ("samples", 8), ("p50 ms", 8), ("p95 ms", 8), ("p99 ms", 8),
               ("max ms", 8)]
    print(format_table(columns, rows))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchmarkError as error:
        print(f"dashboard.py: error: {error}", file=sys.stderr)
        sys.exit(1)
