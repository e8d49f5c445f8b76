"""The worker's start-up order and health (issue 11 item 9), with real ``spececd-worker``
processes, a real Mosquitto and tiny models: it connects to the broker before loading its model
and retains ``loading`` meanwhile; its readiness (metric ``spececd_worker_ready`` and the
container healthcheck) is 1 only while it is connected and loaded."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from shared import topics
from tests.brokers import free_port
from tests.tiny import make_tiny_model_dir
from tests.workers import ROOT, start_worker_process

HEALTHCHECK = ROOT / "deploy" / "docker" / "healthcheck.py"


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory) -> str:
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("health") / "t", arch="llama", seed=2))


def test_wrong_broker_address_fails_before_the_model_loads(tmp_path: Path) -> None:
    """A wrong broker address is reported at once, before the (here: impossible) model load."""
    cmd = [
        sys.executable, "-m", "cloud_worker.cli", "--broker", f"127.0.0.1:{free_port()}", "--worker-id", "w-x",
        "--target", str(tmp_path / "no-such-model"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 1
    assert "cannot reach the MQTT broker" in proc.stderr, proc.stderr
    assert "no-such-model" not in proc.stderr  # the model was never touched


def test_status_is_loading_then_online(own_dev_broker, mqtt_clients, uid, target_dir, tmp_path) -> None:
    cfg = own_dev_broker.config()
    watcher = mqtt_clients.make(cfg)
    watcher.subscribe(topics.status_topic(f"w-{uid}"))
    wp = start_worker_process(cfg, worker_id=f"w-{uid}", target=target_dir, workdir=tmp_path)
    try:
        seen = []
        while not seen or seen[-1] != topics.ONLINE:
            seen.append(watcher.messages.get(timeout=10).payload)
        assert seen == [topics.LOADING, topics.ONLINE]
    finally:
        wp.kill()


def _ready(port: int) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith("spececd_worker_ready "):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def _healthcheck(port: int) -> int:
    env = {**os.environ, "SPECECD_METRICS_LISTEN": f"0.0.0.0:{port}"}
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK)], env=env, capture_output=True, timeout=30
    ).returncode


def _wait(pred, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


def test_ready_only_while_connected_and_loaded(own_dev_broker, uid, target_dir, tmp_path) -> None:
    port = free_port()
    wp = start_worker_process(
        own_dev_broker.config(),
        worker_id=f"w-{uid}",
        target=target_dir,
        workdir=tmp_path,
        extra=["--metrics-listen", f"127.0.0.1:{port}"],
    )
    try:
        assert _wait(lambda: _ready(port) == 1.0, 10)
        assert _healthcheck(port) == 0
        own_dev_broker.stop()
        assert _wait(lambda: _ready(port) == 0.0, 10), wp.output()
        assert _healthcheck(port) == 1  # the container is unhealthy while the broker is down
        own_dev_broker.start()
        assert _wait(lambda: _ready(port) == 1.0, 30), wp.output()
        assert _healthcheck(port) == 0
    finally:
        wp.kill()
