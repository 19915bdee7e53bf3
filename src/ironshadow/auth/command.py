"""``ironshadow auth``: add, list and remove the users of a data folder, and issue tokens.

A running engine reads the change within about a second; no restart is needed. Passwords
come from standard input (with a prompt and no echo on a terminal) and are never printed.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import tomllib
from pathlib import Path

from ..broker.access import USER_ROLES
from .tokens import (
    DEFAULT_TOKEN_LIFETIME,
    SECRET_FILE_NAME,
    TokenSecret,
    TokenSecretError,
    issue_token,
    parse_duration,
    utc_text,
)
from .users import USERS_FILE_NAME, UserStore, UserStoreError

DATA_DIR_ENV = "IRONSHADOW_DATA_DIR"


def add_command(commands: argparse._SubParsersAction, default_data_dir: str) -> None:  # type: ignore[type-arg]
    """Register ``auth`` with the ``ironshadow`` command line."""
    parser = commands.add_parser(
        "auth",
        help="manage the users that may connect over MQTT and HTTP, and print tokens",
        description="Add, list and remove the MQTT users (devices, applications and admins) "
        f"in the data folder's {USERS_FILE_NAME}. Once it holds a user, `ironshadow serve` "
        "requires a user name and password from every client, and a token on the HTTP API "
        "(`ironshadow auth token` prints one). A running engine applies changes within about "
        "a second.",
    )
    parser.set_defaults(handler=run)
    actions = parser.add_subparsers(dest="auth_action", required=True)

    def common(action: argparse.ArgumentParser) -> None:
        action.add_argument(
            "--data-dir",
            metavar="DIR",
            help=f"the engine's data folder (default: ${DATA_DIR_ENV}, the data_dir of "
            f"--config, or {default_data_dir})",
        )
        action.add_argument(
            "--config", metavar="FILE", help="TOML settings file to take data_dir from"
        )
        action.set_defaults(default_data_dir=default_data_dir)

    add = actions.add_parser(
        "add",
        help="add a user; the password is read from standard input",
        description="Add a user. The password is read from standard input: one line, without "
        "its line ending (on a terminal you are asked twice, without echo). A device's name "
        "is its thing name, and it must connect with that name as client id.",
    )
    add.add_argument("name", help="user name; for a device, its thing name")
    add.add_argument("--role", required=True, choices=USER_ROLES, help="what the user may do")
    common(add)
    add.set_defaults(auth_handler=_add)

    listing = actions.add_parser("list", help="list the users and their roles")
    common(listing)
    listing.set_defaults(auth_handler=_list)

    remove = actions.add_parser("remove", help="remove a user")
    remove.add_argument("name", help="user name")
    common(remove)
    remove.set_defaults(auth_handler=_remove)

    token = actions.add_parser(
        "token",
        help="print a bearer token for the HTTP API",
        description="Print a bearer token for the user to standard output, for scripts and "
        "Prometheus: send it as `Authorization: Bearer TOKEN`. It is signed with the data "
        f"folder's {SECRET_FILE_NAME}, so the engine serving that folder accepts it until it "
        "expires or the user is removed or changes role or password. Nothing is read from "
        "standard input.",
    )
    token.add_argument("name", help="user name")
    token.add_argument(
        "--lifetime",
        type=_duration_argument,
        default=DEFAULT_TOKEN_LIFETIME,
        metavar="DURATION",
        help="how long the token is valid: seconds, or a number with a unit s, m, h or d "
        "(default: 12h)",
    )
    common(token)
    token.set_defaults(auth_handler=_token)


def _data_dir(arguments: argparse.Namespace) -> Path:
    """Return the data folder: the flag, then the environment, then --config, then default."""
    if arguments.data_dir:
        return Path(arguments.data_dir)
    from_env = os.environ.get(DATA_DIR_ENV)
    if from_env:
        return Path(from_env)
    config = arguments.config or os.environ.get("IRONSHADOW_CONFIG")
    if config:
        try:
            with open(config, "rb") as handle:
                document = tomllib.load(handle)
        except OSError as exc:
            raise UserStoreError(f"cannot read config file {config}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise UserStoreError(f"config file {config} is not valid TOML: {exc}") from None
        value = document.get("data_dir", document.get("data-dir"))
        if value is not None:
            return Path(str(value))
    return Path(arguments.default_data_dir)


def _read_password(name: str) -> bytes:
    if sys.stdin.isatty():
        first = getpass.getpass(f"Password for {name}: ")
        second = getpass.getpass("Repeat the password: ")
        if first != second:
            raise UserStoreError("the two passwords differ; nothing was changed")
        text = first
    else:
        text = sys.stdin.readline()
        text = text.removesuffix("\n").removesuffix("\r")
    if not text:
        raise UserStoreError(
            f"no password for {name!r} on standard input; pipe it in, for example "
            f"`printf '%s' \"$PASSWORD\" | ironshadow auth add {name} --role ...`"
        )
    return text.encode()


def _add(arguments: argparse.Namespace) -> int:
    store = UserStore(_data_dir(arguments) / USERS_FILE_NAME)
    password = _read_password(arguments.name)
    user = store.add(arguments.name, arguments.role, password)
    print(f"added {user.role} {user.name!r} to {store.path}")
    return 0


def _list(arguments: argparse.Namespace) -> int:
    store = UserStore(_data_dir(arguments) / USERS_FILE_NAME)
    store.load()
    users = store.list()
    if not users:
        print(f"no users in {store.path}; clients connect without a password")
        return 0
    width = max(len("NAME"), *(len(user.name) for user in users))
    print(f"{'NAME':<{width}}  ROLE")
    for user in users:
        print(f"{user.name:<{width}}  {user.role}")
    return 0


def _remove(arguments: argparse.Namespace) -> int:
    store = UserStore(_data_dir(arguments) / USERS_FILE_NAME)
    user = store.remove(arguments.name)
    print(f"removed {user.role} {user.name!r} from {store.path}")
    if not len(store):
        print(
            "that was the last user: a running engine now admits anonymous clients only if "
            "every listener is on loopback or allow_anonymous is set, and rejects all others",
            file=sys.stderr,
        )
    return 0


def _duration_argument(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _token(arguments: argparse.Namespace) -> int:
    data_dir = _data_dir(arguments)
    store = UserStore(data_dir / USERS_FILE_NAME)
    store.load()
    user = store.lookup(arguments.name)
    if user is None:
        known = ", ".join(user.name for user in store.list()[:10]) or "none"
        raise UserStoreError(
            f"user {arguments.name!r} not found in {store.path}; users: {known}"
        )
    try:
        key = TokenSecret.in_data_dir(data_dir).key()
    except TokenSecretError as exc:
        raise UserStoreError(str(exc)) from None
    token, claims = issue_token(key, user, arguments.lifetime)
    print(token)
    print(
        f"token for {user.role} {user.name!r}, valid until {utc_text(claims.expires)}",
        file=sys.stderr,
    )
    return 0


def run(arguments: argparse.Namespace) -> int:
    """Run an ``auth`` action; print a clear error and return 1 when it fails."""
    try:
        return int(arguments.auth_handler(arguments))
    except UserStoreError as exc:
        print(f"ironshadow auth: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"ironshadow auth: error: {exc}", file=sys.stderr)
        return 1
