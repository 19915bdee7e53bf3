"""Retained messages, one per topic, found by topic filter through a tree of topic levels."""

from __future__ import annotations

import time

from .message import Message


class _Node:
    __slots__ = ("children", "message")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.message: Message | None = None


class RetainedStore:
    __slots__ = ("_root", "count")

    def __init__(self) -> None:
        self._root = _Node()
        self.count = 0

    def store(self, message: Message) -> None:
        """Keep ``message`` as the topic's retained message; an empty payload deletes it
        [MQTT-3.3.1-10]."""
        levels = message.topic.split("/")
        if not message.payload:
            self._delete(levels)
            return
        node = self._root
        for level in levels:
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _Node()
            node = child
        if node.message is None:
            self.count += 1
        node.message = message

    def messages(self) -> list[Message]:
        """Return every retained message, those of topics starting with ``$`` included."""
        found: list[Message] = []
        self._collect(self._root, found, False)
        return found

    def get(self, topic: str) -> Message | None:
        node: _Node | None = self._root
        for level in topic.split("/"):
            node = node.children.get(level)  # type: ignore[union-attr]
            if node is None:
                return None
        return node.message  # type: ignore[union-attr]

    def _delete(self, levels: list[str]) -> None:
        path = []
        node = self._root
        for level in levels:
            child = node.children.get(level)
            if child is None:
                return
            path.append((node, level))
            node = child
        if node.message is not None:
            node.message = None
            self.count -= 1
        for parent, level in reversed(path):
            child = parent.children[level]
            if child.message is not None or child.children:
                break
            del parent.children[level]

    def match(self, topic_filter: str) -> list[Message]:
        """Return the unexpired retained messages whose topics match ``topic_filter``."""
        found: list[Message] = []
        self._walk(self._root, topic_filter.split("/"), 0, found)
        now = time.monotonic()
        live = [message for message in found if not message.expired(now)]
        for message in found:
            if message.expired(now):
                self._delete(message.topic.split("/"))
        return live

    def _walk(self, node: _Node, levels: list[str], index: int, out: list[Message]) -> None:
        if index == len(levels):
            if node.message is not None:
                out.append(node.message)
            return
        level = levels[index]
        top = index == 0
        if level == "#":
            # '#' matches the parent level too, and everything below it.
            if node.message is not None and not top:
                out.append(node.message)
            self._collect(node, out, skip_dollar=top)
            return
        if level == "+":
            for name, child in node.children.items():
                if top and name.startswith("$"):
                    continue  # [MQTT-4.7.2-1]
                self._walk(child, levels, index + 1, out)
            return
        child = node.children.get(level)
        if child is not None:
            self._walk(child, levels, index + 1, out)

    def _collect(self, node: _Node, out: list[Message], skip_dollar: bool) -> None:
        stack = [
            child
            for name, child in node.children.items()
            if not (skip_dollar and name.startswith("$"))
        ]
        while stack:
            current = stack.pop()
            if current.message is not None:
                out.append(current.message)
            stack.extend(current.children.values())
