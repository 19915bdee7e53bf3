"""Authentication and authorization hooks: who a client is, and what it may publish and read.

The broker calls three methods of its :class:`AccessPolicy`:

* at CONNECT, ``authenticate()``: who the client is (a :class:`Principal`) or why it is
  rejected (a :class:`Rejection`). A policy that needs slow work, such as checking a password
  hash, returns an ``asyncio.Future`` instead. The broker then pauses reading from the
  connection and keeps its early packets until the future is done.
* at PUBLISH, ``may_publish()``, only for connections whose principal ``restricts()``
  names as restricted. The broker caches the answer per connection and topic, and drops the
  cache whenever ``generation`` changes.
* at SUBSCRIBE, ``may_subscribe()`` for each filter (the inner filter of a shared
  subscription), for restricted connections only.

The base class allows every client and every topic, which is the broker's default. The
engine's internal consumers subscribe inside the process and are never checked.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..mqtt.reason_codes import ConnackReturnCode, ReasonCode

if TYPE_CHECKING:
    from ..mqtt.packets import Connect
    from .connection import MQTTConnection

# Roles of a principal. A user has one of the first three.
ROLE_DEVICE = "device"
ROLE_APPLICATION = "application"
ROLE_ADMIN = "admin"
ROLE_ANONYMOUS = "anonymous"
USER_ROLES = (ROLE_DEVICE, ROLE_APPLICATION, ROLE_ADMIN)

# Authentication methods of a principal.
METHOD_PASSWORD = "password"
METHOD_CERTIFICATE = "certificate"
METHOD_ANONYMOUS = "anonymous"


@dataclass(frozen=True, slots=True)
class Principal:
    """The identity of an authenticated connection."""

    name: str
    role: str
    method: str


# A client without an identity, admitted because anonymous access is allowed.
ANONYMOUS = Principal("", ROLE_ANONYMOUS, METHOD_ANONYMOUS)


@dataclass(frozen=True, slots=True)
class Rejection:
    """A CONNECT that the policy rejects: the CONNACK codes and a reason for log and client."""

    v5_code: int
    v311_code: int
    reason: str


def bad_credentials(reason: str) -> Rejection:
    """Return the rejection for a wrong password or an unknown user name."""
    return Rejection(
        ReasonCode.BAD_USER_NAME_OR_PASSWORD, ConnackReturnCode.BAD_USER_NAME_OR_PASSWORD, reason
    )


def not_authorized(reason: str) -> Rejection:
    """Return the rejection for a known client that may not connect this way."""
    return Rejection(ReasonCode.NOT_AUTHORIZED, ConnackReturnCode.NOT_AUTHORIZED, reason)


AuthenticationResult = Principal | Rejection


class AccessPolicy:
    """Allows every client and every topic. Subclass it to authenticate and authorize."""

    # Incremented whenever the rules change, so that the broker drops cached decisions.
    generation = 0

    def authenticate(
        self, connection: MQTTConnection, connect: Connect
    ) -> AuthenticationResult | asyncio.Future[AuthenticationResult]:
        """Return who the client of ``connect`` is, why it is rejected, or a future of either.

        A connection from a verified client certificate carries the certificate's thing name
        in ``connection.certificate_name``.
        """
        name = connection.certificate_name
        if name is not None:
            return Principal(name, ROLE_DEVICE, METHOD_CERTIFICATE)
        return ANONYMOUS

    def recheck(self, principal: Principal) -> str | None:
        """Return why a connected ``principal`` may no longer stay connected, or None.

        The broker calls this for every connected client after the rules change.
        """
        return None

    def restricts(self, principal: Principal) -> bool:
        """Return whether ``principal``'s topics are checked; False lets it use every topic."""
        return False

    def may_publish(self, principal: Principal, client_id: str, topic: str) -> bool:
        return True

    def may_subscribe(self, principal: Principal, client_id: str, topic_filter: str) -> bool:
        """Return whether every topic that ``topic_filter`` matches is readable by the client."""
        return True
