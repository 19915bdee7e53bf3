"""The web dashboard: its static files, the page at ``/`` and ``GET /api/engine``.

The page and its scripts are in ``static/``, built from ``web/`` in the repository (see
web/README.md), so an installed engine needs no Node and the browser loads nothing from
another host. The page reads the REST API, the history API and the ``/ws`` feed like any
other client. ``GET /api/engine`` gives the engine view the figures of ``/metrics`` as JSON.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from pydantic import BaseModel, Field
from starlette.responses import FileResponse, HTMLResponse, Response
from starlette.staticfiles import StaticFiles

from .cluster_reads import STATUS_TIMEOUT_SECONDS, status_everywhere
from .errors import JSON_MEDIA_TYPE

if TYPE_CHECKING:
    from ..engine import Engine

STATIC_DIR = Path(__file__).parent / "static"


class EngineConnections(BaseModel):
    mqtt: int = Field(description="MQTT clients connected now, over TCP and WebSocket.")
    mqttWebSocket: int = Field(description="Of those, the clients connected over /mqtt.")
    offlineSessions: int = Field(description="Persistent sessions whose client is offline.")
    feedClients: int = Field(description="Clients of the /ws shadow feed.")


class EngineCounters(BaseModel):
    publishReceived: int = Field(description="PUBLISH packets received since start.")
    publishSent: int = Field(description="PUBLISH packets sent since start.")
    publishDropped: int = Field(
        description="Messages not sent: QoS 0 to a congested client, or over a client's "
        "maximum packet size."
    )
    queueDropped: int = Field(description="Messages that a full session queue dropped.")
    shadowUpdates: int = Field(description="Shadow updates accepted, over MQTT and REST.")


class EngineStore(BaseModel):
    pendingWrites: int = Field(description="Shadow writes not yet durable in the hot store.")
    pendingBytes: int = Field(description="Bytes waiting for the hot store.")
    historyOutboxRows: int = Field(description="History rows not yet committed.")
    pressure: bool = Field(
        description="True while the pending writes are above their high mark, so the engine "
        "slows the devices down and rejects REST writes with 503."
    )
    pressureSeconds: float = Field(description="Seconds spent above the high mark since start.")


class EngineStatus(BaseModel):
    """The engine's figures at one moment. A client computes a rate from two readings, by
    dividing the change of a counter by the change of ``timestamp``."""

    timestamp: float = Field(description="When the figures were read, in epoch seconds.")
    connections: EngineConnections
    counters: EngineCounters
    readingPaused: bool = Field(
        description="True while the engine reads from no MQTT connection, to slow devices down."
    )
    store: EngineStore | None = Field(
        description="The write-behind queue to the hot store. Null with --memory-only."
    )
    historyKept: bool = Field(
        description="Whether the engine keeps history, which GET /things/{thing}/history "
        "reads. False with --memory-only."
    )
    workers: list[dict[str, Any]] | None = Field(
        default=None,
        description="With several worker processes: each worker's own figures, in worker "
        'order, with "worker": its index and "up": true, while the fields above add them up. '
        f"A worker that did not reply within {STATUS_TIMEOUT_SECONDS:g} s (restarting or "
        'stuck) is {"worker": index, "up": false, "error": reason} and left out of the '
        "totals. Null for a single process.",
    )


def engine_status(engine: Engine, app: FastAPI | None) -> dict[str, Any]:
    """Collect the figures of ``EngineStatus`` from the engine and the app's WebSocket
    endpoints (none without ``app``)."""
    broker = engine.broker
    stats = broker.stats
    connected = 0
    offline = 0
    for session in broker.sessions.values():
        if session.connection is not None:
            connected += 1
        elif session.consumer is None:  # not one of the engine's own consumers
            offline += 1

    state = app.state if app is not None else None
    mqtt_websockets = getattr(state, "mqtt_websockets", None)
    feed = getattr(state, "feed", None)
    status: dict[str, Any] = {
        "timestamp": time.time(),
        "connections": {
            "mqtt": connected,
            "mqttWebSocket": len(mqtt_websockets.transports) if mqtt_websockets else 0,
            "offlineSessions": offline,
            "feedClients": len(feed.clients) if feed else 0,
        },
        "counters": {
            "publishReceived": stats.publish_received,
            "publishSent": stats.publish_sent,
            "publishDropped": stats.publish_dropped,
            "queueDropped": stats.queue_dropped,
            "shadowUpdates": engine.shadows.updates_applied,
        },
        "readingPaused": bool(broker.reading_paused),
        "store": None,
        "historyKept": engine.history_store is not None,
    }

    pipeline = engine.pipeline
    if pipeline is not None:
        status["store"] = {
            "pendingWrites": pipeline.pending,
            "pendingBytes": pipeline.pending_bytes,
            "historyOutboxRows": pipeline.history_rows_written - pipeline.history_rows_committed,
            "pressure": bool(pipeline.pressure),
            "pressureSeconds": pipeline.paused_seconds(),
        }
    return status


def add_dashboard_routes(app: FastAPI, engine: Engine) -> None:
    """Serve the dashboard at ``/``, the OpenAPI page at ``/docs`` and their files under
    ``/static``, and add ``/api/engine``."""

    @app.get(
        "/api/engine",
        tags=["operations"],
        summary="Engine status",
        description="Connections, message and update counters, and the write-behind queue "
        "with its backpressure state, as JSON: the figures of /metrics that the dashboard's "
        "engine view shows.",
        operation_id="GetEngineStatus",
        response_model=EngineStatus,
        responses={200: {"description": "The engine's figures now."}},
    )
    async def get_engine_status() -> Response:
        status = engine_status(engine, app)
        peers = app.state.peers
        if peers is not None:
            status = await status_everywhere(peers, status)
        # Figures of one moment: a browser must not show a stored copy as current.
        return Response(
            orjson.dumps(status),
            media_type=JSON_MEDIA_TYPE,
            headers={"Cache-Control": "no-store"},
        )

    @app.get("/docs", include_in_schema=False)
    async def openapi_page() -> HTMLResponse:
        # FastAPI's own page would load Swagger UI from a CDN; these copies come from npm
        # with the dashboard's other vendored files.
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title}: OpenAPI",
            swagger_js_url="/static/vendor/swagger-ui-bundle.js",
            swagger_css_url="/static/vendor/swagger-ui.css",
            swagger_favicon_url="/static/vendor/swagger-ui-favicon.png",
        )

    @app.get("/", include_in_schema=False)
    async def dashboard_page() -> FileResponse:
        # The page changes with each release while its URL stays the same.
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
