"""The users file: MQTT user names, their roles and salted Argon2id password hashes.

The file is JSON in the data folder (``users.json``), readable by its owner only::

    {"format": 1,
     "users": {"press-7": {"role": "device", "password_hash": "$argon2id$v=19$..."}}}

Every change rewrites it whole: a temporary file beside it, created with mode 0600, flushed to
disk and renamed over the old one, so a reader sees the old file or the new one and never a
part. Changes hold an exclusive lock on ``users.json.lock`` so that two ``ironshadow auth``
commands at once cannot lose each other's change. Passwords are hashed with argon2-cffi's
default parameters (Argon2id, the RFC 9106 low-memory profile: 3 passes over 64 MiB), which
the hash itself records, so a hash stays valid when the defaults change.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from ..broker.access import ROLE_DEVICE, USER_ROLES

log = logging.getLogger("ironshadow.auth")

USERS_FILE_NAME = "users.json"
FILE_FORMAT = 1
# Maximum length of a user name: AWS IoT's limit for thing names, because device names are
# thing names.
MAX_NAME_LENGTH = 128
# Thing names as AWS IoT allows them; a device's name is its thing name and client id.
_DEVICE_NAME = re.compile(r"[a-zA-Z0-9:_-]+")
# Other users may use any printable characters except the MQTT topic separator and
# wildcards, because names are put into topic patterns ({username}).
_FORBIDDEN_IN_NAME = re.compile(r"[/+#\s\x00-\x1f\x7f]")

_hasher = PasswordHasher()


class UserStoreError(Exception):
    """An invalid users file or change to it. The message names the value and the fix."""


@dataclass(frozen=True, slots=True)
class User:
    name: str
    role: str
    # Argon2 hash in its PHC string form, which contains the salt and the parameters.
    password_hash: str


def hash_password(password: bytes) -> str:
    """Return a new salted Argon2id hash of ``password``. Slow on purpose: tens of ms."""
    return _hasher.hash(password)


def verify_password(password_hash: str, password: bytes) -> bool:
    """Return whether ``password`` matches ``password_hash``. Slow on purpose: tens of ms."""
    try:
        return _hasher.verify(password_hash, password)
    except VerifyMismatchError:
        return False
    except (InvalidHashError, VerificationError) as exc:
        log.error("a password hash in the users file cannot be checked: %s", exc)
        return False


def validate_user(name: str, role: str) -> None:
    """Raise UserStoreError unless ``name`` and ``role`` may be stored."""
    if role not in USER_ROLES:
        raise UserStoreError(f"invalid role {role!r}: choose one of {', '.join(USER_ROLES)}")
    if not name or len(name) > MAX_NAME_LENGTH:
        raise UserStoreError(
            f"invalid user name {name!r}: give 1 to {MAX_NAME_LENGTH} characters"
        )
    if role == ROLE_DEVICE and _DEVICE_NAME.fullmatch(name) is None:
        raise UserStoreError(
            f"invalid device name {name!r}: a device's name is its thing name and client id, "
            "so use only letters, digits, ':', '_' and '-'"
        )
    bad = _FORBIDDEN_IN_NAME.search(name)
    if bad is not None:
        raise UserStoreError(
            f"invalid user name {name!r}: it contains {bad.group()!r}; names may not contain "
            "'/', '+', '#', spaces or control characters"
        )


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        status = path.stat()
    except FileNotFoundError:
        return None
    return (status.st_mtime_ns, status.st_size, status.st_ino)


class UserStore:
    """The users of one users file, loaded in memory; changes are written through at once.

    ``lookup``, ``role``, ``list`` and ``len()`` read the loaded copy; ``reload_if_changed``
    picks up changes made by other processes, such as the ``ironshadow auth`` command.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._users: dict[str, User] = {}
        self._stamp: tuple[int, int, int] | None = None

    # --- reading ----------------------------------------------------------------------

    def load(self) -> None:
        """Read the file; a missing file means no users. Raise UserStoreError if invalid."""
        stamp = _file_stamp(self.path)
        self._users = self._read() if stamp is not None else {}
        self._stamp = stamp

    def reload_if_changed(self) -> bool:
        """Read the file again if it changed since the last read; return whether it did.

        On an invalid file it raises UserStoreError and keeps the users loaded before, and
        the next call tries again only after the file changes once more.
        """
        stamp = _file_stamp(self.path)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        self._users = self._read() if stamp is not None else {}
        return True

    def _read(self) -> dict[str, User]:
        path = self.path
        try:
            document = json.loads(path.read_bytes())
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise UserStoreError(f"cannot read users file {path}: {exc.strerror}") from None
        except ValueError as exc:
            raise UserStoreError(
                f"users file {path} is not valid JSON ({exc}); restore it or remove it and "
                "add the users again with `ironshadow auth add`"
            ) from None
        if not isinstance(document, dict) or document.get("format") != FILE_FORMAT:
            raise UserStoreError(
                f"users file {path} is not an IronShadow users file of format {FILE_FORMAT}"
            )
        entries = document.get("users")
        if not isinstance(entries, dict):
            raise UserStoreError(f"users file {path}: 'users' must be an object")
        users = {}
        for name, entry in entries.items():
            role = entry.get("role") if isinstance(entry, dict) else None
            password_hash = entry.get("password_hash") if isinstance(entry, dict) else None
            if not isinstance(password_hash, str) or not password_hash.startswith("$argon2"):
                raise UserStoreError(
                    f"users file {path}: user {name!r} has no Argon2 password hash; remove the "
                    "user and add it again with `ironshadow auth add`"
                )
            try:
                validate_user(name, role)
            except UserStoreError as exc:
                raise UserStoreError(f"users file {path}: {exc}") from None
            users[name] = User(name, role, password_hash)
        return users

    def __len__(self) -> int:
        return len(self._users)

    def lookup(self, name: str) -> User | None:
        return self._users.get(name)

    def role(self, name: str) -> str | None:
        user = self._users.get(name)
        return user.role if user is not None else None

    def list(self) -> list[User]:
        """Return the users sorted by name."""
        return sorted(self._users.values(), key=lambda user: user.name)

    def verify(self, name: str, password: bytes) -> User | None:
        """Return the user if ``password`` is right, else None. Slow on purpose: tens of ms.

        For callers outside the event loop; the broker uses ``CredentialCache`` instead.
        """
        user = self._users.get(name)
        if user is None or not verify_password(user.password_hash, password):
            return None
        return user

    # --- changing ---------------------------------------------------------------------

    def add(self, name: str, role: str, password: bytes) -> User:
        """Add a user; raise UserStoreError if the name exists or the input is invalid."""
        validate_user(name, role)
        if not password:
            raise UserStoreError(f"the password for {name!r} is empty; give a password")
        with self._locked():
            if name in self._users:
                raise UserStoreError(
                    f"user {name!r} already exists in {self.path}; remove it first with "
                    f"`ironshadow auth remove {name}` to replace it"
                )
            user = User(name, role, hash_password(password))
            self._write({**self._users, name: user})
        return user

    def add_many(self, entries: list[tuple[str, str, bytes]]) -> None:
        """Add users from (name, role, password) entries with one write of the file.

        Each password costs one slow hash. Nothing is written if any entry is invalid or
        names an existing user.
        """
        for name, role, password in entries:
            validate_user(name, role)
            if not password:
                raise UserStoreError(f"the password for {name!r} is empty; give a password")
        with self._locked():
            users = dict(self._users)
            for name, role, password in entries:
                if name in users:
                    raise UserStoreError(f"user {name!r} already exists in {self.path}")
                users[name] = User(name, role, hash_password(password))
            self._write(users)

    def remove(self, name: str) -> User:
        """Remove a user and return it; raise UserStoreError if there is none of that name."""
        with self._locked():
            user = self._users.get(name)
            if user is None:
                known = ", ".join(sorted(self._users)[:10]) or "none"
                raise UserStoreError(
                    f"user {name!r} not found in {self.path}; users: {known}"
                )
            users = dict(self._users)
            del users[name]
            self._write(users)
        return user

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the lock file and reread the users, so a change starts from the latest file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            self.load()
            yield
        finally:
            os.close(descriptor)

    def _write(self, users: dict[str, User]) -> None:
        document = {
            "format": FILE_FORMAT,
            "users": {
                user.name: {"role": user.role, "password_hash": user.password_hash}
                for user in sorted(users.values(), key=lambda user: user.name)
            },
        }
        data = json.dumps(document, indent=2).encode() + b"\n"
        path = self.path
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(descriptor, "wb") as handle:
                # A temporary file left by a crashed command may have other permissions.
                os.fchmod(handle.fileno(), 0o600)
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        self._users = users
        self._stamp = _file_stamp(path)
