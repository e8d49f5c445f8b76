"""SpecECD's own parts on the production broker config: TLS, passwords, ACL (DESIGN §2).

The broker-level rules are in test_broker_security.py; here the worker and the edge agent run
through them, and the edge reports refusals clearly.
"""

from __future__ import annotations

import queue
import subprocess
import sys

import pytest

from bench.inprocess import InProcessPair
from cloud_worker.worker import Worker
from edge_agent.agent import EdgeAgent
from edge_agent.mqtt_link import MqttLink
from edge_agent.speculative import GenerateOptions, SessionState
from shared import topics
from shared.errors import BrokerAuthError, BrokerError
from shared.models import load_model
from shared.protocol import Draft, encode
from tests.tiny import make_tiny_model_dir
from tests.workers import ROOT


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("prod-models")
    return {
        "draft": load_model(str(make_tiny_model_dir(root / "d", arch="llama", seed=1, layers=1))),
        "target": load_model(str(make_tiny_model_dir(root / "t", arch="llama", seed=2))),
        "target_dir": str(root / "t"),
        "draft_dir": str(root / "d"),
    }


@pytest.fixture
def worker(models, prod_broker):
    w = Worker(models["target"], prod_broker.config("worker1"), worker_id="worker1")
    w.start()
    yield w
    w.stop()


def test_generation_over_tls_with_acl(models, prod_broker, worker) -> None:
    link = MqttLink(prod_broker.config("devA"), device="devA", round_timeout_s=3.0)
    link.connect()
    try:
        agent = EdgeAgent(models["draft"], link, defaults=GenerateOptions(gamma=3, max_new_tokens=12))
        result = agent.run([1, 2, 3, 4])
        assert len(result.token_ids) == 12 or result.token_ids[-1] in models["target"].eos_token_ids
        assert result.rounds and worker.bad_messages == {}
    finally:
        link.shutdown()


def test_other_device_cannot_inject_into_a_session(models, prod_broker, worker, mqtt_clients) -> None:
    link = MqttLink(prod_broker.config("devA"), device="devA", round_timeout_s=3.0)
    link.connect()
    intruder = mqtt_clients.make(prod_broker.config("devB"))
    with pytest.raises(BrokerError, match="Not authorized"):  # refused, and delivers nothing below
        intruder.subscribe("spececd/v1/devA/+/down")
    try:
        agent = EdgeAgent(models["draft"], link, defaults=GenerateOptions(gamma=2, max_new_tokens=16))
        state = SessionState()
        events = agent.stream([1, 2, 3, 4], state=state)
        first = [next(events).token for _ in range(3)]
        forged = Draft(sid=state.sid, epoch=0, seq=99, pos=4, tok=(7,), q=None)
        intruder.publish(topics.up_topic("devA", state.sid), encode(forged))  # dropped by the ACL
        intruder.publish(topics.open_topic("devA"), b"\xff")
        rest = [ev.token for ev in events]
        undisturbed = InProcessPair.from_models(models["draft"], models["target"]).run(
            [1, 2, 3, 4], agent.defaults
        )
        assert first + rest == undisturbed.token_ids
        assert worker.bad_messages == {}  # the forged messages never reached the worker
        with pytest.raises(queue.Empty):
            intruder.messages.get(timeout=0.5)  # and devB saw none of devA's verdicts
    finally:
        link.shutdown()


def test_wrong_password_is_refused_clearly(prod_broker) -> None:
    link = MqttLink(prod_broker.config("devA", password="not-the-password"), device="devA")
    with pytest.raises(BrokerAuthError, match=r"(?i)password"):
        link.connect(timeout=5)


def test_edge_cli_says_why_it_was_refused(models, prod_broker, tmp_path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("wrong\n")
    cmd = [
        sys.executable, "-m", "edge_agent.cli", "generate", "hello", "--broker", f"localhost:{prod_broker.port}",
        "--username", "devA", "--password-file", str(pw), "--tls-ca", str(prod_broker.ca_file),
        "--draft", models["draft_dir"], "--target", models["target_dir"], "--max-new-tokens", "4",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 1
    assert "password" in proc.stderr.lower() and "devA" in proc.stderr
    anon = subprocess.run(
        [c for c in cmd if c not in ("--username", "devA", "--password-file", str(pw))] + ["--device", "devA"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert anon.returncode == 1 and "refused" in anon.stderr.lower(), anon.stderr
