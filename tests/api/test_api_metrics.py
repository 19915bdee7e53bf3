"""GET /metrics, read with prometheus-client's own parser of the text format."""

from __future__ import annotations

import time

import orjson
import pytest
from api_harness import http_client, running_engine
from prometheus_client.parser import text_string_to_metric_families

from conftest import scaled
from ironshadow.api.metrics import Exposition, merge_workers
from ironshadow.engine import StorageConfig
from ironshadow.metrics import Histogram
from mqtt_client import V311, TestClient


def scrape(client) -> dict[str, dict[tuple, float]]:
    """Return each sample's value by metric family, then by sample name and labels."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {}
    for family in text_string_to_metric_families(response.text):
        families[family.name] = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for sample in family.samples
        }
    return families


def value(families, sample: str) -> float:
    """Return the unlabelled sample of this name; a counter's family drops the _total."""
    family = sample.removesuffix("_total")
    return families[family][(sample, ())]


def test_metrics_follow_mqtt_updates(tmp_path):
    with running_engine(storage=StorageConfig(tmp_path)) as engine, http_client(engine) as client:
        before = scrape(client)
        device = TestClient(engine.mqtt_port, "press-7", V311)
        try:
            for temperature in (61.5, 62.0, 62.5):
                payload = orjson.dumps({"state": {"reported": {"temperature": temperature}}})
                device.publish("$aws/things/press-7/shadow/update", payload, 1)

            deadline = time.monotonic() + scaled(10)
            while True:
                after = scrape(client)
                committed = value(after, "ironshadow_history_rows_total")
                if committed >= 3 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert value(after, "ironshadow_clients_connected") == 1
            # The shadow service's internal session is not an offline client session.
            assert value(after, "ironshadow_sessions_offline") == 0
        finally:
            device.disconnect()

    assert value(before, "ironshadow_shadow_updates_total") == 0
    assert value(after, "ironshadow_shadow_updates_total") == 3
    assert value(after, "ironshadow_shadows") == 1
    assert value(after, "ironshadow_publish_received_total") >= 3
    assert value(after, "ironshadow_history_rows_total") == 3
    assert value(after, "ironshadow_history_outbox_rows") == 0
    assert value(after, "ironshadow_store_pending_writes") == 0
    assert value(after, "ironshadow_store_pressure") == 0
    assert value(after, "ironshadow_reading_paused") == 0

    writes = value(after, "ironshadow_store_writes_total")
    assert writes >= 1
    updates = after["ironshadow_store_write_updates"]
    assert updates[("ironshadow_store_write_updates_count", ())] == writes
    assert updates[("ironshadow_store_write_updates_sum", ())] == 3
    assert updates[("ironshadow_store_write_updates_bucket", (("le", "+Inf"),))] == writes
    seconds = after["ironshadow_store_write_seconds"]
    assert seconds[("ironshadow_store_write_seconds_count", ())] == writes
    assert seconds[("ironshadow_store_write_seconds_sum", ())] > 0

    assert value(after, "process_resident_memory_bytes") > 10 * 2**20
    cpu = value(after, "process_cpu_seconds_total")
    assert cpu >= value(before, "process_cpu_seconds_total") > 0


def packets(families, direction: str, kind: str) -> float:
    """Return the count of one packet type from ironshadow_packets_{direction}_total."""
    name = f"ironshadow_packets_{direction}_total"
    return families[name.removesuffix("_total")][(name, (("type", kind),))]


def test_metrics_count_packets_by_type_and_deltas_sent():
    with running_engine() as engine, http_client(engine) as client:
        before = scrape(client)
        device = TestClient(engine.mqtt_port, "lathe-2", V311)
        try:
            device.subscribe("$aws/things/lathe-2/shadow/update/delta", 1)
            desired = orjson.dumps({"state": {"desired": {"rpm": 900}}})
            response = client.post("/things/lathe-2/shadow", content=desired)
            assert response.status_code == 200
            delta = device.expect()
            assert delta.topic == "$aws/things/lathe-2/shadow/update/delta"
            reported = orjson.dumps({"state": {"reported": {"rpm": 900}}})
            device.publish("$aws/things/lathe-2/shadow/update", reported, 1)
        finally:
            device.disconnect()
        # The client's packets arrive in order, so once its DISCONNECT is counted all of
        # them are.
        deadline = time.monotonic() + scaled(5)
        while True:
            after = scrape(client)
            if packets(after, "received", "disconnect") or time.monotonic() > deadline:
                break
            time.sleep(0.02)

    assert value(before, "ironshadow_deltas_sent_total") == 0
    # One delta for the desired value; the matching report clears the delta and sends none.
    assert value(after, "ironshadow_deltas_sent_total") == 1
    assert packets(after, "received", "connect") == 1
    assert packets(after, "received", "subscribe") == 1
    assert packets(after, "received", "publish") == 1
    assert packets(after, "received", "disconnect") == 1
    assert packets(after, "sent", "connack") == 1
    assert packets(after, "sent", "suback") == 1
    # The delta and the QoS 1 report's PUBACK went out; the client acknowledged the delta.
    assert packets(after, "sent", "publish") == 1
    assert packets(after, "sent", "puback") == 1
    assert packets(after, "received", "puback") == 1
    assert packets(after, "sent", "auth") == 0


