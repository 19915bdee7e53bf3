"""The REST API: AWS IoT Device Shadow over HTTP, plus thing listing.

Endpoints:

- ``GET|POST|DELETE /things/{thing}/shadow[?name=...]``: get, update or delete a classic or
  named shadow. The request body goes to the shadow service unchanged, so HTTP and MQTT
  return the same documents and the same errors, and an accepted update publishes
  ``update/delta`` and ``update/documents`` on MQTT.
- ``GET /things/{thing}/shadows`` and AWS's own path
  ``GET /api/things/shadow/ListNamedShadowsForThing/{thing}``: the thing's named shadows.
- ``GET /things``: things in name order, filtered by name prefix and connection state.
- ``GET /things/{thing}``: one thing's summary and its named shadows.
- ``GET /metrics``: the engine's metrics for Prometheus (api/metrics.py).
- ``/ws``: the WebSocket feed of shadow changes (api/feed.py).
- ``/mqtt``: MQTT over WebSocket, served by the broker's connection logic
  (api/mqtt_websocket.py).
- ``/docs`` and ``/openapi.json``: the OpenAPI description.
- ``/``, ``/static/...`` and ``GET /api/engine``: the web dashboard (api/dashboard.py).
- ``POST /auth/token``, ``POST /auth/login``, ``POST /auth/logout`` and
  ``GET /auth/session``: tokens and the dashboard's sign-in. With users in the data folder,
  every other endpoint outside the probes and the documentation needs a token
  (api/security.py).

Every handler is a coroutine, so it runs on the engine's event loop and reads the shadow
service and the broker without locks. None of them awaits between reading and writing
engine state.
"""

from __future__ import annotations

import bisect
import time
from typing import TYPE_CHECKING, Annotated, Any

import orjson
from fastapi import FastAPI, Path, Query, Request
from fastapi.openapi.utils import get_openapi
from starlette.responses import Response

from .. import __version__
from ..cluster import PeerCallError
from ..shadow import ShadowError, validate_thing_name
from .cluster_reads import list_everywhere, remote_owner, unavailable
from .dashboard import add_dashboard_routes
from .documents import (
    UPDATE_REQUEST_BODY,
    DeleteAccepted,
    ErrorDocument,
    NamedShadowList,
    ShadowDocument,
    ThingDetail,
    ThingList,
    UpdateAccepted,
)
from .errors import JSON_MEDIA_TYPE, ApiError, error_response, install_error_handlers
from .feed import FeedConfig, ShadowFeed, add_feed_route
from .history import add_history_routes
from .metrics import add_metrics_routes
from .mqtt_websocket import MQTTWebSocketEndpoint, add_mqtt_websocket_route
from .paging import (
    NAMED_SHADOWS_PAGE_SIZE_DEFAULT,
    NAMED_SHADOWS_PAGE_SIZE_MAX,
    THINGS_PAGE_SIZE_DEFAULT,
    THINGS_PAGE_SIZE_MAX,
    decode_token,
    encode_token,
)
from .security import AuthMiddleware, HttpAuth, add_auth_routes, install_openapi_security
from .things import ThingDirectory

if TYPE_CHECKING:
    from ..engine import Engine

# Seconds a client is asked to wait before it retries a write rejected while the store
# catches up.
RETRY_AFTER_SECONDS = 1

# Both AWS IoT limits: thing names are 1 to 128 characters, shadow names 1 to 64.
THING_NAME_HELP = "Thing name: 1 to 128 characters from a-z, A-Z, 0-9, ':', '_' and '-'."
SHADOW_NAME_HELP = (
    "Named shadow: 1 to 64 characters from a-z, A-Z, 0-9, '$', ':', '_' and '-'. "
    "Leave it out for the thing's classic (unnamed) shadow."
)

API_DESCRIPTION = """\
Device shadows of the IronShadow engine, compatible with the AWS IoT Device Shadow REST API.

Shadow requests return the same documents and errors as the MQTT shadow topics. An accepted
update also publishes `update/delta` and `update/documents` on MQTT. Every error body is
`{"code": <HTTP status>, "message": "...", "timestamp": <epoch seconds>}`, with
`clientToken` when the shadow request carried one.

Once the engine's data folder contains users, every endpoint except the probes, the sign-in
endpoints and the documentation needs a token from `POST /auth/token` (or
`ironshadow auth token NAME`), sent as `Authorization: Bearer <token>`: use Authorize
above. Without a valid token the response is 401, and 403 when the user's role does not
allow the request: a device may use only its own thing's paths.
"""

