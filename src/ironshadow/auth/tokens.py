"""Bearer tokens for the HTTP API: signed with a secret from the data folder, checked per request.

A token is ``v1.<payload>.<signature>``. The payload is base64url-encoded compact JSON::

    {"sub": "press-7", "role": "device", "exp": 1796430482, "cred": "9f2c41d07a3be615"}

with ``exp`` the expiry in epoch seconds and ``cred`` a fingerprint of the user's password
hash. The signature is HMAC-SHA256 over ``v1.<payload>`` under the data folder's token
secret, base64url-encoded. The payload is signed, not encrypted: anyone holding a token can
read the user name, role and expiry, as with a JWT.

A token counts only while its user still exists with the same role and password hash, so
``ironshadow auth remove`` (and removing and adding a user again, to change a password)
revokes that user's tokens. Deleting the secret file revokes every token: the engine and
``ironshadow auth token`` then create a new secret.

The secret is 32 random bytes, stored hex-encoded in ``token-secret`` in the data folder with
mode 0600. The first process to need it creates it, through a temporary file linked into
place, so that two processes starting at once agree on one secret.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from .users import User, UserStore

log = logging.getLogger("ironshadow.auth")

SECRET_FILE_NAME = "token-secret"
TOKEN_VERSION = "v1"
# Lifetime of a token when none is given: one working shift plus margin.
DEFAULT_TOKEN_LIFETIME = 12 * 3600.0
# Bytes of the HMAC key. HMAC-SHA256 gains nothing from a key longer than its 32-byte output.
SECRET_BYTES = 32
# Maximum token length accepted. A user name has at most 128 characters, so a real token is
# under 400 characters, and a longer one is rejected before it is decoded.
MAX_TOKEN_LENGTH = 2048
# Seconds between two checks of the secret file for a replacement or deletion.
SECRET_RECHECK_INTERVAL = 1.0

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|h|d)?")
_UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class TokenError(Exception):
    """A token that is malformed, badly signed or expired; the message names the problem."""


class TokenSecretError(Exception):
    """The token secret file cannot be read or created; the message names the file."""


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """The signed contents of a token."""

    name: str
    role: str
    # Expiry in epoch seconds: the token is valid before this second.
    expires: int
    # credential_fingerprint() of the user's password hash when the token was issued.
    credential: str


def parse_duration(value: str | float) -> float:
    """Return seconds from a number of seconds or a number with a unit: 90m, 12h, 30d.

    Raises ValueError, naming the value, unless the duration is positive.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        match = _DURATION.fullmatch(str(value).strip())
        if match is None:
            raise ValueError(
                f"invalid duration {value!r}: give seconds or a number with a unit s, m, h or "
                "d, for example 3600, 90m, 12h or 30d"
            )
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2) or "s"]
    if not seconds > 0:
        raise ValueError(f"invalid duration {value!r}: it must be more than 0 seconds")
    return seconds


