"""TLS settings: the checks of the certificate, key and CA files, and the start-up errors that
``ironshadow serve`` prints for them."""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port, scaled
from ironshadow.broker.tls import TLSConfigError, server_context
from ironshadow.cli import build_parser
from ironshadow.settings import SettingsError, broker_config, check_tls, resolve

from .certificates import Certificates, openssl


def files(certificates: Certificates, tmp_path: Path) -> dict[str, Path]:
    """Return the files that the error cases refer to by name."""
    encrypted = tmp_path / "encrypted.key"
    if not encrypted.exists():
        openssl("pkcs8", "-topk8", "-in", certificates.server.key, "-out", encrypted,
                "-passout", "pass:factory")
    return {
        "cert": certificates.server.cert,
        "key": certificates.server.key,
        "ca": certificates.ca,
        "missing": tmp_path / "missing.pem",
        "folder": tmp_path,
        "device_cert": certificates.device.cert,
        "device_key": certificates.device.key,
        "encrypted_key": encrypted,
        "": Path(""),
    }


@pytest.mark.parametrize(
    ("cert", "key", "ca", "message"),
    [
        ("missing", "key", "", "tls_cert file {missing} not found"),
        ("cert", "missing", "", "tls_key file {missing} not found"),
        ("cert", "key", "missing", "tls_ca file {missing} not found"),
        ("folder", "key", "", "tls_cert {folder} is a folder, not a file"),
        ("cert", "", "", "tls_cert is set, but tls_key is not"),
        ("", "key", "", "tls_key is set, but tls_cert is not"),
        ("", "", "ca", "tls_ca is set, but tls_cert and tls_key are not"),
        ("key", "key", "", "tls_cert file {key} contains no valid PEM certificate"),
        ("cert", "cert", "", "tls_key file {cert} contains no valid PEM private key"),
        ("cert", "device_key", "", "tls_key file {device_key} does not match the certificate"),
        ("cert", "encrypted_key", "", "tls_key file {encrypted_key} is encrypted"),
        ("cert", "key", "device_cert", "tls_ca file {device_cert} contains no CA certificate"),
    ],
)
def test_tls_server_context_file_errors(
    certificates: Certificates, tmp_path: Path, cert: str, key: str, ca: str, message: str
) -> None:
    paths = files(certificates, tmp_path)
    as_text = {name: str(path) if name else "" for name, path in paths.items()}

    with pytest.raises(TLSConfigError) as caught:
        server_context(as_text[cert], as_text[key], as_text[ca])

    assert message.format(**as_text) in str(caught.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read a file without read permission")
def test_tls_server_context_unreadable_file(certificates: Certificates, tmp_path: Path) -> None:
    unreadable = tmp_path / "server.pem"
    shutil.copy(certificates.server.cert, unreadable)
    unreadable.chmod(0)

    with pytest.raises(TLSConfigError, match=r"cannot read tls_cert file .*permission denied"):
        server_context(str(unreadable), str(certificates.server.key))


def test_tls_server_context_requires_certificates_with_ca(certificates: Certificates) -> None:
    context = server_context(
        str(certificates.server.cert), str(certificates.server.key), str(certificates.ca)
    )
    without_ca = server_context(str(certificates.server.cert), str(certificates.server.key))

    assert context.verify_mode == ssl.CERT_REQUIRED
    assert without_ca.verify_mode == ssl.CERT_NONE


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def test_tls_settings_from_toml(certificates: Certificates, tmp_path: Path) -> None:
    config = tmp_path / "engine.toml"
    config.write_text(
        f'tls_port = 8884\ntls_cert = "{certificates.server.cert}"\n'
        f'tls_key = "{certificates.server.key}"\ntls_ca = "{certificates.ca}"\n'
        'tls_name_field = "dns"\n'
    )

    values = resolve(parse("--config", str(config)), {})
    check_tls(values)
    broker = broker_config(values)

    assert broker.tls_port == 8884
    assert broker.tls_cert == str(certificates.server.cert)
    assert broker.tls_key == str(certificates.server.key)
    assert broker.tls_ca == str(certificates.ca)
    assert broker.tls_name_field == "dns"


def test_tls_settings_reject_unknown_name_field() -> None:
    with pytest.raises(SettingsError, match="choose one of cn, dns, uri"):
        resolve(parse(), {"IRONSHADOW_TLS_NAME_FIELD": "email"})


def test_tls_settings_reject_shared_port(certificates: Certificates) -> None:
    values = resolve(
        parse(
            "--tls-cert", str(certificates.server.cert), "--tls-key", str(certificates.server.key),
            "--mqtt-port", "1884", "--tls-port", "1884",
        ),
        {},
    )

    with pytest.raises(SettingsError, match="tls_port and mqtt_port are both 1884"):
        check_tls(values)


def serve(tmp_path: Path, *argv: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run ``ironshadow serve`` that is expected to fail at start-up; return code and output."""
    command = [
        sys.executable, "-m", "ironshadow", "serve", "--memory-only", "true",
        "--data-dir", str(tmp_path / "data"), "--mqtt-port", str(free_port()),
        "--http-port", str(free_port()), *argv,
    ]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=scaled(30),
        env={**os.environ, **(env or {})},
        check=False,
    )
    return result.returncode, result.stdout + result.stderr


def test_tls_cli_missing_certificate(tmp_path: Path, certificates: Certificates) -> None:
    missing = tmp_path / "server.pem"

    code, output = serve(
        tmp_path, "--tls-cert", str(missing), "--tls-key", str(certificates.server.key)
    )

    assert code == 2
    assert f"ironshadow: error: tls_cert file {missing} not found" in output
    assert "Traceback" not in output


def test_tls_cli_key_mismatch_from_environment(
    tmp_path: Path, certificates: Certificates
) -> None:
    environment = {
        "IRONSHADOW_TLS_CERT": str(certificates.server.cert),
        "IRONSHADOW_TLS_KEY": str(certificates.device.key),
    }

    code, output = serve(tmp_path, env=environment)

    assert code == 2
    assert (
        f"ironshadow: error: tls_key file {certificates.device.key} does not match the "
        f"certificate in tls_cert file {certificates.server.cert}"
    ) in output
    assert "Traceback" not in output


def test_tls_cli_port_in_use(tmp_path: Path, certificates: Certificates) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        code, output = serve(
            tmp_path,
            "--tls-cert", str(certificates.server.cert),
            "--tls-key", str(certificates.server.key),
            "--tls-port", str(port),
        )

    assert code == 2
    assert f"MQTT TLS port {port} on 127.0.0.1 is already in use" in output
    assert "--tls-port" in output
    assert "Traceback" not in output
