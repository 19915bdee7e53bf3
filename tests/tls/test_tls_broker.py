"""The MQTT TLS listener with paho-mqtt and Python's ssl module as clients: client
certificates, the thing name taken from them, and the handshakes that the broker rejects."""

from __future__ import annotations

import logging
import socket
import ssl
import time
import warnings
from collections.abc import Callable

import pytest

from conftest import BrokerThread, scaled
from ironshadow.broker.tls import MINIMUM_VERSION, server_context
from mqtt_client import V5, V311, TestClient

from .certificates import Certificates, KeyPair


def tls_client(
    port: int,
    certificates: Certificates,
    pair: KeyPair | None,
    client_id: str,
    protocol: int = V5,
    connect: bool = True,
) -> TestClient:
    """Return a paho client that trusts the test CA and presents ``pair``, if given."""
    client = TestClient(port, client_id, protocol, connect=False)
    client.client.tls_set(
        ca_certs=str(certificates.ca),
        certfile=str(pair.cert) if pair is not None else None,
        keyfile=str(pair.key) if pair is not None else None,
    )
    if connect:
        client.connect()
    return client


def certificate_names(broker: BrokerThread) -> dict[str, str | None]:
    """Return the certificate name of each open connection, by client id."""

    def collect() -> dict[str, str | None]:
        return {c.client_id: c.certificate_name for c in broker.broker.connections}

    return broker.call(collect)


def assert_rejected(client: TestClient) -> None:
    """Connect ``client`` and check that the broker closes the connection without CONNACK."""
    try:
        client.connect(wait=False)
    except (ssl.SSLError, OSError):
        # With TLS 1.2 the client learns of the rejection during its own handshake.
        return
    # With TLS 1.3 the client finishes its handshake before the server checks the client
    # certificate, so the rejection arrives as a closed connection.
    assert client.disconnected.wait(scaled(10)), "the broker kept the connection open"
    assert not client.connected.is_set()


def test_tls_paho_publishes_and_receives(
    make_tls_broker: Callable[..., BrokerThread], certificates: Certificates
) -> None:
    broker = make_tls_broker()
    subscriber = tls_client(broker.config.tls_port, certificates, certificates.device, "boiler-7")
    plain = TestClient(broker.port, "dashboard-1", V311)
    publisher = tls_client(
        broker.config.tls_port, certificates, certificates.named_device, "press-12", V311
    )
    subscriber.subscribe("plant/#", qos=1)
    plain.subscribe("plant/#", qos=1)
    publisher.publish("plant/press-12/temperature", b"71.5", qos=1)
    over_tls = subscriber.messages.get(timeout=scaled(10))
    over_tcp = plain.messages.get(timeout=scaled(10))

    assert over_tls.topic == "plant/press-12/temperature"
    assert over_tls.payload == b"71.5"
    assert over_tcp.payload == b"71.5"


def test_tls_certificate_name_from_common_name(
    make_tls_broker: Callable[..., BrokerThread], certificates: Certificates
) -> None:
    broker = make_tls_broker()
    tls_client(broker.config.tls_port, certificates, certificates.device, "client-a")
    TestClient(broker.port, "client-b", V5)

    names = certificate_names(broker)

    assert names == {"client-a": "boiler-7", "client-b": None}


@pytest.mark.parametrize(
    ("field", "expected"),
    [("cn", "press-12"), ("dns", "press-12.line-3"), ("uri", "urn:thing:press-12")],
)
def test_tls_certificate_name_from_field(
    make_tls_broker: Callable[..., BrokerThread],
    certificates: Certificates,
    field: str,
    expected: str,
) -> None:
    broker = make_tls_broker(tls_name_field=field)
    tls_client(broker.config.tls_port, certificates, certificates.named_device, "press-12")

    names = certificate_names(broker)

    assert names == {"press-12": expected}


@pytest.mark.parametrize(
    ("field", "pair_name", "subject", "accepted_name"),
    [
        ("cn", "nameless_device", "O=Factory Tests", "press-12"),
        ("dns", "device", "CN=boiler-7", "press-12.line-3"),
    ],
)
def test_tls_certificate_without_name_rejected(
    make_tls_broker: Callable[..., BrokerThread],
    certificates: Certificates,
    caplog: pytest.LogCaptureFixture,
    field: str,
    pair_name: str,
    subject: str,
    accepted_name: str,
) -> None:
    broker = make_tls_broker(tls_name_field=field)
    pair = getattr(certificates, pair_name)
    rejected = tls_client(broker.config.tls_port, certificates, pair, "nameless", connect=False)

    assert_rejected(rejected)
    accepted = tls_client(broker.config.tls_port, certificates, certificates.named_device, "ok")

    assert accepted.connected.is_set()
    assert certificate_names(broker) == {"ok": accepted_name}
    messages = [record.getMessage() for record in caplog.records]
    assert any("TLS connection from 127.0.0.1:" in m and subject in m for m in messages)
    assert any("change tls_name_field" in m for m in messages)
    assert broker.call(lambda: broker.broker.stats.connections_rejected) == 1


