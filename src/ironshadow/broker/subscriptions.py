"""The subscription index.

Filters without wildcards sit in a dict keyed by the filter itself, so the common case (each
device subscribes to its own topics) costs one dict lookup per message whatever the number of
devices. Filters with ``+`` or ``#`` sit in a tree of topic levels that a message walks once,
so their cost grows with the depth of the topic, not with the number of subscribers on other
topics.

A node holds the plain subscriptions on its filter, keyed by client id, and the shared
subscription groups, keyed by share name.

Match results are cached per topic until the next subscribe or unsubscribe, because the same
topics come back again and again (a device's telemetry topic, the shadow service's reply
topics, which are looked up once to decide whether to build a reply and again to route it).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from .._mypyc import mypyc_attr

if TYPE_CHECKING:
    from .session import Session


class SubscriptionRecord:
    """One client's subscription to one filter, with its MQTT 5 options."""

    __slots__ = (
        "no_local",
        "qos",
        "retain_as_published",
        "retain_handling",
        "session",
        "share_group",
        "subscription_id",
        "topic_filter",
    )

    def __init__(
        self,
        session: Session,
        topic_filter: str,
        qos: int,
        no_local: bool = False,
        retain_as_published: bool = False,
        retain_handling: int = 0,
        subscription_id: int = 0,
        share_group: str | None = None,
    ) -> None:
        self.session = session
        self.topic_filter = topic_filter
        self.qos = qos
        self.no_local = no_local
        self.retain_as_published = retain_as_published
        self.retain_handling = retain_handling
        self.subscription_id = subscription_id
        self.share_group = share_group


class SharedGroup:
    """Members of one ``$share/{group}/{filter}``; each message goes to one of them."""

    __slots__ = ("members", "next_index")

    def __init__(self) -> None:
        self.members: dict[str, SubscriptionRecord] = {}
        self.next_index = 0

    def pick(self, clients_only: bool = False) -> SubscriptionRecord | None:
        """Pick the next member in turn, preferring members that are connected.

        A consumer inside the engine (a cluster worker's stand-in for a peer's members)
        counts as connected. With ``clients_only`` consumers are passed over.
        """
        members = list(self.members.values())
        if clients_only:
            members = [record for record in members if record.session.consumer is None]
        count = len(members)
        if not count:
            return None
        start = self.next_index % count
        for offset in range(count):
            session = members[(start + offset) % count].session
            if session.connection is not None or session.consumer is not None:
                self.next_index = start + offset + 1
                return members[(start + offset) % count]
        self.next_index = start + 1
        return members[start]


class _Node:
    __slots__ = ("children", "groups", "records")

    def __init__(self) -> None:
        self.children: dict[str, _Node] | None = None
        self.records: dict[str, SubscriptionRecord] | None = None
        self.groups: dict[str, SharedGroup] | None = None

    def is_empty(self) -> bool:
        return not self.children and not self.records and not self.groups


# Topics whose match results are cached at most; the cache is emptied when it is full.
MATCH_CACHE_SIZE = 65_536


