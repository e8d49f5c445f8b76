"""Retained messages and sizes are bounded for devices on the production broker (issue 10 #7).

The attack: a device stored 300 retained 1 MB messages on its own topics and the broker grew
9 -> 296 MB (286 MB on disk). Now broker/retain-guard refuses every retained publish except the
workers' status, and ``max_packet_size`` follows from the largest legitimate message. Every test
asserts on what the broker stores or delivers, with a positive control.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from shared.errors import BrokerAuthError, BrokerError
from shared.mqtt import Incoming
from shared.protocol import MAX_GAMMA, MAX_PAYLOAD_BYTES, Draft, Open, decode, encode
from shared.sampling import SamplingParams, SparseDist
from shared.topics import OPEN_SHARED_FILTER, open_topic, status_topic, up_topic
from tests.brokers import BROKER_DIR, Clients, prod_missing, start_broker

LLAMA31_POSITIONS = 131_072  # the default target's context


def _drain(q: queue.Queue[Incoming], wait: float = 0.5) -> list[Incoming]:
    got = []
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        try:
            got.append(q.get(timeout=left))
        except queue.Empty:
            break
    return got


def _rss_kib(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", text, re.M).group(1))  # type: ignore[union-attr]


def _sub_argv(broker, user: str, *extra: str) -> list[str]:
    return [
        "mosquitto_sub", "-V", "mqttv5", "-h", "localhost", "-p", str(broker.port), "--cafile",
        str(broker.ca_file), "-u", user, "-P", broker.users[user], *extra,
    ]  # fmt: skip


def test_a_device_cannot_retain_but_a_worker_status_is_retained(prod_broker, mqtt_clients, uid):
    dev = mqtt_clients.make(prod_broker.config("devA"))
    for topic in (open_topic("devA"), up_topic("devA", uid)):
        with pytest.raises(BrokerAuthError, match="refused the publish"):
            dev.publish(topic, b"kept forever?", retain=True, wait=True)
        dev.publish(topic, b"not retained", wait=True)  # the same topic without retain is fine
    mqtt_clients.make(prod_broker.config("worker1")).publish(
        status_topic("worker1"), uid.encode(), retain=True, content_type=None, wait=True
    )
    late = mqtt_clients.make(prod_broker.config("monitor"))
    late.subscribe("spececd/#")
    retained = {m.topic: m.payload for m in _drain(late.messages) if m.retain}
    assert retained.get(status_topic("worker1")) == uid.encode()  # positive control
    assert not [t for t in retained if "/devA/" in t]


def test_a_devices_retained_will_is_not_stored(prod_broker, mqtt_clients, uid):
    """A Will is a publish too: a device killed with a retained Will leaves nothing stored, while a
    worker's retained "offline" Will is stored (positive control)."""
    cases = (
        ("devA", up_topic("devA", uid), f"spececd/v1/devA/{uid}/down"),
        ("worker2", status_topic("worker2"), up_topic("devA", uid)),
    )
    for user, topic, sub in cases:  # each subscribes to what it may, so mosquitto_sub stays up
        will = ["--will-topic", topic, "--will-payload", f"will {uid}", "--will-retain", "--will-qos", "1"]
        proc = subprocess.Popen(_sub_argv(prod_broker, user, *will, "-t", sub))
        time.sleep(1.0)  # connected (no signal to wait on); then die without a DISCONNECT
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=5)
    time.sleep(0.5)
    late = mqtt_clients.make(prod_broker.config("monitor"))
    late.subscribe("spececd/#")
    retained = {m.topic: m.payload for m in _drain(late.messages) if m.retain}
    assert retained.get(status_topic("worker2")) == f"will {uid}".encode()
    assert up_topic("devA", uid) not in retained