@pytest.mark.parametrize(
    ("pair_name", "reason"),
    [
        ("expired", "the client certificate was rejected (certificate has expired)"),
        ("not_yet_valid", "the client certificate was rejected (certificate is not yet valid)"),
        (
            "unknown_issuer",
            "the client certificate was rejected (unable to get local issuer certificate)",
        ),
        (None, "the client sent no certificate"),
    ],
)
def test_tls_bad_client_certificate_rejected(
    make_tls_broker: Callable[..., BrokerThread],
    certificates: Certificates,
    caplog: pytest.LogCaptureFixture,
    pair_name: str | None,
    reason: str,
) -> None:
    broker = make_tls_broker()
    pair = getattr(certificates, pair_name) if pair_name is not None else None
    watcher = tls_client(broker.config.tls_port, certificates, certificates.device, "watcher")
    watcher.subscribe("alarms/#")
    rejected = tls_client(broker.config.tls_port, certificates, pair, "intruder", connect=False)

    assert_rejected(rejected)
    assert_rejected(rejected)
    sender = tls_client(broker.config.tls_port, certificates, certificates.named_device, "sender")
    sender.publish("alarms/press-12", b"overheat", qos=1)
    received = watcher.messages.get(timeout=scaled(10))

    assert received.payload == b"overheat"
    assert set(certificate_names(broker)) == {"watcher", "sender"}
    failures = [r.getMessage() for r in caplog.records if "TLS handshake on port" in r.getMessage()]
    # The second rejection with the same reason is counted but not logged again.
    assert failures == [
        f"TLS handshake on port {broker.config.tls_port} failed: {reason}. Repeats of this "
        "reason are logged at most once a minute"
    ]
    assert broker.call(lambda: broker.broker.stats.connections_rejected) == 2


def test_tls_without_ca_needs_no_client_certificate(
    make_tls_broker: Callable[..., BrokerThread], certificates: Certificates
) -> None:
    broker = make_tls_broker(tls_ca="")
    anonymous = tls_client(broker.config.tls_port, certificates, None, "anonymous-1")
    # The server does not request a certificate, so the client's one is never sent.
    with_certificate = tls_client(
        broker.config.tls_port, certificates, certificates.device, "boiler-7"
    )

    assert anonymous.connected.is_set()
    assert with_certificate.connected.is_set()
    assert certificate_names(broker) == {"anonymous-1": None, "boiler-7": None}


def test_tls_minimum_version_is_1_2(
    make_tls_broker: Callable[..., BrokerThread],
    certificates: Certificates,
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = make_tls_broker(tls_ca="")
    context = ssl.create_default_context(cafile=str(certificates.ca))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    # The client's own security level would refuse TLS 1.1 before the server could.
    context.set_ciphers("DEFAULT:@SECLEVEL=0")

    with socket.create_connection(("127.0.0.1", broker.config.tls_port)) as sock:
        sock.settimeout(scaled(10))
        with pytest.raises(ssl.SSLError):
            context.wrap_socket(sock, server_hostname="127.0.0.1")

    assert server_context(
        str(certificates.server.cert), str(certificates.server.key)
    ).minimum_version == MINIMUM_VERSION == ssl.TLSVersion.TLSv1_2
    assert any("failed: unsupported protocol" in r.getMessage() for r in caplog.records)


def test_tls_stalled_handshake_times_out(make_tls_broker: Callable[..., BrokerThread]) -> None:
    broker = make_tls_broker(tls_handshake_timeout=0.5)

    with socket.create_connection(("127.0.0.1", broker.config.tls_port)) as sock:
        started = time.monotonic()
        sock.settimeout(scaled(10))
        try:
            data = sock.recv(1)
        except ConnectionResetError:
            data = b""
        waited = time.monotonic() - started

    assert data == b""
    assert waited >= 0.4
    assert waited < scaled(5)


def test_tls_listener_logs_its_port(
    make_tls_broker: Callable[..., BrokerThread],
    certificates: Certificates,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="ironshadow.broker")
    broker = make_tls_broker()

    messages = [record.getMessage() for record in caplog.records]
    assert (
        f"MQTT TLS listener open on 127.0.0.1:{broker.config.tls_port}; client certificates "
        f"required (CA file {certificates.ca}), thing name from cn"
    ) in messages
    assert broker.config.tls_port in broker.call(lambda: broker.broker.ports)
