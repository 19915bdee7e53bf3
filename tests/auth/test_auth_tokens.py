"""Bearer tokens: signing, expiry, revocation through the users file, the secret file and
the token_lifetime setting."""

from __future__ import annotations

import argparse
import base64
import json
import re
import stat
from pathlib import Path

import pytest

from ironshadow.auth import UserStore
from ironshadow.auth.tokens import (
    TokenError,
    TokenSecret,
    TokenSecretError,
    issue_token,
    parse_duration,
    read_token,
    revocation_reason,
)
from ironshadow.cli import build_parser
from ironshadow.settings import SettingsError, resolve

KEY = bytes(range(32))
NOW = 1_800_000_000.0


@pytest.fixture
def store(tmp_path: Path, users_file: Path) -> UserStore:
    """A users store on a copy of the shared users file."""
    path = tmp_path / "users.json"
    path.write_bytes(users_file.read_bytes())
    users = UserStore(path)
    users.load()
    return users


def test_token_round_trip(store: UserStore) -> None:
    user = store.lookup("press-1")
    assert user is not None
    token, claims = issue_token(KEY, user, 3600, now=NOW)

    read = read_token(KEY, token, now=NOW + 3599)

    assert read == claims
    assert read.name == "press-1"
    assert read.role == "device"
    assert read.expires == NOW + 3600
    assert revocation_reason(read, store) is None


def test_token_payload_holds_no_secret(store: UserStore) -> None:
    user = store.lookup("dashboard")
    assert user is not None
    token, _ = issue_token(KEY, user, 60, now=NOW)

    version, payload, _signature = token.split(".")
    document = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))

    assert version == "v1"
    assert set(document) == {"sub", "role", "exp", "cred"}
    assert "argon2" not in token
    assert user.password_hash not in json.dumps(document)


def test_token_expires_at_its_second(store: UserStore) -> None:
    user = store.lookup("press-1")
    assert user is not None
    token, _ = issue_token(KEY, user, 10, now=NOW)

    with pytest.raises(TokenError, match="expired at 2027-01-15T08:00:10Z"):
        read_token(KEY, token, now=NOW + 10)


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("", "not an IronShadow token"),
        ("Bearer x", "not an IronShadow token"),
        ("v2.e30.AAAA", "not an IronShadow token"),
        ("v1.e30", "not an IronShadow token"),
        ("v1.e30.A", "not valid base64url"),
        ("v1." + "A" * 3000 + ".AAAA", "more than any valid token"),
    ],
)
def test_malformed_token_rejected(token: str, message: str) -> None:
    with pytest.raises(TokenError, match=message):
        read_token(KEY, token, now=NOW)


def test_changed_or_foreign_token_rejected(store: UserStore) -> None:
    user = store.lookup("press-1")
    assert user is not None
    token, _ = issue_token(KEY, user, 3600, now=NOW)
    version, _, signature = token.split(".")
    # The same payload naming an application, with press-1's signature.
    other = store.lookup("dashboard")
    assert other is not None
    _, other_payload, _ = issue_token(KEY, other, 3600, now=NOW)[0].split(".")

    with pytest.raises(TokenError, match="signature does not match"):
        read_token(KEY, f"{version}.{other_payload}.{signature}", now=NOW)
    with pytest.raises(TokenError, match="signature does not match"):
        read_token(bytes(32), token, now=NOW)


def test_removed_user_revokes_token(store: UserStore) -> None:
    store.add("press-9", "device", b"first-password")
    user = store.lookup("press-9")
    assert user is not None
    _, claims = issue_token(KEY, user, 3600, now=NOW)

    store.remove("press-9")
    assert revocation_reason(claims, store) == "user 'press-9' no longer exists"

    store.add("press-9", "application", b"first-password")
    assert revocation_reason(claims, store) == (
        "the role of user 'press-9' changed from device to application"
    )

    store.remove("press-9")
    store.add("press-9", "device", b"first-password")
    # The same password gets a new salt, so the token from before still counts as revoked.
    assert revocation_reason(claims, store) == (
        "the password of user 'press-9' changed after the token was issued"
    )


def test_secret_created_once_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "token-secret"
    first = TokenSecret(path).key()
    second = TokenSecret(path).key()

    assert first == second
    assert len(first) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert list(tmp_path.iterdir()) == [path]

    path.unlink()
    assert TokenSecret(path).key() != first


def test_invalid_secret_file_named(tmp_path: Path) -> None:
    path = tmp_path / "token-secret"
    path.write_text("not hex\n")

    expected = re.escape(f"token secret file {path} does not hold 32")
    with pytest.raises(TokenSecretError, match=expected):
        TokenSecret(path).key()


def test_missing_data_folder_named(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "token-secret"

    with pytest.raises(TokenSecretError, match=r"cannot create token secret file .*missing"):
        TokenSecret(path).key()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("3600", 3600.0), ("90m", 5400.0), ("12h", 43200.0), ("30d", 2592000.0), ("1.5s", 1.5)],
)
def test_duration_parsed(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("text", "message"), [("0", "more than 0"), ("12x", "unit s, m, h or d")])
def test_invalid_duration_named(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=f"invalid duration '{text}'.*{message}"):
        parse_duration(text)


def parse_serve(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def test_token_lifetime_setting(tmp_path: Path) -> None:
    config = tmp_path / "engine.toml"
    config.write_text("token_lifetime = 7200\n")

    assert resolve(parse_serve(), {})["token_lifetime"] == 12 * 3600
    assert resolve(parse_serve("--config", str(config)), {})["token_lifetime"] == 7200
    environ = {"IRONSHADOW_TOKEN_LIFETIME": "90m"}
    assert resolve(parse_serve("--config", str(config)), environ)["token_lifetime"] == 5400
    assert resolve(parse_serve("--token-lifetime", "30d"), environ)["token_lifetime"] == 2592000


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("12x", "invalid value '12x' for token_lifetime in flag --token-lifetime: invalid "
         "duration '12x': give seconds or a number with a unit s, m, h or d"),
        ("0.5", "invalid value '0.5' for token_lifetime in flag --token-lifetime: must be at "
         "least 1"),
    ],
)  # fmt: skip
def test_invalid_token_lifetime_named(value: str, message: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(message)):
        resolve(parse_serve("--token-lifetime", value), {})
