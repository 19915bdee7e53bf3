"""Schemas of the REST API's documents, for the OpenAPI description only.

The shadow endpoints pass the shadow service's JSON through unchanged and the list
endpoints serialize with orjson, so these models never validate a response. They describe
the same documents that the AWS IoT Device Shadow service returns.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

# Field names follow the AWS documents (camelCase), so the models use them as they are.


class ErrorDocument(BaseModel):
    """An error: the HTTP status repeated as ``code``, and a message."""

    code: int = Field(description="The HTTP status of the response.", examples=[400])
    message: str = Field(examples=["Invalid JSON"])
    timestamp: int | None = Field(
        default=None, description="When the error was generated, in epoch seconds."
    )
    clientToken: str | None = Field(
        default=None,
        description="The request's clientToken, when the request body could be parsed.",
    )


class ShadowState(BaseModel):
    desired: dict[str, Any] | None = Field(
        default=None, description="The state applications request."
    )
    reported: dict[str, Any] | None = Field(
        default=None, description="The state the device reports."
    )
    delta: dict[str, Any] | None = Field(
        default=None,
        description="Desired keys whose value differs from the reported one. "
        "Present only when not empty.",
    )


class ShadowDocument(BaseModel):
    """A full shadow, as returned by GET."""

    state: ShadowState
    metadata: dict[str, Any] = Field(
        description="The same structure as state, with {\"timestamp\": epochSeconds} per leaf."
    )
    version: int = Field(description="Goes up by one on every accepted update.", examples=[7])
    timestamp: int = Field(description="When the response was generated, in epoch seconds.")
    clientToken: str | None = None


class UpdateAccepted(BaseModel):
    """The reply to an accepted update: the request's state and metadata, not the merged shadow."""

    state: dict[str, Any] = Field(description="The state of the request, nulls included.")
    metadata: dict[str, Any] = Field(description="Timestamps of exactly the fields sent.")
    version: int = Field(description="The shadow's new version.")
    timestamp: int
    clientToken: str | None = None


class DeleteAccepted(BaseModel):
    """The reply to an accepted delete."""

    version: int = Field(description="The version of the deleted shadow.")
    timestamp: int
    clientToken: str | None = None


class NamedShadowList(BaseModel):
    """A page of a thing's named shadow names, as AWS IoT's ListNamedShadowsForThing."""

    results: list[str] = Field(
        description="Shadow names in sorted order.", examples=[["config", "firmware"]]
    )
    nextToken: str | None = Field(
        description="Pass it as nextToken to get the next page. Null on the last page."
    )
    timestamp: int = Field(description="When the response was generated, in epoch seconds.")


class ThingSummary(BaseModel):
    name: str = Field(examples=["press-17"])
    connected: bool = Field(
        description="Whether an MQTT client with this client id is connected now."
    )
    lastSeen: int | None = Field(
        description="Epoch seconds of the client's last connect or disconnect. "
        "Null if it never connected."
    )
    version: int | None = Field(
        description="The version of the classic shadow. Null when the thing has none."
    )
    pendingDelta: bool = Field(
        description="Whether the classic shadow's desired state differs from its reported "
        "state, so the device has a delta to apply. False when the thing has no classic shadow."
    )


class ThingDetail(ThingSummary):
    namedShadows: list[str] = Field(description="Names of the thing's named shadows, sorted.")


class UnavailableWorker(BaseModel):
    """A worker whose things a list leaves out."""

    worker: int = Field(description="The worker's index.")
    error: str = Field(description="Why it did not respond, such as 'no reply within 2 s'.")


class ThingList(BaseModel):
    """A page of things in name order."""

    things: list[ThingSummary]
    nextToken: str | None = Field(
        description="Pass it as nextToken to get the next page. Null on the last page. A page "
        "can hold fewer than pageSize things while nextToken is not null."
    )
    timestamp: int = Field(description="When the response was generated, in epoch seconds.")
    unavailableWorkers: list[UnavailableWorker] = Field(
        description="With several workers, those that did not respond in time (restarting or "
        "stuck). Their things are missing from this page, and nextToken goes on past them. "
        "Empty when every worker answered."
    )


def _section_schema(description: str) -> dict[str, Any]:
    return {
        "anyOf": [{"type": "object", "additionalProperties": True}, {"type": "null"}],
        "description": description,
    }


# The body of POST /things/{thing}/shadow. The endpoint reads the raw bytes and the shadow
# service validates them, so this schema is only written into the OpenAPI description.
UPDATE_REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "description": "An AWS IoT shadow update request document. Objects merge key by key, "
    "null deletes a key, arrays and scalars replace.",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["state"],
                "properties": {
                    "state": {
                        "anyOf": [
                            {
                                "type": "object",
                                "properties": {
                                    "desired": _section_schema(
                                        "Changes to the desired state. Null clears it."
                                    ),
                                    "reported": _section_schema(
                                        "Changes to the reported state. Null clears it."
                                    ),
                                },
                            },
                            {"type": "null"},
                        ]
                    },
                    "clientToken": {
                        "type": "string",
                        "maxLength": 64,
                        "description": "Echoed in the reply and in the MQTT notifications.",
                    },
                    "version": {
                        "type": "integer",
                        "description": "Apply only if the shadow has this version, else 409.",
                    },
                },
            },
            "example": {"state": {"desired": {"speed": 1200}}, "clientToken": "req-1"},
        }
    },
}
