"""MQTT topic filter semantics, including $-topics."""

import pytest

from plantbus.broker.topics import matches, validate_filter, validate_topic


@pytest.mark.parametrize(
    ("flt", "topic", "expected"),
    [
        ("plant/#", "plant/h1/press7", True),
        ("plant/#", "plant", True),
        ("plant/+/press7", "plant/h1/press7", True),
        ("plant/+", "plant/h1/press7", False),
        ("plant/+/+", "plant/h1/press7", True),
        ("#", "plant/h1/press7", True),
        ("+/h1/#", "plant/h1/press7", True),
        ("plant/h1/press7", "plant/h1/press7", True),
        ("plant/h1/press", "plant/h1/press7", False),
        ("plant/h1/press7/x", "plant/h1/press7", False),
        ("#", "$cmd/plant/h1/press7", False),
        ("+/plant/#", "$cmd/plant", False),
        ("$cmd/#", "$cmd/plant/h1/press7", True),
        ("$cmd/plant/+/press7", "$cmd/plant/h1/press7", True),
        ("plant//x", "plant//x", True),
        ("plant/+/x", "plant//x", True),
    ],
)
def test_matches(flt, topic, expected):
    assert matches(flt, topic) is expected


@pytest.mark.parametrize("flt", ["a/#/b", "a/b#", "a/+b", "", "#/a"])
def test_invalid_filters(flt):
    with pytest.raises(ValueError):
        validate_filter(flt)


@pytest.mark.parametrize("topic", ["a/+", "a/#", ""])
def test_invalid_topics(topic):
    with pytest.raises(ValueError):
        validate_topic(topic)
