"""Topic names, topic filters, wildcard matching and shared subscriptions."""

from __future__ import annotations

import pytest
from codec_strategies import STREAM_SETTINGS, topic_filters, topic_names
from hypothesis import given
from hypothesis import strategies as st

from ironshadow.mqtt import (
    MQTTProtocolError,
    ReasonCode,
    parse_shared_subscription,
    topic_matches,
    validate_topic_filter,
    validate_topic_name,
)

# --- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "topic", ["a", "/", "//", "a/b/c", "/finance", "sport/", "$SYS/broker", "with space", "é/ü"]
)
def test_name_valid(topic):
    validate_topic_name(topic)


@pytest.mark.parametrize("topic", ["", "+", "#", "a/+", "a/#", "a+", "sport/tennis#", "+/b"])
def test_name_invalid(topic):
    with pytest.raises(MQTTProtocolError) as info:
        validate_topic_name(topic)
    assert info.value.reason_code == ReasonCode.TOPIC_NAME_INVALID


# --- filters ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "topic_filter",
    [
        "#", "+", "+/+", "/+", "+/", "a/#", "a/+/b", "a/+/#", "/", "//", "sport/tennis/player1",
        "$SYS/#", "$SYS/+/x", "+/#", "a//#",
    ],
)
def test_filter_valid(topic_filter):
    validate_topic_filter(topic_filter)


@pytest.mark.parametrize(
    "topic_filter",
    [
        "",  # empty
        "#/a",  # '#' not last
        "a/#/b",
        "#/#",
        "a/b#",  # wildcard inside a level
        "sport/tennis#",
        "sport+",
        "a/+b/c",
        "+a",
        "a/#b",
        "##",
        "++",
    ],
)
def test_filter_invalid(topic_filter):
    with pytest.raises(MQTTProtocolError) as info:
        validate_topic_filter(topic_filter)
    assert info.value.reason_code == ReasonCode.TOPIC_FILTER_INVALID


@STREAM_SETTINGS
@given(topic_filters())
def test_generated_filters_valid(topic_filter):
    validate_topic_filter(topic_filter)


# --- matching ---------------------------------------------------------------------------------

_MATCHES = [
    ("sport/tennis/player1/#", "sport/tennis/player1"),
    ("sport/tennis/player1/#", "sport/tennis/player1/ranking"),
    ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon"),
    ("sport/#", "sport"),
    ("sport/#", "sport/"),
    ("#", "sport"),
    ("#", "/"),
    ("#", "a/b/c"),
    ("sport/tennis/+", "sport/tennis/player1"),
    ("sport/+", "sport/"),
    ("+/+", "/finance"),
    ("/+", "/finance"),
    ("+", "finance"),
    ("+", ""),
    ("+/tennis/#", "sport/tennis/player1"),
    ("a/+/c", "a//c"),
    ("a/b", "a/b"),
    ("$SYS/#", "$SYS/broker/uptime"),
    ("$SYS/#", "$SYS"),
    ("$SYS/monitor/+", "$SYS/monitor/Clients"),
    ("a/$x/+", "a/$x/y"),
    ("a/+", "a/$x"),
]

_NON_MATCHES = [
    ("sport/tennis/+", "sport/tennis/player1/ranking"),
    ("sport/tennis/+", "sport/tennis"),
    ("sport/+", "sport"),
    ("+", "/finance"),
    ("+", "a/b"),
    ("a/b", "a/b/c"),
    ("a/b/c", "a/b"),
    ("a/b", "A/b"),
    ("a/b", "a/b/"),
    ("sport/#", "sports"),
    ("#", "$SYS"),
    ("#", "$SYS/broker"),
    ("+/monitor/Clients", "$SYS/monitor/Clients"),
    ("+", "$SYS"),
    ("+/#", "$share/x"),
    ("$SYS/#", "SYS/x"),
]


@pytest.mark.parametrize(("topic_filter", "topic"), _MATCHES)
def test_matches(topic_filter, topic):
    assert topic_matches(topic_filter, topic)


@pytest.mark.parametrize(("topic_filter", "topic"), _NON_MATCHES)
def test_no_match(topic_filter, topic):
    assert not topic_matches(topic_filter, topic)


_plain_topics = topic_names.filter(lambda topic: not topic.startswith("$"))


@STREAM_SETTINGS
@given(topic_names)
def test_topic_matches_itself(topic):
    assert topic_matches(topic, topic)


@STREAM_SETTINGS
@given(_plain_topics)
def test_hash_matches_plain_topics(topic):
    assert topic_matches("#", topic)


@STREAM_SETTINGS
@given(topic_names.map(lambda topic: "$" + topic))
def test_hash_skips_dollar_topics(topic):
    assert not topic_matches("#", topic)


@STREAM_SETTINGS
@given(topic_names.map(lambda topic: "$" + topic))
def test_plus_skips_dollar_topics(topic):
    levels = topic.split("/")
    assert not topic_matches("/".join("+" for _ in levels), topic)


@STREAM_SETTINGS
@given(_plain_topics)
def test_plus_per_level_matches(topic):
    levels = topic.split("/")
    assert topic_matches("/".join("+" for _ in levels), topic)


@STREAM_SETTINGS
@given(_plain_topics)
def test_extra_plus_level_no_match(topic):
    levels = topic.split("/")
    assert not topic_matches("/".join("+" for _ in [*levels, "x"]), topic)


@STREAM_SETTINGS
@given(topic_names, st.lists(st.sampled_from(["x", "", "y/z"]), max_size=3))
def test_hash_matches_parent_and_children(prefix, suffixes):
    topic = "/".join([prefix, *suffixes])
    assert topic_matches(prefix + "/#", topic)


# --- shared subscriptions ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic_filter", "expected"),
    [
        ("$share/g1/a/b", ("g1", "a/b")),
        ("$share/g1/#", ("g1", "#")),
        ("$share/g1/+/temp", ("g1", "+/temp")),
        ("$share/group/a/", ("group", "a/")),
        ("$share/g/$SYS/x", ("g", "$SYS/x")),
        ("$share/g//", ("g", "/")),
    ],
)
def test_shared_parse(topic_filter, expected):
    assert parse_shared_subscription(topic_filter) == expected


@pytest.mark.parametrize(
    "topic_filter", ["a/b", "#", "$SYS/#", "$share", "$sharex/g/a", "share/g/a"]
)
def test_shared_not_shared(topic_filter):
    assert parse_shared_subscription(topic_filter) == (None, topic_filter)


@pytest.mark.parametrize(
    "topic_filter",
    [
        "$share/",  # no group
        "$share//a",  # empty group
        "$share/g",  # no filter
        "$share/g/",  # empty filter
        "$share/g+/a",  # wildcard in the group
        "$share/+/a",
        "$share/#/a",
        "$share/g#x/a",
        "$share/g/a/#/b",  # invalid inner filter
        "$share/g/a+",
    ],
)
def test_shared_invalid(topic_filter):
    with pytest.raises(MQTTProtocolError) as info:
        parse_shared_subscription(topic_filter)
    assert info.value.reason_code == ReasonCode.TOPIC_FILTER_INVALID
