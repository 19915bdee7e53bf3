"""Clients that authenticate with a client certificate on the TLS listener, under the access
policy that ``ironshadow serve`` installs: the certificate names the device."""

from __future__ import annotations

import shutil

import pytest

from conftest import free_port
from mqtt_client import V5, TestClient
from tls.certificates import Certificates, KeyPair, make_certificates

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is missing")

NOT_AUTHORIZED = 0x87


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certificates"))


def tls_client(port: int, certificates: Certificates, pair: KeyPair, client_id: str) -> TestClient:
    client = TestClient(port, client_id, V5, connect=False)
    client.client.tls_set(
        ca_certs=str(certificates.ca), certfile=str(pair.cert), keyfile=str(pair.key)
    )
    client.connect()
    return client


def tls_engine(make_auth_engine, certificates: Certificates):  # type: ignore[no-untyped-def]
    return make_auth_engine(
        broker_fields={
            "tls_port": free_port(),
            "tls_cert": str(certificates.server.cert),
            "tls_key": str(certificates.server.key),
            "tls_ca": str(certificates.ca),
        }
    )


def test_certificate_device_without_password(make_auth_engine, certificates):
    engine = tls_engine(make_auth_engine, certificates)
    tls_port = engine.thread.config.tls_port
    # The device certificate has CN=boiler-7, which is not in the users file.
    device = tls_client(tls_port, certificates, certificates.device, "boiler-7")
    assert not device.connack[1].is_failure
    assert device.subscribe("$aws/things/boiler-7/shadow/update/accepted", 1) == [1]
    assert device.subscribe("$aws/things/press-1/shadow/#", 1)[0].value == NOT_AUTHORIZED

    def principal() -> tuple[str, str, str]:
        (connection,) = [c for c in engine.thread.broker.connections if c.client_id == "boiler-7"]
        found = connection.principal
        return (found.name, found.role, found.method)

    assert engine.call(principal) == ("boiler-7", "device", "certificate")


def test_certificate_device_with_other_client_id(make_auth_engine, certificates):
    engine = tls_engine(make_auth_engine, certificates)
    client = tls_client(engine.thread.config.tls_port, certificates, certificates.device, "x-1")
    assert client.connack[1].value == NOT_AUTHORIZED
