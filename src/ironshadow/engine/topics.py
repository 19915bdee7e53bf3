"""AWS IoT Device Shadow topic names.

Classic shadow: ``$aws/things/{thing}/shadow/{operation}``; named shadow:
``$aws/things/{thing}/shadow/name/{shadow}/{operation}``. Requests are ``update``, ``get`` and
``delete``; the engine replies on ``{request}/accepted`` and ``{request}/rejected`` and
publishes ``update/delta`` and ``update/documents``.
"""

from __future__ import annotations

THINGS_PREFIX = "$aws/things/"
REQUEST_OPERATIONS = ("update", "get", "delete")

# What the shadow service subscribes to: the request topics only, so that its own replies
# never come back to it and do not count as heard by a subscriber.
REQUEST_FILTERS = [
    f"$aws/things/+/shadow/{operation}" for operation in REQUEST_OPERATIONS
] + [f"$aws/things/+/shadow/name/+/{operation}" for operation in REQUEST_OPERATIONS]


def shadow_topic_prefix(thing: str, shadow_name: str | None) -> str:
    if shadow_name is None:
        return f"$aws/things/{thing}/shadow"
    return f"$aws/things/{thing}/shadow/name/{shadow_name}"


def parse_shadow_topic(topic: str) -> tuple[str, str | None, str] | None:
    """Split a shadow topic into ``(thing, shadow name or None, operation)``.

    The operation is everything after the shadow prefix, for example ``update`` or
    ``update/delta``. Topics outside the shadow namespace return None.
    """
    if not topic.startswith(THINGS_PREFIX):
        return None
    levels = topic.split("/")
    # ['$aws', 'things', thing, 'shadow', ...]
    if len(levels) < 5 or levels[3] != "shadow" or not levels[2]:
        return None
    thing = levels[2]
    if levels[4] == "name":
        if len(levels) < 7 or not levels[5]:
            return None
        return thing, levels[5], "/".join(levels[6:])
    return thing, None, "/".join(levels[4:])
