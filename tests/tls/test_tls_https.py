"""``ironshadow serve`` with a certificate: HTTPS for the REST API, wss for the /ws feed and
for MQTT over WebSocket, and MQTT over TLS beside them, all in one engine process."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from websockets.sync.client import connect

from conftest import free_port, scaled
from mqtt_client import V5, TestClient

from .certificates import Certificates


@dataclass
class EngineProcess:
    process: subprocess.Popen[str]
    mqtt_port: int
    http_port: int
    tls_port: int
    lines: list[str]  # output lines so far, appended by a reader thread

    def wait_for_line(self, text: str) -> str:
        """Return the first output line that contains ``text``, waiting up to 10 s for it."""
        deadline = time.monotonic() + scaled(10)
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if text in line:
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no output line contains {text!r}:\n" + "".join(self.lines))


def wait_for_port(port: int) -> None:
    deadline = time.monotonic() + scaled(15)
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on port {port} after 15 s")


@pytest.fixture(scope="module")
def engine(
    tmp_path_factory: pytest.TempPathFactory, certificates: Certificates
) -> Iterator[EngineProcess]:
    """An engine process with TLS on, shared by the tests of this module."""
    data_dir = tmp_path_factory.mktemp("tls-engine") / "data"
    mqtt_port, http_port, tls_port = free_port(), free_port(), free_port()
    process = subprocess.Popen(
        [
            sys.executable, "-m", "ironshadow", "serve", "--memory-only", "true",
            "--data-dir", str(data_dir),
            "--mqtt-port", str(mqtt_port), "--http-port", str(http_port),
            "--tls-port", str(tls_port),
            "--tls-cert", str(certificates.server.cert),
            "--tls-key", str(certificates.server.key),
            "--tls-ca", str(certificates.ca),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    running = EngineProcess(process, mqtt_port, http_port, tls_port, [])
    assert process.stdout is not None
    reader = threading.Thread(target=lambda: running.lines.extend(process.stdout), daemon=True)
    reader.start()
    try:
        wait_for_port(http_port)
        yield running
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(scaled(15))
        reader.join(scaled(5))
        process.stdout.close()


@pytest.fixture
def trusting(certificates: Certificates) -> ssl.SSLContext:
    """A client context that trusts the test CA."""
    return ssl.create_default_context(cafile=str(certificates.ca))


def boiler(engine: EngineProcess, certificates: Certificates) -> TestClient:
    """Connect device boiler-7 over TLS with its client certificate.

    The engine admits a device with a certificate only under the certificate's thing name.
    """
    client = TestClient(engine.tls_port, "boiler-7", V5, connect=False)
    client.client.tls_set(
        ca_certs=str(certificates.ca),
        certfile=str(certificates.device.cert),
        keyfile=str(certificates.device.key),
    )
    client.connect()
    return client


def test_https_healthz(engine: EngineProcess, trusting: ssl.SSLContext) -> None:
    url = f"https://127.0.0.1:{engine.http_port}/healthz"

    with httpx.Client(verify=trusting, trust_env=False, timeout=scaled(10)) as http:
        response = http.get(url)

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_https_rejects_plain_http_and_unknown_server(engine: EngineProcess) -> None:
    with httpx.Client(trust_env=False, timeout=scaled(10)) as http:
        with pytest.raises(httpx.TransportError):
            http.get(f"http://127.0.0.1:{engine.http_port}/healthz")
        # The default context trusts the system's CAs only, not the test CA.
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            http.get(f"https://127.0.0.1:{engine.http_port}/healthz")


def test_https_feed_over_wss(
    engine: EngineProcess, certificates: Certificates, trusting: ssl.SSLContext
) -> None:
    url = f"wss://127.0.0.1:{engine.http_port}/ws"
    device = boiler(engine, certificates)
    try:
        with connect(url, ssl=trusting, open_timeout=scaled(10)) as websocket:
            websocket.send(json.dumps({"subscribe": ["boiler-7"]}))
            reply = json.loads(websocket.recv(timeout=scaled(10)))
            update = {"state": {"reported": {"pressure": 2.5}}}
            device.publish("$aws/things/boiler-7/shadow/update", json.dumps(update), qos=1)
            frame = json.loads(websocket.recv(timeout=scaled(10)))
    finally:
        device.close()

    assert reply == {"subscriptions": ["boiler-7"]}
    assert frame["thing"] == "boiler-7"
    assert frame["state"]["reported"] == {"pressure": 2.5}


def test_https_mqtt_over_wss(engine: EngineProcess, certificates: Certificates) -> None:
    listener = TestClient(engine.mqtt_port, "listener", V5)
    browser = TestClient(engine.http_port, "browser-1", V5, transport="websockets", connect=False)
    browser.client.tls_set(ca_certs=str(certificates.ca))
    try:
        listener.subscribe("hall/#", qos=1)
        browser.connect()
        browser.publish("hall/lights", b"on", qos=1)
        message = listener.expect()
    finally:
        browser.close()
        listener.close()

    assert message.topic == "hall/lights"
    assert message.payload == b"on"


def test_https_start_up_log(engine: EngineProcess) -> None:
    api = engine.wait_for_line("REST API listening on")
    mqtt_tls = engine.wait_for_line("MQTT TLS listener open on")

    assert f"REST API listening on https://127.0.0.1:{engine.http_port}," in api
    assert f"MQTT TLS listener open on 127.0.0.1:{engine.tls_port}; client certificates" in (
        mqtt_tls
    )