def test_metrics_without_stores_leave_out_the_store_families():
    with running_engine() as engine, http_client(engine) as client:
        families = scrape(client)
    assert "ironshadow_shadow_updates" in families
    assert "ironshadow_clients_connected" in families
    store_families = ("ironshadow_store_", "ironshadow_history_")
    assert not any(name.startswith(store_families) for name in families)


def limit_trips(families, limit: str) -> float:
    return families["ironshadow_limit_trips"][("ironshadow_limit_trips_total", (("limit", limit),))]


def test_metrics_count_limit_trips():
    with (
        running_engine(max_subscriptions=1, max_topic_levels=9) as engine,
        http_client(engine) as client,
    ):
        before = scrape(client)
        app = TestClient(engine.mqtt_port, "dashboard")
        assert [code.value for code in app.subscribe("plant/#", 0)] == [0]
        assert [code.value for code in app.subscribe("line/#", 0)] == [0x97]
        app.publish("a/b/c/d/e/f/g/h/i/j", b"ten levels", 0)
        assert app.disconnected.wait(scaled(5))
        after = scrape(client)

    limits = (
        "max_connections_per_address",
        "connect_rate_per_address",
        "max_subscriptions",
        "max_publish_rate",
        "max_topic_levels",
        "max_topic_length",
    )
    for limit in limits:
        assert limit_trips(before, limit) == 0
    assert limit_trips(after, "max_subscriptions") == 1
    assert limit_trips(after, "max_topic_levels") == 1
    assert limit_trips(after, "max_topic_length") == 0


def worker_exposition(connected: int, updates: int) -> Exposition:
    out = Exposition()
    out.gauge("ironshadow_clients_connected", connected, "MQTT clients connected now.")
    out.labelled_counter(
        "ironshadow_packets_received_total", "type", [("connect", connected)], "Packets."
    )
    out.counter("ironshadow_shadow_updates_total", updates, "Shadow updates accepted.")
    histogram = Histogram((0.5, 1.0))
    histogram.observe(0.25)
    out.histogram("ironshadow_store_write_seconds", histogram, "Seconds per write.")
    return out


def test_exposition_survives_bytes_round_trip():
    out = worker_exposition(3, 7)
    assert Exposition.from_bytes(out.to_bytes()).render() == out.render()


def test_merged_workers_parse_with_worker_labels():
    merged = merge_workers(
        {
            0: worker_exposition(3, 7),
            1: Exposition.from_bytes(worker_exposition(5, 11).to_bytes()),
            2: None,
        }
    )
    families = {
        family.name: {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for sample in family.samples
        }
        for family in text_string_to_metric_families(merged.render().decode())
    }
    assert families["ironshadow_clients_connected"] == {
        ("ironshadow_clients_connected", (("worker", "0"),)): 3,
        ("ironshadow_clients_connected", (("worker", "1"),)): 5,
    }
    packets = families["ironshadow_packets_received"]
    connect_labels = (("type", "connect"), ("worker", "1"))
    assert packets[("ironshadow_packets_received_total", connect_labels)] == 5
    assert families["ironshadow_shadow_updates"] == {
        ("ironshadow_shadow_updates_total", (("worker", "0"),)): 7,
        ("ironshadow_shadow_updates_total", (("worker", "1"),)): 11,
    }
    writes = families["ironshadow_store_write_seconds"]
    bucket_labels = (("le", "0.5"), ("worker", "1"))
    assert writes[("ironshadow_store_write_seconds_bucket", bucket_labels)] == 1
    assert families["ironshadow_worker_up"] == {
        ("ironshadow_worker_up", (("worker", "0"),)): 1,
        ("ironshadow_worker_up", (("worker", "1"),)): 1,
        ("ironshadow_worker_up", (("worker", "2"),)): 0,
    }


def test_invalid_encoded_metrics_raise():
    with pytest.raises(ValueError, match="invalid encoded metrics"):
        Exposition.from_bytes(b'{"not": "a list"}')
