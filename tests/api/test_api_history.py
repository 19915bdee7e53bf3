"""The history endpoint and the 503 that writes get while the store catches up."""

from __future__ import annotations

import time

from api_harness import http_client, running_engine

from conftest import scaled
from ironshadow.engine import StorageConfig

URL = "/things/oven-4/history"


def post_reported(client, **values: float) -> None:
    response = client.post("/things/oven-4/shadow", json={"state": {"reported": values}})
    assert response.status_code == 200


def wait_for_points(client, count: int, **params: str) -> list[dict]:
    """Poll until the outbox has moved ``count`` points into the history store."""
    deadline = time.monotonic() + scaled(10)
    while True:
        response = client.get(URL, params=params)
        assert response.status_code == 200
        points = response.json()["points"]
        if len(points) >= count or time.monotonic() > deadline:
            return points
        time.sleep(0.05)


def test_history_raw_points(tmp_path):
    with running_engine(storage=StorageConfig(tmp_path)) as engine, http_client(engine) as client:
        post_reported(client, temperature=180.5, fan=1)
        post_reported(client, temperature=182.0)
        points = wait_for_points(client, 3)
        assert [(point["field"], point["value"]) for point in points] == [
            ("fan", 1.0),
            ("temperature", 180.5),
            ("temperature", 182.0),
        ]
        only = client.get(URL, params={"fields": "fan"}).json()["points"]
        assert [point["field"] for point in only] == ["fan"]
        limited = client.get(URL, params={"limit": "1"}).json()["points"]
        assert len(limited) == 1


def test_history_buckets(tmp_path):
    with running_engine(storage=StorageConfig(tmp_path)) as engine, http_client(engine) as client:
        for value in (10.0, 20.0, 30.0):
            post_reported(client, temperature=value)
        wait_for_points(client, 3)
        buckets = client.get(URL, params={"bucket": "1d", "fields": "temperature"}).json()
        assert buckets["bucket"] == 86400.0
        (row,) = buckets["points"]
        assert row["avg"] == 20.0
        assert row["min"] == 10.0
        assert row["max"] == 30.0
        assert row["last"] == 30.0


def test_history_window_in_rfc3339(tmp_path):
    with running_engine(storage=StorageConfig(tmp_path)) as engine, http_client(engine) as client:
        post_reported(client, temperature=1.0)
        wait_for_points(client, 1)
        window = {"from": "2020-01-01T00:00:00Z", "to": "2020-01-02T00:00:00Z"}
        past = client.get(URL, params=window)
        assert past.status_code == 200
        assert past.json()["points"] == []


def test_history_rejects_bad_parameters(tmp_path):
    with running_engine(storage=StorageConfig(tmp_path)) as engine, http_client(engine) as client:
        cases = [
            ({"from": "yesterday"}, "from='yesterday'"),
            ({"bucket": "5 minutes"}, "bucket='5 minutes'"),
            ({"bucket": "0s"}, "bucket='0s'"),
            ({"from": "200", "to": "100"}, "must be before"),
            ({"limit": "0"}, "limit"),
        ]
        for params, fragment in cases:
            response = client.get(URL, params=params)
            assert response.status_code == 400, params
            assert fragment in response.json()["message"], params
        bad_thing = client.get("/things/bad.name/history")
        assert bad_thing.status_code == 400


def test_history_without_store_is_404():
    with running_engine() as engine, http_client(engine) as client:
        response = client.get(URL)
        assert response.status_code == 404
        assert "--memory-only" in response.json()["message"]


def test_writes_get_503_while_store_catches_up(tmp_path):
    with running_engine(storage=StorageConfig(tmp_path)) as engine, http_client(engine) as client:
        post_reported(client, temperature=5.0)
        pipeline = engine.engine.pipeline
        engine.call(setattr, pipeline, "pressure", True)
        response = client.post("/things/oven-4/shadow", json={"state": {"reported": {"a": 1}}})
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "1"
        assert client.get("/things/oven-4/shadow").status_code == 200
        engine.call(setattr, pipeline, "pressure", False)
        post_reported(client, temperature=6.0)
