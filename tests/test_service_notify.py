"""sd_notify protocol of the edge agent against a REAL unix datagram socket set as NOTIFY_SOCKET.

The socket stands in for systemd's notify socket: libsystemd's sd_notify (through cysystemd)
sends to it exactly as it would to PID 1. Checked: READY=1 only after the draft model is loaded
(a real tiny model) and the broker connected (a real Mosquitto CONNECT/CONNACK), STATUS= while
loading, WATCHDOG=1 every WatchdogSec/2 while the main loop beats, none when it hangs.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from edge_agent.service import ServiceNotifier, start_edge_service

pytest.importorskip("cysystemd", reason="cysystemd (libsystemd's sd_notify) is a Linux dependency")

WATCHDOG_USEC = 200_000  # WatchdogSec = 0.2 s, so pings every 0.1 s


@pytest.fixture
def notify_socket(monkeypatch):
    """A bound AF_UNIX datagram socket; NOTIFY_SOCKET and WATCHDOG_* point at it / this process."""
    folder = tempfile.mkdtemp(prefix="sdn", dir="/tmp")  # short: sun_path holds 108 bytes
    path = os.path.join(folder, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    yield sock
    sock.close()
    shutil.rmtree(folder, ignore_errors=True)


def drain(sock: socket.socket, wait: float = 0.2) -> list[str]:
    """Every datagram that arrives within ``wait`` seconds of the last one."""
    out = []
    sock.settimeout(wait)
    try:
        while True:
            out.append(sock.recv(4096).decode())
    except TimeoutError:
        return out


def collect(sock: socket.socket, seconds: float) -> list[tuple[float, str]]:
    """(arrival time, message) for ``seconds``."""
    out, end = [], time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            out.append((time.monotonic(), sock.recv(4096).decode()))
        except TimeoutError:
            break
    return out


def load_tiny_draft(folder: Path):
    from shared.models import load_model
    from tests.tiny import make_tiny_model_dir

    path = make_tiny_model_dir(folder / "draft", arch="llama")
    return load_model(str(path), device="cpu")


@pytest.fixture
def mosquitto_port():
    """A private Mosquitto on a free port (its own process, killed after the test)."""
    binary = shutil.which("mosquitto")
    if binary is None:
        pytest.skip("the mosquitto binary is not installed (apt-get install mosquitto)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    yield port
    proc.terminate()
    proc.wait(timeout=5)


def mqtt_connect(port: int) -> socket.socket:
    """A minimal MQTT 3.1.1 CONNECT; returns the socket once the broker's CONNACK accepts it."""
    client_id = b"sdnotify-test"
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(client_id).to_bytes(2, "big") + client_id
    conn = socket.create_connection(("127.0.0.1", port), timeout=5)
    conn.sendall(bytes([0x10, len(body)]) + body)
    assert conn.recv(4) == b"\x20\x02\x00\x00", "broker did not accept the connection"
    return conn


def test_ready_only_after_model_load_and_broker_connect(notify_socket, tmp_path, mosquitto_port):
    notifier = ServiceNotifier()
    seen_before: dict[str, list[str]] = {}

    def load_draft():
        seen_before["load"] = drain(notify_socket)
        return load_tiny_draft(tmp_path)

    def connect_broker():
        seen_before["connect"] = drain(notify_socket)
        return mqtt_connect(mosquitto_port)

    try:
        model, conn = start_edge_service(load_draft, connect_broker, notifier)
        after = drain(notify_socket)
    finally:
        notifier.close()
    conn.close()
    assert model.model.config.num_hidden_layers == 2  # the real tiny model came back
    assert seen_before["load"] == ["STATUS=loading draft model..."]
    assert seen_before["connect"] == ["STATUS=connecting to the MQTT broker..."]
    assert after[:2] == ["READY=1", "STATUS=ready"]


def test_failed_start_says_why_and_never_sends_ready(notify_socket):
    notifier = ServiceNotifier()

    def connect_broker():
        raise ConnectionRefusedError("broker down")

    with pytest.raises(ConnectionRefusedError):
        start_edge_service(lambda: "model", connect_broker, notifier)
    msgs = drain(notify_socket)
    assert "READY=1" not in msgs
    assert (
        msgs[-1] == "STATUS=failed while connecting to the MQTT broker: ConnectionRefusedError: broker down"
    )
    assert notifier._thread is None  # no watchdog before READY


def test_watchdog_pings_at_half_watchdogsec_only_while_main_loop_beats(notify_socket):
    notifier = ServiceNotifier()
    assert notifier.ping_interval == pytest.approx(0.1)
    beating = threading.Event()
    beating.set()
    done = threading.Event()

    def main_loop():
        while not done.is_set():
            if beating.is_set():
                notifier.heartbeat()
            time.sleep(notifier.heartbeat_interval)

    loop = threading.Thread(target=main_loop, daemon=True)
    loop.start()
    try:
        notifier.ready()
        assert drain(notify_socket, 0.05)[0] == "READY=1"
        alive = [t for t, m in collect(notify_socket, 1.0) if m == "WATCHDOG=1"]
        gaps = [b - a for a, b in itertools.pairwise(alive)]
        assert 7 <= len(alive) <= 12, alive
        assert sorted(gaps)[len(gaps) // 2] == pytest.approx(0.1, abs=0.03)

        beating.clear()  # the main loop hangs: pings stop within one interval or so
        time.sleep(0.25)
        drain(notify_socket, 0.01)
        hung = collect(notify_socket, 0.6)
        assert hung == []

        beating.set()  # it recovers: pings come back
        assert [m for _, m in collect(notify_socket, 0.5)].count("WATCHDOG=1") >= 3

        notifier.stopping()
        time.sleep(0.05)
        msgs = drain(notify_socket, 0.3)
        assert msgs[0] == "STOPPING=1" or msgs[-1] == "STOPPING=1"
        assert "WATCHDOG=1" not in msgs[msgs.index("STOPPING=1") :]
    finally:
        done.set()
        notifier.close()


def test_watchdog_for_another_pid_or_disabled_is_ignored(notify_socket, monkeypatch):
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert ServiceNotifier().watchdog_sec is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert ServiceNotifier(watchdog=False).watchdog_sec is None
    notifier = ServiceNotifier(watchdog=False)
    notifier.ready()
    assert drain(notify_socket, 0.3) == ["READY=1"]  # and no WATCHDOG=1 after it


def test_without_notify_socket_everything_is_a_noop(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    notifier = ServiceNotifier()
    assert not notifier.enabled and notifier.watchdog_sec is None
    model, broker = start_edge_service(lambda: 1, lambda: 2, notifier)
    assert (model, broker) == (1, 2)
    notifier.heartbeat()
    notifier.stopping()
    assert notifier._thread is None


def test_a_dead_notify_socket_does_not_crash_the_agent(monkeypatch, caplog):
    monkeypatch.setenv("NOTIFY_SOCKET", "/tmp/spececd-no-such-notify-socket")
    notifier = ServiceNotifier()
    notifier.status("hello")  # logged, not raised
    assert "systemd notification 'STATUS' failed" in caplog.text


def test_missing_cysystemd_under_systemd_says_what_to_install(monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setitem(sys.modules, "cysystemd.daemon", None)  # import fails as if not installed
    with pytest.raises(RuntimeError, match="pip install cysystemd"):
        ServiceNotifier()
