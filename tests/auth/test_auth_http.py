"""Tokens and roles on the HTTP side of ``ironshadow serve``: REST, the /ws feed, sign-in and
the session cookie, with real HTTP and WebSocket clients against an engine process whose
users come from the users file and the ``ironshadow auth`` command."""

from __future__ import annotations

import contextlib
import json
import shutil
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from conftest import free_port, scaled
from ironshadow.api.security import HttpAuth
from ironshadow.auth import USERS_FILE_NAME, AuthPolicy, AuthSettings
from ironshadow.auth.tokens import TokenClaims, issue_token

from .auth_harness import add_user, remove_user, run_auth, serving
from .conftest import USERS

PASSWORDS = {name: password for name, _, password in USERS}
HOST = "127.0.0.1"


@dataclass
class Engine:
    data_dir: Path
    http_port: int

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    def feed_url(self, query: str = "") -> str:
        return f"ws://{HOST}:{self.http_port}/ws{query}"


def wait_for_http(base_url: str, verify: Any = True) -> None:
    deadline = time.monotonic() + scaled(15)
    while True:
        try:
            if httpx.get(base_url + "/healthz", trust_env=False, verify=verify).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{base_url}/healthz did not answer in 15 s"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory, users_file: Path) -> Iterator[Engine]:
    """An engine with the four shared users and a SQLite history, shared by this module."""
    data_dir = tmp_path_factory.mktemp("http-auth") / "data"
    data_dir.mkdir()
    shutil.copy(users_file, data_dir / "users.json")
    with serving(data_dir, "--memory-only", "false") as process:
        running = Engine(data_dir, process.http_port)
        wait_for_http(running.base_url)
        yield running


@pytest.fixture
def client(engine: Engine) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=engine.base_url, timeout=scaled(10), trust_env=False) as http:
        yield http


def get_token(client: httpx.Client, name: str, password: str | None = None) -> str:
    """Return a token from POST /auth/token."""
    response = client.post(
        "/auth/token", json={"username": name, "password": password or PASSWORDS[name]}
    )
    assert response.status_code == 200, response.text
    return str(response.json()["token"])


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_unauthorized(response: httpx.Response, text: str, error: str | None = None) -> None:
    """Check a 401 with its challenge and an error document whose message contains ``text``."""
    assert response.status_code == 401, response.text
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith('Bearer realm="ironshadow"')
    if error is not None:
        assert f'error="{error}"' in challenge
    document = response.json()
    assert document["code"] == 401
    assert text in document["message"]


def wait_for_status(
    client: httpx.Client, path: str, headers: dict[str, str], status: int
) -> httpx.Response:
    """Repeat GET ``path`` until it returns ``status`` (the engine rereads users every second)."""
    deadline = time.monotonic() + scaled(10)
    while True:
        response = client.get(path, headers=headers)
        if response.status_code == status or time.monotonic() > deadline:
            return response
        time.sleep(0.05)


@contextlib.contextmanager
def open_websocket(url: str, **options: Any) -> Iterator[ClientConnection]:
    with connect(url, open_timeout=scaled(10), **options) as websocket:
        yield websocket


def request(websocket: ClientConnection, document: dict[str, Any]) -> dict[str, Any]:
    websocket.send(json.dumps(document))
    return dict(json.loads(websocket.recv(timeout=scaled(10))))


# --- without a token ---------------------------------------------------------------------


def test_probes_and_login_page_open(client: httpx.Client) -> None:
    for path in ("/healthz", "/readyz", "/", "/static/app.js", "/static/login.js", "/docs"):
        response = client.get(path)
        assert response.status_code == 200, (path, response.text)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/things"),
        ("GET", "/things/press-1"),
        ("GET", "/things/press-1/shadow"),
        ("POST", "/things/press-1/shadow"),
        ("DELETE", "/things/press-1/shadow"),
        ("GET", "/things/press-1/history"),
        ("GET", "/metrics"),
        ("GET", "/api/engine"),
        ("GET", "/auth/session"),
        ("GET", "/no/such/path"),
    ],
)
def test_missing_token_rejected(client: httpx.Client, method: str, path: str) -> None:
    response = client.request(method, path, json={"state": {"reported": {"speed": 1}}})

    assert_unauthorized(response, "send the header 'Authorization: Bearer <token>'")
    assert "error=" not in response.headers["www-authenticate"]


