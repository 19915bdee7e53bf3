"""Thing reads over every worker of ``ironshadow serve --workers N``.

Every worker serves the HTTP API, but each keeps the shadows, sessions and (with the
embedded stores) the history of only the things it owns. The thing endpoints therefore read
through :class:`Peers`, the serving worker's :class:`~ironshadow.cluster.ClusterWorker`:

- ``GET /things/{thing}``, ``.../shadows`` and ``.../history`` run on the owner of the
  thing, with a CALL frame when that is another worker. History is read in place when all
  workers share one history store (PostgreSQL).
- ``GET /things`` requests a page of its own things from every worker and merges the pages
  (:func:`merge_pages`), and ``GET /api/engine`` adds up the figures of every worker that
  replies (:func:`merge_statuses`).

:func:`register_procedures` installs the procedures that the CALL frames run, on every
worker. A worker that does not reply makes a read of one of its things fail with 503 and
Retry-After. ``GET /things`` and ``GET /api/engine`` leave it out of their response and
name it there, so that the dashboard goes on showing the rest of the fleet while a worker
restarts.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Protocol

from ..cluster import PeerCallError, owner_not_responding
from .errors import error_response
from .things import ThingDirectory

if TYPE_CHECKING:
    from fastapi import FastAPI, Response

    from ..cluster import ClusterWorker
    from ..engine import Engine

# Retry-After, in seconds, of a 503 for a read that another worker did not reply to.
RETRY_AFTER_SECONDS = 1
# Seconds that GET /api/engine waits for each worker's figures. The dashboard reads them
# every second, and a worker collects them from counters in memory.
STATUS_TIMEOUT_SECONDS = 2.0
# Seconds that GET /things waits for each worker's page. A worker reads it from memory and
# checks at most MAX_SCANNED_PER_PAGE names.
LIST_TIMEOUT_SECONDS = 2.0

ThingPage = tuple[list[dict[str, Any]], str | None]
# A worker left out of a response: {"worker": index, "error": reason}.
Missing = dict[str, Any]


class Peers(Protocol):
    """The other workers of a cluster, as a worker's HTTP API uses them."""

    index: int
    workers: int
    history_per_worker: bool

    def owner(self, name: str) -> int: ...

    async def call(
        self, peer: int, procedure: str, arguments: dict[str, Any], timeout: float = ...
    ) -> Any: ...


def register_procedures(worker: ClusterWorker, engine: Engine, app: FastAPI) -> None:
    """Install the thing reads that the other workers run on ``worker`` through CALL
    frames. ``app`` is the worker's HTTP app, whose WebSocket endpoints count in its
    figures."""
    directory = ThingDirectory(engine.shadows, engine.broker)

    async def describe(arguments: dict[str, Any]) -> dict[str, Any] | None:
        thing = arguments["thing"]
        return directory.detail(thing) if directory.exists(thing) else None

    async def named_shadows(arguments: dict[str, Any]) -> list[str]:
        return engine.shadows.named_shadow_names(arguments["thing"])

    async def list_page(arguments: dict[str, Any]) -> dict[str, Any]:
        things, cursor = directory.list_page(
            arguments["prefix"], arguments["connected"], arguments["pageSize"], arguments["after"]
        )
        return {"things": things, "cursor": cursor}

    async def history(arguments: dict[str, Any]) -> list[dict[str, Any]]:
        store = engine.history_store
        if store is None:
            raise LookupError("this worker keeps no history")
        rows = await store.query(
            arguments["thing"],
            arguments["name"],
            arguments["start"],
            arguments["end"],
            arguments["fields"],
            arguments["bucket"],
            arguments["limit"],
        )
        return [row._asdict() for row in rows]

    async def status(_arguments: dict[str, Any]) -> dict[str, Any]:
        from .dashboard import engine_status

        return engine_status(engine, app)

    worker.procedures.update(
        describe=describe,
        named_shadows=named_shadows,
        list_page=list_page,
        history=history,
        engine_status=status,
    )


def remote_owner(peers: Peers | None, thing: str) -> int | None:
    """Return the worker that owns ``thing`` when it is not this one, else None."""
    if peers is None:
        return None
    owner = peers.owner(thing)
    return None if owner == peers.index else owner


