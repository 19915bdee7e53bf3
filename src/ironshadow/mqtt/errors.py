"""The one error type that the codec raises for bad input from a peer."""

from __future__ import annotations

from .reason_codes import ReasonCode


class MQTTProtocolError(Exception):
    """Malformed or forbidden input from a peer.

    ``reason_code`` is the MQTT 5 reason code to send in a DISCONNECT (or a CONNACK while
    the connection is being set up). MQTT 3.1.1 has no reason codes on DISCONNECT, so a
    3.1.1 peer only sees its connection close.
    """

    def __init__(self, reason_code: int, message: str) -> None:
        super().__init__(message)
        self.reason_code = ReasonCode(reason_code)
        self.message = message

    def __str__(self) -> str:
        return f"{self.message} (reason code 0x{self.reason_code:02X} {self.reason_code.name})"


def malformed(message: str) -> MQTTProtocolError:
    return MQTTProtocolError(ReasonCode.MALFORMED_PACKET, message)


def protocol_error(message: str) -> MQTTProtocolError:
    return MQTTProtocolError(ReasonCode.PROTOCOL_ERROR, message)
