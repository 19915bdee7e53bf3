"""The OpenAPI description and the API's error documents for routing failures."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from api_harness import EngineApiThread, http_client, running_engine

OPERATIONS = {
    ("/things/{thing}/shadow", "get"): "GetThingShadow",
    ("/things/{thing}/shadow", "post"): "UpdateThingShadow",
    ("/things/{thing}/shadow", "delete"): "DeleteThingShadow",
    ("/things/{thing}/shadows", "get"): "ListNamedShadowsForThing",
    ("/api/things/shadow/ListNamedShadowsForThing/{thing}", "get"): (
        "ListNamedShadowsForThingAwsPath"
    ),
    ("/things", "get"): "ListThings",
    ("/things/{thing}", "get"): "DescribeThing",
}


@pytest.fixture(scope="module")
def engine() -> Iterator[EngineApiThread]:
    with running_engine() as thread:
        yield thread


@pytest.fixture(scope="module")
def client(engine: EngineApiThread) -> Iterator[httpx.Client]:
    with http_client(engine) as client:
        yield client


@pytest.fixture(scope="module")
def schema(client: httpx.Client) -> dict[str, Any]:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    return response.json()


def parameter(operation: dict[str, Any], name: str) -> dict[str, Any]:
    return next(item for item in operation["parameters"] if item["name"] == name)


def test_openapi_lists_every_operation(schema: dict[str, Any]) -> None:
    for (path, method), operation_id in OPERATIONS.items():
        operation = schema["paths"][path][method]
        assert operation["operationId"] == operation_id
        assert operation["summary"]
        assert operation["description"]


def test_openapi_errors_use_error_document(schema: dict[str, Any]) -> None:
    error_ref = "#/components/schemas/ErrorDocument"
    for path, method in OPERATIONS:
        responses = schema["paths"][path][method]["responses"]
        assert "400" in responses, (path, method)
        for status, response in responses.items():
            if status != "200":
                assert response["content"]["application/json"]["schema"]["$ref"] == error_ref


def test_openapi_has_no_422(schema: dict[str, Any]) -> None:
    assert '"422"' not in json.dumps(schema)
    assert "HTTPValidationError" not in schema["components"]["schemas"]


def test_openapi_shadow_error_statuses(schema: dict[str, Any]) -> None:
    shadow = schema["paths"]["/things/{thing}/shadow"]

    assert {"400", "409", "413", "415"} <= set(shadow["post"]["responses"])
    assert {"400", "404", "415"} <= set(shadow["get"]["responses"])
    assert {"400", "404", "415"} <= set(shadow["delete"]["responses"])


def test_openapi_update_request_body(schema: dict[str, Any]) -> None:
    body = schema["paths"]["/things/{thing}/shadow"]["post"]["requestBody"]
    document_schema = body["content"]["application/json"]["schema"]

    assert document_schema["required"] == ["state"]
    assert {"state", "clientToken", "version"} <= set(document_schema["properties"])


def test_openapi_response_shapes(schema: dict[str, Any]) -> None:
    components = schema["components"]["schemas"]

    assert set(components["ThingSummary"]["properties"]) == {
        "name", "connected", "lastSeen", "version", "pendingDelta"
    }
    assert {"results", "nextToken", "timestamp"} <= set(components["NamedShadowList"]["properties"])
    assert {"code", "message", "timestamp", "clientToken"} <= set(
        components["ErrorDocument"]["properties"]
    )


def test_openapi_paging_parameters(schema: dict[str, Any]) -> None:
    things = schema["paths"]["/things"]["get"]
    named = schema["paths"]["/things/{thing}/shadows"]["get"]

    assert parameter(things, "pageSize")["schema"]["maximum"] == 1000
    assert parameter(named, "pageSize")["schema"]["maximum"] == 100
    assert parameter(things, "connected")["in"] == "query"
    assert parameter(things, "nextToken")["in"] == "query"
    assert parameter(named, "nextToken")["in"] == "query"


def test_docs_page_served(client: httpx.Client) -> None:
    response = client.get("/docs")

    assert response.status_code == 200
    assert "text/html" in response.headers["content-type"]
    assert "/openapi.json" in response.text
    # Everything the page loads comes from the engine itself, none from a CDN.
    assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", response.text)
    assert "/static/vendor/swagger-ui-bundle.js" in assets
    assert all(asset.startswith("/static/") for asset in assets), assets
    for asset in assets:
        assert client.get(asset).status_code == 200, asset


def test_unknown_path_is_404_document(client: httpx.Client) -> None:
    response = client.get("/no/such/endpoint")

    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    document = response.json()
    assert document["code"] == 404
    assert "/no/such/endpoint" in document["message"]
    assert "/docs" in document["message"]


def test_wrong_method_on_list_is_405(client: httpx.Client) -> None:
    response = client.post("/things", content=b"{}")

    assert response.status_code == 405
    assert response.json()["code"] == 405
    assert response.headers["allow"] == "GET"