def unavailable(error: PeerCallError, thing: str) -> Response:
    """Return the 503 for a read of ``thing`` whose owner did not respond."""
    return error_response(
        503,
        f"{owner_not_responding(thing, error.peer, error.reason)} Retry the request shortly.",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


async def list_everywhere(
    peers: Peers,
    local: ThingPage,
    prefix: str,
    connected: bool | None,
    page_size: int,
    after: str | None,
) -> tuple[list[dict[str, Any]], str | None, list[Missing]]:
    """Return the page of things over every worker, given this worker's own ``local`` page,
    and the workers that did not reply within LIST_TIMEOUT_SECONDS.

    The page leaves out the things of those workers, and its cursor goes on past them: a
    client that pages on while a worker restarts does not see that worker's things.
    """
    arguments = {"prefix": prefix, "connected": connected, "pageSize": page_size, "after": after}

    async def page_of(peer: int) -> ThingPage | Missing:
        try:
            page = await peers.call(peer, "list_page", arguments, LIST_TIMEOUT_SECONDS)
        except PeerCallError as error:
            return {"worker": peer, "error": error.reason}
        return page["things"], page["cursor"]

    results = await asyncio.gather(
        *(page_of(peer) for peer in range(peers.workers) if peer != peers.index)
    )
    pages = [local, *(result for result in results if isinstance(result, tuple))]
    missing = [result for result in results if isinstance(result, dict)]
    things, cursor = merge_pages(pages, page_size)
    return things, cursor, missing


async def status_everywhere(peers: Peers, local: dict[str, Any]) -> dict[str, Any]:
    """Return the engine's figures over every worker, given this worker's ``local`` ones.

    A worker that does not reply within STATUS_TIMEOUT_SECONDS (it is restarting, or stuck)
    is listed as down with the reason, and the totals are those of the workers that replied.
    """

    async def status_of(peer: int) -> dict[str, Any]:
        try:
            status = await peers.call(peer, "engine_status", {}, STATUS_TIMEOUT_SECONDS)
        except PeerCallError as error:
            return {"worker": peer, "up": False, "error": error.reason}
        return {**status, "worker": peer, "up": True}

    statuses = list(
        await asyncio.gather(
            *(status_of(peer) for peer in range(peers.workers) if peer != peers.index)
        )
    )
    statuses.insert(peers.index, {**local, "worker": peers.index, "up": True})
    return merge_statuses(statuses)


def merge_statuses(statuses: list[dict[str, Any]]) -> dict[str, Any]:
    """Add up the figures of the workers that are up, and keep each worker's own figures
    under ``workers``.

    Counts and queue sizes add up, ``readingPaused`` and ``pressure`` hold when they hold on
    any worker, and ``pressureSeconds`` is the longest of any worker.
    """
    up = [status for status in statuses if status["up"]]
    first = up[0]
    total: dict[str, Any] = {
        "timestamp": first["timestamp"],
        "connections": {
            name: sum(status["connections"][name] for status in up)
            for name in first["connections"]
        },
        "counters": {
            name: sum(status["counters"][name] for status in up) for name in first["counters"]
        },
        "readingPaused": any(status["readingPaused"] for status in up),
        "store": None,
        "historyKept": any(status["historyKept"] for status in up),
        "workers": statuses,
    }
    stores = [status["store"] for status in up if status["store"] is not None]
    if stores:
        total["store"] = {
            "pendingWrites": sum(store["pendingWrites"] for store in stores),
            "pendingBytes": sum(store["pendingBytes"] for store in stores),
            "historyOutboxRows": sum(store["historyOutboxRows"] for store in stores),
            "pressure": any(store["pressure"] for store in stores),
            "pressureSeconds": max(store["pressureSeconds"] for store in stores),
        }
    return total


def merge_pages(pages: list[ThingPage], page_size: int) -> ThingPage:
    """Merge the workers' pages of thing summaries into one page and its cursor.

    Each worker has looked at every name up to its cursor (None: to the end), so the names
    up to the smallest cursor are complete. A name that several workers know (a client
    connected through another worker than its thing's owner) is merged into one summary.
    """
    cursors = [cursor for _things, cursor in pages if cursor is not None]
    bound = min(cursors) if cursors else None
    merged: dict[str, dict[str, Any]] = {}
    for things, _cursor in pages:
        for thing in things:
            name = thing["name"]
            if bound is not None and name > bound:
                continue
            seen = merged.get(name)
            merged[name] = thing if seen is None else _merge_summaries(seen, thing)
    names = sorted(merged)
    if len(names) > page_size:
        names = names[:page_size]
        return [merged[name] for name in names], names[-1]
    return [merged[name] for name in names], bound


def _merge_summaries(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    shadow = first if first["version"] is not None else second
    last_seen = [value for value in (first["lastSeen"], second["lastSeen"]) if value is not None]
    return {
        **shadow,
        "connected": first["connected"] or second["connected"],
        "lastSeen": max(last_seen) if last_seen else None,
    }
