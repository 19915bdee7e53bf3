"""Error documents for every failure the REST API returns.

Every error body has the shape of an AWS IoT shadow error document,
``{"code": <HTTP status>, "message": "...", "timestamp": <epoch seconds>}``, whether it
comes from the shadow service, from parameter validation, from routing (404, 405) or from a
bug (500). FastAPI's default 422 body is replaced by a 400 that names the parameter and
what to pass instead.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson
from annotated_types import Ge, Gt, Le, Lt
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("ironshadow.api")

JSON_MEDIA_TYPE = "application/json"
INTERNAL_ERROR_MESSAGE = "Internal service failure"


class ApiError(Exception):
    """A rejected request: its HTTP status and a message with the fix for the caller."""

    def __init__(
        self, status: int, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def error_body(status: int, message: str) -> bytes:
    return orjson.dumps({"code": status, "message": message, "timestamp": int(time.time())})


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(
        error_body(status, message), status_code=status, media_type=JSON_MEDIA_TYPE,
        headers=headers,
    )


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that turn every error into an error document."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    # Starlette places it inside its last-resort ServerErrorMiddleware but outside the
    # exception handlers, so it also catches an exception raised by one of them.
    app.add_middleware(InternalErrorMiddleware)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.message, exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    headers = dict(exc.headers) if exc.headers else None
    if exc.status_code == 404:
        message = f"Not found: no endpoint at {request.url.path}. The endpoints are listed at /docs"
    elif exc.status_code == 405:
        # Starlette's Allow header lists only the first route that matched the path, but
        # GET, POST and DELETE of a shadow are separate routes.
        allowed = ", ".join(_allowed_methods(request))
        headers = {"Allow": allowed}
        message = (
            f"Method {request.method} is not allowed on {request.url.path}. "
            f"Use one of: {allowed}"
        )
    else:
        message = str(exc.detail)
    return error_response(exc.status_code, message, headers)


def _allowed_methods(request: Request) -> list[str]:
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods.update(getattr(route, "methods", None) or ())
    return sorted(methods)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    problems = [_describe_problem(request, error) for error in exc.errors()]
    return error_response(400, " ".join(problems))


def _describe_problem(request: Request, error: dict[str, Any]) -> str:
    """Describe the invalid parameter, its value and what to pass instead."""
    location = error.get("loc", ())
    where = location[0] if location else "request"
    name = ".".join(str(part) for part in location[1:]) or "value"
    kind = error.get("type", "")
    if kind == "missing":
        return f"Missing {where} parameter {name}. Add it to the request."

    value = error.get("input")
    reason = str(error.get("msg", "invalid value")).rstrip(".")
    text = f"Invalid {where} parameter {name}={value!r}: {reason[:1].lower()}{reason[1:]}"
    if kind.startswith("int_") or kind in {"greater_than_equal", "less_than_equal"}:
        low, high = _integer_bounds(request, name)
        if low is not None and high is not None:
            return f"{text}. Pass a whole number from {low} to {high}."
        return f"{text}. Pass a whole number."
    if kind.startswith("bool_"):
        return f"{text}. Pass true or false."
    return f"{text}."


def _integer_bounds(request: Request, name: str) -> tuple[int | None, int | None]:
    """Return the inclusive range declared for the route's query parameter ``name``."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    low: int | None = None
    high: int | None = None
    for field in getattr(dependant, "query_params", ()):
        if field.alias != name:
            continue
        for constraint in field.field_info.metadata:
            if isinstance(constraint, Ge):
                low = int(constraint.ge)  # type: ignore[call-overload]
            elif isinstance(constraint, Gt):
                low = int(constraint.gt) + 1  # type: ignore[call-overload]
            elif isinstance(constraint, Le):
                high = int(constraint.le)  # type: ignore[call-overload]
            elif isinstance(constraint, Lt):
                high = int(constraint.lt) - 1  # type: ignore[call-overload]
    return low, high


class InternalErrorMiddleware:
    """Log an unexpected exception and respond with 500 and an error document.

    Starlette's own last-resort handler re-raises after responding, so uvicorn would log
    the same exception a second time under its own logger.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        response_started = False

        async def send_tracked(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except Exception:
            log.exception("request %s %s failed", scope.get("method"), scope.get("path"))
            if response_started:
                raise
            response = error_response(500, INTERNAL_ERROR_MESSAGE)
            await response(scope, receive, send)
