"""The broker's access policy from the users file, the roles and the ACL file.

Modes, decided again on every reload:

* users in the users file: every client authenticates, with a user name and password or
  with a client certificate (TLS listener);
* no users, and anonymous access allowed (every listener on loopback, or ``allow_anonymous``):
  every client is admitted as anonymous and may use every topic;
* no users and anonymous access not allowed: every client is rejected. ``ironshadow serve``
  refuses to start this way; it happens only when the last user is removed while it runs.

Roles:

* ``device``: ``$aws/things/{its name}/#`` and the configured device patterns. It must connect
  with its name as client id.
* ``application``: every thing's shadow topics (``$aws/things/+/shadow/#``) and the configured
  application patterns. It may also subscribe to the engine's events (``$aws/events/#``).
* ``admin``: every topic.

The ACL file adds rules for device and application users (see ``acl``).

Reload: a timer checks the modification times of the users and ACL files once per
RELOAD_INTERVAL. After a change the policy increments ``generation``, which drops the
broker's cached publish decisions, and calls ``Broker.access_changed()``, which disconnects
clients whose user was removed or changed role and removes subscriptions no longer allowed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from ..broker.access import (
    ANONYMOUS,
    METHOD_ANONYMOUS,
    METHOD_CERTIFICATE,
    METHOD_PASSWORD,
    ROLE_APPLICATION,
    ROLE_DEVICE,
    AccessPolicy,
    AuthenticationResult,
    Principal,
    bad_credentials,
    not_authorized,
)
from .acl import AclError, Rule, TopicRules, load_acl, validate_pattern
from .credentials import CredentialCache
from .users import USERS_FILE_NAME, User, UserStore, UserStoreError

if TYPE_CHECKING:
    from ..broker.connection import MQTTConnection
    from ..broker.core import Broker
    from ..mqtt.packets import Connect

log = logging.getLogger("ironshadow.auth")

# Seconds between two checks of the users and ACL files for changes.
RELOAD_INTERVAL = 1.0

DEVICE_TOPICS = ("$aws/things/{username}/#",)
APPLICATION_TOPICS = ("$aws/things/+/shadow/#",)
APPLICATION_SUBSCRIBE_ONLY = ("$aws/events/#",)


def is_loopback(host: str) -> bool:
    """Return whether ``host`` is a loopback address or ``localhost``.

    Other names count as not loopback, because resolving them could query the network.
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class AuthSettings:
    data_dir: Path
    acl_file: Path | None = None
    # Admit anonymous clients when there are no users although a listener is not on loopback.
    allow_anonymous: bool = False
    # Whether every listener is bound to a loopback address.
    loopback_only: bool = True
    device_topics: tuple[str, ...] = ()
    application_topics: tuple[str, ...] = ()

    @property
    def users_file(self) -> Path:
        return self.data_dir / USERS_FILE_NAME


