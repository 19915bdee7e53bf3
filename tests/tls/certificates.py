"""Test certificates made with the openssl command: two CAs, a server and client certificates.

``openssl ca`` signs every certificate, because it takes explicit start and end dates
(``-startdate``, ``-enddate``), which expired and not-yet-valid certificates need. The
``openssl x509`` command of OpenSSL 3.0 takes only ``-days``. Keys are EC P-256, which is
quick to generate.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

# Validity of the certificates that should be valid, in days.
VALID_DAYS = 30

CA_CONFIG = """\
[ca]
default_ca = test_ca

[test_ca]
dir = {folder}
database = $dir/index.txt
serial = $dir/serial
new_certs_dir = $dir/issued
certificate = $dir/ca.pem
private_key = $dir/ca.key
default_md = sha256
policy = any_subject
unique_subject = no
copy_extensions = none

[any_subject]
commonName = optional
organizationName = optional

[req]
distinguished_name = subject
prompt = no

[subject]

[ca_extensions]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash

[server]
basicConstraints = CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost

[client]
basicConstraints = CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth

[client_with_names]
basicConstraints = CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectAltName = DNS:press-12.line-3, URI:urn:thing:press-12
"""


@dataclass(frozen=True, slots=True)
class KeyPair:
    """A certificate and its private key, as PEM files."""

    cert: Path
    key: Path


def openssl(*args: str | Path) -> None:
    """Run the openssl command and raise with its output when it fails."""
    command = ["openssl", *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()}")


class CertificateAuthority:
    """A self-signed CA in ``folder`` that signs certificates with ``openssl ca``."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder = folder
        (folder / "issued").mkdir(parents=True)
        (folder / "index.txt").write_text("")
        (folder / "serial").write_text("1000\n")
        self.config = folder / "ca.cnf"
        self.config.write_text(CA_CONFIG.format(folder=folder))
        self.cert = folder / "ca.pem"
        key = folder / "ca.key"
        generate_key(key)
        openssl(
            "req", "-new", "-x509", "-config", self.config, "-key", key, "-out", self.cert,
            "-days", VALID_DAYS, "-subj", f"/CN={name}", "-extensions", "ca_extensions",
        )

    def issue(
        self,
        name: str,
        subject: str,
        extensions: str,
        start: str | None = None,
        end: str | None = None,
    ) -> KeyPair:
        """Sign a new key pair for ``subject``; ``start`` and ``end`` are YYYYMMDDHHMMSSZ."""
        key = self.folder / f"{name}.key"
        request = self.folder / f"{name}.csr"
        cert = self.folder / f"{name}.pem"
        generate_key(key)
        openssl("req", "-new", "-config", self.config, "-key", key, "-out", request,
                "-subj", subject)
        dates: list[str] = []
        if start is not None:
            dates += ["-startdate", start]
        if end is not None:
            dates += ["-enddate", end]
        else:
            dates += ["-days", str(VALID_DAYS)]
        openssl(
            "ca", "-batch", "-notext", "-config", self.config, "-in", request, "-out", cert,
            "-extensions", extensions, *dates,
        )
        return KeyPair(cert, key)


def generate_key(path: Path) -> None:
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path)


@dataclass(frozen=True, slots=True)
class Certificates:
    """Everything the TLS tests use, made once per test session."""

    ca: Path  # the CA that the broker trusts
    server: KeyPair  # for 127.0.0.1 and localhost, signed by ``ca``
    device: KeyPair  # CN=boiler-7, signed by ``ca``
    named_device: KeyPair  # CN=press-12 with DNS and URI subject alternative names
    nameless_device: KeyPair  # subject O=Factory Tests only, with no common name
    expired: KeyPair  # CN=expired-1, valid in 2020 only
    not_yet_valid: KeyPair  # CN=future-1, valid from 2099
    unknown_ca: Path  # another CA, which the broker does not trust
    unknown_issuer: KeyPair  # CN=stranger-1, signed by ``unknown_ca``


def make_certificates(folder: Path) -> Certificates:
    trusted = CertificateAuthority(folder / "trusted", "IronShadow Test CA")
    other = CertificateAuthority(folder / "other", "Unknown Test CA")
    return Certificates(
        ca=trusted.cert,
        server=trusted.issue("server", "/CN=localhost", "server"),
        device=trusted.issue("device", "/O=Factory Tests/CN=boiler-7", "client"),
        named_device=trusted.issue("named", "/CN=press-12", "client_with_names"),
        nameless_device=trusted.issue("nameless", "/O=Factory Tests", "client"),
        expired=trusted.issue(
            "expired", "/CN=expired-1", "client", "20200101000000Z", "20210101000000Z"
        ),
        not_yet_valid=trusted.issue(
            "future", "/CN=future-1", "client", "20990101000000Z", "20991231000000Z"
        ),
        unknown_ca=other.cert,
        unknown_issuer=other.issue("stranger", "/CN=stranger-1", "client"),
    )