# A cluster worker's index extends this one (ironshadow.cluster.worker.ClusterIndex).
@mypyc_attr(allow_interpreted_subclasses=True)
class SubscriptionIndex:
    __slots__ = ("_cache", "_exact", "_root", "count")

    def __init__(self) -> None:
        self._exact: dict[str, _Node] = {}
        self._root = _Node()
        self._cache: dict[str, list[_Node]] = {}
        self.count = 0

    def add(self, inner_filter: str, record: SubscriptionRecord) -> bool:
        """Add or replace a subscription; return True if it replaced an existing one."""
        node = self._node_for(inner_filter, create=True)
        assert node is not None
        self._cache.clear()
        client_id = record.session.client_id
        if record.share_group is None:
            if node.records is None:
                node.records = {}
            replaced = client_id in node.records
            node.records[client_id] = record
        else:
            if node.groups is None:
                node.groups = {}
            group = node.groups.get(record.share_group)
            if group is None:
                group = node.groups[record.share_group] = SharedGroup()
            replaced = client_id in group.members
            group.members[client_id] = record
        if not replaced:
            self.count += 1
        return replaced

    def remove(self, inner_filter: str, client_id: str, share_group: str | None) -> bool:
        """Remove a subscription; return True if it existed."""
        node = self._node_for(inner_filter, create=False)
        if node is None:
            return False
        self._cache.clear()
        removed = False
        if share_group is None:
            if node.records and node.records.pop(client_id, None) is not None:
                removed = True
        elif node.groups:
            group = node.groups.get(share_group)
            if group is not None and group.members.pop(client_id, None) is not None:
                removed = True
                if not group.members:
                    del node.groups[share_group]
        if removed:
            self.count -= 1
            if node.is_empty():
                self._prune(inner_filter)
        return removed

    def match(self, topic: str) -> list[_Node]:
        """Return the nodes whose filters match ``topic``; the caller must not change it."""
        cache = self._cache
        nodes = cache.get(topic)
        if nodes is not None:
            return nodes
        nodes = []
        node = self._exact.get(topic)
        if node is not None:
            nodes.append(node)
        if self._root.children:
            self._walk(self._root, topic.split("/"), 0, nodes, topic.startswith("$"))
        if len(cache) >= MATCH_CACHE_SIZE:
            cache.clear()
        cache[topic] = nodes
        return nodes

    def _walk(
        self, node: _Node, levels: list[str], index: int, out: list[_Node], dollar: bool
    ) -> None:
        children = node.children
        if index == len(levels):
            if node.records or node.groups:
                out.append(node)
            if children:
                child = children.get("#")  # "a/#" also matches "a" [MQTT-4.7.1-2]
                if child is not None:
                    out.append(child)
            return
        if not children:
            return
        if not (dollar and index == 0):  # [MQTT-4.7.2-1]
            child = children.get("#")
            if child is not None:
                out.append(child)
            child = children.get("+")
            if child is not None:
                self._walk(child, levels, index + 1, out, dollar)
        child = children.get(levels[index])
        if child is not None:
            self._walk(child, levels, index + 1, out, dollar)

    def _node_for(self, inner_filter: str, create: bool) -> _Node | None:
        if "+" not in inner_filter and "#" not in inner_filter:
            node = self._exact.get(inner_filter)
            if node is None and create:
                node = self._exact[inner_filter] = _Node()
            return node
        node = self._root
        for level in inner_filter.split("/"):
            children = node.children
            if children is None:
                if not create:
                    return None
                children = node.children = {}
            child = children.get(level)
            if child is None:
                if not create:
                    return None
                child = children[level] = _Node()
            node = child
        return node

    def _prune(self, inner_filter: str) -> None:
        if "+" not in inner_filter and "#" not in inner_filter:
            self._exact.pop(inner_filter, None)
            return
        path: list[tuple[_Node, str]] = []
        node = self._root
        for level in inner_filter.split("/"):
            assert node.children is not None
            path.append((node, level))
            node = node.children[level]
        for parent, level in reversed(path):
            child = parent.children[level]  # type: ignore[index]
            if not child.is_empty():
                break
            del parent.children[level]  # type: ignore[union-attr]

    def group(self, inner_filter: str, name: str) -> SharedGroup | None:
        """Return the shared group ``name`` on ``inner_filter``, or None if it has no members."""
        node = self._node_for(inner_filter, create=False)
        if node is None or not node.groups:
            return None
        return node.groups.get(name)

    def iter_records(self, nodes: list[_Node], shared: bool = True) -> Iterator[SubscriptionRecord]:
        """Yield the plain records of ``nodes`` and, if ``shared``, one picked member per
        shared group."""
        for node in nodes:
            if node.records:
                yield from node.records.values()
            if shared and node.groups:
                for group in node.groups.values():
                    record = group.pick()
                    if record is not None:
                        yield record