@pytest.mark.skipif(prod_missing() is not None, reason=str(prod_missing()))
def test_attack_7_three_hundred_retained_1mb_messages_are_refused(tmp_path):
    """The attack as reported, on a broker of its own so its memory and disk can be measured."""
    broker = start_broker("prod", tmp_path / "broker")
    clients = Clients()
    try:
        monitor = clients.make(broker.config("monitor"))
        monitor.subscribe("spececd/v1/devA/#")
        before = _rss_kib(broker.proc.pid)  # type: ignore[union-attr]
        dev = clients.make(broker.config("devA"))
        payload = os.urandom(1_000_000)
        refused = 0
        for i in range(300):
            try:
                dev.publish(up_topic("devA", f"r{i}"), payload, retain=True, wait=True, timeout=30)
            except BrokerAuthError:
                refused += 1
        assert refused == 300
        grown_mib = (_rss_kib(broker.proc.pid) - before) / 1024  # type: ignore[union-attr]
        assert grown_mib < 32, f"broker RSS grew {grown_mib:.0f} MiB"  # 300 stored would be ~290
        assert _drain(monitor.messages) == []  # refused messages are not delivered either
        clients.close_all()
        late = clients.make(broker.config("monitor"))
        late.subscribe("spececd/#")
        assert [m.topic for m in _drain(late.messages) if "/devA/" in m.topic] == []
        broker.stop()  # writes the persistence file
        on_disk = sum(p.stat().st_size for p in (tmp_path / "broker" / "data").rglob("*") if p.is_file())
        assert on_disk < 1 << 20, f"{on_disk} bytes persisted"
    finally:
        clients.close_all()
        broker.stop()


def test_the_packet_limit_follows_from_the_protocol_cap():
    """max_packet_size = the protocol's payload cap + room for the MQTT header and properties."""
    conf = (BROKER_DIR / "mosquitto-prod.conf").read_text()
    limit = int(re.search(r"^max_packet_size (\d+)$", conf, re.M).group(1))  # type: ignore[union-attr]
    assert MAX_PAYLOAD_BYTES + 1024 <= limit <= MAX_PAYLOAD_BYTES + 64 * 1024


def test_the_largest_legitimate_messages_pass(prod_broker, mqtt_clients, uid):
    """An open whose ctx fills Llama 3.1's 131,072 positions and a gamma-64 draft with 32-entry q
    per position reach the worker intact (the limit has room for both)."""
    worker = mqtt_clients.make(prod_broker.config("worker1"))
    worker.subscribe(OPEN_SHARED_FILTER)
    worker.subscribe(up_topic("devA", uid))
    dev = mqtt_clients.make(prod_broker.config("devA"))
    big_open = Open(sid=uid, epoch=2**31 - 1, ctx=(2**32 - 1,) * LLAMA31_POSITIONS, sampling=SamplingParams(),
                    draft_model="d" * 1024, target_model="t" * 1024, max_new=2**31 - 1)  # fmt: skip
    ids = tuple(range(2**32 - 32, 2**32))
    big_draft = Draft(sid=uid, epoch=0, seq=2**31 - 1, pos=2**31 - 1, tok=(2**32 - 1,) * MAX_GAMMA,
                      q=tuple(SparseDist(ids=ids, w=(2047,) * 32) for _ in range(MAX_GAMMA)))  # fmt: skip
    for topic, msg in ((open_topic("devA"), big_open), (up_topic("devA", uid), big_draft)):
        dev.publish(topic, encode(msg), wait=True, response_topic=f"spececd/v1/devA/{uid}/down",
                    correlation_data=uuid.uuid4().bytes, message_expiry=30)  # fmt: skip
    got = {m.topic: decode(m.payload) for m in _drain(worker.messages, wait=5)}
    assert got == {open_topic("devA"): big_open, up_topic("devA", uid): big_draft}


def test_an_oversized_packet_is_dropped_and_its_sender_disconnected(prod_broker, mqtt_clients):
    worker = mqtt_clients.make(prod_broker.config("worker1"))
    worker.subscribe(OPEN_SHARED_FILTER)
    dev = mqtt_clients.make(prod_broker.config("devB"))
    with contextlib.suppress(BrokerError):  # the broker closes the connection instead of a PUBACK
        dev.publish(open_topic("devB"), b"x" * (MAX_PAYLOAD_BYTES + 64 * 1024), wait=True, timeout=2)
    assert [len(m.payload) for m in _drain(worker.messages, wait=1.0)] == []
    assert "disconnected due to oversize packet" in prod_broker.log.read_text()
