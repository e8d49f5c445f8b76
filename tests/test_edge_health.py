"""The edge's /health answers non-200 when the agent cannot serve under its policy (issue 11
item 8), through a real Mosquitto, a real worker and the real HTTP server."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest

from cloud_worker.worker import Worker
from edge_agent.agent import EdgeAgent
from edge_agent.api import create_app, start_server
from edge_agent.mqtt_link import MqttLink
from edge_agent.speculative import GenerateOptions
from shared.models import load_model
from tests.tiny import make_tiny_model_dir


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("edge-health")
    return {
        "draft": load_model(str(make_tiny_model_dir(root / "d", seed=1, layers=1))),
        "target": load_model(str(make_tiny_model_dir(root / "t", seed=2))),
    }


def health(handle) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://{handle.host}:{handle.port}/health", timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


CASES = [  # (mode, policy, can serve with no worker online)
    ("speculative", "draft", True),  # the draft model alone, flagged
    ("speculative", "fail", False),
    ("speculative", "wait", False),
    ("cloud-only", "draft", False),  # no draft model to fall back on
    ("edge-only", "fail", True),  # needs no cloud
]


@pytest.mark.parametrize(("mode", "policy", "without_cloud"), CASES)
def test_health_follows_the_policy(models, own_dev_broker, uid, mode, policy, without_cloud) -> None:
    link = MqttLink(own_dev_broker.config(), device=uid)
    link.connect()
    agent = EdgeAgent(models["draft"], link, defaults=GenerateOptions(mode=mode, on_cloud_unreachable=policy))
    handle = start_server(create_app(agent, model_name="m", max_queue=1))
    worker = None
    try:
        code, body = health(handle)
        assert body["cloud"] == "down"
        assert code == (200 if without_cloud else 503), body
        worker = Worker(models["target"], own_dev_broker.config(), worker_id=f"w-{uid}")
        worker.start()
        for _ in range(100):
            if link.available():
                break

            time.sleep(0.05)
        code, body = health(handle)
        assert (code, body["cloud"]) == (200, "up"), body
    finally:
        handle.stop()
        link.shutdown()
        if worker is not None:
            worker.stop()