def utc_text(epoch_seconds: float) -> str:
    """Return ``epoch_seconds`` as an RFC 3339 UTC time to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch_seconds))


def credential_fingerprint(password_hash: str) -> str:
    """Return 16 hex digits of SHA-256 of ``password_hash``, which change with the password.

    The hash already contains a random salt, so the fingerprint reveals nothing about the
    password and differs even when a user gets the same password again.
    """
    return hashlib.sha256(password_hash.encode()).hexdigest()[:16]


def _encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(key: bytes, signed_part: str) -> bytes:
    return hmac.digest(key, signed_part.encode("ascii"), "sha256")


def issue_token(
    key: bytes, user: User, lifetime: float, now: float | None = None
) -> tuple[str, TokenClaims]:
    """Return a token for ``user`` valid for ``lifetime`` seconds from ``now``, and its claims."""
    issued = time.time() if now is None else now
    claims = TokenClaims(
        user.name, user.role, int(issued + lifetime), credential_fingerprint(user.password_hash)
    )
    payload = {
        "sub": claims.name,
        "role": claims.role,
        "exp": claims.expires,
        "cred": claims.credential,
    }
    signed_part = TOKEN_VERSION + "." + _encode(json.dumps(payload, separators=(",", ":")).encode())
    return signed_part + "." + _encode(_sign(key, signed_part)), claims


def read_token(key: bytes, token: str, now: float | None = None) -> TokenClaims:
    """Return the claims of ``token`` if its signature is valid and it has not expired.

    Raises TokenError with a message that names the problem. It does not check the users
    file, which ``revocation_reason()`` does.
    """
    if len(token) > MAX_TOKEN_LENGTH:
        raise TokenError(f"the token is {len(token)} characters long, more than any valid token")
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != TOKEN_VERSION:
        raise TokenError(
            f"the token is not an IronShadow token, which has the form "
            f"{TOKEN_VERSION}.<payload>.<signature>"
        )
    signed_part = parts[0] + "." + parts[1]
    try:
        signature = _decode(parts[2])
        payload_bytes = _decode(parts[1])
    except (binascii.Error, ValueError):
        raise TokenError("the token is not valid base64url") from None
    if not hmac.compare_digest(signature, _sign(key, signed_part)):
        raise TokenError(
            "the token's signature does not match this engine's token secret: it was issued "
            "by another engine, changed, or issued before the secret was replaced"
        )
    # The signature is valid, so the payload was written by issue_token().
    payload = json.loads(payload_bytes)
    claims = TokenClaims(payload["sub"], payload["role"], payload["exp"], payload["cred"])
    current = time.time() if now is None else now
    if current >= claims.expires:
        raise TokenError(f"the token expired at {utc_text(claims.expires)}")
    return claims


def revocation_reason(claims: TokenClaims, users: UserStore) -> str | None:
    """Return why the users file no longer backs ``claims``, or None while it does."""
    user = users.lookup(claims.name)
    if user is None:
        return f"user {claims.name!r} no longer exists"
    if user.role != claims.role:
        return f"the role of user {claims.name!r} changed from {claims.role} to {user.role}"
    if credential_fingerprint(user.password_hash) != claims.credential:
        return f"the password of user {claims.name!r} changed after the token was issued"
    return None


class TokenSecret:
    """The HMAC key in a data folder's secret file, created on first use.

    ``key()`` rereads the file at most once per SECRET_RECHECK_INTERVAL when it was
    replaced, and creates a new one when it was deleted, so both take effect without a
    restart.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._key: bytes | None = None
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0

    @classmethod
    def in_data_dir(cls, data_dir: Path) -> TokenSecret:
        return cls(data_dir / SECRET_FILE_NAME)

    def key(self) -> bytes:
        """Return the key, reading or creating the file if needed; raise TokenSecretError."""
        now = time.monotonic()
        if self._key is not None and now - self._checked < SECRET_RECHECK_INTERVAL:
            return self._key
        self._checked = now
        stamp = self._file_stamp()
        if self._key is None or stamp != self._stamp:
            self._key = self._read_or_create()
            self._stamp = self._file_stamp()
        return self._key

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            status = self.path.stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise TokenSecretError(
                f"cannot read token secret file {self.path}: {exc.strerror}"
            ) from None
        return (status.st_mtime_ns, status.st_ino)

    def _read_or_create(self) -> bytes:
        key = self._read()
        if key is not None:
            return key
        self._create()
        key = self._read()
        if key is None:
            raise TokenSecretError(
                f"token secret file {self.path} is missing right after its creation; check "
                "that no other program removes files from the data folder"
            )
        return key

    def _read(self) -> bytes | None:
        path = self.path
        try:
            text = path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not ASCII text"
            raise TokenSecretError(f"cannot read token secret file {path}: {reason}") from None
        try:
            key = bytes.fromhex(text)
        except ValueError:
            key = b""
        if len(key) != SECRET_BYTES:
            raise TokenSecretError(
                f"token secret file {path} does not hold {SECRET_BYTES} hex-encoded bytes; "
                "delete it to create a new secret, which revokes every token"
            )
        return key

    def _create(self) -> None:
        path = self.path
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        data = (secrets.token_hex(SECRET_BYTES) + "\n").encode("ascii")
        try:
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            try:
                # link() fails if the file exists, so of two processes creating the secret at
                # once, one wins and the other reads the winner's secret.
                os.link(temporary, path)
            except FileExistsError:
                return
            log.info("created token secret file %s", path)
        except OSError as exc:
            raise TokenSecretError(
                f"cannot create token secret file {path}: {exc.strerror}"
            ) from None
        finally:
            temporary.unlink(missing_ok=True)
