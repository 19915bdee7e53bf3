"""``GET /metrics``: the engine's figures in the Prometheus text exposition format.

Every metric is read from the engine's own counters when the endpoint is scraped, so the
endpoint costs nothing between scrapes. Names start with ``ironshadow_``, counters end in
``_total`` and durations are in seconds, as Prometheus's naming conventions ask. docs/metrics.md
lists them all.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, NamedTuple

import orjson
from fastapi import FastAPI
from starlette.responses import Response

from ..metrics import Histogram
from ..mqtt.constants import PacketType

if TYPE_CHECKING:
    from ..engine import Engine

log = logging.getLogger("ironshadow.api")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class Sample(NamedTuple):
    """One line of a metric family: the sample name, its labels and its value."""

    name: str
    labels: tuple[tuple[str, str], ...]
    value: float


class Family(NamedTuple):
    """One metric family: the ``# HELP`` and ``# TYPE`` lines and the samples below them."""

    name: str
    kind: str
    help_text: str
    samples: list[Sample]


class Exposition:
    """The metric families of one scrape, rendered as Prometheus text."""

    def __init__(self) -> None:
        self.families: list[Family] = []

    def _family(self, name: str, kind: str, help_text: str) -> list[Sample]:
        family = Family(name, kind, help_text, [])
        self.families.append(family)
        return family.samples

    def gauge(self, name: str, value: float, help_text: str) -> None:
        self._family(name, "gauge", help_text).append(Sample(name, (), value))

    def labelled_gauge(
        self, name: str, label: str, values: list[tuple[str, float]], help_text: str
    ) -> None:
        """Add one gauge family with a sample per ``(label value, value)`` pair."""
        samples = self._family(name, "gauge", help_text)
        for label_value, value in values:
            samples.append(Sample(name, ((label, label_value),), value))

    def counter(self, name: str, value: float, help_text: str) -> None:
        if not name.endswith("_total"):
            raise ValueError(f"counter name {name!r} must end in _total")
        # Format 0.0.4 names the family as the sample, _total included.
        self._family(name, "counter", help_text).append(Sample(name, (), value))

    def labelled_counter(
        self, name: str, label: str, values: list[tuple[str, float]], help_text: str
    ) -> None:
        """Add one counter family with a sample per ``(label value, count)`` pair."""
        if not name.endswith("_total"):
            raise ValueError(f"counter name {name!r} must end in _total")
        samples = self._family(name, "counter", help_text)
        for label_value, value in values:
            samples.append(Sample(name, ((label, label_value),), value))

    def histogram(self, name: str, histogram: Histogram, help_text: str) -> None:
        samples = self._family(name, "histogram", help_text)
        for bound, count in histogram.cumulative():
            samples.append(Sample(f"{name}_bucket", (("le", _number(bound)),), count))
        samples.append(Sample(f"{name}_sum", (), histogram.sum))
        samples.append(Sample(f"{name}_count", (), histogram.count))

    def render(self) -> bytes:
        lines: list[str] = []
        for family in self.families:
            lines.append(f"# HELP {family.name} {family.help_text}")
            lines.append(f"# TYPE {family.name} {family.kind}")
            for sample in family.samples:
                if sample.labels:
                    labels = ",".join(f'{key}="{value}"' for key, value in sample.labels)
                    lines.append(f"{sample.name}{{{labels}}} {_number(sample.value)}")
                else:
                    lines.append(f"{sample.name} {_number(sample.value)}")
        return ("\n".join(lines) + "\n").encode()

    def to_bytes(self) -> bytes:
        """Encode the families as JSON, for a worker to send them to another over the bus."""
        return orjson.dumps(
            [
                [
                    family.name,
                    family.kind,
                    family.help_text,
                    [[sample.name, sample.labels, sample.value] for sample in family.samples],
                ]
                for family in self.families
            ]
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Exposition:
        """Decode what :meth:`to_bytes` wrote; raise ValueError when it is not that."""
        exposition = cls()
        try:
            for name, kind, help_text, samples in orjson.loads(data):
                exposition.families.append(
                    Family(
                        name,
                        kind,
                        help_text,
                        [
                            Sample(sample_name, tuple(map(tuple, labels)), value)
                            for sample_name, labels, value in samples
                        ],
                    )
                )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"invalid encoded metrics: {exc}") from exc
        return exposition


def merge_workers(expositions: dict[int, Exposition | None]) -> Exposition:
    """Combine the metrics of several workers into one exposition.

    Every sample gets a ``worker`` label with its worker's index, and the samples of one
    family from all workers go under one ``# HELP`` and ``# TYPE``. A worker whose metrics
    are None is missing: ``ironshadow_worker_up`` is 0 for it, and 1 for the others.
    """
    merged = Exposition()
    by_name: dict[str, list[Sample]] = {}
    for worker in sorted(expositions):
        exposition = expositions[worker]
        if exposition is None:
            continue
        worker_label = ("worker", str(worker))
        for family in exposition.families:
            samples = by_name.get(family.name)
            if samples is None:
                samples = by_name[family.name] = merged._family(
                    family.name, family.kind, family.help_text
                )
            for sample in family.samples:
                samples.append(Sample(sample.name, (*sample.labels, worker_label), sample.value))
    merged.labelled_gauge(
        "ironshadow_worker_up",
        "worker",
        [
            (str(worker), 0 if exposition is None else 1)
            for worker, exposition in sorted(expositions.items())
        ],
        "1 when the worker's metrics are in this scrape, 0 when it did not send them in time.",
    )
    return merged


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


# Set in ``app.state.peer_metrics`` by a cluster's worker: returns the encoded metrics
# (Exposition.to_bytes) of every other worker by index, None for a worker that did not send
# them in time.
PeerMetrics = Callable[[], Awaitable[dict[int, bytes | None]]]


def _decode_peer_metrics(peers: dict[int, bytes | None]) -> dict[int, Exposition | None]:
    decoded: dict[int, Exposition | None] = {}
    for worker, data in peers.items():
        exposition = None
        if data is not None:
            try:
                exposition = Exposition.from_bytes(data)
            except ValueError as exc:
                log.error("metrics of worker %d are invalid and left out: %s", worker, exc)
        decoded[worker] = exposition
    return decoded


def add_metrics_routes(app: FastAPI, engine: Engine) -> None:
    """Add ``/healthz``, ``/readyz`` and ``/metrics``.

    With ``app.state.peer_metrics`` set, ``/metrics`` covers every worker of a cluster: see
    :func:`merge_workers`.
    """
    app.state.peer_metrics = None

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
        peer_metrics: PeerMetrics | None = app.state.peer_metrics
        peers = await peer_metrics() if peer_metrics is not None else None
        out = collect(engine)
        collect_websockets(out, app)
        if peers is not None:
            own = app.state.peers.index if app.state.peers is not None else 0
            out = merge_workers({own: out, **_decode_peer_metrics(peers)})
        out.gauge(
            "ironshadow_metrics_collect_seconds",
            time.perf_counter() - started,
            "Seconds this scrape took to collect the metrics above.",
        )
        return Response(out.render(), media_type=CONTENT_TYPE)
