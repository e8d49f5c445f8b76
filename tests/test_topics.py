"""Topic names of DESIGN §2 and their strict parser."""

from __future__ import annotations

import pytest

from shared.errors import ProtocolError
from shared.topics import (
    OPEN_SHARED_FILTER,
    ParsedTopic,
    down_topic,
    open_topic,
    parse_topic,
    status_topic,
    up_topic,
)


def test_names_follow_design():
    assert open_topic("devA") == "spececd/v1/devA/open"
    assert up_topic("devA", "s-1") == "spececd/v1/devA/s-1/up"
    assert down_topic("edge.7", "s_1") == "spececd/v1/edge.7/s_1/down"
    assert status_topic("worker1") == "spececd/v1/workers/worker1/status"
    assert OPEN_SHARED_FILTER == "$share/spececd-workers/spececd/v1/+/open"


def test_parse_round_trips():
    assert parse_topic(open_topic("devA")) == ParsedTopic("open", device="devA")
    assert parse_topic(up_topic("devA", "s1")) == ParsedTopic("up", device="devA", sid="s1")
    assert parse_topic(down_topic("devA", "s1")) == ParsedTopic("down", device="devA", sid="s1")
    assert parse_topic(status_topic("w-1")) == ParsedTopic("status", worker="w-1")


@pytest.mark.parametrize(
    "topic",
    [
        "spececd/v1/devA",
        "spececd/v2/devA/open",
        "other/v1/devA/open",
        "spececd/v1/devA/s1/sideways",
        "spececd/v1/+/open",
        "spececd/v1/devA/#/up",
        "spececd/v1/devA/s.1/up",  # '.' is not allowed in a session id
        "spececd/v1/workers/open",  # reserved device name
        "spececd/v1/devA/s1/up/extra",
        "spececd/v1//open",
        f"spececd/v1/{'d' * 65}/open",
    ],
)
def test_parse_rejects_anything_else(topic):
    with pytest.raises(ProtocolError) as err:
        parse_topic(topic)
    assert err.value.field == "topic"


@pytest.mark.parametrize("bad", ["", "a/b", "a+b", "#", "x" * 65, "workers"])
def test_builders_reject_bad_device_names(bad):
    with pytest.raises(ProtocolError, match="device"):
        open_topic(bad)


def test_builders_reject_bad_session_ids():
    with pytest.raises(ProtocolError, match="sid"):
        up_topic("devA", "a b")
