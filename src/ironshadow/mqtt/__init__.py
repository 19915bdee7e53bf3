"""Sans-I/O MQTT 3.1.1 and 5.0 codec: bytes in, packets out; packets in, bytes out.

Nothing here does I/O or imports asyncio, so the same code serves every transport and is
tested without sockets.
"""

from .constants import MQTT_3_1_1, MQTT_5, PacketType
from .decoder import PacketDecoder
from .errors import MQTTProtocolError
from .packets import (
    Auth,
    Connack,
    Connect,
    Disconnect,
    Packet,
    Pingreq,
    Pingresp,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    Subscription,
    Unsuback,
    Unsubscribe,
    Will,
)
from .properties import PropertyId
from .reason_codes import ConnackReturnCode, ReasonCode
from .topics import (
    parse_shared_subscription,
    topic_matches,
    validate_topic_filter,
    validate_topic_name,
)

__all__ = [
    "MQTT_3_1_1",
    "MQTT_5",
    "Auth",
    "Connack",
    "ConnackReturnCode",
    "Connect",
    "Disconnect",
    "MQTTProtocolError",
    "Packet",
    "PacketDecoder",
    "PacketType",
    "Pingreq",
    "Pingresp",
    "PropertyId",
    "Puback",
    "Pubcomp",
    "Publish",
    "Pubrec",
    "Pubrel",
    "ReasonCode",
    "Suback",
    "Subscribe",
    "Subscription",
    "Unsuback",
    "Unsubscribe",
    "Will",
    "parse_shared_subscription",
    "topic_matches",
    "validate_topic_filter",
    "validate_topic_name",
]
