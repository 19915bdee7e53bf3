"""/healthz and /readyz, the probes an orchestrator polls."""

from __future__ import annotations

import sys
from pathlib import Path

from api_harness import http_client, running_engine

from ironshadow.engine import StorageConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "storage"))
from servers import RedisServer


def test_health_and_readiness_with_embedded_stores(tmp_path):
    with running_engine(storage=StorageConfig(tmp_path)) as engine, http_client(engine) as client:
        health = client.get("/healthz")
        ready = client.get("/readyz")
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready"}


def test_readiness_fails_while_redis_is_down(tmp_path):
    redis_server = RedisServer.start()
    try:
        storage = StorageConfig(tmp_path, redis_url=redis_server.url)
        with running_engine(storage=storage) as engine, http_client(engine) as client:
            assert client.get("/readyz").status_code == 200
            redis_server.kill()
            down = client.get("/readyz")
            alive = client.get("/healthz")
    finally:
        redis_server.stop()

    assert down.status_code == 503
    body = down.json()
    assert body["status"] == "not ready"
    assert len(body["problems"]) == 1
    assert body["problems"][0].startswith(f"hot store: Redis at {redis_server.url} is unreachable")
    assert alive.status_code == 200