def test_invalid_tokens_rejected(client: httpx.Client, engine: Engine, tmp_path: Path) -> None:
    token = get_token(client, "dashboard")
    version, payload, signature = token.split(".")
    # The same users in another data folder: its own secret signs other tokens.
    other_folder = tmp_path / "other"
    other_folder.mkdir()
    shutil.copy(engine.data_dir / "users.json", other_folder / "users.json")
    foreign = run_auth("token", "dashboard", "--data-dir", str(other_folder))
    assert foreign.returncode == 0, foreign.stderr
    flipped = payload[:-2] + ("A" if payload[-2] != "A" else "B") + payload[-1]

    cases = [
        ({"Authorization": "Bearer not-a-token"}, "not an IronShadow token", "invalid_token"),
        ({"Authorization": f"Bearer {version}.{flipped}.{signature}"},
         "signature does not match", "invalid_token"),
        ({"Authorization": f"Bearer {foreign.stdout.strip()}"},
         "signature does not match", "invalid_token"),
        ({"Authorization": f"Basic {token}"}, "expected 'Bearer <token>'", "invalid_request"),
        ({"Authorization": "Bearer"}, "with no token", "invalid_request"),
        ({"Cookie": "ironshadow_session=v1.e30.AAAA"}, "signature does not match",
         "invalid_token"),
    ]  # fmt: skip
    for headers, text, error in cases:
        assert_unauthorized(client.get("/things", headers=headers), text, error)
    assert client.get("/things", headers=bearer(token)).status_code == 200


def test_expired_token_rejected(client: httpx.Client, engine: Engine) -> None:
    issued = run_auth("token", "dashboard", "--data-dir", str(engine.data_dir), "--lifetime", "1s")
    assert issued.returncode == 0, issued.stderr
    assert "valid until" in issued.stderr

    response = wait_for_status(client, "/things", bearer(issued.stdout.strip()), 401)

    assert_unauthorized(response, "the token expired at ", "invalid_token")


def test_wrong_password_rejected(client: httpx.Client) -> None:
    wrong = client.post("/auth/token", json={"username": "press-1", "password": "guess"})
    unknown = client.post("/auth/token", json={"username": "press-99", "password": "guess"})
    not_json = client.post("/auth/token", content=b"username=press-1")
    no_password = client.post("/auth/token", json={"username": "press-1"})

    assert_unauthorized(wrong, "Wrong user name or password.")
    assert_unauthorized(unknown, "Wrong user name or password.")
    assert not_json.status_code == 400
    assert "the body is not JSON" in not_json.json()["message"]
    assert no_password.status_code == 400
    assert "password is missing or not a string" in no_password.json()["message"]


def test_token_response(client: httpx.Client) -> None:
    before = time.time()
    response = client.post(
        "/auth/token", json={"username": "press-1", "password": PASSWORDS["press-1"]}
    )

    assert response.status_code == 200
    document = response.json()
    assert document["role"] == "device"
    assert document["username"] == "press-1"
    assert document["token"].startswith("v1.")
    # The default lifetime is 12 hours.
    assert before + 12 * 3600 - 2 <= document["expiresAt"] <= time.time() + 12 * 3600


# --- roles ---------------------------------------------------------------------------------


def test_device_uses_only_its_own_thing(client: httpx.Client) -> None:
    application = bearer(get_token(client, "dashboard"))
    device = bearer(get_token(client, "press-1"))
    update = {"state": {"reported": {"speed": 4}}}
    assert client.post("/things/press-2/shadow", json=update, headers=application).is_success

    own = [
        client.post("/things/press-1/shadow", json=update, headers=device),
        client.post("/things/press-1/shadow?name=firmware", json=update, headers=device),
        client.get("/things/press-1/shadow", headers=device),
        client.get("/things/press-1/shadow?name=firmware", headers=device),
        client.get("/things/press-1", headers=device),
        client.get("/things/press-1/shadows", headers=device),
        client.get("/api/things/shadow/ListNamedShadowsForThing/press-1", headers=device),
        client.get("/things/press-1/history", headers=device),
        client.get("/auth/session", headers=device),
        client.delete("/things/press-1/shadow?name=firmware", headers=device),
    ]
    for response in own:
        assert response.status_code == 200, (response.request.url, response.text)
    assert client.get("/auth/session", headers=device).json()["username"] == "press-1"

    others = [
        ("GET", "/things/press-2/shadow"),
        ("POST", "/things/press-2/shadow"),
        ("DELETE", "/things/press-2/shadow"),
        ("GET", "/things/press-2/shadow?name=firmware"),
        ("GET", "/things/press-2/history"),
        ("GET", "/things/press-2"),
        ("GET", "/things/press-2/shadows"),
        ("GET", "/api/things/shadow/ListNamedShadowsForThing/press-2"),
        ("GET", "/things/press-10/shadow"),
        ("GET", "/things"),
        ("GET", "/metrics"),
        ("GET", "/api/engine"),
    ]
    for method, path in others:
        response = client.request(method, path, json=update, headers=device)
        assert response.status_code == 403, (method, path, response.text)
        assert response.json()["message"].startswith("Forbidden: device 'press-1' may use only")

    # The rejected update and delete left press-2's shadow as it was.
    shadow = client.get("/things/press-2/shadow", headers=application)
    assert shadow.status_code == 200
    assert shadow.json()["state"]["reported"] == {"speed": 4}


