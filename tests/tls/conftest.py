"""Fixtures for the TLS tests: certificates made once per session, and brokers that use them."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import Any

import pytest

from conftest import BrokerThread, free_port

from .certificates import Certificates, make_certificates

if shutil.which("openssl") is None:
    pytest.skip("the openssl command is not installed", allow_module_level=True)


@pytest.fixture(scope="session")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certificates"))


@pytest.fixture
def make_tls_broker(
    make_broker: Callable[..., BrokerThread], certificates: Certificates
) -> Callable[..., BrokerThread]:
    """Return a factory of brokers with a TLS listener that requires client certificates.

    Pass ``tls_ca=""`` for a listener that does not request them. The thread's config has
    the TLS port in ``tls_port``.
    """

    def factory(**fields: Any) -> BrokerThread:
        fields.setdefault("tls_port", free_port())
        fields.setdefault("tls_cert", str(certificates.server.cert))
        fields.setdefault("tls_key", str(certificates.server.key))
        fields.setdefault("tls_ca", str(certificates.ca))
        return make_broker(**fields)

    return factory
