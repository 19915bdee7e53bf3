"""Topic rules: what each role may use, and the ACL file that adds to them or takes away.

Each rule is a list of topic patterns: MQTT topic filters in which ``{username}`` stands for
the user's name and ``{client_id}`` for the connection's client id. A pattern whose client id
is empty or contains ``/``, ``+`` or ``#`` does not apply, so that a client id can never widen
a pattern. Patterns follow MQTT's matching rules, including that a pattern starting with a
wildcard matches no topic starting with ``$`` [MQTT-4.7.2-1].

A client may publish to a topic when a pattern that allows it matches the topic and no deny
pattern does. It may subscribe to a filter when an allowing pattern matches every topic that
the filter matches, and no deny pattern matches any of them.

The ACL file is TOML, a list of ``[[rule]]`` tables::

    [[rule]]
    users = ["gateway-7"]              # user names; optional
    roles = ["application"]            # roles; optional
    topics = ["factory/{username}/#"]  # publish and subscribe
    publish = ["alarms/{client_id}"]   # publish only
    subscribe = ["factory/+/status"]   # subscribe only
    deny_publish = ["$aws/things/+/shadow/delete"]
    deny_subscribe = []

A rule applies to the users it names and to every user of the roles it names; a rule with
neither applies to every device and application user. Admin users are not restricted by any
rule. Deny patterns win over allowing ones, from any rule.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..broker.access import USER_ROLES, Principal
from ..mqtt.errors import MQTTProtocolError
from ..mqtt.topics import topic_matches, validate_topic_filter

PLACEHOLDERS = ("{username}", "{client_id}")
RULE_KEYS = ("users", "roles", "topics", "publish", "subscribe", "deny_publish", "deny_subscribe")


class AclError(ValueError):
    """An invalid ACL file or topic pattern; the message names the file, rule and value."""


@dataclass(frozen=True, slots=True)
class Rule:
    users: frozenset[str] = frozenset()
    roles: frozenset[str] = frozenset()
    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    deny_publish: tuple[str, ...] = ()
    deny_subscribe: tuple[str, ...] = ()

    def applies_to(self, principal: Principal) -> bool:
        if not self.users and not self.roles:
            return True
        return principal.name in self.users or principal.role in self.roles


@dataclass(frozen=True, slots=True)
class TopicRules:
    """The patterns of each role, followed by the rules of the ACL file."""

    # Role -> patterns it may publish to and subscribe to.
    role_publish: dict[str, tuple[str, ...]] = field(default_factory=dict)
    role_subscribe: dict[str, tuple[str, ...]] = field(default_factory=dict)
    acl: tuple[Rule, ...] = ()

    def may_publish(self, principal: Principal, client_id: str, topic: str) -> bool:
        allowed = self.role_publish.get(principal.role, ())
        rules = [rule for rule in self.acl if rule.applies_to(principal)]
        if any(
            topic_matches(pattern, topic)
            for pattern in _expanded(principal, client_id, allowed, rules, "publish")
        ):
            return not any(
                topic_matches(pattern, topic)
                for pattern in _expanded(principal, client_id, (), rules, "deny_publish")
            )
        return False

    def may_subscribe(self, principal: Principal, client_id: str, topic_filter: str) -> bool:
        allowed = self.role_subscribe.get(principal.role, ())
        rules = [rule for rule in self.acl if rule.applies_to(principal)]
        if any(
            filter_covers(pattern, topic_filter)
            for pattern in _expanded(principal, client_id, allowed, rules, "subscribe")
        ):
            return not any(
                filters_overlap(pattern, topic_filter)
                for pattern in _expanded(principal, client_id, (), rules, "deny_subscribe")
            )
        return False


def _expanded(
    principal: Principal,
    client_id: str,
    base: Iterable[str],
    rules: list[Rule],
    kind: str,
) -> Iterable[str]:
    """Yield the patterns of ``base`` and of ``rules``' ``kind`` with placeholders filled."""
    usable_client_id = bool(client_id) and not any(c in client_id for c in "/+#")
    for patterns in (base, *(getattr(rule, kind) for rule in rules)):
        for pattern in patterns:
            if "{client_id}" in pattern:
                if not usable_client_id:
                    continue
                pattern = pattern.replace("{client_id}", client_id)
            yield pattern.replace("{username}", principal.name)


# --- topic filters against topic filters --------------------------------------------------


def _first_level_excludes_dollar(levels: list[str]) -> bool:
    return levels[0] in ("+", "#")


