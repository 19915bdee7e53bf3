"""An application message on its way through the broker, and its encodings for subscribers.

A message is decoded once and encoded per distinct delivery shape. Deliveries at QoS 0
without per-subscriber properties share one cached encoding, so fan-out to many such
subscribers costs one encode.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..mqtt.constants import MQTT_5
from ..mqtt.encoding import encode_string, encode_vbi
from ..mqtt.properties import Properties, PropertyId, encode_properties

_EXPIRY = PropertyId.MESSAGE_EXPIRY_INTERVAL
_SUBSCRIPTION_IDENTIFIER = PropertyId.SUBSCRIPTION_IDENTIFIER
_TOPIC_ALIAS = PropertyId.TOPIC_ALIAS


class Message:
    """A message being routed.

    A consumer inside the engine may have to store the message before the publisher is
    acknowledged. It calls :meth:`hold` while the message is routed and :meth:`release` once
    the message is stored, and the publisher's PUBACK or PUBREC waits for the last release.
    """

    __slots__ = (
        "_cache",
        "_properties_bytes",
        "_topic_bytes",
        "expires_at",
        "holds",
        "on_released",
        "origin",
        "payload",
        "properties",
        "qos",
        "retain",
        "serialized",
        "topic",
    )

    def __init__(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        properties: Properties | None = None,
        origin: str | None = None,
    ) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        # Properties forwarded to subscribers: Topic Alias and Subscription Identifier
        # belong to one hop and are set per delivery.
        if properties:
            properties = {
                key: value
                for key, value in properties.items()
                if key != _TOPIC_ALIAS and key != _SUBSCRIPTION_IDENTIFIER
            }
        self.properties = properties or None
        self.origin = origin
        self.expires_at: float | None = None
        if properties and _EXPIRY in properties:
            self.expires_at = time.monotonic() + properties[_EXPIRY]
        self._topic_bytes: bytes | None = None
        self._properties_bytes: bytes | None = None
        self._cache: dict[int, bytes] | None = None
        self.holds = 0
        self.on_released: Callable[[], None] | None = None
        # This message in the format of saved MQTT state, cached because many sessions may
        # queue the same message (see ``persistence``).
        self.serialized: bytes | None = None

    def hold(self) -> None:
        """Delay the publisher's acknowledgement until a matching :meth:`release`."""
        self.holds += 1

    def release(self) -> None:
        self.holds -= 1
        if not self.holds and self.on_released is not None:
            callback, self.on_released = self.on_released, None
            callback()

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def topic_bytes(self) -> bytes:
        if self._topic_bytes is None:
            self._topic_bytes = encode_string(self.topic)
        return self._topic_bytes

    def _v5_properties(
        self, subscription_ids: list[int] | None, topic_alias: int, now: float
    ) -> bytes:
        if self.expires_at is None and not subscription_ids and not topic_alias:
            if self._properties_bytes is None:
                self._properties_bytes = encode_properties(self.properties)
            return self._properties_bytes
        properties = dict(self.properties) if self.properties else {}
        if self.expires_at is not None:
            # [MQTT-3.3.2-6] The interval sent is the time left, rounded up.
            properties[_EXPIRY] = max(0, int(self.expires_at - now + 0.999))
        if subscription_ids:
            properties[_SUBSCRIPTION_IDENTIFIER] = subscription_ids
        if topic_alias:
            properties[_TOPIC_ALIAS] = topic_alias
        return encode_properties(properties)

    def encode(
        self,
        version: int,
        qos: int,
        retain: bool,
        packet_id: int = 0,
        dup: bool = False,
        subscription_ids: list[int] | None = None,
        topic_alias: int = 0,
        omit_topic: bool = False,
        now: float = 0.0,
    ) -> bytes:
        """Encode a PUBLISH of this message for one subscriber."""
        first = 0x30 | (qos << 1) | (1 if retain else 0) | (0x08 if dup else 0)
        plain = not subscription_ids and not topic_alias and self.expires_at is None
        cache: dict[int, bytes] | None = None
        key = 0
        if plain and not qos:
            key = first if version != MQTT_5 else first | 0x100
            cache = self._cache
            if cache is None:
                cache = {}
                self._cache = cache
            else:
                data = cache.get(key)
                if data is not None:
                    return data
        topic = b"\x00\x00" if omit_topic else self.topic_bytes()
        properties = (
            self._v5_properties(subscription_ids, topic_alias, now) if version == MQTT_5 else b""
        )
        payload = self.payload
        length = len(topic) + len(properties) + len(payload)
        if qos:
            length += 2
            data = b"".join((
                bytes((first,)),
                encode_vbi(length),
                topic,
                packet_id.to_bytes(2, "big"),
                properties,
                payload,
            ))
        else:
            data = b"".join((bytes((first,)), encode_vbi(length), topic, properties, payload))
            if cache is not None:
                cache[key] = data
        return data
