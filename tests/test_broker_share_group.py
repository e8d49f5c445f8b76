"""No device can join the workers' share group or swallow another device's opens (issue 10 #1).

With Mosquitto's acl_file a device could subscribe to ``$share/spececd-workers/spececd/v1/+/open``:
the broker made it a member of the workers' group, handed it its share of every device's opens
and dropped them at delivery (10 of 20 opens of another device vanished). The production config
uses the dynamic-security plugin, which checks the SUBSCRIBE itself. Each attack below runs
against a real Mosquitto with the production config, and the test asserts on delivery: every one
of the victim's opens reaches the worker (a raw worker1 client in the parametrized test, the
real ``Worker`` answering them in the last test), and the attacker receives none.
"""

from __future__ import annotations

import queue
import subprocess
import time
import uuid

import pytest

from shared import topics
from shared.errors import BrokerError
from shared.mqtt import Incoming, MqttClient
from shared.protocol import Open, decode, encode
from shared.sampling import SamplingParams
from shared.topics import OPEN_SHARED_FILTER, open_topic

OPENS = 20  # the original attack: 10 of 20 vanished with one attacker in a group of two

ATTACKS = [
    OPEN_SHARED_FILTER,  # the workers' own group and filter
    "$share/spececd-workers/spececd/v1/devB/open",
    "$share/spececd-workers/spececd/v1/#",
    "$share/spececd-workers/#",
    "$share/spececd-workers/+/+/+/open",
    "$share/spececd-workers/spececd/v1/+/+/open",
    "$share/x/spececd/v1/+/open",
    "$share/x/#",
    "$share/x/spececd/v1/+/+/open",
    "spececd/v1/+/open",
    "spececd/v1/devB/open",
    "+/+/+/open",
    "+/+/open",
    "spececd/#",
    "#",
]


def _subscribe_all(client: MqttClient, filters: list[str]) -> list[str]:
    """Try every filter; return those the broker granted (delivery is what the tests check)."""
    granted = []
    for topic_filter in filters:
        try:
            client.subscribe(topic_filter)
            granted.append(topic_filter)
        except BrokerError as exc:
            assert "Not authorized" in str(exc), exc
    return granted


def _collect(q: queue.Queue[Incoming], want: int, timeout: float) -> list[Incoming]:
    got: list[Incoming] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and (left := deadline - time.monotonic()) > 0:
        try:
            got.append(q.get(timeout=left))
        except queue.Empty:
            break
    return got


def _open(victim: MqttClient, payload: bytes, **kwargs: object) -> None:
    """Publish one of the victim's opens and wait for its PUBACK.

    Waits for the victim's connection first: a clean-clone run once found devB's client between
    connections at its first publish (``BrokerError: not connected``), which says nothing about
    the attack under test. A publish that was sent is never repeated, so no open is counted twice.
    """
    assert victim.connected.wait(5), "devB's client could not (re)connect to the test broker"
    victim.publish(open_topic("devB"), payload, wait=True, **kwargs)  # type: ignore[arg-type]


def _opens_only(msgs: list[Incoming]) -> list[Incoming]:
    return [m for m in msgs if m.topic.endswith("/open")]


CASES = [("devA", f) for f in ATTACKS] + [("monitor", f) for f in ATTACKS if f.startswith("$share/")]


@pytest.mark.parametrize(("attacker", "topic_filter"), CASES)
def test_no_filter_lets_a_client_take_a_devices_opens(prod_broker, mqtt_clients, attacker, topic_filter):
    worker = mqtt_clients.make(prod_broker.config("worker1"))
    worker.subscribe(OPEN_SHARED_FILTER)
    thief = mqtt_clients.make(prod_broker.config(attacker))
    granted = _subscribe_all(thief, [topic_filter])
    if attacker == "devA":
        assert granted == []  # a device may subscribe to nothing but its own answers and statuses
    victim = mqtt_clients.make(prod_broker.config("devB"))

    payloads = [f"open {i} {uuid.uuid4().hex}".encode() for i in range(OPENS)]
    for payload in payloads:
        _open(victim, payload)
    got = _collect(worker.messages, OPENS, timeout=10)
    assert sorted(m.payload for m in got) == sorted(payloads)  # all of them, none swallowed
    stolen = [m.payload for m in _opens_only(_collect(thief.messages, 1, timeout=0.3))]
    if attacker == "devA":
        assert stolen == []
    else:  # the monitor may watch a copy of the traffic (spececd/#), never take the worker's
        assert set(stolen) <= set(payloads)