OPENAPI_TAGS = [
    {"name": "shadows", "description": "Get, update and delete device shadows."},
    {"name": "things", "description": "Devices known to the engine and their named shadows."},
    {"name": "history", "description": "Numeric history of shadows, raw or aggregated."},
    {"name": "authentication", "description": "Tokens and dashboard sign-in."},
]

Thing = Annotated[str, Path(description=THING_NAME_HELP, examples=["press-17"])]
ShadowName = Annotated[
    str | None, Query(description=SHADOW_NAME_HELP, examples=["firmware"])
]
NextToken = Annotated[
    str | None,
    Query(
        alias="nextToken",
        description="The nextToken of the previous page. Leave it out for the first page.",
    ),
]

NamedShadowsPageSize = Annotated[
    int,
    Query(
        alias="pageSize",
        ge=1,
        le=NAMED_SHADOWS_PAGE_SIZE_MAX,
        description="Shadow names per page.",
    ),
]
ThingsPageSize = Annotated[
    int,
    Query(alias="pageSize", ge=1, le=THINGS_PAGE_SIZE_MAX, description="Things per page."),
]


def _responses(success: str, *errors: tuple[int, str]) -> dict[int | str, dict[str, Any]]:
    """Build the OpenAPI ``responses``: the 200 description and each error status."""
    responses: dict[int | str, dict[str, Any]] = {200: {"description": success}}
    for status, text in errors:
        responses[status] = {"model": ErrorDocument, "description": text}
    return responses


BAD_NAME = (400, "Invalid thing or shadow name, or an invalid request document.")
BODY_TOO_LARGE = (413, "The request body or the resulting shadow is too large.")
NOT_UTF8 = (415, "The request body is not UTF-8.")
NO_SHADOW = (404, "No shadow exists with that name (never created, or deleted).")
INTERNAL = (500, "Internal service failure.")
UNAVAILABLE = (
    503,
    "Retry later, after Retry-After seconds: the store is catching up, or with several "
    "workers the worker that owns the thing did not reply in time.",
)


