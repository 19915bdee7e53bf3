"""Events that the broker reports to the layers above it (the engine, later the API).

Subclass :class:`BrokerHooks`, override the methods you need and pass the object to
``Broker.add_hooks``. Hooks run synchronously on the event loop, inside the broker's own
processing, so they must be quick and must not raise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .connection import MQTTConnection
    from .session import Session
    from .subscriptions import SubscriptionRecord

# Reasons for the end of a client's connection, named as AWS IoT names them in presence events.
CLIENT_INITIATED_DISCONNECT = "CLIENT_INITIATED_DISCONNECT"
CONNECTION_LOST = "CONNECTION_LOST"
DUPLICATE_CLIENT_ID = "DUPLICATE_CLIENTID"
KEEP_ALIVE_TIMEOUT = "MQTT_KEEP_ALIVE_TIMEOUT"
CLIENT_ERROR = "CLIENT_ERROR"
SERVER_INITIATED_DISCONNECT = "SERVER_INITIATED_DISCONNECT"


class BrokerHooks:
    def client_connected(self, connection: MQTTConnection) -> None:
        """Handle a client that completed CONNECT. Its CONNACK is already queued."""

    def client_disconnected(self, connection: MQTTConnection, reason: str) -> None:
        """Handle the end of a connected client's connection, for ``reason`` (a constant above)."""

    def subscribed(self, session: Session, record: SubscriptionRecord) -> None:
        """Handle a new subscription. Its SUBACK and any retained messages are already queued."""
