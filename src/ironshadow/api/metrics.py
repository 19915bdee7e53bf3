"""``GET /metrics``: the engine's figures in the Prometheus text exposition format.

Every metric is read from the engine's own counters when the endpoint is scraped, so the
endpoint costs nothing between scrapes. Names start with ``ironshadow_``, counters end in
``_total`` and durations are in seconds, as Prometheus's naming conventions ask. docs/metrics.md
lists them all.
"""

from __future__ import annotations

import math
import os
import time
from typing import TYPE_CHECKING

import orjson
from fastapi import FastAPI
from starlette.responses import Response

from ..metrics import Histogram
from ..mqtt.constants import PacketType

if TYPE_CHECKING:
    from ..engine import Engine

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class Exposition:
    """The metric families of one scrape, rendered as Prometheus text."""

    def __init__(self) -> None:
        self._lines: list[str] = []

    def _family(self, name: str, kind: str, help_text: str) -> None:
        self._lines.append(f"# HELP {name} {help_text}")
        self._lines.append(f"# TYPE {name} {kind}")

    def gauge(self, name: str, value: float, help_text: str) -> None:
        self._family(name, "gauge", help_text)
        self._lines.append(f"{name} {_number(value)}")

    def counter(self, name: str, value: float, help_text: str) -> None:
        if not name.endswith("_total"):
            raise ValueError(f"counter name {name!r} must end in _total")
        # Format 0.0.4 names the family as the sample, _total included.
        self._family(name, "counter", help_text)
        self._lines.append(f"{name} {_number(value)}")

    def labelled_counter(
        self, name: str, label: str, values: list[tuple[str, float]], help_text: str
    ) -> None:
        """Add one counter family with a sample per ``(label value, count)`` pair."""
        if not name.endswith("_total"):
            raise ValueError(f"counter name {name!r} must end in _total")
        self._family(name, "counter", help_text)
        for label_value, value in values:
            self._lines.append(f'{name}{{{label}="{label_value}"}} {_number(value)}')

    def histogram(self, name: str, histogram: Histogram, help_text: str) -> None:
        self._family(name, "histogram", help_text)
        for bound, count in histogram.cumulative():
            self._lines.append(f'{name}_bucket{{le="{_number(bound)}"}} {count}')
        self._lines.append(f"{name}_sum {_number(histogram.sum)}")
        self._lines.append(f"{name}_count {histogram.count}")

    def render(self) -> bytes:
        return ("\n".join(self._lines) + "\n").encode()


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def collect(engine: Engine) -> Exposition:
    """Collect every metric of the engine at this moment."""
    out = Exposition()
    broker = engine.broker
    stats = broker.stats
    connected = 0
    offline = 0
    for session in broker.sessions.values():
        if session.connection is not None:
            connected += 1
        elif session.consumer is None:  # the engine's own consumers are not clients
            offline += 1

    out.gauge("ironshadow_clients_connected", connected, "MQTT clients connected now.")
    out.gauge(
        "ironshadow_sessions_offline",
        offline,
        "Persistent MQTT sessions whose client is not connected.",
    )
    out.gauge("ironshadow_subscriptions", broker.index.count, "MQTT subscriptions.")
    out.gauge("ironshadow_retained_messages", broker.retained.count, "Retained messages.")
    for name, value, help_text in (
        ("connections_accepted", stats.connections_accepted, "MQTT connections accepted."),
        ("connections_rejected", stats.connections_rejected, "MQTT connections refused."),
        ("protocol_errors", stats.protocol_errors, "Connections closed for a protocol error."),
        ("publish_received", stats.publish_received, "PUBLISH packets received."),
        ("publish_sent", stats.publish_sent, "PUBLISH packets sent."),
        (
            "publish_dropped",
            stats.publish_dropped,
            "Messages not sent: QoS 0 to a congested client, or over a client's maximum "
            "packet size.",
        ),
        ("queue_dropped", stats.queue_dropped, "Messages that a full session queue dropped."),
        ("bytes_received", stats.bytes_received, "Bytes received from MQTT clients."),
        ("bytes_sent", stats.bytes_sent, "Bytes sent to MQTT clients."),
    ):
        out.counter(f"ironshadow_{name}_total", value, help_text)
    out.labelled_counter(
        "ironshadow_packets_received_total",
        "type",
        _by_packet_type(stats.received_by_type),
        "MQTT packets received, by control packet type.",
    )
    out.labelled_counter(
        "ironshadow_packets_sent_total",
        "type",
        _by_packet_type(stats.sent_by_type),
        "MQTT packets sent, by control packet type.",
    )
    out.gauge(
        "ironshadow_reading_paused",
        int(broker.reading_paused),
        "1 while the engine reads from no MQTT connection to slow the devices down.",
    )
    out.labelled_counter(
        "ironshadow_limit_trips_total",
        "limit",
        list(stats.limit_trips.items()),
        "Abuse limit trips, by limit setting: connections closed or rejected, subscriptions "
        "rejected, and pauses of clients over max_publish_rate.",
    )

    shadows = engine.shadows
    out.gauge("ironshadow_shadows", len(shadows.shadows), "Shadows in memory, tombstones too.")
    out.counter(
        "ironshadow_shadow_updates_total",
        shadows.updates_applied,
        "Shadow updates accepted, over MQTT and REST.",
    )
    out.counter(
        "ironshadow_deltas_sent_total",
        shadows.deltas_sent,
        "Delta messages published on update/delta topics: after updates that changed a "
        "delta, and to devices that subscribe while a delta is pending.",
    )

    pipeline = engine.pipeline
    if pipeline is not None:
        out.gauge(
            "ironshadow_store_pending_writes",
            pipeline.pending,
            "Shadow writes accepted and not yet durable in the hot store.",
        )
        out.gauge(
            "ironshadow_store_pending_bytes",
            pipeline.pending_bytes,
            "Bytes of documents and history rows waiting for the hot store.",
        )
        out.gauge(
            "ironshadow_store_pressure",
            int(pipeline.pressure),
            "1 while the writes waiting for the hot store are above their high mark.",
        )
        out.counter(
            "ironshadow_store_pressure_seconds_total",
            pipeline.paused_seconds(),
            "Seconds spent above the high mark, with the devices slowed down.",
        )
        out.counter("ironshadow_store_writes_total", pipeline.batches_written, "Hot store writes.")
        out.histogram(
            "ironshadow_store_write_updates",
            pipeline.batch_items,
            "Shadow writes per hot store write.",
        )
        out.histogram(
            "ironshadow_store_write_seconds",
            pipeline.write_seconds,
            "Seconds per hot store write, retries included.",
        )
        out.gauge(
            "ironshadow_history_outbox_rows",
            pipeline.history_rows_written - pipeline.history_rows_committed,
            "History rows written to the outbox since start and not yet committed by the "
            "history store.",
        )
        out.counter(
            "ironshadow_history_rows_total",
            pipeline.history_rows_committed,
            "History rows committed by the history store.",
        )
        out.histogram(
            "ironshadow_history_write_rows",
            pipeline.history_batch_rows,
            "Rows per history store write.",
        )
        out.histogram(
            "ironshadow_history_write_seconds",
            pipeline.history_write_seconds,
            "Seconds per history store write.",
        )

    cpu_seconds, rss_bytes = _process_usage()
    out.counter("process_cpu_seconds_total", cpu_seconds, "User and system CPU time, seconds.")
    out.gauge("process_resident_memory_bytes", rss_bytes, "Resident memory size, bytes.")
    return out


