"""Fixtures for the authentication tests: a data folder with users, and engines that use it."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import BrokerThread
from ironshadow.auth import AuthSettings, UserStore

# The engine harness sits beside the engine tests, which import it by module name. Appending
# its folder keeps every other import resolving as before.
_ENGINE_TESTS = str(Path(__file__).resolve().parents[1] / "engine")
if _ENGINE_TESTS not in sys.path:
    sys.path.append(_ENGINE_TESTS)

from .auth_harness import AuthEngine  # noqa: E402

# Users that the in-process engine tests share: (name, role, password).
USERS = [
    ("press-1", "device", "press-1-secret"),
    ("press-2", "device", "press-2-secret"),
    ("dashboard", "application", "dashboard-secret"),
    ("operator", "admin", "operator-secret"),
]


@pytest.fixture(scope="session")
def users_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Return a users file with USERS, hashed once per test session."""
    data_dir = tmp_path_factory.mktemp("users")
    store = UserStore(data_dir / "users.json")
    for name, role, password in USERS:
        store.add(name, role, password.encode())
    return store.path


@pytest.fixture
def data_dir(tmp_path: Path, users_file: Path) -> Path:
    """Return a fresh data folder holding a copy of the shared users file."""
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "users.json").write_bytes(users_file.read_bytes())
    return folder


@pytest.fixture
def make_auth_engine(
    make_engine: Callable[..., BrokerThread], data_dir: Path
) -> Iterator[Callable[..., AuthEngine]]:
    """Return a factory of in-process engines with an AuthPolicy on ``data_dir``."""
    started: list[AuthEngine] = []

    def factory(broker_fields: dict[str, object] | None = None, **settings: object) -> AuthEngine:
        settings.setdefault("data_dir", data_dir)
        engine = AuthEngine(make_engine, AuthSettings(**settings), broker_fields)  # type: ignore[arg-type]
        started.append(engine)
        return engine

    yield factory
    for engine in started:
        engine.close()


@pytest.fixture
def auth_engine(make_auth_engine: Callable[..., AuthEngine]) -> AuthEngine:
    return make_auth_engine()
