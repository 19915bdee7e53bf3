"""Page sizes and the opaque ``nextToken`` cursors of the list endpoints.

A token carries the last name of the previous page, so the next page starts right after it
in name order. Names added or removed between two requests do not shift later pages, and
the server keeps no state per listing.
"""

from __future__ import annotations

import base64
import binascii

from .errors import ApiError

# ListNamedShadowsForThing: AWS IoT accepts a pageSize of 1 to 100.
NAMED_SHADOWS_PAGE_SIZE_MAX = 100
NAMED_SHADOWS_PAGE_SIZE_DEFAULT = 100

# GET /things: a page is built on the event loop that also serves MQTT, and 1000
# summaries are about 72 KB of JSON.
THINGS_PAGE_SIZE_MAX = 1000
THINGS_PAGE_SIZE_DEFAULT = 100

_TOKEN_MARKER = b"after:"


def encode_token(last_name: str | None) -> str | None:
    """Return the nextToken for a page that ended at ``last_name`` (None: no next page)."""
    if last_name is None:
        return None
    raw = _TOKEN_MARKER + last_name.encode("utf-8")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_token(token: str | None) -> str | None:
    """Return the last name of the previous page stored in ``token``.

    Raises ApiError (400) for a token that no list endpoint returned.
    """
    if token is None:
        return None
    try:
        padded = token.encode("ascii") + b"=" * (-len(token) % 4)
        raw = base64.urlsafe_b64decode(padded)
        if not raw.startswith(_TOKEN_MARKER):
            raise ValueError("missing marker")
        return raw[len(_TOKEN_MARKER) :].decode("utf-8")
    except (UnicodeError, ValueError, binascii.Error):
        raise ApiError(
            400,
            f"Invalid nextToken {token!r}: pass the nextToken of the previous page "
            "unchanged, or leave it out to start from the first page",
        ) from None
