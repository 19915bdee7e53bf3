"""TLS for the MQTT listener: the server's SSL context and the thing name of a client certificate.

:func:`server_context` checks the PEM files before it loads them, so that a bad file stops the
start-up with an error that names the setting and the file. The context accepts TLS 1.2 and
newer. With a CA bundle (``tls_ca``) it requires a client certificate signed by one of its
CAs. OpenSSL then rejects an expired, not yet valid or unknown certificate during the
handshake, before the connection reaches the broker.

uvloop 0.23 logs a failed server-side handshake only in debug mode (``_fatal_error`` in its
sslproto.pyx), so :func:`report_handshake_failures` makes the context pass each failure to a
callback.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import TLS_NAME_CN, TLS_NAME_DNS, TLS_NAME_FIELDS, TLS_NAME_URI

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2

# Each value of tls_name_field in words, for log lines.
NAME_FIELD_WORDS = {
    TLS_NAME_CN: "subject common name (CN)",
    TLS_NAME_DNS: "DNS subject alternative name",
    TLS_NAME_URI: "URI subject alternative name",
}

# Description of each setting's file, for error messages.
_ROLES = {
    "tls_cert": "the server certificate (PEM)",
    "tls_key": "the private key of the server certificate (PEM, not encrypted)",
    "tls_ca": "the certificate of the CA that signs the client certificates (PEM)",
}


class TLSConfigError(ValueError):
    """An invalid TLS setting or file. The message names the setting, the file and the fix."""


class TLSListenerError(OSError):
    """The TLS listener's address could not be bound. ``errno`` is the error of the bind."""


class _EncryptedKey(Exception):
    pass


def server_context(cert: str, key: str, ca: str = "") -> ssl.SSLContext:
    """Build the SSL context of a TLS server from PEM files, checking each file first.

    Raises TLSConfigError when a file is missing, unreadable or contains no certificate or key,
    when the key is encrypted, or when the key does not belong to the certificate.
    """
    if not cert and not key:
        raise TLSConfigError(
            "tls_ca is set, but tls_cert and tls_key are not. Give the server certificate "
            "and its key as well, or unset tls_ca to run without TLS"
        )
    if not cert or not key:
        given, missing = ("tls_cert", "tls_key") if cert else ("tls_key", "tls_cert")
        raise TLSConfigError(
            f"{given} is set, but {missing} is not. Give {_ROLES[missing]} with {missing}, "
            f"or unset {given} to run without TLS"
        )
    _check_readable("tls_cert", cert)
    _check_readable("tls_key", key)
    _check_certificates("tls_cert", cert)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    try:
        context.load_cert_chain(cert, key, password=_refuse_password)
    except _EncryptedKey:
        raise TLSConfigError(
            f"tls_key file {key} is encrypted with a passphrase, which IronShadow cannot "
            "prompt for. Decrypt it, for example with: openssl pkey -in ENCRYPTED -out PLAIN"
        ) from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TLSConfigError(
                f"tls_key file {key} does not match the certificate in tls_cert file {cert}. "
                "Give the private key that the certificate was made for"
            ) from None
        raise TLSConfigError(
            f"tls_key file {key} contains no valid PEM private key ({exc}). "
            f"Give {_ROLES['tls_key']}"
        ) from None
    if ca:
        _check_readable("tls_ca", ca)
        _check_certificates("tls_ca", ca)
        context.load_verify_locations(cafile=ca)
        if not context.get_ca_certs():
            raise TLSConfigError(
                f"tls_ca file {ca} contains no CA certificate, only end-entity ones. "
                f"Give {_ROLES['tls_ca']}"
            )
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _refuse_password() -> str:
    # Without a callback, OpenSSL would ask for the passphrase on the terminal and block.
    raise _EncryptedKey


def _check_readable(setting: str, path: str) -> None:
    role = _ROLES[setting]
    try:
        with Path(path).open("rb"):
            pass
    except FileNotFoundError:
        raise TLSConfigError(f"{setting} file {path} not found. Give the path of {role}") from None
    except IsADirectoryError:
        raise TLSConfigError(
            f"{setting} {path} is a folder, not a file. Give the path of {role}"
        ) from None
    except PermissionError:
        raise TLSConfigError(
            f"cannot read {setting} file {path}: permission denied. Make it readable by the "
            "user that runs IronShadow"
        ) from None
    except OSError as exc:
        raise TLSConfigError(f"cannot read {setting} file {path}: {exc.strerror}") from None


def _check_certificates(setting: str, path: str) -> None:
    """Raise TLSConfigError unless the file contains at least one valid PEM certificate."""
    scratch = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        scratch.load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        raise TLSConfigError(
            f"{setting} file {path} contains no valid PEM certificate ({exc.reason or exc}). "
            f"Give {_ROLES[setting]}; convert a DER file with: openssl x509 -in FILE -out FILE.pem"
        ) from None


def report_handshake_failures(
    context: ssl.SSLContext, report: Callable[[ssl.SSLError], None]
) -> None:
    """Make ``context`` call ``report`` with the error of every handshake that fails.

    The callback runs on the event loop, inside the failing handshake, so it must be quick.
    Only the handshake goes through the added code, not the reads and writes after it.
    """

    class ReportingSSLObject(ssl.SSLObject):
        def do_handshake(self) -> None:
            try:
                super().do_handshake()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                raise
            except ssl.SSLError as exc:
                report(exc)
                raise

    context.sslobject_class = ReportingSSLObject


def handshake_error_text(exc: ssl.SSLError) -> str:
    """Return the reason of a failed handshake in words, without OpenSSL's source location."""
    verify_message = getattr(exc, "verify_message", None)
    if verify_message:
        return f"the client certificate was rejected ({verify_message})"
    if exc.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return "the client sent no certificate"
    if exc.reason:
        return exc.reason.lower().replace("_", " ")
    return str(exc)


def certificate_name(peercert: dict[str, Any], field: str) -> str | None:
    """Return the thing name in a verified client certificate, or None if it has none.

    ``peercert`` is the dictionary of ``SSLSocket.getpeercert()``. ``field`` is ``cn`` for
    the subject's common name (the last one, if several), ``dns`` or ``uri`` for the first
    subject alternative name of that type.
    """
    if field == TLS_NAME_CN:
        names = [
            value
            for relative_name in peercert.get("subject", ())
            for key, value in relative_name
            if key == "commonName"
        ]
        return names[-1] if names else None
    kind = {TLS_NAME_DNS: "DNS", TLS_NAME_URI: "URI"}.get(field)
    if kind is None:
        choices = ", ".join(TLS_NAME_FIELDS)
        raise ValueError(f"invalid tls_name_field {field!r}. Choose one of {choices}")
    for name_type, value in peercert.get("subjectAltName", ()):
        if name_type == kind:
            return value
    return None


def describe_subject(peercert: dict[str, Any]) -> str:
    """Return the certificate's subject as ``CN=..., O=...`` for log lines."""
    short = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
             "countryName": "C", "serialNumber": "serialNumber"}
    parts = [
        f"{short.get(key, key)}={value}"
        for relative_name in peercert.get("subject", ())
        for key, value in relative_name
    ]
    return ", ".join(parts) or "(empty subject)"
