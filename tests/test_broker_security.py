"""The production broker config (TLS, passwords, dynamic-security roles of DESIGN §2) keeps
devices apart.

The dynamic-security plugin refuses a forbidden SUBSCRIBE ("Not authorized" in the SUBACK) and
drops a forbidden publish without telling the subscribers. A SUBACK proves little (acl_file
granted subscriptions that then delivered nothing, or worse), so every test asserts on delivery
(what arrives, what does not), and each has a positive control that the same path works for the
rightful owner. The share-group attacks are in test_broker_share_group.py, retain and sizes in
test_broker_limits.py.
"""

from __future__ import annotations

import queue
import subprocess
import time

import pytest

from shared.errors import BrokerAuthError, BrokerError
from shared.mqtt import Incoming, MqttClient
from shared.topics import OPEN_SHARED_FILTER, UP_FILTER, down_topic, open_topic, status_topic, up_topic
from tests.brokers import BROKER_DIR


def _get(q: queue.Queue[Incoming], timeout: float = 3.0) -> Incoming:
    try:
        return q.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(f"no message within {timeout} s") from None


def _drain(q: queue.Queue[Incoming], wait: float = 0.3, *, status: bool = False) -> list[str]:
    """Topics received within ``wait``, except the workers' status topics, which every client
    may read (other tests on the shared broker leave retained statuses there)."""
    topics = []
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        try:
            topic = q.get(timeout=left).topic
            if status or not topic.startswith("spececd/v1/workers/"):
                topics.append(topic)
        except queue.Empty:
            break
    return topics


def try_subscribe(client: MqttClient, topic_filter: str) -> bool:
    """Subscribe; False when the broker refused it (the caller still checks delivery)."""
    try:
        client.subscribe(topic_filter)
        return True
    except BrokerError as exc:
        assert "Not authorized" in str(exc), exc
        return False


def test_device_receives_nothing_of_another_devices_down(prod_broker, mqtt_clients, uid):
    dev_a = mqtt_clients.make(prod_broker.config("devA"))
    dev_b = mqtt_clients.make(prod_broker.config("devB"))
    worker = mqtt_clients.make(prod_broker.config("worker1"))
    for stolen in ("spececd/v1/devB/+/down", "#", "spececd/v1/+/+/down", "$share/g/spececd/v1/devB/+/down"):
        assert not try_subscribe(dev_a, stolen), stolen  # refused at SUBSCRIBE
    dev_b.subscribe(down_topic("devB", uid))

    worker.publish(down_topic("devB", uid), b"verdict for B", wait=True)
    assert _get(dev_b.messages).payload == b"verdict for B"  # the rightful owner gets it
    assert _drain(dev_a.messages) == []


def test_device_cannot_write_another_devices_open_or_up(prod_broker, mqtt_clients, uid):
    dev_a = mqtt_clients.make(prod_broker.config("devA"))
    worker = mqtt_clients.make(prod_broker.config("worker1"))
    worker.subscribe(OPEN_SHARED_FILTER)
    worker.subscribe(UP_FILTER)

    dev_a.publish(open_topic("devB"), b"forged open")
    dev_a.publish(up_topic("devB", uid), b"forged draft")
    with pytest.raises(BrokerAuthError, match="refused the publish"):  # PUBACK says "Not authorized"
        dev_a.publish(up_topic("devB", uid), b"forged draft", wait=True)
    dev_a.publish(open_topic("devA"), b"own open", wait=True)
    dev_a.publish(up_topic("devA", uid), b"own draft", wait=True)

    got = _drain(worker.messages, wait=0.5)
    assert got == [open_topic("devA"), up_topic("devA", uid)]


def test_device_cannot_forge_answers_or_worker_status(prod_broker, mqtt_clients, uid):
    dev_a = mqtt_clients.make(prod_broker.config("devA"))
    dev_b = mqtt_clients.make(prod_broker.config("devB"))
    dev_b.subscribe(down_topic("devB", uid))
    dev_b.subscribe(status_topic("worker1"))

    dev_a.publish(down_topic("devB", uid), b"forged verdict")
    dev_a.publish(status_topic("worker1"), b"offline", content_type=None)
    assert _drain(dev_b.messages) == []


def test_worker_writes_only_its_own_status(prod_broker, mqtt_clients, uid):
    dev_a = mqtt_clients.make(prod_broker.config("devA"))
    dev_a.subscribe(status_topic("worker1"))
    dev_a.subscribe(status_topic("worker2"))
    worker1 = mqtt_clients.make(prod_broker.config("worker1"))
    _drain(dev_a.messages, status=True)  # retained statuses left by other tests

    worker1.publish(status_topic("worker2"), b"offline", content_type=None)
    worker1.publish(status_topic("worker1"), uid.encode(), content_type=None, wait=True)
    msg = _get(dev_a.messages)
    assert (msg.topic, msg.payload) == (status_topic("worker1"), uid.encode())
    assert _drain(dev_a.messages, status=True) == []


