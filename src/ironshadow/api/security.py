"""Authentication and roles on the HTTP side: bearer tokens, the dashboard's session cookie
and the ``/auth`` endpoints.

Mode, decided on every request from the users file that the MQTT access policy reloads:

* users in the users file: every request needs a valid token, except the public paths
  (``PUBLIC_PATHS``: the probes, the sign-in endpoints, the dashboard page with its static
  files, and the OpenAPI page and document). ``/mqtt`` needs none, because MQTT over
  WebSocket authenticates in its CONNECT packet like any MQTT client.
* no users and anonymous access allowed: the API is open, as without an access policy.
* no users and anonymous access off: every request that needs a token is rejected, as the
  broker rejects every MQTT client.

A request carries its token in ``Authorization: Bearer <token>``, in the session cookie that
``POST /auth/login`` sets, or, for the ``/ws`` feed only (browsers cannot set headers on a
WebSocket), in the ``token`` query parameter. A missing, malformed, expired or revoked token
gets 401 with ``WWW-Authenticate: Bearer``. A valid token whose role does not allow the
request gets 403.

Roles: a ``device`` may use ``/things/{its name}`` and the shadow, named shadow and history
paths below it, and may follow only its own thing on ``/ws``. ``application`` and ``admin``
users may use every endpoint: the API has no admin-only endpoint, because users are managed
with the ``ironshadow auth`` command.

Feed clients stay connected after their handshake, so ``HttpAuth`` checks them once per
FEED_CHECK_INTERVAL while any is connected, and closes with 1008 those whose token expired
or was revoked, and anonymous ones once users exist.
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import FastAPI, Request
from pydantic import BaseModel, Field
from starlette.requests import cookie_parser
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from ..auth.tokens import (
    DEFAULT_TOKEN_LIFETIME,
    TokenClaims,
    TokenError,
    TokenSecret,
    issue_token,
    read_token,
    revocation_reason,
    utc_text,
)
from ..broker.access import ROLE_DEVICE
from .documents import ErrorDocument
from .errors import JSON_MEDIA_TYPE, ApiError, error_body, error_response
from .feed import CLAIMS_STATE_KEY, FEED_PATH
from .mqtt_websocket import MQTT_PATH

if TYPE_CHECKING:
    from ..auth import AuthPolicy
    from .feed import ShadowFeed

log = logging.getLogger("ironshadow.api")

COOKIE_NAME = "ironshadow_session"
REALM = "ironshadow"
# Paths that need no token: orchestrator probes, sign-in, and pages that contain no data.
PUBLIC_PATHS = frozenset(
    {
        "/",
        "/healthz",
        "/readyz",
        "/docs",
        "/openapi.json",
        "/auth/token",
        "/auth/login",
        "/auth/logout",
    }
)
PUBLIC_PREFIXES = ("/static/",)
# Paths below /things/{thing} that a device may use on its own thing.
DEVICE_RESOURCES = frozenset({"shadow", "shadows", "history"})
AWS_NAMED_SHADOWS_PATH = "/api/things/shadow/ListNamedShadowsForThing/"
# Maximum sign-in request body, in bytes: room for a user name of 128 characters and a long
# password.
MAX_LOGIN_BODY_BYTES = 4096
# Seconds between two checks of the connected feed clients' tokens.
FEED_CHECK_INTERVAL = 1.0
# Seconds between two log lines about failed sign-ins. Failures in between are counted and
# reported in the next line.
LOGIN_FAILURE_LOG_INTERVAL = 60.0
CLOSE_POLICY_VIOLATION = 1008

MISSING_TOKEN = (
    "Authentication required: send the header 'Authorization: Bearer <token>' with a token "
    "from POST /auth/token or `ironshadow auth token NAME`, or sign in on the dashboard."
)
NEW_TOKEN_HINT = "Get a new token from POST /auth/token or sign in again."


@dataclass(frozen=True, slots=True)
class Denial:
    """A rejected request: the HTTP status, the message, and the RFC 6750 error code that
    goes into ``WWW-Authenticate`` (none when the request sent no token)."""

    status: int
    message: str
    error: str | None = None

    def headers(self) -> dict[str, str]:
        if self.status != 401:
            return {}
        challenge = f'Bearer realm="{REALM}"'
        if self.error is not None:
            challenge += f', error="{self.error}"'
        return {"WWW-Authenticate": challenge}


def is_public_path(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def device_may_use(device: str, path: str) -> bool:
    """Return whether device ``device`` may request ``path`` (its own thing's paths only)."""
    if path == AWS_NAMED_SHADOWS_PATH + device:
        return True
    parts = path.split("/")
    # "/things/press-7/shadow" splits into "", "things", "press-7", "shadow".
    if len(parts) < 3 or parts[1] != "things" or parts[2] != device:
        return False
    return len(parts) == 3 or (len(parts) == 4 and parts[3] in DEVICE_RESOURCES)


def forbidden_reason(claims: TokenClaims, method: str, path: str) -> str | None:
    """Return why ``claims``' role may not make the request, or None if it may."""
    if claims.role != ROLE_DEVICE:
        return None
    if path == FEED_PATH or path.startswith("/auth/"):
        # The feed checks each subscription of a device.
        return None
    if device_may_use(claims.name, path):
        return None
    return (
        f"Forbidden: device {claims.name!r} may use only /things/{claims.name} and the shadow, "
        f"shadows and history paths below it, not {method} {path}."
    )


def token_from_scope(scope: Scope) -> str | Denial | None:
    """Return the request's token, a Denial for an invalid Authorization header, or None.

    The Authorization header comes first, then the ``token`` query parameter (``/ws`` only),
    then the session cookie.
    """
    authorization: str | None = None
    cookie: str | None = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            authorization = value.decode("latin-1")
        elif name == b"cookie":
            cookie = value.decode("latin-1")
    if authorization is not None:
        scheme, _, credentials = authorization.strip().partition(" ")
        credentials = credentials.strip()
        if scheme.lower() != "bearer" or not credentials:
            return Denial(
                401,
                f"Invalid Authorization header: expected 'Bearer <token>', got the scheme "
                f"{scheme!r}{'' if credentials else ' with no token'}. {NEW_TOKEN_HINT}",
                "invalid_request",
            )
        return credentials
    if scope["type"] == "websocket" and scope["path"] == FEED_PATH:
        query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
        tokens = query.get("token")
        if tokens:
            return tokens[-1]
    if cookie is not None:
        return cookie_parser(cookie).get(COOKIE_NAME) or None
    return None


class LoginRequest(BaseModel):
    username: str = Field(description="User name, as added with `ironshadow auth add`.")
    password: str = Field(description="The user's password.")


class TokenResponse(BaseModel):
    token: str = Field(description="Send it as 'Authorization: Bearer <token>'.")
    expiresAt: int = Field(description="When the token expires, in epoch seconds.")
    role: str = Field(description="The user's role: device, application or admin.")
    username: str = Field(description="The user name the token belongs to.")


class SessionResponse(BaseModel):
    required: bool = Field(
        description="Whether the API requires authentication, which it does once the data "
        "folder holds any user. The other members are present only when it is true."
    )
    username: str | None = Field(None, description="The signed-in user.")
    role: str | None = Field(None, description="The user's role.")
    expiresAt: int | None = Field(None, description="When the token expires, in epoch seconds.")


class HttpAuth:
    """Tokens and roles for the HTTP API, backed by the MQTT access policy's users.

    ``policy`` must be attached to the engine's broker, whose reload timer keeps its users
    current. Tokens live ``token_lifetime`` seconds.
    """

    def __init__(self, policy: AuthPolicy, token_lifetime: float = DEFAULT_TOKEN_LIFETIME) -> None:
        self.policy = policy
        self.users = policy.users
        self.token_lifetime = token_lifetime
        self.secret = TokenSecret.in_data_dir(policy.settings.data_dir)
        # Set by create_app(): the feed whose clients the periodic check closes.
        self.feed: ShadowFeed | None = None
        self._feed_timer: asyncio.TimerHandle | None = None
        self._failures_unlogged = 0
        self._failure_logged_at = -LOGIN_FAILURE_LOG_INTERVAL
        self.login_failures = 0

    @property
    def required(self) -> bool:
        """Whether requests outside the public paths need a token now."""
        return len(self.users) > 0 or not self.policy.anonymous_allowed

    # --- checking requests -------------------------------------------------------------

    def authenticate(self, token: str | None, now: float | None = None) -> TokenClaims | Denial:
        """Return the claims of a valid token, or why the request is rejected."""
        if not len(self.users):
            return Denial(
                401,
                f"Authentication required, but {self.policy.settings.users_file} has no users "
                "and anonymous access is off; add a user with `ironshadow auth add`.",
            )
        if token is None:
            return Denial(401, MISSING_TOKEN)
        try:
            claims = read_token(self.secret.key(), token, now)
        except TokenError as exc:
            return Denial(401, f"Invalid token: {exc}. {NEW_TOKEN_HINT}", "invalid_token")
        reason = self._revocation_reason(claims)
        if reason is not None:
            return Denial(401, f"Revoked token: {reason}. {NEW_TOKEN_HINT}", "invalid_token")
        return claims

    def _revocation_reason(self, claims: TokenClaims) -> str | None:
        """Return why the users file no longer backs ``claims``, or None while it does.

        Each worker of ``serve --workers N`` reads the users file on its own timer, so a
        token that another worker issued after a change to the file can look revoked here
        for up to a second. The file is checked for changes before a token is called
        revoked.
        """
        reason = revocation_reason(claims, self.users)
        if reason is not None and self.policy.reload():
            reason = revocation_reason(claims, self.users)
        return reason

    # --- signing in --------------------------------------------------------------------

    async def sign_in(self, request: Request) -> tuple[str, TokenClaims]:
        """Check the user name and password of a sign-in request and return a new token.

        Raises ApiError: 400 for an invalid request, 401 for a wrong user name or password.
        The Argon2 check runs in the credential cache's threads, off the event loop.
        """
        if not self.required:
            raise ApiError(
                400,
                "Authentication is off: the data folder has no users, so the API needs no "
                "token. Add users with `ironshadow auth add` to turn it on.",
            )
        if not len(self.users):
            raise ApiError(
                400,
                f"No one can sign in: {self.policy.settings.users_file} has no users and "
                "anonymous access is off. Add a user with `ironshadow auth add`.",
            )
        login = _parse_login(await _read_limited(request, MAX_LOGIN_BODY_BYTES))
        user = self.policy.find_user(login.username)
        password_hash = user.password_hash if user is not None else None
        verdict = self.policy.credentials.check(
            login.username, password_hash, login.password.encode()
        )
        if not isinstance(verdict, bool):
            # Shielded, because other sign-ins and MQTT CONNECTs may wait for the same check,
            # and cancelling this request must not cancel it for them.
            verdict = await asyncio.shield(verdict)
        user = self.users.lookup(login.username)
        if not verdict or user is None or user.password_hash != password_hash:
            self._count_failure(login.username, request)
            denial = Denial(401, "Wrong user name or password.")
            raise ApiError(denial.status, denial.message, denial.headers())
        token, claims = issue_token(self.secret.key(), user, self.token_lifetime)
        log.info(
            "issued a token to %s %r, valid until %s",
            user.role,
            user.name,
            utc_text(claims.expires),
        )
        return token, claims

    def _count_failure(self, username: str, request: Request) -> None:
        self.login_failures += 1
        self._failures_unlogged += 1
        now = time.monotonic()
        if now - self._failure_logged_at < LOGIN_FAILURE_LOG_INTERVAL:
            return
        client = request.client
        log.warning(
            "%d failed sign-ins since the last report, the latest for user %r from %s",
            self._failures_unlogged,
            username,
            client.host if client is not None else "(unknown)",
        )
        self._failures_unlogged = 0
        self._failure_logged_at = now

    # --- feed clients ------------------------------------------------------------------

    def watch_feed(self) -> None:
        """Start the periodic check of feed clients unless it runs.

        The feed calls it on the event loop after each client joins, and the check stops
        once no client is left.
        """
        if self._feed_timer is None and self.feed is not None:
            loop = asyncio.get_running_loop()
            self._feed_timer = loop.call_later(FEED_CHECK_INTERVAL, self._check_feed)

    def _check_feed(self) -> None:
        self._feed_timer = None
        feed = self.feed
        if feed is None or not feed.clients:
            return
        now = time.time()
        feed.close_clients(lambda identity: self.feed_close_reason(identity, now))
        if feed.clients:
            self.watch_feed()

    def feed_close_reason(self, identity: Any, now: float) -> str | None:
        """Return why a feed client with ``identity`` (TokenClaims or None) must go, or None."""
        if identity is None:
            return "sign-in required: users were added" if self.required else None
        claims: TokenClaims = identity
        if now >= claims.expires:
            return "token expired"
        if self._revocation_reason(claims) is not None:
            return "token revoked: user removed or changed"
        return None


class AuthMiddleware:
    """Check the token and role of every HTTP request and WebSocket handshake."""

    def __init__(self, app: ASGIApp, auth: HttpAuth) -> None:
        self.app = app
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        path = scope.get("path", "")
        exempt = (kind == "http" and is_public_path(path)) or (
            kind == "websocket" and path == MQTT_PATH
        )
        if kind not in ("http", "websocket") or exempt:
            await self.app(scope, receive, send)
            return
        auth = self.auth
        if not auth.required:
            await self.app(scope, receive, send)
            return

        token = token_from_scope(scope)
        result = token if isinstance(token, Denial) else auth.authenticate(token)
        if isinstance(result, Denial):
            await _reject(scope, receive, send, result)
            return
        reason = forbidden_reason(result, scope.get("method", "GET"), path)
        if reason is not None:
            await _reject(scope, receive, send, Denial(403, reason))
            return
        state = dict(scope.get("state") or {})
        state[CLAIMS_STATE_KEY] = result
        await self.app({**scope, "state": state}, receive, send)


async def _reject(scope: Scope, receive: Receive, send: Send, denial: Denial) -> None:
    headers = denial.headers()
    if scope["type"] == "http":
        await error_response(denial.status, denial.message, headers)(scope, receive, send)
        return
    # A WebSocket handshake: respond with an HTTP response where the server supports it
    # (the ASGI WebSocket Denial Response extension), else close before accepting, which
    # servers send as HTTP 403.
    if (await receive())["type"] != "websocket.connect":
        return  # the client went away first
    if "websocket.http.response" in scope.get("extensions", {}):
        body = error_body(denial.status, denial.message)
        raw_headers = [(b"content-type", JSON_MEDIA_TYPE.encode())]
        raw_headers += [(name.lower().encode(), value.encode()) for name, value in headers.items()]
        await send(
            {"type": "websocket.http.response.start", "status": denial.status,
             "headers": raw_headers}
        )  # fmt: skip
        await send({"type": "websocket.http.response.body", "body": body})
        return
    await send(
        {"type": "websocket.close", "code": CLOSE_POLICY_VIOLATION,
         "reason": close_reason(denial.message)}
    )  # fmt: skip


def close_reason(text: str) -> str:
    """Return ``text`` cut to the 123 UTF-8 bytes that a WebSocket close reason may hold."""
    return text.encode()[:123].decode(errors="ignore")


async def _read_limited(request: Request, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"The sign-in request is larger than {limit} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_login(body: bytes) -> LoginRequest:
    example = '{"username": "...", "password": "..."}'
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ApiError(
            400, f"Invalid sign-in request: the body is not JSON; send {example}."
        ) from None
    if type(document) is not dict:
        raise ApiError(400, f"Invalid sign-in request: send a JSON object, {example}.")
    for member in ("username", "password"):
        if type(document.get(member)) is not str:
            raise ApiError(
                400,
                f"Invalid sign-in request: {member} is missing or not a string; send {example}.",
            )
    return LoginRequest(username=document["username"], password=document["password"])


# --- routes and OpenAPI ------------------------------------------------------------------


def add_auth_routes(app: FastAPI, auth: HttpAuth | None) -> None:
    """Add ``/auth/token``, ``/auth/login``, ``/auth/logout`` and ``/auth/session``.

    Without ``auth`` (no access policy) the API is open: sign-in is rejected with 400 and
    the session reports that no authentication is required.
    """

    async def sign_in(request: Request) -> tuple[str, TokenClaims]:
        if auth is None:
            raise ApiError(
                400,
                "Authentication is off: the engine runs without users, so the API needs no "
                "token.",
            )
        return await auth.sign_in(request)

    unauthorized = {"model": ErrorDocument, "description": "Wrong user name or password."}
    bad_request = {"model": ErrorDocument, "description": "Invalid request, or no users exist."}
    login_body = {
        "requestBody": {
            "required": True,
            "content": {JSON_MEDIA_TYPE: {"schema": LoginRequest.model_json_schema()}},
        }
    }

    @app.post(
        "/auth/token",
        tags=["authentication"],
        summary="Get a bearer token",
        description="Check a user name and password and return a signed token, to send as "
        "'Authorization: Bearer <token>'. It is valid for token_lifetime (12 hours by "
        "default), and it stops working at once when the user is removed or changes role or "
        "password.",
        operation_id="CreateToken",
        response_model=TokenResponse,
        responses={400: bad_request, 401: unauthorized},
        openapi_extra=login_body,
    )
    async def create_token(request: Request) -> Response:
        token, claims = await sign_in(request)
        document = {
            "token": token,
            "expiresAt": claims.expires,
            "role": claims.role,
            "username": claims.name,
        }
        return Response(orjson.dumps(document), media_type=JSON_MEDIA_TYPE)

    @app.post(
        "/auth/login",
        tags=["authentication"],
        summary="Sign in to the dashboard",
        description="Check a user name and password and set an HttpOnly, SameSite=Strict "
        f"session cookie ({COOKIE_NAME}) that holds a token; it is Secure over HTTPS. The "
        "response does not contain the token.",
        operation_id="Login",
        response_model=SessionResponse,
        responses={400: bad_request, 401: unauthorized},
        openapi_extra=login_body,
    )
    async def login(request: Request) -> Response:
        token, claims = await sign_in(request)
        document = {
            "required": True,
            "username": claims.name,
            "role": claims.role,
            "expiresAt": claims.expires,
        }
        response = Response(orjson.dumps(document), media_type=JSON_MEDIA_TYPE)
        response.set_cookie(
            COOKIE_NAME,
            token,
            max_age=max(1, int(claims.expires - time.time())),
            path="/",
            secure=request.url.scheme in ("https", "wss"),
            httponly=True,
            samesite="strict",
        )
        return response

    @app.post(
        "/auth/logout",
        tags=["authentication"],
        summary="Sign out of the dashboard",
        description="Delete the session cookie. The token it held stays valid until it "
        "expires, for whoever copied it.",
        operation_id="Logout",
        status_code=204,
        response_class=Response,
        responses={204: {"description": "The cookie is deleted."}},
    )
    async def logout(request: Request) -> Response:
        response = Response(status_code=204)
        response.delete_cookie(
            COOKIE_NAME,
            path="/",
            secure=request.url.scheme in ("https", "wss"),
            httponly=True,
            samesite="strict",
        )
        return response

    @app.get(
        "/auth/session",
        tags=["authentication"],
        summary="Describe the caller's session",
        description="Return whether the API requires authentication and, if so, who the "
        "token or session cookie belongs to. Without a valid token it returns 401 once "
        "authentication is required.",
        operation_id="GetSession",
        response_model=SessionResponse,
    )
    async def session(request: Request) -> Response:
        claims: TokenClaims | None = request.scope.get("state", {}).get(CLAIMS_STATE_KEY)
        document: dict[str, Any] = {"required": False}
        if claims is not None:
            document = {
                "required": True,
                "username": claims.name,
                "role": claims.role,
                "expiresAt": claims.expires,
            }
        return Response(orjson.dumps(document), media_type=JSON_MEDIA_TYPE)


def install_openapi_security(app: FastAPI) -> None:
    """Declare the bearer token and the session cookie in the OpenAPI document.

    Every operation requires one of them except those on public paths. /docs then shows an
    Authorize button for the token.
    """
    build: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        components = schema.setdefault("components", {})
        components.setdefault("securitySchemes", {}).update(
            {
                "bearerToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A token from POST /auth/token or `ironshadow auth token "
                    "NAME`.",
                },
                "sessionCookie": {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": COOKIE_NAME,
                    "description": "The cookie that POST /auth/login sets.",
                },
            }
        )
        schema["security"] = [{"bearerToken": []}, {"sessionCookie": []}]
        for path, path_item in schema.get("paths", {}).items():
            for operation in path_item.values():
                if is_public_path(path):
                    operation["security"] = []
                    continue
                responses = operation.setdefault("responses", {})
                responses.setdefault(
                    "401",
                    {"description": "Missing, invalid, expired or revoked token, once the "
                     "data folder holds users."},
                )  # fmt: skip
                responses.setdefault(
                    "403", {"description": "The token's role does not allow this request."}
                )
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