def test_no_subscription_at_all_delays_or_swallows_opens(prod_broker, mqtt_clients):
    """Every variant at once, from both devices of the run, while devB keeps opening."""
    worker = mqtt_clients.make(prod_broker.config("worker1"))
    worker.subscribe(OPEN_SHARED_FILTER)
    thief = mqtt_clients.make(prod_broker.config("devA"))
    assert _subscribe_all(thief, ATTACKS) == []
    victim = mqtt_clients.make(prod_broker.config("devB"))
    start = time.monotonic()
    for i in range(OPENS):
        _open(victim, f"open {i}".encode())
    got = _collect(worker.messages, OPENS, timeout=10)
    assert len(got) == OPENS and time.monotonic() - start < 5  # no stall waiting for a thief's ack
    assert _collect(thief.messages, 1, timeout=0.3) == []


def test_real_worker_answers_every_open_while_a_device_attacks(prod_broker, mqtt_clients, tmp_path):
    """End to end: the real worker answers each of devB's opens (opened or a typed error)."""
    from cloud_worker.worker import Worker
    from shared.models import load_model
    from tests.tiny import make_tiny_model_dir

    target = load_model(str(make_tiny_model_dir(tmp_path / "t", arch="llama", seed=2)))
    worker = Worker(target, prod_broker.config("worker1"), worker_id="worker1")
    worker.start()
    try:
        thief = mqtt_clients.make(prod_broker.config("devA"))
        assert _subscribe_all(thief, ATTACKS) == []
        victim = mqtt_clients.make(prod_broker.config("devB"))
        victim.subscribe(f"{topics.PREFIX}/devB/+/down")
        sids = [f"s{i}-{uuid.uuid4().hex[:8]}" for i in range(10)]
        for sid in sids:
            msg = Open(sid=sid, epoch=0, ctx=(1, 2, 3), sampling=SamplingParams(), draft_model="d",
                       target_model="t", max_new=4)  # fmt: skip
            _open(victim, encode(msg), response_topic=topics.down_topic("devB", sid))
        answered = {decode(m.payload).sid for m in _collect(victim.messages, len(sids), timeout=30)}
        assert answered == set(sids)
        assert _collect(thief.messages, 1, timeout=0.3) == []
    finally:
        worker.stop()


def test_monitor_recipe_of_the_readme_still_works(prod_broker, mqtt_clients, uid):
    """broker/README.md's mosquitto_sub recipe, as the monitor user over TLS: it sees an open and
    an answer, and the monitor cannot publish."""
    cmd = [
        "mosquitto_sub", "-V", "mqttv5", "-q", "1", "-h", "localhost", "-p", str(prod_broker.port),
        "--cafile", str(prod_broker.ca_file), "-u", "monitor", "-P", prod_broker.users["monitor"],
        "-t", "spececd/#", "-C", "2", "-W", "10", "-R",  # -R: skip the workers' retained statuses
        "-F", "%I %t qos=%q retain=%r len=%l ct=%C rt=%R exp=%E corr=%D payload=%x",
    ]  # fmt: skip
    sub = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)  # mosquitto_sub has no "subscribed" signal; the -C 2 count checks delivery
        mqtt_clients.make(prod_broker.config("devA")).publish(open_topic("devA"), b"\xa0", wait=True)
        mqtt_clients.make(prod_broker.config("worker2")).publish(
            topics.down_topic("devA", uid), b"\xa1", wait=True
        )
        out, err = sub.communicate(timeout=15)
    finally:
        sub.kill()
    lines = [line for line in out.splitlines() if "/workers/" not in line]
    assert any("spececd/v1/devA/open qos=1" in line and "payload=a0" in line for line in lines), (out, err)
    monitor = mqtt_clients.make(prod_broker.config("monitor"))
    with pytest.raises(BrokerError, match="refused the publish"):
        monitor.publish(open_topic("devA"), b"forged", wait=True)
