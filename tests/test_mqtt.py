"""shared/mqtt.py against a real Mosquitto started from broker/mosquitto-dev.conf."""

from __future__ import annotations

import queue
import socket
import threading
import time

import pytest

from shared.errors import BrokerError
from shared.mqtt import BrokerConfig, Incoming, Will, make_client, read_password_file


def _get(q: queue.Queue[Incoming], timeout: float = 3.0) -> Incoming:
    try:
        return q.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(f"no message within {timeout} s") from None


def _nothing(q: queue.Queue[Incoming], wait: float = 0.3) -> None:
    with pytest.raises(queue.Empty):
        q.get(timeout=wait)


def test_round_trip_keeps_mqtt5_properties(dev_broker, mqtt_clients, uid):
    sub = mqtt_clients.make(dev_broker.config())
    pub = mqtt_clients.make(dev_broker.config())
    sub.subscribe(f"{uid}/+/req")
    before = time.perf_counter()
    pub.publish(
        f"{uid}/a/req",
        b"\x00\xffcbor",
        response_topic=f"{uid}/a/resp",
        correlation_data=b"\x01\x02",
        message_expiry=30,
        wait=True,
    )
    msg = _get(sub.messages)
    assert msg.topic == f"{uid}/a/req"
    assert msg.payload == b"\x00\xffcbor"
    assert msg.content_type == "application/cbor"
    assert msg.response_topic == f"{uid}/a/resp"
    assert msg.correlation_data == b"\x01\x02"
    assert 0 < msg.message_expiry <= 30
    assert msg.retain is False
    assert msg.received_at >= before


def test_absent_properties_are_none(dev_broker, mqtt_clients, uid):
    sub = mqtt_clients.make(dev_broker.config())
    sub.subscribe(f"{uid}/x")
    mqtt_clients.make(dev_broker.config()).publish(f"{uid}/x", b"online", content_type=None, retain=True)
    msg = _get(sub.messages)
    assert (msg.content_type, msg.response_topic, msg.correlation_data, msg.message_expiry) == (None,) * 4
    assert msg.payload == b"online"


def test_subscribe_returns_after_suback(dev_broker, mqtt_clients, uid):
    """Published right after subscribe() returns, every message must arrive: no sleep needed."""
    pub = mqtt_clients.make(dev_broker.config())
    for i in range(5):
        sub = mqtt_clients.make(dev_broker.config())
        sub.subscribe(f"{uid}/{i}")
        pub.publish(f"{uid}/{i}", b"x")
        assert _get(sub.messages).topic == f"{uid}/{i}"


def test_handler_takes_its_filter_and_queue_gets_the_rest(dev_broker, mqtt_clients, uid):
    got: queue.Queue[Incoming] = queue.Queue()
    c = mqtt_clients.make(dev_broker.config())
    c.subscribe(f"$share/g{uid}/{uid}/+/open", handler=got.put)
    c.subscribe(f"{uid}/other")
    c.publish(f"{uid}/dev/open", b"1")
    c.publish(f"{uid}/other", b"2")
    assert _get(got).payload == b"1"
    assert _get(c.messages).payload == b"2"
    _nothing(got, 0.1)
    c.subscribe(f"{uid}/boom", handler=lambda _m: 1 / 0)
    c.publish(f"{uid}/boom", b"x")
    c.publish(f"{uid}/dev/open", b"4")  # the network thread survived the raising handler
    assert _get(got).payload == b"4"
    c.unsubscribe(f"{uid}/other")
    c.publish(f"{uid}/other", b"3")
    _nothing(c.messages)


def test_unreachable_broker_fails_fast_and_says_what_to_check():
    config = BrokerConfig(host="127.0.0.1", port=_closed_port())
    start = time.monotonic()
    with pytest.raises(BrokerError) as err:
        make_client(config, client_id="nobody").connect(timeout=2)
    assert time.monotonic() - start < 1.5
    assert f"127.0.0.1:{config.port}" in str(err.value)
    assert "mosquitto running" in str(err.value)


def test_unknown_host_is_a_broker_error():
    with pytest.raises(BrokerError, match=r"no-such-host\.invalid:1883"):
        make_client(BrokerConfig(host="no-such-host.invalid"), client_id="nobody").connect(timeout=2)


def test_publish_while_disconnected_raises(dev_broker):
    client = make_client(dev_broker.config(), client_id="never-connected")
    with pytest.raises(BrokerError, match="not connected"):
        client.publish("x/y", b"1")


def test_connect_returns_only_once_publishing_works(dev_broker, mqtt_clients, monkeypatch):
    """connect() used to return at the CONNACK, before paho's network thread marked the client
    connected: a worker's first publish (its retained `loading`) then failed with "not
    connected" on a busy machine. The network thread is slowed here to make that window wide."""
    from shared.mqtt import MqttClient

    real = MqttClient._on_connect

    def slow(self, client, userdata, flags, code, props):
        self._connack = code
        self._connack_event.set()  # what the CONNACK wakes
        time.sleep(0.3)  # a busy machine between that and the rest of the callback
        real(self, client, userdata, flags, code, props)

    monkeypatch.setattr(MqttClient, "_on_connect", slow)
    client = mqtt_clients.make(dev_broker.config())  # connects
    assert client.connected.is_set()
    client.publish("spececd-test/ready", b"1", wait=True)


