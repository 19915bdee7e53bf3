"""MQTT authentication and authorization: users, password checks, roles and the ACL file.

The broker calls an :class:`~ironshadow.broker.access.AccessPolicy`. This package provides
the one that ``ironshadow serve`` installs (:class:`AuthPolicy`) and the users store that
``ironshadow auth`` edits (:class:`UserStore`). It builds on the broker and the MQTT codec
only, never on storage, the engine or the API.
"""

from .acl import AclError
from .credentials import CredentialCache
from .policy import AuthPolicy, AuthSettings, is_loopback
from .users import USERS_FILE_NAME, User, UserStore, UserStoreError

__all__ = [
    "USERS_FILE_NAME",
    "AclError",
    "AuthPolicy",
    "AuthSettings",
    "CredentialCache",
    "User",
    "UserStore",
    "UserStoreError",
    "is_loopback",
]