class AuthPolicy(AccessPolicy):
    """Authenticates clients against the users file and authorizes topics by role and ACL.

    Construct it (which reads both files and raises UserStoreError or AclError if either is
    invalid), then ``attach()`` it to a broker on the running event loop, and ``close()``
    it at shutdown.
    """

    def __init__(self, settings: AuthSettings) -> None:
        self.settings = settings
        self.users = UserStore(settings.users_file)
        self.credentials = CredentialCache()
        self.generation = 0
        where = "setting device_topic"
        device = DEVICE_TOPICS + tuple(validate_pattern(p, where) for p in settings.device_topics)
        where = "setting application_topic"
        application = APPLICATION_TOPICS + tuple(
            validate_pattern(p, where) for p in settings.application_topics
        )
        self._role_publish = {ROLE_DEVICE: device, ROLE_APPLICATION: application}
        self._role_subscribe = {
            ROLE_DEVICE: device,
            ROLE_APPLICATION: application + APPLICATION_SUBSCRIBE_ONLY,
        }
        self.users.load()
        acl: tuple[Rule, ...] = ()
        self._acl_stamp: tuple[int, int] | None = None
        if settings.acl_file is not None:
            acl = load_acl(settings.acl_file)
            self._acl_stamp = self._stamp(settings.acl_file)
        self.rules = TopicRules(self._role_publish, self._role_subscribe, acl)
        self._broker: Broker | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._reported_errors: set[str] = set()

    # --- mode -------------------------------------------------------------------------

    @property
    def anonymous_allowed(self) -> bool:
        settings = self.settings
        return not len(self.users) and (settings.loopback_only or settings.allow_anonymous)

    def describe_mode(self) -> str:
        """Return one log line that describes how clients are admitted now."""
        count = len(self.users)
        if count:
            noun = "user" if count == 1 else "users"
            return f"authentication required: {count} {noun} in {self.settings.users_file}"
        if self.settings.loopback_only:
            return "anonymous access: no users, every listener on loopback"
        if self.settings.allow_anonymous:
            return "anonymous access: no users, and allow_anonymous is set"
        return (
            f"every client rejected: no users in {self.settings.users_file} and anonymous "
            "access is off; add a user with `ironshadow auth add`"
        )

    # --- lifecycle --------------------------------------------------------------------

    def attach(self, broker: Broker) -> None:
        """Become ``broker``'s access policy and start watching the files. Call on its loop."""
        broker.access = self
        self._broker = broker
        self._timer = asyncio.get_running_loop().call_later(RELOAD_INTERVAL, self._tick)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.credentials.close()

    # --- reload -----------------------------------------------------------------------

    @staticmethod
    def _stamp(path: Path) -> tuple[int, int] | None:
        try:
            status = path.stat()
        except OSError:
            return None
        return (status.st_mtime_ns, status.st_size)

    def _tick(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(RELOAD_INTERVAL, self._tick)
        self.reload()

    def reload(self) -> bool:
        """Read the users and ACL files again if they changed; return whether rules changed.

        An invalid file is logged once and its previous contents stay in force.
        NOTE: the files are read on the event loop. A users file of many megabytes would
        stall the loop for as long as its JSON takes to parse, once per change.
        """
        changed = False
        try:
            changed = self.users.reload_if_changed()
        except UserStoreError as exc:
            self._report(str(exc))
        acl_file = self.settings.acl_file
        if acl_file is not None:
            stamp = self._stamp(acl_file)
            if stamp != self._acl_stamp:
                self._acl_stamp = stamp
                try:
                    acl = load_acl(acl_file)
                except AclError as exc:
                    self._report(f"{exc}; the previous rules stay in force")
                else:
                    self.rules = TopicRules(self._role_publish, self._role_subscribe, acl)
                    log.info("ACL file %s reloaded: %d rules", acl_file, len(acl))
                    changed = True
        if changed:
            self._reported_errors.clear()
            self.generation += 1
            log.info("access rules changed; %s", self.describe_mode())
            if self._broker is not None:
                self._broker.access_changed()
        return changed

    def _report(self, message: str) -> None:
        if message not in self._reported_errors:
            self._reported_errors.add(message)
            log.error("%s", message)

    # --- authentication ---------------------------------------------------------------

    def find_user(self, name: str) -> User | None:
        """Return the user ``name``, or None when the users file has no such user.

        Each worker of ``serve --workers N`` reads the file on its own timer, so a user that
        another worker already admits may be missing here for up to a second. The file is
        read again, if it changed, before a user is reported missing.
        """
        user = self.users.lookup(name)
        if user is None and self.reload():
            user = self.users.lookup(name)
        return user

    def authenticate(
        self, connection: MQTTConnection, connect: Connect
    ) -> AuthenticationResult | asyncio.Future[AuthenticationResult]:
        client_id = connect.client_id
        certificate_name = connection.certificate_name
        if certificate_name is not None:
            if client_id != certificate_name:
                return not_authorized(
                    f"client id {client_id!r} differs from the certificate's thing name "
                    f"{certificate_name!r}; a device connects with its name as client id"
                )
            return Principal(certificate_name, ROLE_DEVICE, METHOD_CERTIFICATE)
        if not len(self.users):
            if self.anonymous_allowed:
                return ANONYMOUS
            return not_authorized("no users are configured and anonymous access is off")
        username = connect.username
        if username is None:
            return not_authorized("a user name and password are required")
        password = connect.password
        if password is None:
            return bad_credentials(f"user {username!r} gave no password")
        user = self.find_user(username)
        password_hash = user.password_hash if user is not None else None
        verdict = self.credentials.check(username, password_hash, password)
        if isinstance(verdict, bool):
            return self._decide(user, username, client_id, verdict)
        future: asyncio.Future[AuthenticationResult] = asyncio.get_running_loop().create_future()
        verdict.add_done_callback(
            partial(self._verified, future, username, password_hash, client_id)
        )
        return future

    def _verified(
        self,
        future: asyncio.Future[AuthenticationResult],
        username: str,
        password_hash: str | None,
        client_id: str,
        verdict: asyncio.Future[bool],
    ) -> None:
        if future.done():
            return
        if verdict.cancelled():
            future.cancel()
            return
        error = verdict.exception()
        if error is not None:
            future.set_exception(error)
            return
        user = self.users.lookup(username)
        if user is not None and user.password_hash != password_hash:
            # The password changed during the check: the client tries again.
            future.set_result(bad_credentials(f"the password of {username!r} just changed"))
            return
        future.set_result(self._decide(user, username, client_id, verdict.result()))

    @staticmethod
    def _decide(
        user: User | None, username: str, client_id: str, password_ok: bool
    ) -> AuthenticationResult:
        if user is None or not password_ok:
            return bad_credentials(f"wrong password or unknown user name {username!r}")
        if user.role == ROLE_DEVICE and client_id != user.name:
            return not_authorized(
                f"client id {client_id!r} differs from the name of device {user.name!r}; a "
                "device connects with its name as client id"
            )
        return Principal(user.name, user.role, METHOD_PASSWORD)

    def recheck(self, principal: Principal) -> str | None:
        if principal.method == METHOD_ANONYMOUS:
            if self.anonymous_allowed:
                return None
            return "anonymous access ended: users were added, so clients must authenticate"
        if principal.method == METHOD_PASSWORD:
            user = self.users.lookup(principal.name)
            if user is None:
                return f"user {principal.name!r} was removed"
            if user.role != principal.role:
                return f"the role of user {principal.name!r} changed to {user.role}"
        return None

    # --- authorization ----------------------------------------------------------------

    def restricts(self, principal: Principal) -> bool:
        return principal.role in (ROLE_DEVICE, ROLE_APPLICATION)

    def may_publish(self, principal: Principal, client_id: str, topic: str) -> bool:
        if not self.restricts(principal):
            return True
        return self.rules.may_publish(principal, client_id, topic)

    def may_subscribe(self, principal: Principal, client_id: str, topic_filter: str) -> bool:
        if not self.restricts(principal):
            return True
        return self.rules.may_subscribe(principal, client_id, topic_filter)
