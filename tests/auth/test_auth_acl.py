"""Topic patterns and the ACL file, without sockets."""

from __future__ import annotations

import pytest

from ironshadow.auth.acl import (
    AclError,
    Rule,
    TopicRules,
    filter_covers,
    filters_overlap,
    load_acl,
    parse_acl,
)
from ironshadow.broker.access import Principal


@pytest.mark.parametrize(
    ("pattern", "topic_filter", "expected"),
    [
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("a/#", "a/+/c", True),
        ("a/#", "a/#", True),
        ("a/+", "a/b", True),
        ("a/+", "a/+", True),
        ("a/+", "a/#", False),
        ("a/+", "a", False),
        ("a/+", "a/b/c", False),
        ("a/b", "a/+", False),
        ("a/b", "a/b", True),
        ("#", "a/b", True),
        ("#", "$aws/things/x", False),
        ("+/x", "$aws/x", False),
        ("$aws/things/p1/#", "$aws/things/+/shadow/#", False),
        ("$aws/things/+/shadow/#", "$aws/things/p1/shadow/update", True),
        ("$aws/things/+/shadow/#", "$aws/things/#", False),
    ],
)
def test_filter_covers(pattern, topic_filter, expected):
    assert filter_covers(pattern, topic_filter) is expected


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        ("a/#", "a", True),
        ("a/b", "a/+", True),
        ("a/b", "a/c", False),
        ("a/+/c", "a/b/#", True),
        ("a/b", "a/b/c", False),
        ("#", "$aws/x", False),
        ("$aws/#", "$aws/things/+", True),
        ("+/b", "a/+", True),
    ],
)
def test_filters_overlap(first, second, expected):
    assert filters_overlap(first, second) is expected
    assert filters_overlap(second, first) is expected


DEVICE = Principal("press-1", "device", "password")


def rules(*acl: Rule) -> TopicRules:
    own = ("$aws/things/{username}/#",)
    return TopicRules({"device": own}, {"device": own}, acl)


def test_rules_role_patterns():
    topic_rules = rules()
    assert topic_rules.may_publish(DEVICE, "press-1", "$aws/things/press-1/shadow/update")
    assert not topic_rules.may_publish(DEVICE, "press-1", "$aws/things/press-2/shadow/update")
    assert topic_rules.may_subscribe(DEVICE, "press-1", "$aws/things/press-1/shadow/+/delta")
    assert not topic_rules.may_subscribe(DEVICE, "press-1", "$aws/things/+/shadow/update")


def test_rules_deny_wins():
    deny = Rule(deny_publish=("$aws/things/+/shadow/delete",),
                deny_subscribe=("$aws/things/+/shadow/update/documents",))
    topic_rules = rules(deny)
    assert not topic_rules.may_publish(DEVICE, "press-1", "$aws/things/press-1/shadow/delete")
    assert topic_rules.may_publish(DEVICE, "press-1", "$aws/things/press-1/shadow/update")
    # The deny pattern overlaps the requested filter, so the whole subscription is refused.
    assert not topic_rules.may_subscribe(DEVICE, "press-1", "$aws/things/press-1/#")


def test_rules_client_id_cannot_widen_pattern():
    rule = Rule(publish=("alarms/{client_id}",))
    topic_rules = rules(rule)
    assert topic_rules.may_publish(DEVICE, "press-1", "alarms/press-1")
    for client_id in ("#", "a/+", ""):
        assert not topic_rules.may_publish(DEVICE, client_id, "alarms/anything")


def test_rules_apply_by_user_and_role():
    rule = Rule(users=frozenset({"press-2"}), publish=("line/2",))
    topic_rules = rules(rule)
    assert not topic_rules.may_publish(DEVICE, "press-1", "line/2")
    other = Principal("press-2", "device", "password")
    assert topic_rules.may_publish(other, "press-2", "line/2")


def test_parse_acl_topics_mean_both():
    (rule,) = parse_acl({"rule": [{"roles": ["device"], "topics": ["f/{username}"]}]}, "test")
    assert rule.publish == ("f/{username}",)
    assert rule.subscribe == ("f/{username}",)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"rules": []}, "unknown key 'rules'"),
        ({"rule": [{"role": ["device"]}]}, "rule 1: unknown key 'role'"),
        ({"rule": [{"roles": ["boss"]}]}, "unknown role 'boss'"),
        ({"rule": [{"publish": "a/b"}]}, "publish must be a list of strings"),
        ({"rule": [{"publish": ["a/{name}"]}]}, "unknown placeholder"),
        ({"rule": [{"subscribe": ["a/#/b"]}]}, "invalid topic pattern 'a/#/b'"),
    ],
)
def test_parse_acl_errors(document, message):
    with pytest.raises(AclError, match=message):
        parse_acl(document, "ACL file x.toml")


def test_load_acl_missing_file(tmp_path):
    with pytest.raises(AclError, match="not found"):
        load_acl(tmp_path / "absent.toml")


def test_load_acl_bad_toml(tmp_path):
    path = tmp_path / "acl.toml"
    path.write_text("[[rule]\n")
    with pytest.raises(AclError, match="is not valid TOML"):
        load_acl(path)