def collect_websockets(out: Exposition, app: FastAPI) -> None:
    """Add the metrics of the WebSocket endpoints that ``create_app`` put in ``app.state``."""
    endpoint = getattr(app.state, "mqtt_websockets", None)
    if endpoint is not None:
        out.gauge(
            "ironshadow_mqtt_websocket_connections",
            len(endpoint.transports),
            "MQTT connections over WebSocket (/mqtt) open now, also counted in the MQTT metrics.",
        )
    feed = getattr(app.state, "feed", None)
    if feed is not None:
        out.gauge("ironshadow_feed_clients", len(feed.clients), "Shadow feed (/ws) clients.")
        out.counter(
            "ironshadow_feed_frames_sent_total",
            feed.frames_sent,
            "Shadow change frames handed to feed clients.",
        )
        out.counter(
            "ironshadow_feed_clients_dropped_total",
            feed.clients_dropped,
            "Feed clients disconnected because too many frames waited for them.",
        )


_PACKET_TYPE_NAMES = {member.value: member.name.lower() for member in PacketType}


def _by_packet_type(counts: list[int]) -> list[tuple[str, float]]:
    """Pair each control packet type's name with its count, every type listed."""
    return [(name, counts[value]) for value, name in _PACKET_TYPE_NAMES.items()]


def _process_usage() -> tuple[float, int]:
    """Return this process's CPU seconds (all threads) and resident bytes, from /proc."""
    with open("/proc/self/stat", "rb") as stat_file:
        # The command name, in parentheses, may contain spaces: split after it.
        fields = stat_file.read().rpartition(b")")[2].split()
    # utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    cpu_seconds = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    with open("/proc/self/statm", "rb") as statm_file:
        rss_pages = int(statm_file.read().split()[1])
    return cpu_seconds, rss_pages * _PAGE_SIZE


def add_metrics_routes(app: FastAPI, engine: Engine) -> None:
    @app.get(
        "/healthz",
        tags=["operations"],
        summary="Liveness probe",
        description="Return 200 while the engine's process serves HTTP.",
        operation_id="GetHealth",
    )
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["operations"],
        summary="Readiness probe",
        description="Return 200 when the MQTT listener is open and the stores respond, else 503 "
        "with the list of problems.",
        operation_id="GetReadiness",
        responses={503: {"description": "Not ready: the problems are listed."}},
    )
    async def readyz() -> Response:
        problems = await engine.readiness_problems()
        if problems:
            body = {"status": "not ready", "problems": problems}
            return Response(orjson.dumps(body), 503, media_type="application/json")
        return Response(orjson.dumps({"status": "ready"}), media_type="application/json")

    @app.get(
        "/metrics",
        tags=["operations"],
        summary="Engine metrics for Prometheus",
        description="Connections, messages, shadow updates, the write-behind queue and its "
        "backpressure, store write sizes and latencies, and process CPU and memory, in the "
        "Prometheus text exposition format 0.0.4.",
        operation_id="GetMetrics",
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE: {}}, "description": "The metrics."}},
    )
    async def metrics() -> Response:
        started = time.perf_counter()
        out = collect(engine)
        collect_websockets(out, app)
        out.gauge(
            "ironshadow_metrics_collect_seconds",
            time.perf_counter() - started,
            "Seconds this scrape took to collect the metrics above.",
        )
        return Response(out.render(), media_type=CONTENT_TYPE)
