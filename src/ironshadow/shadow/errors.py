"""The error that a rejected shadow request raises, and the texts of its messages.

The texts are those of the AWS IoT Device Shadow service where AWS documents one, so that
clients which compare messages keep working. Where AWS documents no text (an empty update
payload, a null inside an array, 429), the text is IronShadow's own.
"""

from __future__ import annotations

from .jsonbytes import dumps_exact

INVALID_JSON = "Invalid JSON"
UNSUPPORTED_ENCODING = "Unsupported documented encoding; supported encoding is UTF-8"
MISSING_UPDATE_PAYLOAD = "Missing update payload"
MISSING_STATE = "Missing required node: state"
STATE_NOT_OBJECT = "State node must be an object"
DESIRED_NOT_OBJECT = "Desired node must be an object"
REPORTED_NOT_OBJECT = "Reported node must be an object"
INVALID_STATE_NODE = "State contains an invalid node"
INVALID_CLIENT_TOKEN = "Invalid clientToken"
INVALID_VERSION = "Invalid version"
TOO_DEEP = "JSON contains too many levels of nesting; maximum is {max_depth}"
NULL_IN_ARRAY = "Invalid array: null is not allowed inside an array"
VERSION_CONFLICT = "Version conflict"
PAYLOAD_TOO_LARGE = "The payload exceeds the maximum size allowed"
NO_SHADOW = "No shadow exists with name: '{name}'"
TOO_MANY_REQUESTS = "Too many requests in flight on this connection"
INTERNAL_FAILURE = "Internal service failure"


class ShadowError(Exception):
    """A rejected shadow request.

    ``code`` is the AWS shadow error code, which is also the HTTP status for the REST API
    (400, 404, 409, 413, 415, 429 or 500). ``client_token`` is the request's clientToken,
    echoed in the error document so that a client can match the rejection to its request.
    """

    def __init__(self, code: int, message: str, client_token: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.client_token = client_token

    def __str__(self) -> str:
        return f"{self.code} {self.message}"

    def document(self, now: int) -> dict[str, object]:
        """Build the error document: code, message, timestamp and clientToken if any."""
        document: dict[str, object] = {"code": self.code, "message": self.message, "timestamp": now}
        if self.client_token is not None:
            document["clientToken"] = self.client_token
        return document

    def payload(self, now: int) -> bytes:
        """Serialise the error document for a ``rejected`` topic or an HTTP error body."""
        return dumps_exact(self.document(now))


def too_deep(max_depth: int) -> ShadowError:
    return ShadowError(400, TOO_DEEP.format(max_depth=max_depth))


def no_shadow(thing_name: str | None, shadow_name: str | None) -> ShadowError:
    """Build the 404 for a missing or deleted shadow.

    AWS names the thing for a classic shadow and, in its tutorial, the shadow name for a
    named one.
    """
    name = shadow_name or thing_name
    if name is None:
        return ShadowError(404, "No shadow exists")
    return ShadowError(404, NO_SHADOW.format(name=name))
