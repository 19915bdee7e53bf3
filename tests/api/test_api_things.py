"""GET /things, GET /things/{thing} and the named shadow lists over real HTTP."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from api_harness import EngineApiThread, http_client, running_engine

from conftest import scaled
from mqtt_client import V311, TestClient

NAMED_SHADOW_LIST_PATHS = [
    "/things/{thing}/shadows",
    "/api/things/shadow/ListNamedShadowsForThing/{thing}",
]


@pytest.fixture
def engine() -> Iterator[EngineApiThread]:
    with running_engine() as thread:
        yield thread


@pytest.fixture
def client(engine: EngineApiThread) -> Iterator[httpx.Client]:
    with http_client(engine) as client:
        yield client


def create_shadow(client: httpx.Client, thing: str, name: str | None = None) -> None:
    params = {} if name is None else {"name": name}
    body = json.dumps({"state": {"reported": {"on": True}}}).encode()
    response = client.post(f"/things/{thing}/shadow", content=body, params=params)
    assert response.status_code == 200, response.text


def list_things(client: httpx.Client, **params: Any) -> dict[str, Any]:
    response = client.get("/things", params=params)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    return response.json()


def all_pages(client: httpx.Client, path: str, key: str, **params: Any) -> list[list[Any]]:
    """Follow nextToken from the first page to the last and return every page."""
    pages = []
    token = None
    for _ in range(100):
        query = dict(params)
        if token is not None:
            query["nextToken"] = token
        response = client.get(path, params=query)
        assert response.status_code == 200, response.text
        document = response.json()
        pages.append(document[key])
        token = document["nextToken"]
        if token is None:
            return pages
    raise AssertionError("nextToken never became null")


def assert_bad_request(response: httpx.Response, *fragments: str) -> None:
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/json"
    document = response.json()
    assert document["code"] == 400
    for fragment in fragments:
        assert fragment in document["message"]


def wait_until(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + scaled(timeout)
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


# --- GET /things ----------------------------------------------------------------------


def test_things_empty_engine(client: httpx.Client) -> None:
    document = list_things(client)

    assert document["things"] == []
    assert document["nextToken"] is None
    assert isinstance(document["timestamp"], int)


def test_things_from_shadows_and_clients(engine: EngineApiThread, client: httpx.Client) -> None:
    create_shadow(client, "cnc-2")
    create_shadow(client, "cnc-3", "firmware")
    TestClient(engine.mqtt_port, client_id="cnc-1")
    before = int(time.time())

    things = {thing["name"]: thing for thing in list_things(client)["things"]}

    assert list(things) == ["cnc-1", "cnc-2", "cnc-3"]
    assert things["cnc-1"]["connected"] is True
    assert before - 5 <= things["cnc-1"]["lastSeen"] <= before + 5
    assert things["cnc-1"]["version"] is None
    assert things["cnc-2"] == {
        "name": "cnc-2",
        "connected": False,
        "lastSeen": None,
        "version": 1,
        "pendingDelta": False,
    }
    assert things["cnc-3"]["version"] is None


def test_things_disconnected_client(engine: EngineApiThread, client: httpx.Client) -> None:
    create_shadow(client, "cnc-4")
    device = TestClient(engine.mqtt_port, client_id="cnc-4")
    device.disconnect()

    def offline() -> bool:
        return list_things(client)["things"][0]["connected"] is False

    wait_until(offline)
    thing = list_things(client)["things"][0]
    assert thing["name"] == "cnc-4"
    assert isinstance(thing["lastSeen"], int)


def test_things_forget_clients_that_leave_nothing(
    engine: EngineApiThread, client: httpx.Client
) -> None:
    """A client with neither a shadow nor a persistent session leaves the list when it goes."""
    persistent = TestClient(engine.mqtt_port, "gauge-2", protocol=V311, clean=False)
    passing = TestClient(engine.mqtt_port, "gauge-1")
    watcher = TestClient(engine.mqtt_port, "gauge-watcher")
    watcher.subscribe("$aws/events/presence/disconnected/+", 1)
    # mosquitto_pub connects without a client id, so the broker assigns one ("auto-...").
    subprocess.run(
        ["mosquitto_pub", "-p", str(engine.mqtt_port), "-V", "5", "-t", "plant/noise",
         "-m", "1"],
        check=True,
        timeout=scaled(10),
    )
    passing.disconnect()
    persistent.disconnect()
    gone = set()
    while len(gone) < 3:
        gone.add(watcher.expect().topic.rpartition("/")[2])
    assert {"gauge-1", "gauge-2"} <= gone

    names = [thing["name"] for thing in list_things(client)["things"]]

    assert names == ["gauge-2", "gauge-watcher"]


def test_things_version_follows_updates(client: httpx.Client) -> None:
    for _ in range(3):
        create_shadow(client, "cnc-5")

    assert list_things(client)["things"][0]["version"] == 3


def test_things_deleted_shadow_not_listed(client: httpx.Client) -> None:
    create_shadow(client, "cnc-6")
    create_shadow(client, "cnc-7", "config")
    create_shadow(client, "cnc-8")
    client.delete("/things/cnc-6/shadow")
    client.delete("/things/cnc-7/shadow", params={"name": "config"})

    names = [thing["name"] for thing in list_things(client)["things"]]

    assert names == ["cnc-8"]


def test_things_prefix_filter(client: httpx.Client) -> None:
    for thing in ["line1-a", "line1-b", "line2-a", "line10-a", "line"]:
        create_shadow(client, thing)

    names = [thing["name"] for thing in list_things(client, prefix="line1")["things"]]

    assert names == ["line1-a", "line1-b", "line10-a"]
    assert list_things(client, prefix="nothing")["things"] == []


def test_things_connected_filter(engine: EngineApiThread, client: httpx.Client) -> None:
    create_shadow(client, "cell-offline")
    TestClient(engine.mqtt_port, client_id="cell-online")

    online = [thing["name"] for thing in list_things(client, connected="true")["things"]]
    offline = [thing["name"] for thing in list_things(client, connected="false")["things"]]

    assert online == ["cell-online"]
    assert offline == ["cell-offline"]


def test_things_paging_covers_all(client: httpx.Client) -> None:
    names = [f"dev-{number:02d}" for number in range(7)]
    for name in reversed(names):
        create_shadow(client, name)

    pages = all_pages(client, "/things", "things", pageSize=3)

    assert [len(page) for page in pages] == [3, 3, 1]
    assert [thing["name"] for page in pages for thing in page] == names


def test_things_exact_last_page_has_no_token(client: httpx.Client) -> None:
    for number in range(4):
        create_shadow(client, f"dev-{number}")

    document = list_things(client, pageSize=4)

    assert len(document["things"]) == 4
    assert document["nextToken"] is None


def test_things_paging_sees_later_inserts(client: httpx.Client) -> None:
    for name in ["b-1", "b-3"]:
        create_shadow(client, name)
    first = list_things(client, pageSize=1)
    create_shadow(client, "b-2")
    create_shadow(client, "a-0")

    second = list_things(client, pageSize=5, nextToken=first["nextToken"])

    assert [thing["name"] for thing in first["things"]] == ["b-1"]
    assert [thing["name"] for thing in second["things"]] == ["b-2", "b-3"]


def test_things_prefix_with_token(client: httpx.Client) -> None:
    for name in ["a-1", "p-1", "p-2", "p-3", "z-1"]:
        create_shadow(client, name)

    pages = all_pages(client, "/things", "things", prefix="p-", pageSize=2)

    assert [[thing["name"] for thing in page] for page in pages] == [["p-1", "p-2"], ["p-3"]]


@pytest.mark.parametrize(
    ("query", "fragments"),
    [
        ({"pageSize": "abc"}, ["pageSize='abc'", "whole number from 1 to 1000"]),
        ({"pageSize": "0"}, ["pageSize='0'", "greater than or equal to 1"]),
        ({"pageSize": "1001"}, ["pageSize='1001'", "from 1 to 1000"]),
        ({"pageSize": "2.5"}, ["pageSize='2.5'", "whole number"]),
        ({"connected": "maybe"}, ["connected='maybe'", "Pass true or false"]),
        ({"nextToken": "not-a-token"}, ["Invalid nextToken", "previous page"]),
        ({"nextToken": "%%%"}, ["Invalid nextToken"]),
        ({"prefix": "p" * 129}, ["prefix", "at most 128 characters"]),
    ],
)
def test_things_bad_parameters(
    client: httpx.Client, query: dict[str, str], fragments: list[str]
) -> None:
    assert_bad_request(client.get("/things", params=query), *fragments)


# --- GET /things/{thing} ----------------------------------------------------------------


def test_describe_thing(engine: EngineApiThread, client: httpx.Client) -> None:
    create_shadow(client, "mill-1")
    create_shadow(client, "mill-1", "spindle")
    create_shadow(client, "mill-1", "coolant")
    TestClient(engine.mqtt_port, client_id="mill-1")

    response = client.get("/things/mill-1")

    assert response.status_code == 200
    document = response.json()
    assert document["name"] == "mill-1"
    assert document["connected"] is True
    assert isinstance(document["lastSeen"], int)
    assert document["version"] == 1
    assert document["namedShadows"] == ["coolant", "spindle"]


def test_describe_unknown_thing_is_404(client: httpx.Client) -> None:
    response = client.get("/things/ghost")

    assert response.status_code == 404
    document = response.json()
    assert document["code"] == 404
    assert "ghost" in document["message"]


def test_describe_bad_thing_name_is_400(client: httpx.Client) -> None:
    assert_bad_request(client.get("/things/bad%20name"), "Invalid thing name")


# --- named shadow lists ---------------------------------------------------------------


@pytest.mark.parametrize("path", NAMED_SHADOW_LIST_PATHS)
def test_named_shadows_sorted(client: httpx.Client, path: str) -> None:
    create_shadow(client, "oven-1")
    for name in ["zeta", "alpha", "$meta", "mid"]:
        create_shadow(client, "oven-1", name)

    response = client.get(path.format(thing="oven-1"))

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    document = response.json()
    assert document["results"] == ["$meta", "alpha", "mid", "zeta"]
    assert document["nextToken"] is None
    assert isinstance(document["timestamp"], int)


@pytest.mark.parametrize("path", NAMED_SHADOW_LIST_PATHS)
def test_named_shadows_paging(client: httpx.Client, path: str) -> None:
    names = [f"s{number}" for number in range(5)]
    for name in names:
        create_shadow(client, "oven-2", name)

    pages = all_pages(client, path.format(thing="oven-2"), "results", pageSize=2)

    assert pages == [["s0", "s1"], ["s2", "s3"], ["s4"]]


def test_named_shadows_skip_deleted(client: httpx.Client) -> None:
    create_shadow(client, "oven-3", "keep")
    create_shadow(client, "oven-3", "drop")
    client.delete("/things/oven-3/shadow", params={"name": "drop"})

    assert client.get("/things/oven-3/shadows").json()["results"] == ["keep"]


def test_named_shadows_unknown_thing_empty(client: httpx.Client) -> None:
    document = client.get("/things/nobody/shadows").json()

    assert document["results"] == []
    assert document["nextToken"] is None


@pytest.mark.parametrize("path", NAMED_SHADOW_LIST_PATHS)
@pytest.mark.parametrize(
    ("query", "fragments"),
    [
        ({"pageSize": "101"}, ["pageSize='101'", "from 1 to 100"]),
        ({"pageSize": "-1"}, ["pageSize='-1'", "from 1 to 100"]),
        ({"pageSize": "ten"}, ["pageSize='ten'", "whole number"]),
        ({"nextToken": "bogus"}, ["Invalid nextToken"]),
    ],
)
def test_named_shadows_bad_parameters(
    client: httpx.Client, path: str, query: dict[str, str], fragments: list[str]
) -> None:
    assert_bad_request(client.get(path.format(thing="oven-4"), params=query), *fragments)


@pytest.mark.parametrize("path", NAMED_SHADOW_LIST_PATHS)
def test_named_shadows_bad_thing_name(client: httpx.Client, path: str) -> None:
    assert_bad_request(client.get(path.format(thing="a" * 129)), "maximum is 128")


def test_things_pending_delta(client: httpx.Client) -> None:
    create_shadow(client, "cnc-8")
    desired = json.dumps({"state": {"desired": {"on": False}}}).encode()
    assert client.post("/things/cnc-8/shadow", content=desired).status_code == 200
    assert list_things(client)["things"][0]["pendingDelta"] is True

    reported = json.dumps({"state": {"reported": {"on": False}}}).encode()
    assert client.post("/things/cnc-8/shadow", content=reported).status_code == 200
    assert list_things(client)["things"][0]["pendingDelta"] is False
