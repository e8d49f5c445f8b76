"""Generation through a real Mosquitto and real workers (DESIGN §2, §5).

Each test uses its own device name and session ids, so tests sharing the dev broker never see
each other's traffic.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from bench.inprocess import InProcessPair
from cloud_worker.worker import Worker
from edge_agent.agent import EdgeAgent
from edge_agent.mqtt_link import MqttLink
from edge_agent.results import collect
from edge_agent.speculative import SRC_FALLBACK, GenerateOptions, SessionState
from shared.errors import CloudUnavailableError
from shared.sampling import SamplingParams
from tests.tiny import load_tiny_pair
from tests.workers import start_worker_process, start_worker_processes, wait_status

PROMPT = [5, 17, 42, 9]
GREEDY = SamplingParams()
SAMPLED = SamplingParams(temperature=0.9, top_p=0.95, seed=77)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return load_tiny_pair(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def reference(models):
    return InProcessPair.from_models(models["draft"], models["target"], max_sessions=64)


def make_worker(models, broker, worker_id: str, **kw) -> Worker:
    worker = Worker(models["target"], broker.config(), worker_id=worker_id, **kw)
    worker.start()
    return worker


def make_agent(models, broker, device: str, *, timeout_s: float = 3.0, **opts) -> EdgeAgent:
    link = MqttLink(broker.config(), device=device, round_timeout_s=timeout_s, open_timeout_s=timeout_s)
    link.connect()
    defaults = GenerateOptions(gamma=3, max_new_tokens=24, **opts)
    return EdgeAgent(models["draft"], link, defaults=defaults)


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("mode", ["speculative", "cloud-only"])
def test_through_broker_equals_in_process(models, reference, dev_broker, uid, params, mode) -> None:
    worker = make_worker(models, dev_broker, f"w-{uid}")
    agent = make_agent(models, dev_broker, uid)
    try:
        opts = agent.options(params=params, mode=mode)
        remote = agent.run(PROMPT, opts)
        local = reference.run(PROMPT, opts)
        assert remote.token_ids == local.token_ids
        assert len(remote.token_ids) == 24 or remote.token_ids[-1] in models["target"].eos_token_ids
        if mode == "speculative":
            assert all(r.bytes_up > 0 and r.bytes_down > 0 for r in remote.rounds)
            assert remote.accepted == local.accepted
    finally:
        agent.close()
        worker.stop()
    assert not worker.bad_messages


def test_two_workers_share_sessions_and_survive_sigkill(
    models, reference, dev_broker, uid, tmp_path: Path
) -> None:
    cfg = dev_broker.config()
    workers = start_worker_processes(
        cfg, [f"a-{uid}", f"b-{uid}"], target=models["target_dir"], workdir=tmp_path
    )
    agent = make_agent(models, dev_broker, uid, timeout_s=5.0)
    try:
        # sessions spread: the shared subscription hands opens to both workers
        for _ in range(8):
            collect(agent.stream(PROMPT, agent.options(max_new_tokens=2)))
        assert {worker for _sid, worker in agent.link.history} == set(workers)

        for params in (GREEDY, SAMPLED):
            opts = agent.options(params=params)
            undisturbed = reference.run(PROMPT, opts).token_ids
            state = SessionState()
            events = agent.stream(PROMPT, opts, state=state)
            got = [next(events).token for _ in range(6)]
            victim = agent.link.owner_of(state.sid)
            survivor = next(w for w in workers if w != victim)
            workers[victim].kill()
            got += [ev.token for ev in events]
            assert got == undisturbed  # nothing lost, nothing duplicated
            assert state.failovers == 1
            assert agent.link.owner_of(state.sid) in (survivor, None)
            workers[victim] = start_worker_process(
                cfg, worker_id=victim, target=models["target_dir"], workdir=tmp_path
            )
    finally:
        agent.close()
        for w in workers.values():
            w.proc.kill()


def test_broker_restart_mid_generation(models, reference, own_dev_broker, uid) -> None:
    worker = make_worker(models, own_dev_broker, f"w-{uid}")
    agent = make_agent(models, own_dev_broker, uid, on_cloud_unreachable="wait")
    try:
        opts = agent.options(params=SAMPLED, max_new_tokens=30)
        undisturbed = reference.run(PROMPT, opts).token_ids
        state = SessionState()
        events = agent.stream(PROMPT, opts, state=state)
        got = [next(events).token for _ in range(5)]
        own_dev_broker.restart(downtime=0.5)
        got += [ev.token for ev in events]
        assert got == undisturbed
    finally:
        agent.close()
        worker.stop()


def test_evicted_session_resyncs_over_mqtt(models, reference, dev_broker, uid) -> None:
    worker = make_worker(models, dev_broker, f"w-{uid}", max_sessions=1)
    agent = make_agent(models, dev_broker, uid)
    try:
        opts = agent.options(params=SAMPLED, max_new_tokens=20)
        undisturbed = reference.run(PROMPT, opts).token_ids
        state = SessionState()
        events = agent.stream(PROMPT, opts, state=state)
        got = [next(events).token for _ in range(4)]
        other = agent.run([1, 2, 3], agent.options(max_new_tokens=3))  # evicts ours (max_sessions=1)
        assert other.token_ids
        got += [ev.token for ev in events]
        assert got == undisturbed
        assert state.resyncs >= 1
    finally:
        agent.close()
        worker.stop()


def test_sigterm_drains_and_goes_offline(models, dev_broker, uid, tmp_path: Path) -> None:
    cfg = dev_broker.config()
    wp = start_worker_process(cfg, worker_id=f"t-{uid}", target=models["target_dir"], workdir=tmp_path)
    seen = threading.Event()
    waiter = threading.Thread(
        target=lambda: (wait_status(cfg, wp.worker_id, b"offline", timeout=30), seen.set()), daemon=True
    )
    waiter.start()
    time.sleep(0.3)
    assert wp.terminate() == 0
    waiter.join(30)
    assert seen.is_set(), wp.output()


class TestCloudUnreachable:
    """The edge's fallback policies when no worker answers or the broker is gone (DESIGN §5)."""

    def test_broker_down_draft_policy_falls_back_then_resumes(self, models, own_dev_broker, uid) -> None:
        worker = make_worker(models, own_dev_broker, f"w-{uid}")
        agent = make_agent(models, own_dev_broker, uid, timeout_s=0.5, on_cloud_unreachable="draft")
        try:
            events = agent.stream(PROMPT, agent.options(max_new_tokens=60, gamma=2))
            before = [next(events) for _ in range(3)]
            assert all(e.source != SRC_FALLBACK for e in before)
            own_dev_broker.stop(crash=True)
            during = [next(events) for _ in range(3)]
            assert [e.source for e in during] == [SRC_FALLBACK] * 3  # unverified, and flagged
            own_dev_broker.start()
            deadline = time.monotonic() + 30
            while not agent.link.available() and time.monotonic() < deadline:
                time.sleep(0.05)  # the link reconnects with backoff; the generator waits, lazily
            after = list(events)
            assert after and after[-1].source != SRC_FALLBACK  # speculative again once it is back
            first_back = next(i for i, e in enumerate(after) if e.source != SRC_FALLBACK)
            assert first_back <= 1  # the first token after the reconnect may still be a fallback one
        finally:
            agent.close()
            worker.stop(drain_timeout=5)

    def test_fail_raises(self, models, dev_broker, uid) -> None:
        agent = make_agent(models, dev_broker, uid, timeout_s=0.5, on_cloud_unreachable="fail")
        try:
            with pytest.raises(CloudUnavailableError, match="no worker answered"):
                agent.run(PROMPT)
        finally:
            agent.close()

    def test_draft_flags_fallback_tokens_then_resumes(self, models, reference, dev_broker, uid) -> None:
        agent = make_agent(models, dev_broker, uid, timeout_s=0.5, on_cloud_unreachable="draft")
        worker = None
        try:
            opts = agent.options(max_new_tokens=16)
            state = SessionState()
            events = agent.stream(PROMPT, opts, state=state)
            first = [next(events) for _ in range(3)]
            assert [e.source for e in first] == [SRC_FALLBACK] * 3
            edge_only = reference.run(PROMPT, replace(opts, mode="edge-only"))
            assert [e.token for e in first] == edge_only.token_ids[:3]  # the draft model's own tokens
            worker = make_worker(models, dev_broker, f"w-{uid}")
            rest = list(events)
            assert any(e.source != SRC_FALLBACK for e in rest)  # speculative mode resumed
            sources = [e.source for e in first + rest]
            last_fallback = max(i for i, s in enumerate(sources) if s == SRC_FALLBACK)
            assert all(s != SRC_FALLBACK for s in sources[last_fallback + 1 :])
        finally:
            agent.close()
            if worker is not None:
                worker.stop()

    def test_wait_blocks_until_a_worker_comes(self, models, reference, dev_broker, uid) -> None:
        agent = make_agent(models, dev_broker, uid, timeout_s=0.5, on_cloud_unreachable="wait")
        holder: dict = {}
        try:
            runner = threading.Thread(target=lambda: holder.update(r=agent.run(PROMPT)), daemon=True)
            runner.start()
            time.sleep(1.5)
            assert runner.is_alive()  # waiting, not generating unverified tokens
            worker = make_worker(models, dev_broker, f"w-{uid}")
            runner.join(60)
            worker.stop()
            assert holder["r"].token_ids == reference.run(PROMPT, agent.defaults).token_ids
            assert holder["r"].fallback_tokens == 0
        finally:
            agent.close()