def test_tcp_nodelay_is_set_on_the_socket(dev_broker, mqtt_clients):
    client = mqtt_clients.make(dev_broker.config())
    sock = client._paho.socket()
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_request_reply_round_trip_avoids_nagle(dev_broker, mqtt_clients, uid):
    """With TCP_NODELAY on both sides a QoS 1 request -> reply through the broker takes ~1 ms on
    loopback; if either side lost it, Nagle + delayed ACK make it ~44 ms (DESIGN §2)."""
    edge = mqtt_clients.make(dev_broker.config())
    worker = mqtt_clients.make(dev_broker.config())
    worker.subscribe(f"{uid}/up")
    edge.subscribe(f"{uid}/down")
    times = []
    for _ in range(30):
        start = time.perf_counter()
        edge.publish(f"{uid}/up", b"draft")
        _get(worker.messages)
        worker.publish(f"{uid}/down", b"verdict")
        _get(edge.messages)
        times.append(time.perf_counter() - start)
    assert sorted(times)[len(times) // 2] < 0.020


def test_reconnects_after_broker_restart_and_resubscribes(own_dev_broker, mqtt_clients, uid):
    resumed = threading.Event()
    client = mqtt_clients.make(own_dev_broker.config(), reconnect_min_delay=0.05, reconnect_max_delay=0.5)
    client.on_reconnect.append(resumed.set)
    client.subscribe(f"{uid}/down")

    own_dev_broker.restart(downtime=0.3, crash=True)
    assert resumed.wait(5), "on_reconnect not called after the broker came back"
    assert client.connected.is_set()
    # The broker lost every subscription (no persistence): this one arrives only if re-made.
    mqtt_clients.make(own_dev_broker.config()).publish(f"{uid}/down", b"again")
    assert _get(client.messages).payload == b"again"
    client.publish(f"{uid}/down", b"and-out", wait=True)
    assert _get(client.messages).payload == b"and-out"


def test_connected_is_cleared_while_the_broker_is_down(own_dev_broker, mqtt_clients):
    client = mqtt_clients.make(own_dev_broker.config(), reconnect_min_delay=0.05)
    own_dev_broker.stop()
    deadline = time.monotonic() + 3
    while client.connected.is_set() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not client.connected.is_set()
    with pytest.raises(BrokerError, match="not connected"):
        client.publish("x", b"1")


def test_will_is_sent_on_a_broken_link_but_not_on_close(dev_broker, mqtt_clients, uid):
    watcher = mqtt_clients.make(dev_broker.config())
    watcher.subscribe(f"{uid}/status/+")
    will = lambda name: Will(f"{uid}/status/{name}", b"offline", qos=1, retain=False)  # noqa: E731
    polite = mqtt_clients.make(dev_broker.config(), will=will("polite"))
    polite.close()
    _nothing(watcher.messages)

    broken = mqtt_clients.make(dev_broker.config(), will=will("broken"), reconnect_min_delay=5)
    broken._paho.socket().shutdown(socket.SHUT_RDWR)  # the link dies without a DISCONNECT
    msg = _get(watcher.messages)
    assert (msg.topic, msg.payload) == (f"{uid}/status/broken", b"offline")


def test_broker_config_parsing_and_password_file(tmp_path):
    assert BrokerConfig.parse_hostport("example.org:8883").port == 8883
    assert BrokerConfig.parse_hostport("[::1]:1884").host == "::1"
    assert BrokerConfig.parse_hostport("mqtt.local").port == 1883
    with pytest.raises(BrokerError, match="HOST:PORT"):
        BrokerConfig.parse_hostport("host:notaport")
    secret = tmp_path / "pw"
    secret.write_text("s3cret \n")
    assert read_password_file(secret) == "s3cret"
    assert "s3cret" not in repr(BrokerConfig(password="s3cret"))
    secret.write_text("\n")
    with pytest.raises(BrokerError, match="empty"):
        read_password_file(secret)
    with pytest.raises(BrokerError, match="cannot read"):
        read_password_file(tmp_path / "missing")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_close_survives_the_network_thread_ending_inside_loop_stop(dev_broker, mqtt_clients, monkeypatch):
    """paho's loop_stop reads its thread handle, then joins it, while the network thread clears
    that handle as it ends (eclipse-paho/paho.mqtt.python#872; once in CI as AttributeError in a
    worker's stop). Make the thread always end in between: close still stops it."""
    import paho.mqtt.client as paho_client

    client = mqtt_clients.make(dev_broker.config())
    network = client._paho._thread
    assert network is not None and network.is_alive()
    real = threading.current_thread

    class _Late:  # paho's module sees this as `threading`: the thread ends before loop_stop joins
        def __getattr__(self, name):
            return getattr(threading, name)

        @staticmethod
        def current_thread():
            network.join(5)
            return real()

    monkeypatch.setattr(paho_client, "threading", _Late())
    client.close()
    assert not network.is_alive() and client._paho._thread is None
    assert not client.connected.is_set()