@pytest.mark.parametrize("name", ["dashboard", "operator"])
def test_application_and_admin_use_everything(client: httpx.Client, name: str) -> None:
    headers = bearer(get_token(client, name))
    update = {"state": {"desired": {"speed": 2}}}

    responses = [
        client.post("/things/press-2/shadow", json=update, headers=headers),
        client.get("/things/press-2/shadow", headers=headers),
        client.get("/things/press-2", headers=headers),
        client.get("/things/press-2/history", headers=headers),
        client.get("/things", headers=headers),
        client.get("/api/engine", headers=headers),
        client.get("/metrics", headers=headers),
        client.delete("/things/press-2/shadow", headers=headers),
    ]

    for response in responses:
        assert response.status_code == 200, (response.request.url, response.text)
    assert "ironshadow_clients_connected" in responses[6].text


def test_cli_token_works_as_bearer(client: httpx.Client, engine: Engine) -> None:
    issued = run_auth("token", "dashboard", "--data-dir", str(engine.data_dir), "--lifetime", "30d")

    assert issued.returncode == 0, issued.stderr
    token = issued.stdout.strip()
    assert issued.stdout.count("\n") == 1
    metrics = client.get("/metrics", headers=bearer(token))
    assert metrics.status_code == 200
    assert metrics.text.startswith("# HELP")
    expires = client.get("/auth/session", headers=bearer(token)).json()["expiresAt"]
    assert expires > time.time() + 29 * 86400


def test_cli_token_for_unknown_user(engine: Engine) -> None:
    result = run_auth("token", "press-99", "--data-dir", str(engine.data_dir))

    assert result.returncode == 1
    assert result.stdout == ""
    assert "user 'press-99' not found" in result.stderr


def test_removed_user_loses_access(client: httpx.Client, engine: Engine) -> None:
    add_user(engine.data_dir, "press-8", "device", "press-8-secret")
    # The engine reads the users file about once a second.
    deadline = time.monotonic() + scaled(10)
    while True:
        response = client.post(
            "/auth/token", json={"username": "press-8", "password": "press-8-secret"}
        )
        if response.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert response.status_code == 200, response.text
    headers = bearer(response.json()["token"])
    update = {"state": {"reported": {"speed": 1}}}
    assert client.post("/things/press-8/shadow", json=update, headers=headers).is_success

    with open_websocket(engine.feed_url(), additional_headers=headers) as websocket:
        assert request(websocket, {"subscribe": ["press-8"]}) == {"subscriptions": ["press-8"]}
        remove_user(engine.data_dir, "press-8")

        response = wait_for_status(client, "/things/press-8/shadow", headers, 401)
        assert_unauthorized(response, "Revoked token: user 'press-8' no longer exists")
        with pytest.raises(ConnectionClosed) as closed:
            websocket.recv(timeout=scaled(10))
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1008
    assert closed.value.rcvd.reason == "token revoked: user removed or changed"


# --- sign-in and the session cookie ---------------------------------------------------------


def test_login_sets_session_cookie(client: httpx.Client) -> None:
    wrong = client.post("/auth/login", json={"username": "dashboard", "password": "guess"})
    assert_unauthorized(wrong, "Wrong user name or password.")
    assert "set-cookie" not in wrong.headers

    signed_in = client.post(
        "/auth/login", json={"username": "dashboard", "password": PASSWORDS["dashboard"]}
    )

    assert signed_in.status_code == 200
    assert "token" not in signed_in.json()
    assert signed_in.json()["username"] == "dashboard"
    cookie = signed_in.headers["set-cookie"]
    attributes = [part.strip().lower() for part in cookie.split(";")]
    assert attributes[0].startswith("ironshadow_session=v1.")
    assert "httponly" in attributes
    assert "samesite=strict" in attributes
    assert "path=/" in attributes
    assert "secure" not in attributes
    # httpx keeps the cookie and sends it back.
    assert client.get("/things").status_code == 200
    session = client.get("/auth/session").json()
    assert session == {
        "required": True,
        "username": "dashboard",
        "role": "application",
        "expiresAt": signed_in.json()["expiresAt"],
    }

    signed_out = client.post("/auth/logout")
    assert signed_out.status_code == 204
    assert "max-age=0" in signed_out.headers["set-cookie"].lower()
    assert_unauthorized(client.get("/things"), "Authentication required")


