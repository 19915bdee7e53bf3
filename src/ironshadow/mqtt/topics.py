"""Topic names, topic filters and shared subscriptions.

Rules from MQTT 5 section 4.7 (the same in 3.1.1): levels are separated by ``/``; ``+``
matches one whole level and ``#`` the rest of the topic, including its parent level; a
topic that starts with ``$`` is not matched by a filter that starts with a wildcard
[MQTT-4.7.2-1]; names and filters are at least one character long [MQTT-4.7.3-1].
"""

from __future__ import annotations

from .errors import MQTTProtocolError
from .reason_codes import ReasonCode

SHARE_PREFIX = "$share/"


def validate_topic_name(topic: str) -> None:
    if not topic:
        raise MQTTProtocolError(ReasonCode.TOPIC_NAME_INVALID, "topic name is empty")
    if "+" in topic or "#" in topic:
        raise MQTTProtocolError(
            ReasonCode.TOPIC_NAME_INVALID, f"topic name {topic!r} contains a wildcard"
        )


def validate_topic_filter(topic_filter: str) -> None:
    """Raise unless ``topic_filter`` is a valid filter (shared subscriptions excluded)."""
    if not topic_filter:
        raise MQTTProtocolError(ReasonCode.TOPIC_FILTER_INVALID, "topic filter is empty")
    if "+" not in topic_filter and "#" not in topic_filter:
        return
    levels = topic_filter.split("/")
    last = len(levels) - 1
    for index, level in enumerate(levels):
        if level in ("+", ""):
            continue
        if level == "#":
            if index != last:
                raise MQTTProtocolError(
                    ReasonCode.TOPIC_FILTER_INVALID,
                    f"topic filter {topic_filter!r} has '#' before its last level",
                )  # [MQTT-4.7.1-1]
            continue
        if "+" in level or "#" in level:
            raise MQTTProtocolError(
                ReasonCode.TOPIC_FILTER_INVALID,
                f"topic filter {topic_filter!r} has a wildcard inside the level {level!r}",
            )  # [MQTT-4.7.1-2]


def parse_shared_subscription(topic_filter: str) -> tuple[str | None, str]:
    """Split ``$share/{group}/{filter}`` into ``(group, filter)``; other filters get no group."""
    if not topic_filter.startswith(SHARE_PREFIX):
        return None, topic_filter
    rest = topic_filter[len(SHARE_PREFIX) :]
    group, slash, inner = rest.partition("/")
    if not group or not slash or not inner:
        raise MQTTProtocolError(
            ReasonCode.TOPIC_FILTER_INVALID,
            f"shared subscription {topic_filter!r} must have the form $share/GROUP/FILTER",
        )  # [MQTT-4.8.2-1]
    if "+" in group or "#" in group:
        raise MQTTProtocolError(
            ReasonCode.TOPIC_FILTER_INVALID,
            f"share name {group!r} must not contain a wildcard",
        )  # [MQTT-4.8.2-2]
    validate_topic_filter(inner)
    return group, inner


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` matches ``topic_filter``; for tests and one-off checks.

    The broker matches through its subscription tree instead of calling this per filter.
    """
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    for index, level in enumerate(filter_levels):
        if level == "#":
            return True
        if index >= len(topic_levels):
            return False
        if level != "+" and level != topic_levels[index]:
            return False
    return len(filter_levels) == len(topic_levels)
