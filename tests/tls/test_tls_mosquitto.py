"""The MQTT TLS listener with Mosquitto's clients: ``mosquitto_pub`` and ``mosquitto_sub``
with ``--cafile --cert --key``, as separate processes over loopback."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from conftest import BrokerThread, scaled

from .certificates import Certificates, KeyPair

pytestmark = pytest.mark.skipif(
    shutil.which("mosquitto_sub") is None or shutil.which("mosquitto_pub") is None,
    reason="mosquitto_pub and mosquitto_sub are not installed",
)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    """Collect started processes and kill any still running after the test."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.communicate()


def tls_options(broker: BrokerThread, certificates: Certificates, pair: KeyPair) -> list[str]:
    return [
        "-h", "127.0.0.1", "-p", str(broker.config.tls_port),
        "--cafile", str(certificates.ca), "--cert", str(pair.cert), "--key", str(pair.key),
    ]


def wait_for_subscription(broker: BrokerThread, client_id: str, topic_filter: str) -> None:
    def subscribed() -> bool:
        session = broker.broker.sessions.get(client_id)
        return session is not None and topic_filter in session.subscriptions

    deadline = time.monotonic() + scaled(10)
    while not broker.call(subscribed):
        assert time.monotonic() < deadline, f"{client_id} did not subscribe within 10 s"
        time.sleep(0.02)


@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
def test_tls_mosquitto_pub_reaches_sub(
    make_tls_broker: Callable[..., BrokerThread],
    certificates: Certificates,
    processes: list[subprocess.Popen[str]],
    version: str,
) -> None:
    broker = make_tls_broker()
    subscriber = subprocess.Popen(
        [
            "mosquitto_sub", *tls_options(broker, certificates, certificates.device),
            "-V", version, "-i", "cli-sub", "-t", "plant/+", "-q", "1", "-C", "1",
            "-F", "%t|%p", "-W", str(int(scaled(10))),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    processes.append(subscriber)
    wait_for_subscription(broker, "cli-sub", "plant/+")
    published = subprocess.run(
        [
            "mosquitto_pub", *tls_options(broker, certificates, certificates.named_device),
            "-V", version, "-i", "cli-pub", "-q", "1", "-t", "plant/boiler", "-m", "steam",
        ],
        capture_output=True,
        text=True,
        timeout=scaled(10),
        check=False,
    )
    stdout, stderr = subscriber.communicate(timeout=scaled(10))

    assert published.returncode == 0, published.stderr
    assert subscriber.returncode == 0, stderr
    assert stdout == "plant/boiler|steam\n"


@pytest.mark.parametrize("pair_name", ["expired", "unknown_issuer"])
def test_tls_mosquitto_pub_bad_certificate_fails(
    make_tls_broker: Callable[..., BrokerThread],
    certificates: Certificates,
    pair_name: str,
) -> None:
    broker = make_tls_broker()
    pair = getattr(certificates, pair_name)

    rejected = subprocess.run(
        ["mosquitto_pub", *tls_options(broker, certificates, pair), "-t", "plant/x", "-m", "1"],
        capture_output=True,
        text=True,
        timeout=scaled(10),
        check=False,
    )
    accepted = subprocess.run(
        [
            "mosquitto_pub", *tls_options(broker, certificates, certificates.device),
            "-t", "plant/x", "-m", "1",
        ],
        capture_output=True,
        text=True,
        timeout=scaled(10),
        check=False,
    )

    assert rejected.returncode != 0
    assert "Error" in rejected.stderr
    assert accepted.returncode == 0, accepted.stderr
    assert broker.call(lambda: broker.broker.stats.publish_received) == 1