# --- the /ws feed --------------------------------------------------------------------------


def test_feed_rejects_handshake_without_valid_token(client: httpx.Client, engine: Engine) -> None:
    device = get_token(client, "press-1")
    cases = [
        ({}, "Authentication required"),
        ({"additional_headers": bearer("v1.e30.AAAA")}, "signature does not match"),
        ({"additional_headers": {"Cookie": "ironshadow_session=expired"}},
         "not an IronShadow token"),
    ]  # fmt: skip
    for options, text in cases:
        with pytest.raises(InvalidStatus) as rejected, open_websocket(
            engine.feed_url(), **options
        ):
            pass
        response = rejected.value.response
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert text in json.loads(response.body)["message"]

    # The query parameter counts on /ws only.
    assert client.get(f"/things/press-1/shadow?token={device}").status_code == 401


def test_feed_accepts_each_token_source(client: httpx.Client, engine: Engine) -> None:
    token = get_token(client, "dashboard")
    sources = [
        (engine.feed_url(), {"additional_headers": bearer(token)}),
        (engine.feed_url(f"?token={token}"), {}),
        (engine.feed_url(), {"additional_headers": {"Cookie": f"ironshadow_session={token}"}}),
    ]
    for url, options in sources:
        with open_websocket(url, **options) as websocket:
            assert request(websocket, {"subscribe": ["*"]}) == {"subscriptions": ["*"]}


def test_feed_device_follows_only_itself(client: httpx.Client, engine: Engine) -> None:
    application = bearer(get_token(client, "dashboard"))
    device = bearer(get_token(client, "press-1"))

    with open_websocket(engine.feed_url(), additional_headers=device) as websocket:
        for pattern in ("press-2", "press-*", "*", "press-1*"):
            reply = request(websocket, {"subscribe": [pattern]})
            assert reply == {
                "error": f"forbidden subscription {pattern!r}: device 'press-1' may follow "
                "only its own thing; subscribe to 'press-1'"
            }
        # A request with one forbidden entry is rejected whole.
        reply = request(websocket, {"subscribe": ["press-1", "press-2"]})
        assert "forbidden subscription 'press-2'" in reply["error"]
        assert request(websocket, {"subscribe": ["press-1"]}) == {"subscriptions": ["press-1"]}

        for thing in ("press-2", "press-1"):
            update = {"state": {"reported": {"marker": thing}}}
            assert client.post(
                f"/things/{thing}/shadow", json=update, headers=application
            ).is_success
        frame = json.loads(websocket.recv(timeout=scaled(10)))

    # press-2 changed first, so receiving press-1's frame first shows that press-2's was not
    # sent to this client.
    assert frame["thing"] == "press-1"
    assert frame["state"]["reported"]["marker"] == "press-1"


def test_mqtt_over_websocket_needs_no_http_token(engine: Engine) -> None:
    # MQTT 3.1.1 CONNECT with client id "ws-anon", no user name and keep alive 60 s.
    connect_packet = bytes.fromhex("101300044d5154540402003c000777732d616e6f6e")
    url = f"ws://{HOST}:{engine.http_port}/mqtt"

    with open_websocket(url, subprotocols=["mqtt"]) as websocket:
        websocket.send(connect_packet)
        connack = websocket.recv(timeout=scaled(10))

    # The handshake passed, and the broker rejected the CONNECT itself: 5 = not authorized.
    assert connack == bytes.fromhex("20020005")


# --- OpenAPI ---------------------------------------------------------------------------------


def test_openapi_declares_bearer_scheme(client: httpx.Client) -> None:
    schema = client.get("/openapi.json").json()

    schemes = schema["components"]["securitySchemes"]
    assert schemes["bearerToken"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "A token from POST /auth/token or `ironshadow auth token NAME`.",
    }
    assert schemes["sessionCookie"]["in"] == "cookie"
    assert {"bearerToken": []} in schema["security"]
    assert schema["paths"]["/healthz"]["get"]["security"] == []
    assert schema["paths"]["/auth/token"]["post"]["security"] == []
    shadow = schema["paths"]["/things/{thing}/shadow"]["get"]
    assert "security" not in shadow
    assert "401" in shadow["responses"]
    assert "403" in shadow["responses"]


