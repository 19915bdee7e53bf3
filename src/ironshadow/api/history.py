"""``GET /things/{thing}/history``: numeric history of a shadow, raw or per time bucket."""

from __future__ import annotations

import re
import time
from datetime import datetime
from typing import TYPE_CHECKING, Annotated

import orjson
from fastapi import FastAPI, Path, Query
from starlette.responses import Response

from ..cluster import PeerCallError
from ..shadow import ShadowError, validate_shadow_name, validate_thing_name
from .cluster_reads import remote_owner, unavailable
from .errors import JSON_MEDIA_TYPE, ApiError

if TYPE_CHECKING:
    from ..engine import Engine

# Window used when a request gives no "from", in seconds before "to".
DEFAULT_WINDOW_SECONDS = 3600.0
DEFAULT_LIMIT = 1000
MAX_LIMIT = 100_000
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h|d)$")
_UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_time(value: str, parameter: str) -> float:
    """Parse epoch seconds or an RFC 3339 time with an offset into epoch seconds."""
    try:
        return float(value)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        raise ApiError(
            400,
            f"Invalid query parameter {parameter}={value!r}: pass epoch seconds or an RFC 3339 "
            "time with a UTC offset, for example 2026-12-04T10:00:00Z.",
        )
    return parsed.timestamp()


def parse_duration(value: str) -> float:
    match = _DURATION.match(value)
    if match is None or float(match.group(1)) <= 0:
        raise ApiError(
            400,
            f"Invalid query parameter bucket={value!r}: pass a positive duration with a unit "
            "of s, m, h or d, for example 10s, 1m or 1h.",
        )
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def add_history_routes(app: FastAPI, engine: Engine) -> None:
    @app.get(
        "/things/{thing}/history",
        tags=["history"],
        summary="Read a shadow's numeric history",
        description="Return the numeric leaves of the reported state of every accepted update "
        "in a time window, as raw points or, with `bucket`, as the average, minimum, maximum "
        "and last value of each field per time bucket.",
        operation_id="GetShadowHistory",
    )
    async def history(
        thing: Annotated[str, Path(description="Thing name.")],
        name: Annotated[str | None, Query(description="Named shadow; leave out for the "
                                          "classic shadow.")] = None,
        from_: Annotated[str | None, Query(alias="from", description="Start of the window, "
                                           "inclusive: epoch seconds or RFC 3339. Default: "
                                           "one hour before `to`.")] = None,
        to: Annotated[str | None, Query(description="End of the window, exclusive: epoch "
                                        "seconds or RFC 3339. Default: now.")] = None,
        fields: Annotated[str | None, Query(description="Comma-separated dotted paths of "
                                            "the fields to return, for example "
                                            "temperature,motor.rpm. Default: all.")] = None,
        bucket: Annotated[str | None, Query(description="Bucket length, for example 10s, "
                                            "1m, 1h or 1d. Default: raw points.")] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Most rows returned.")]
        = DEFAULT_LIMIT,
    ) -> Response:
        try:
            validate_thing_name(thing)
            if name is not None:
                validate_shadow_name(name)
        except ShadowError as error:
            raise ApiError(400, error.message) from None
        store = engine.history_store
        if store is None:
            raise ApiError(
                404, "No history is kept: the engine runs with --memory-only true."
            )
        end = parse_time(to, "to") if to is not None else time.time()
        start = parse_time(from_, "from") if from_ is not None else end - DEFAULT_WINDOW_SECONDS
        if start >= end:
            raise ApiError(400, f"Invalid window: from ({start}) must be before to ({end}).")
        selected = [field for field in fields.split(",") if field] if fields else None
        bucket_seconds = parse_duration(bucket) if bucket is not None else None
        peers = app.state.peers
        owner = None
        if peers is not None and peers.history_per_worker:
            owner = remote_owner(peers, thing)
        if owner is None:
            rows = await store.query(
                thing, name or "", start, end, selected, bucket_seconds, limit
            )
            points = [row._asdict() for row in rows]
        else:
            arguments = {
                "thing": thing,
                "name": name or "",
                "start": start,
                "end": end,
                "fields": selected,
                "bucket": bucket_seconds,
                "limit": limit,
            }
            try:
                points = await peers.call(owner, "history", arguments)
            except PeerCallError as error:
                return unavailable(error, thing)
        body = {
            "thing": thing,
            "name": name,
            "from": start,
            "to": end,
            "bucket": bucket_seconds,
            "points": points,
        }
        return Response(orjson.dumps(body), media_type=JSON_MEDIA_TYPE)
