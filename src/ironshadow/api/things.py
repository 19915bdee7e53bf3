"""The thing list behind ``GET /things``: a sorted name index and per-thing summaries.

A thing is any name that has a shadow (classic or named, not deleted), or a client id that is
connected or has a persistent session. The engine keeps no thing registry, so the names come
from the shadow service's ``shadows`` map (keys ``thing`` and ``thing~name``) and its
``last_seen`` map (client ids; a client that leaves neither a shadow nor a session behind is
dropped from it when it disconnects).

Paging must stay cheap with a million things, so ``ThingIndex`` keeps every name once in a
sorted list and merges in only the names added since the previous request, without sorting
the whole list again. Python dicts keep insertion order, so the keys added since the last
refresh come after the last key seen then. ``reversed()`` reaches them in time proportional
to their number. A page is then a binary search to the cursor and a walk of at
most ``MAX_SCANNED_PER_PAGE`` names.

NOTE: the first list request sorts every name once, on the event loop: about 1 s for a
million things on one AMD EPYC core (a single run of a script that filled the shadow
service with one million shadows). Later requests only merge in what was added.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from typing import Any, Protocol

# Names checked for one page at most. A filter that matches few things (``connected=true``
# on a mostly offline fleet) would otherwise walk the whole index while the event loop,
# and with it every MQTT connection, waits. The page then contains fewer than ``pageSize``
# things and its nextToken continues the walk.
MAX_SCANNED_PER_PAGE = 10_000

# New names up to this count are inserted one by one with bisect.insort (a memmove each).
# More are appended and the list is re-sorted, which Timsort does in about
# O(n + k log k) because the list is then two sorted runs.
INSORT_MAX_NEW_NAMES = 64

# Names whose keys have left the engine's maps (such as expired shadow tombstones) stay in the
# index and are skipped at page time. Once they could outnumber the live names, the next
# refresh rebuilds the index from the maps.
STALE_NAMES_SLACK = 1024


class ShadowServiceLike(Protocol):
    """The parts of ``ironshadow.engine.ShadowService`` that the thing list reads."""

    shadows: dict[str, Any]
    last_seen: dict[str, int]

    def named_shadow_names(self, thing: str) -> list[str]: ...


class BrokerLike(Protocol):
    # Client id -> session. A session's ``connection`` is None while its client is offline.
    sessions: dict[str, Any]


def thing_of_key(key: str) -> str:
    """Return the thing name of a shadow map key (``thing`` or ``thing~name``)."""
    return key.partition("~")[0]


class _MapCursor:
    """How far the index has read one of the engine's maps."""

    __slots__ = ("last_key", "length", "mapping")

    def __init__(self, mapping: dict[str, Any]) -> None:
        self.mapping = mapping
        self.length = len(mapping)
        self.last_key: str | None = next(reversed(mapping), None)

    def new_keys(self, mapping: dict[str, Any]) -> list[str] | None:
        """Return the keys inserted since the last call, newest first, or None if unknown.

        None means the index must be rebuilt: the map was replaced, or the last key seen
        was removed, or more keys were added than the walk back to the last key found.
        """
        if mapping is not self.mapping:
            return None
        new: list[str] = []
        for key in reversed(mapping):
            if key == self.last_key:
                break
            new.append(key)
        else:
            if self.last_key is not None:
                return None
        # Removals only lower the length, so a larger one proves that keys were added
        # somewhere the walk did not reach (the last key was removed and inserted again).
        # NOTE: a removal that offsets such an insertion exactly goes unnoticed, and the
        # name inserted then stays missing until the next rebuild.
        if len(mapping) > self.length + len(new):
            return None
        self.length = len(mapping)
        if new:
            self.last_key = new[0]
        return new