# --- HTTPS ---------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command is missing")
def test_cookie_secure_over_https(tmp_path: Path, data_dir: Path) -> None:
    from tls.certificates import CertificateAuthority

    authority = CertificateAuthority(tmp_path / "ca", "IronShadow Auth Test CA")
    server = authority.issue("server", "/CN=localhost", "server")
    arguments = ["--tls-cert", str(server.cert), "--tls-key", str(server.key),
                 "--tls-port", str(free_port())]  # fmt: skip

    with serving(data_dir, *arguments) as process:
        base_url = f"https://{HOST}:{process.http_port}"
        trusting = ssl.create_default_context(cafile=str(authority.cert))
        wait_for_http(base_url, verify=trusting)
        with httpx.Client(base_url=base_url, verify=trusting, trust_env=False,
                          timeout=scaled(10)) as https:  # fmt: skip
            signed_in = https.post(
                "/auth/login", json={"username": "dashboard", "password": PASSWORDS["dashboard"]}
            )
            things = https.get("/things")

    assert signed_in.status_code == 200
    attributes = [part.strip().lower() for part in signed_in.headers["set-cookie"].split(";")]
    assert "secure" in attributes
    assert "httponly" in attributes
    assert things.status_code == 200


def test_open_until_users_added(tmp_path: Path) -> None:
    data_dir = tmp_path / "empty"
    data_dir.mkdir()

    with serving(data_dir) as process:
        base_url = f"http://{HOST}:{process.http_port}"
        wait_for_http(base_url)
        with httpx.Client(base_url=base_url, trust_env=False, timeout=scaled(10)) as http:
            things = http.get("/things")
            session = http.get("/auth/session")
            login = http.post("/auth/token", json={"username": "a", "password": "b"})
            assert not (data_dir / "token-secret").exists()

            with open_websocket(f"ws://{HOST}:{process.http_port}/ws") as websocket:
                assert request(websocket, {"subscribe": ["*"]}) == {"subscriptions": ["*"]}
                add_user(data_dir, "press-1", "device", "press-1-secret")
                with pytest.raises(ConnectionClosed) as closed:
                    websocket.recv(timeout=scaled(10))
            after = wait_for_status(http, "/things", {}, 401)

    assert things.status_code == 200
    assert session.json() == {"required": False}
    assert login.status_code == 400
    assert "Authentication is off" in login.json()["message"]
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1008
    assert closed.value.rcvd.reason == "sign-in required: users were added"
    assert_unauthorized(after, "Authentication required")


def test_feed_closed_at_token_expiry(client: httpx.Client, engine: Engine) -> None:
    issued = run_auth("token", "dashboard", "--data-dir", str(engine.data_dir), "--lifetime", "5s")
    assert issued.returncode == 0, issued.stderr
    headers = bearer(issued.stdout.strip())

    with open_websocket(engine.feed_url(), additional_headers=headers) as websocket:
        assert request(websocket, {"subscribe": ["*"]}) == {"subscriptions": ["*"]}
        with pytest.raises(ConnectionClosed) as closed:
            # Frames of other tests' updates may arrive first.
            while True:
                websocket.recv(timeout=scaled(15))

    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1008
    assert closed.value.rcvd.reason == "token expired"


def test_stale_worker_accepts_new_token(tmp_path: Path, users_file: Path) -> None:
    """A worker that has not read the users file since a user was added still accepts a
    token that another worker issued for that user. Every worker reads the file on its own
    timer, so the stale worker reads it again before it calls the token revoked."""
    shutil.copy(users_file, tmp_path / USERS_FILE_NAME)
    behind = HttpAuth(AuthPolicy(AuthSettings(data_dir=tmp_path)))
    behind.policy.reload()
    add_user(tmp_path, "press-9", "device", "press-9-secret")
    current = HttpAuth(AuthPolicy(AuthSettings(data_dir=tmp_path)))
    current.policy.reload()
    user = current.users.lookup("press-9")
    assert user is not None
    token, _claims = issue_token(current.secret.key(), user, 3600)

    claims = behind.authenticate(token)
    assert isinstance(claims, TokenClaims), claims
    assert claims.name == "press-9"


def test_stale_worker_finds_new_user(tmp_path: Path, users_file: Path) -> None:
    """A worker that has not read the users file since a user was added still finds the
    user when it signs in or connects: it reads the file again before it reports the user
    missing."""
    shutil.copy(users_file, tmp_path / USERS_FILE_NAME)
    behind = AuthPolicy(AuthSettings(data_dir=tmp_path))
    behind.reload()
    add_user(tmp_path, "press-10", "device", "press-10-secret")

    user = behind.find_user("press-10")
    assert user is not None
    assert user.role == "device"
    assert behind.find_user("press-11") is None