def create_app(
    engine: Engine,
    max_body_bytes: int | None = None,
    feed_config: FeedConfig | None = None,
    auth: HttpAuth | None = None,
) -> FastAPI:
    """Build the HTTP application for ``engine``: the REST API and the WebSocket endpoints.

    ``max_body_bytes`` caps request bodies. The default is the broker's maximum MQTT
    packet size, so that a request too large for MQTT is also too large for HTTP.
    ``feed_config`` sets the rate and queue limits of the ``/ws`` feed. ``app.state.feed``
    and ``app.state.mqtt_websockets`` hold the two WebSocket endpoints, which
    ``ApiServer.stop()`` closes. ``auth`` turns on tokens and roles (api/security.py);
    without it every endpoint is open.
    """
    service = engine.shadows
    directory = ThingDirectory(service, engine.broker)
    body_limit = max_body_bytes or engine.broker.config.max_packet_size

    app = FastAPI(
        title="IronShadow REST API",
        version=__version__,
        description=API_DESCRIPTION,
        openapi_tags=OPENAPI_TAGS,
        # /docs is served by the dashboard's routes from vendored files; ReDoc would load
        # its script from a CDN.
        docs_url=None,
        redoc_url=None,
    )
    if auth is not None:
        # Added before the error handlers' middleware, so that it runs inside it.
        app.add_middleware(AuthMiddleware, auth=auth)
    install_error_handlers(app)
    # A cluster's worker sets its peers here (api/cluster_reads.py).
    app.state.peers = None
    _install_openapi_without_422(app)
    if auth is not None:
        install_openapi_security(app)
    add_auth_routes(app, auth)
    add_history_routes(app, engine)
    add_metrics_routes(app, engine)
    app.state.feed = ShadowFeed(service, feed_config)
    if auth is not None:
        auth.feed = app.state.feed
        app.state.feed.client_added = auth.watch_feed
    add_feed_route(app, app.state.feed)
    app.state.mqtt_websockets = MQTTWebSocketEndpoint(engine.broker)
    add_mqtt_websocket_route(app, app.state.mqtt_websockets)
    add_dashboard_routes(app, engine)

    async def shadow_request(
        operation: str, request: Request, thing: str, name: str | None
    ) -> Response:
        pipeline = engine.pipeline
        # NOTE: in a cluster this is the serving worker's store, so it also rejects writes
        # for things of other workers. Their owners check their own stores as well.
        if operation != "get" and pipeline is not None and pipeline.pressure:
            return error_response(
                503,
                "The engine is waiting for its store to catch up; retry the request later.",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        payload = await read_body(request, body_limit)
        reply = await service.http_request(operation, thing, name, payload)
        headers = None
        if reply.retry_after is not None:
            headers = {"Retry-After": str(reply.retry_after)}
        return Response(
            reply.body, status_code=reply.status, headers=headers, media_type=JSON_MEDIA_TYPE
        )

    @app.get(
        "/things/{thing}/shadow",
        tags=["shadows"],
        summary="Get a shadow",
        description="Return the full shadow document: desired, reported and delta state, "
        "metadata and version. A body, if sent, may carry a clientToken to echo.",
        operation_id="GetThingShadow",
        response_model=ShadowDocument,
        responses=_responses(
            "The shadow document.",
            BAD_NAME,
            NO_SHADOW,
            BODY_TOO_LARGE,
            NOT_UTF8,
            INTERNAL,
            UNAVAILABLE,
        ),
    )
    async def get_shadow(request: Request, thing: Thing, name: ShadowName = None) -> Response:
        return await shadow_request("get", request, thing, name)

    @app.post(
        "/things/{thing}/shadow",
        tags=["shadows"],
        summary="Update a shadow",
        description="Merge the request's desired and reported state into the shadow, "
        "creating it if needed. The reply echoes the request's state with its metadata "
        "and the new version.",
        operation_id="UpdateThingShadow",
        response_model=UpdateAccepted,
        responses=_responses(
            "The update was accepted. MQTT subscribers got update/delta (when the delta is "
            "not empty) and update/documents.",
            BAD_NAME,
            (409, "Version conflict: the request's version is not the shadow's version."),
            BODY_TOO_LARGE,
            NOT_UTF8,
            INTERNAL,
            UNAVAILABLE,
        ),
        openapi_extra={"requestBody": UPDATE_REQUEST_BODY},
    )
    async def update_shadow(request: Request, thing: Thing, name: ShadowName = None) -> Response:
        return await shadow_request("update", request, thing, name)

    @app.delete(
        "/things/{thing}/shadow",
        tags=["shadows"],
        summary="Delete a shadow",
        description="Delete the shadow's state and metadata. A shadow created again later "
        "continues from the deleted shadow's version.",
        operation_id="DeleteThingShadow",
        response_model=DeleteAccepted,
        responses=_responses(
            "The shadow was deleted.",
            BAD_NAME,
            NO_SHADOW,
            BODY_TOO_LARGE,
            NOT_UTF8,
            INTERNAL,
            UNAVAILABLE,
        ),
    )
    async def delete_shadow(request: Request, thing: Thing, name: ShadowName = None) -> Response:
        return await shadow_request("delete", request, thing, name)

    async def list_named_shadows(
        thing: str, page_size: int, next_token: str | None
    ) -> Response:
        now = int(time.time())
        try:
            validate_thing_name(thing)
        except ShadowError as error:
            return Response(error.payload(now), status_code=error.code, media_type=JSON_MEDIA_TYPE)
        after = decode_token(next_token)
        owner = remote_owner(app.state.peers, thing)
        if owner is None:
            names = service.named_shadow_names(thing)
        else:
            try:
                names = await app.state.peers.call(owner, "named_shadows", {"thing": thing})
            except PeerCallError as error:
                return unavailable(error, thing)
        start = 0 if after is None else bisect.bisect_right(names, after)
        page = names[start : start + page_size]
        more = start + page_size < len(names)
        document = {
            "results": page,
            "nextToken": encode_token(page[-1]) if more and page else None,
            "timestamp": now,
        }
        return Response(orjson.dumps(document), media_type=JSON_MEDIA_TYPE)

    named_shadows_description = (
        "Return the names of the thing's named shadows in sorted order, one page at a time. "
        "The classic shadow and deleted shadows are not listed. A thing without named "
        "shadows, or unknown to the engine, gets an empty list."
    )

    named_shadows_responses = _responses(
        "A page of shadow names.", (400, "Invalid thing name, pageSize or nextToken.")
    )

    @app.get(
        "/things/{thing}/shadows",
        tags=["things"],
        summary="List a thing's named shadows",
        description=named_shadows_description,
        operation_id="ListNamedShadowsForThing",
        response_model=NamedShadowList,
        responses=named_shadows_responses,
    )
    @app.get(
        "/api/things/shadow/ListNamedShadowsForThing/{thing}",
        tags=["things"],
        summary="List a thing's named shadows (AWS IoT path)",
        description=named_shadows_description
        + " This is the path of the AWS IoT ListNamedShadowsForThing API.",
        operation_id="ListNamedShadowsForThingAwsPath",
        response_model=NamedShadowList,
        responses=named_shadows_responses,
    )
    async def named_shadows(
        thing: Thing,
        page_size: NamedShadowsPageSize = NAMED_SHADOWS_PAGE_SIZE_DEFAULT,
        next_token: NextToken = None,
    ) -> Response:
        return await list_named_shadows(thing, page_size, next_token)

    @app.get(
        "/things",
        tags=["things"],
        summary="List things",
        description="Return things in name order, one page at a time. A thing is a name "
        "that has a shadow, or an MQTT client id that is connected or has a persistent "
        "session. Keep requesting with "
        "the returned nextToken until it is null: a page can hold fewer than pageSize "
        "things before the end, because one request checks a bounded number of names.",
        operation_id="ListThings",
        response_model=ThingList,
        responses=_responses(
            "A page of things.", (400, "Invalid prefix, connected, pageSize or nextToken.")
        ),
    )
    async def list_things(
        prefix: Annotated[
            str, Query(max_length=128, description="Only things whose name starts with this.")
        ] = "",
        connected: Annotated[
            bool | None,
            Query(description="true lists only connected things, false only offline ones."),
        ] = None,
        page_size: ThingsPageSize = THINGS_PAGE_SIZE_DEFAULT,
        next_token: NextToken = None,
    ) -> Response:
        after = decode_token(next_token)
        things, cursor = directory.list_page(prefix, connected, page_size, after)
        peers = app.state.peers
        missing: list[dict[str, Any]] = []
        if peers is not None:
            things, cursor, missing = await list_everywhere(
                peers, (things, cursor), prefix, connected, page_size, after
            )
        document = {
            "things": things,
            "nextToken": encode_token(cursor),
            "timestamp": int(time.time()),
            "unavailableWorkers": missing,
        }
        return Response(orjson.dumps(document), media_type=JSON_MEDIA_TYPE)

    @app.get(
        "/things/{thing}",
        tags=["things"],
        summary="Describe a thing",
        description="Return whether the thing is connected, when it was last seen, its "
        "classic shadow's version and the names of its named shadows.",
        operation_id="DescribeThing",
        response_model=ThingDetail,
        responses=_responses(
            "The thing.",
            (400, "Invalid thing name."),
            (404, "Thing not found: it has no shadow and has never connected."),
        ),
    )
    async def describe_thing(thing: Thing) -> Response:
        now = int(time.time())
        try:
            validate_thing_name(thing)
        except ShadowError as error:
            return Response(error.payload(now), status_code=error.code, media_type=JSON_MEDIA_TYPE)
        owner = remote_owner(app.state.peers, thing)
        if owner is None:
            detail = directory.detail(thing) if directory.exists(thing) else None
        else:
            try:
                detail = await app.state.peers.call(owner, "describe", {"thing": thing})
            except PeerCallError as error:
                return unavailable(error, thing)
        if detail is None:
            return error_response(
                404, f"Thing not found: {thing!r} has no shadow and has never connected"
            )
        return Response(orjson.dumps(detail), media_type=JSON_MEDIA_TYPE)

    return app


async def read_body(request: Request, limit: int) -> bytes:
    """Return the request body, or raise ApiError (413) once it exceeds ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _body_too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _body_too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _body_too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"The payload exceeds the maximum size allowed: request bodies are limited to "
        f"{limit} bytes",
    )


def _install_openapi_without_422(app: FastAPI) -> None:
    """Describe the 400 error document instead of FastAPI's 422 validation error body.

    FastAPI lists a 422 response for every endpoint with parameters, but this API responds
    to invalid parameters with 400 and an error document.
    """

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
            tags=app.openapi_tags,
        )
        for path_item in schema.get("paths", {}).values():
            for operation in path_item.values():
                operation.get("responses", {}).pop("422", None)
        component_schemas = schema.get("components", {}).get("schemas", {})
        component_schemas.pop("HTTPValidationError", None)
        component_schemas.pop("ValidationError", None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