class ThingIndex:
    """Every thing name seen so far, once each, in sorted order.

    The index may hold names that no longer count as things (a shadow deleted since), so
    callers check each name they return.
    """

    def __init__(self, service: ShadowServiceLike) -> None:
        self._service = service
        self._names: list[str] = []
        self._members: set[str] = set()
        self._shadows: _MapCursor | None = None
        self._clients: _MapCursor | None = None

    @property
    def names(self) -> list[str]:
        self.refresh()
        return self._names

    def refresh(self) -> None:
        """Merge in the names added to the engine's maps since the last call."""
        shadows = self._service.shadows
        last_seen = self._service.last_seen
        if self._shadows is None or self._clients is None:
            self._rebuild(shadows, last_seen)
            return
        new_shadow_keys = self._shadows.new_keys(shadows)
        new_clients = self._clients.new_keys(last_seen)
        # Each live name is a key of at least one map, so this bounds the stale names.
        key_count = len(shadows) + len(last_seen)
        too_many_stale = len(self._members) > 2 * key_count + STALE_NAMES_SLACK
        if new_shadow_keys is None or new_clients is None or too_many_stale:
            self._rebuild(shadows, last_seen)
            return
        self._insert(thing_of_key(key) for key in new_shadow_keys)
        self._insert(new_clients)

    def _rebuild(self, shadows: dict[str, Any], last_seen: dict[str, int]) -> None:
        members = {thing_of_key(key) for key in shadows}
        members.update(last_seen)
        self._members = members
        self._names = sorted(members)
        self._shadows = _MapCursor(shadows)
        self._clients = _MapCursor(last_seen)

    def _insert(self, candidates: Iterable[str]) -> None:
        members = self._members
        new_names: list[str] = []
        for name in candidates:
            if name not in members:
                members.add(name)
                new_names.append(name)
        if len(new_names) <= INSORT_MAX_NEW_NAMES:
            for name in new_names:
                bisect.insort(self._names, name)
        else:
            self._names.extend(new_names)
            self._names.sort()

    def page(
        self,
        prefix: str,
        after: str | None,
        page_size: int,
        keep: Callable[[str], bool],
        max_scanned: int = MAX_SCANNED_PER_PAGE,
    ) -> tuple[list[str], str | None]:
        """Return up to ``page_size`` names that start with ``prefix`` and pass ``keep``.

        The walk starts after the name ``after`` and stops after ``max_scanned`` names.
        The second value is the cursor for the next page (the last name checked), or None
        when no name with the prefix is left.
        """
        names = self.names
        position = bisect.bisect_left(names, prefix)
        if after is not None:
            position = max(position, bisect.bisect_right(names, after))
        end = min(len(names), position + max_scanned)

        results: list[str] = []
        while position < end and len(results) < page_size:
            name = names[position]
            if not name.startswith(prefix):
                return results, None
            position += 1
            if keep(name):
                results.append(name)

        if position < len(names) and names[position].startswith(prefix):
            return results, names[position - 1]
        return results, None


class ThingDirectory:
    """Thing lookups and summaries for the thing endpoints, from the shadow service and broker."""

    def __init__(self, service: ShadowServiceLike, broker: BrokerLike) -> None:
        self._service = service
        self._broker = broker
        self.index = ThingIndex(service)

    def exists(self, name: str) -> bool:
        """Return whether ``name`` is a known client id or has a shadow not deleted."""
        service = self._service
        if name in service.last_seen:
            return True
        classic = service.shadows.get(name)
        if classic is not None and not classic.deleted:
            return True
        return bool(service.named_shadow_names(name))

    def is_connected(self, name: str) -> bool:
        session = self._broker.sessions.get(name)
        return session is not None and session.connection is not None

    def summary(self, name: str) -> dict[str, Any]:
        """Return the thing's name, connection state, last-seen time, and its classic shadow's
        version and whether that shadow has a delta."""
        classic = self._service.shadows.get(name)
        live = classic is not None and not classic.deleted
        return {
            "name": name,
            "connected": self.is_connected(name),
            "lastSeen": self._service.last_seen.get(name),
            "version": classic.version if live else None,
            "pendingDelta": live and classic.has_delta,
        }

    def detail(self, name: str) -> dict[str, Any]:
        """Return the summary plus the names of the thing's named shadows."""
        document = self.summary(name)
        document["namedShadows"] = self._service.named_shadow_names(name)
        return document

    def list_page(
        self, prefix: str, connected: bool | None, page_size: int, after: str | None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Return one page of thing summaries in name order and the cursor for the next."""
        if connected is None:
            keep = self.exists
        else:

            def keep(name: str) -> bool:
                return self.is_connected(name) == connected and self.exists(name)

        names, cursor = self.index.page(prefix, after, page_size, keep)
        return [self.summary(name) for name in names], cursor