@pytest.mark.parametrize(("username", "password"), [(None, None), ("devA", "wrong"), ("stranger", "pw-devA")])
def test_bad_credentials_are_refused_with_advice(prod_broker, mqtt_clients, username, password):
    config = prod_broker.config(username, password=password)
    with pytest.raises(BrokerAuthError) as err:
        mqtt_clients.make(config, client_id=username or "anon")
    text = str(err.value)
    assert f"localhost:{prod_broker.port}" in text
    assert "password" in text and "add-device.sh" in text


def test_client_id_of_another_device_cannot_be_taken_over(prod_broker, mqtt_clients, uid):
    dev_a = mqtt_clients.make(prod_broker.config("devA"))
    dev_a.subscribe(down_topic("devA", uid))
    impostor = mqtt_clients.make(prod_broker.config("devB"), client_id="devA")
    assert impostor.connected.is_set()  # connected, but as "devB" (use_username_as_clientid)

    time.sleep(0.2)
    assert dev_a.connected.is_set()
    mqtt_clients.make(prod_broker.config("worker2")).publish(down_topic("devA", uid), b"still mine")
    assert _get(dev_a.messages).payload == b"still mine"


def test_two_clients_with_one_username_back_off_and_say_why(prod_broker, mqtt_clients, uid, caplog):
    """The broker gives a username's session to the newest connection; the loser's reconnects
    must slow down (growing backoff) and its log must name the cause."""
    first = mqtt_clients.make(prod_broker.config("devB"), reconnect_min_delay=0.05)
    reconnects = []
    first.on_reconnect.append(lambda: reconnects.append(time.monotonic()))
    mqtt_clients.make(prod_broker.config("devB"), client_id=f"other-{uid}", reconnect_min_delay=0.05)
    time.sleep(2.0)
    # Without backoff growth: one takeover every ~0.05 s, i.e. ~40 reconnects in 2 s.
    assert 1 <= len(reconnects) <= 8
    assert any("same username" in r.getMessage() and "devB" in r.getMessage() for r in caplog.records)


def test_tls_with_the_wrong_ca_fails_clearly(prod_broker, mqtt_clients, tmp_path):
    subprocess.run([str(BROKER_DIR / "make-dev-ca.sh"), str(tmp_path)], check=True, capture_output=True)
    config = prod_broker.config("devA", ca_file=tmp_path / "ca.crt")
    with pytest.raises(BrokerError, match="CA file") as err:
        mqtt_clients.make(config)
    assert not isinstance(err.value, BrokerAuthError)
    assert "certificate verify failed" in str(err.value)


def test_plain_mqtt_to_the_tls_listener_fails_clearly(prod_broker, mqtt_clients):
    config = prod_broker.config("devA")
    plain = type(config)(host=config.host, port=config.port, username="devA", password="pw-devA")
    start = time.monotonic()
    with pytest.raises(BrokerError, match="TLS vs plain"):
        mqtt_clients.make(plain)
    assert time.monotonic() - start < 3


def test_worker_credentials_hold_only_what_a_worker_needs(prod_broker, mqtt_clients, uid):
    """Least privilege (issue 10, workers' trust): a worker reads opens only through the workers'
    share group and the sessions' up topics, writes only down topics and its own status. It can
    neither read answers or statuses, nor forge a device's open or draft."""
    worker1 = mqtt_clients.make(prod_broker.config("worker1"))
    for stolen in (
        "spececd/v1/+/open",  # outside the share group: a copy of every open
        "$share/other/spececd/v1/+/open",
        "spececd/v1/devA/+/down",
        "spececd/v1/workers/+/status",
        "spececd/#",
        "#",
    ):
        assert not try_subscribe(worker1, stolen), stolen
    worker2 = mqtt_clients.make(prod_broker.config("worker2"))
    worker2.subscribe(OPEN_SHARED_FILTER)
    worker2.subscribe(up_topic("devA", uid))
    with pytest.raises(BrokerAuthError, match="refused the publish"):
        worker1.publish(open_topic("devA"), b"forged open", wait=True)
    with pytest.raises(BrokerAuthError, match="refused the publish"):
        worker1.publish(up_topic("devA", uid), b"forged draft", wait=True)
    dev_a = mqtt_clients.make(prod_broker.config("devA"))
    dev_a.publish(up_topic("devA", uid), b"real draft", wait=True)  # positive control
    assert [(m.topic, m.payload) for m in [_get(worker2.messages)]] == [
        (up_topic("devA", uid), b"real draft")
    ]
    assert _drain(worker2.messages) == [] and _drain(worker1.messages) == []


def test_a_worker_can_still_answer_a_session_it_does_not_own(prod_broker, mqtt_clients, uid):
    """The gap that remains (attack #11, broker/README.md "Workers' trust"): workers are one trust
    domain, and any worker may write any session's down topic. If this starts failing, the gap
    was closed: update the README and docs/ARCHITECTURE.md."""
    dev_a = mqtt_clients.make(prod_broker.config("devA"))
    dev_a.subscribe(down_topic("devA", uid))
    mqtt_clients.make(prod_broker.config("worker2")).publish(down_topic("devA", uid), b"not mine", wait=True)
    assert _get(dev_a.messages).payload == b"not mine"
