"""The engine: the embedded MQTT broker and the shadow service, wired together."""

from __future__ import annotations

from ..broker.config import BrokerConfig
from ..broker.core import Broker
from ..shadow import ShadowLimits, shadow_key
from .service import ShadowService

__all__ = ["Engine", "ShadowService", "shadow_key"]


class Engine:
    def __init__(
        self, broker_config: BrokerConfig | None = None, shadow_limits: ShadowLimits | None = None
    ) -> None:
        self.broker = Broker(broker_config)
        self.shadows = ShadowService(self.broker, shadow_limits)

    async def start(self) -> None:
        await self.broker.start()

    async def shutdown(self) -> None:
        await self.broker.shutdown()