def filter_covers(pattern: str, topic_filter: str) -> bool:
    """Return whether every topic that ``topic_filter`` matches is matched by ``pattern``."""
    pattern_levels = pattern.split("/")
    filter_levels = topic_filter.split("/")
    # A wildcard first level never matches a $ topic, so it cannot cover a filter that
    # names one.
    if filter_levels[0].startswith("$") and _first_level_excludes_dollar(pattern_levels):
        return False
    for index, level in enumerate(pattern_levels):
        if level == "#":
            return True  # also covers the parent level: "a/#" matches "a"
        if index >= len(filter_levels):
            return False
        requested = filter_levels[index]
        if requested == "#":
            return False
        if level == "+":
            continue
        if requested == "+" or requested != level:
            return False
    return len(pattern_levels) == len(filter_levels)


def filters_overlap(first: str, second: str) -> bool:
    """Return whether some topic is matched by both topic filters."""
    a = first.split("/")
    b = second.split("/")
    if (a[0].startswith("$") and _first_level_excludes_dollar(b)) or (
        b[0].startswith("$") and _first_level_excludes_dollar(a)
    ):
        return False
    for index in range(max(len(a), len(b))):
        if index >= len(a):
            return b[index] == "#" and index == len(b) - 1
        if index >= len(b):
            return a[index] == "#" and index == len(a) - 1
        x, y = a[index], b[index]
        if x == "#" or y == "#":
            return True
        if x == "+" or y == "+" or x == y:
            continue
        return False
    return True


# --- patterns and the ACL file ------------------------------------------------------------


def validate_pattern(pattern: object, where: str) -> str:
    """Return ``pattern`` if it is a topic filter once its placeholders are filled."""
    if not isinstance(pattern, str):
        raise AclError(f"{where}: topic pattern {pattern!r} must be a string")
    filled = pattern
    for placeholder in PLACEHOLDERS:
        filled = filled.replace(placeholder, "x")
    if "{" in filled or "}" in filled:
        raise AclError(
            f"{where}: topic pattern {pattern!r} has an unknown placeholder; use "
            f"{' or '.join(PLACEHOLDERS)}"
        )
    try:
        validate_topic_filter(filled)
    except MQTTProtocolError as exc:
        raise AclError(f"{where}: invalid topic pattern {pattern!r}: {exc.message}") from None
    return pattern


def _strings(rule: dict[str, object], key: str, where: str) -> tuple[str, ...]:
    values = rule.get(key, [])
    if not isinstance(values, list) or not all(isinstance(value, str) for value in values):
        raise AclError(f"{where}: {key} must be a list of strings, got {values!r}")
    return tuple(values)  # type: ignore[arg-type]


def parse_acl(document: dict[str, object], source: str) -> tuple[Rule, ...]:
    """Build the rules of a parsed ACL document; raise AclError naming what is wrong."""
    unknown = sorted(set(document) - {"rule"})
    if unknown:
        raise AclError(f"{source}: unknown key {unknown[0]!r}; write rules as [[rule]] tables")
    tables = document.get("rule", [])
    if not isinstance(tables, list):
        raise AclError(f"{source}: 'rule' must be a list of tables; write [[rule]]")
    rules = []
    for number, table in enumerate(tables, start=1):
        where = f"{source}, rule {number}"
        if not isinstance(table, dict):
            raise AclError(f"{where}: must be a table")
        unknown = sorted(set(table) - set(RULE_KEYS))
        if unknown:
            raise AclError(
                f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(RULE_KEYS)}"
            )
        roles = _strings(table, "roles", where)
        for role in roles:
            if role not in USER_ROLES:
                raise AclError(f"{where}: unknown role {role!r}; use {', '.join(USER_ROLES)}")
        patterns = {
            key: tuple(validate_pattern(p, where) for p in _strings(table, key, where))
            for key in ("topics", "publish", "subscribe", "deny_publish", "deny_subscribe")
        }
        rules.append(
            Rule(
                users=frozenset(_strings(table, "users", where)),
                roles=frozenset(roles),
                publish=patterns["topics"] + patterns["publish"],
                subscribe=patterns["topics"] + patterns["subscribe"],
                deny_publish=patterns["deny_publish"],
                deny_subscribe=patterns["deny_subscribe"],
            )
        )
    return tuple(rules)


def load_acl(path: Path) -> tuple[Rule, ...]:
    """Read and check the ACL file at ``path``; raise AclError if it is missing or invalid."""
    try:
        with path.open("rb") as handle:
            document = tomllib.load(handle)
    except FileNotFoundError:
        raise AclError(f"ACL file {path} not found; create it or fix --acl-file") from None
    except OSError as exc:
        raise AclError(f"cannot read ACL file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise AclError(f"ACL file {path} is not valid TOML: {exc}") from None
    return parse_acl(document, f"ACL file {path}")
