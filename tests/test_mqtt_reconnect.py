"""shared/mqtt.py: reconnect backoff, paho through its public API, TLS under concurrent
publishes (issue 11 items 4 and 5), against real Mosquitto instances."""

from __future__ import annotations

import hashlib
import itertools
import logging
import random
import re
import socket
import threading
import time
from pathlib import Path

import pytest

from edge_agent.mqtt_link import MqttLink
from shared import topics
from shared.errors import BrokerError, CloudUnavailableError
from shared.mqtt import Backoff, make_client
from shared.protocol import Open
from shared.sampling import SamplingParams

ROOT = Path(__file__).resolve().parent.parent


def _until(pred, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.05)
    return bool(pred())


def test_backoff_is_exponential_jittered_capped_and_resets() -> None:
    backoff = Backoff(0.25, 10.0, rng=random.Random(7))
    delays = [backoff.next() for _ in range(12)]
    for i, d in enumerate(delays):
        cap = min(0.25 * 2**i, 10.0)
        assert cap / 2 <= d <= cap
    assert max(delays) <= 10.0 and delays[-1] >= 5.0  # capped, and it got there
    assert len({round(d / min(0.25 * 2**i, 10.0), 6) for i, d in enumerate(delays)}) > 1  # jittered
    backoff.reset()
    assert backoff.next() <= 0.25


def _count_accepts(port: int, seconds: float) -> list[float]:
    """Listen on ``port`` for ``seconds``, accepting and closing each connection: the reconnect
    attempts of a client whose broker is gone (each sees its connection closed at once)."""
    times: list[float] = []
    with socket.socket() as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", port))
        srv.listen(16)
        srv.settimeout(0.05)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            times.append(time.monotonic())
            conn.close()
    return times


def test_reconnect_backoff_grows_and_is_logged_once(own_dev_broker, mqtt_clients, caplog) -> None:
    """Item 4: with the broker gone, attempts slow down (0.25 s doubling to a 2 s cap: about 6 in
    4 s, where a backoff that never grows makes 20) and are not logged one INFO line each."""
    client = mqtt_clients.make(own_dev_broker.config(), reconnect_min_delay=0.25, reconnect_max_delay=2.0)
    with caplog.at_level(logging.DEBUG, logger="shared.mqtt"):
        own_dev_broker.stop(crash=True)
        time.sleep(2.0)  # the port is closed: every attempt is refused
        attempts = _count_accepts(own_dev_broker.port, 4.0)
        loud = [r for r in caplog.records if r.name == "shared.mqtt" and r.levelno >= logging.INFO]
        assert len(loud) <= 2, [r.getMessage() for r in loud]  # "lost", maybe "still unreachable"
        assert 2 <= len(attempts) <= 8, attempts
        gaps = [b - a for a, b in itertools.pairwise(attempts)]
        assert min(gaps) >= 0.5  # past the first few attempts every wait is >= cap/2
        caplog.clear()
        own_dev_broker.start()
        deadline = time.monotonic() + 10
        while not client.connected.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.connected.is_set()
        back = [
            r.getMessage() for r in caplog.records if r.levelno >= logging.INFO and r.name == "shared.mqtt"
        ]
        assert len(back) == 1 and "reconnected" in back[0], back


def test_paho_is_used_through_its_public_api_only() -> None:
    """Item 5: no private paho attribute or method (``_thread``, ``_reset_sockets``, ...), and
    paho's own network thread and reconnect loop rather than a second layer of our own."""
    source = (ROOT / "shared" / "mqtt.py").read_text()
    private = re.findall(r"(?:_paho|\bc)\.(_[A-Za-z]\w*)", source)
    assert private == []
    assert "loop_start()" in source and "reconnect_delay_set(" in source
    assert ".reconnect()" not in source and ".loop(" not in source


def test_background_connect_keeps_one_client(own_dev_broker, uid) -> None:
    """Item 5: a link started while the broker is down connects in the background with the same
    client object (no client swapped under ``available()``), then sees workers come online."""
    broker = own_dev_broker
    broker.stop()
    link = MqttLink(broker.config(), device=uid)
    with pytest.raises(BrokerError):
        link.connect(timeout=2)
    client = link.client
    link.connect_in_background()
    try:
        assert not link.available()
        broker.start()
        assert _until(link.client.connected.is_set, 15)
        start = time.monotonic()
        with pytest.raises(CloudUnavailableError, match="no worker is online"):
            link.open(
                Open(
                    sid=uid,
                    epoch=0,
                    ctx=(1, 2),
                    sampling=SamplingParams(),
                    draft_model="",
                    target_model="",
                    max_new=4,
                )
            )
        assert time.monotonic() - start < 2.0  # no open_timeout_s stall
        announcer = make_client(broker.config(), client_id=f"ann-{uid}")
        announcer.connect()
        announcer.publish(
            topics.status_topic(f"w-{uid}"), topics.ONLINE, retain=True, content_type=None, wait=True
        )
        deadline = time.monotonic() + 15
        while not link.available() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert link.available() and link.client is client
        announcer.publish(
            topics.status_topic(f"w-{uid}"), topics.LOADING, retain=True, content_type=None, wait=True
        )
        deadline = time.monotonic() + 5
        while link.available() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not link.available()  # a loading worker cannot serve yet
        announcer.close()
    finally:
        link.shutdown()


def test_tls_stream_survives_concurrent_publishes(prod_broker, mqtt_clients, uid) -> None:
    """Item 5: many threads publishing on one TLS connection at once; every message arrives
    intact and the connection never drops (concurrent writes to one TLS stream corrupt it; the
    broker then closes the connection with a protocol error)."""
    receiver = mqtt_clients.make(prod_broker.config("worker1"))
    echoed = []  # the receiver echoes every message, so the sender's connection reads while it writes

    def echo(msg) -> None:
        echoed.append(1)
        receiver.publish(msg.topic.rsplit("/", 1)[0] + "/down", msg.payload)
        receiver.messages.put(msg)

    receiver.subscribe("spececd/v1/devA/+/up", handler=echo)
    sender = mqtt_clients.make(prod_broker.config("devA"))
    sender.subscribe("spececd/v1/devA/+/down")
    drops: list[int] = []
    sender.on_disconnect.append(lambda: drops.append(1))
    threads, per_thread = 8, 25
    rng = random.Random(3)
    payloads = {
        (t, i): rng.randbytes(rng.choice((16, 3000, 200_000, 1_000_000)))
        for t in range(threads)
        for i in range(per_thread)
    }

    def send(t: int) -> None:
        for i in range(per_thread):
            body = payloads[(t, i)]
            sender.publish(f"spececd/v1/devA/{uid}-{t}-{i}/up", body, wait=(i % 10 == 9), timeout=20)

    workers = [threading.Thread(target=send, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    got = {}
    deadline = time.monotonic() + 60
    while len(got) < len(payloads) and time.monotonic() < deadline:
        try:
            msg = receiver.messages.get(timeout=1)
        except Exception:
            continue
        sid = msg.topic.split("/")[3]
        if sid.startswith(uid):
            _, t, i = sid.rsplit("-", 2)
            got[(int(t), int(i))] = hashlib.sha256(msg.payload).digest()
    assert not drops
    assert got == {k: hashlib.sha256(v).digest() for k, v in payloads.items()}
