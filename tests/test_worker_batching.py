"""Batched verification on the worker (issue 9), through a real Mosquitto with tiny real models.

Many sessions share target forwards; every session must still get exactly the tokens of the
unbatched in-process path (greedy and seeded), with mixed γ, cloud-only sessions among
speculative ones, sessions joining and leaving mid-batch, a malformed draft inside a batch and
a worker killed while its sessions share forwards.
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import pytest

from bench.inprocess import InProcessPair
from cloud_worker.verifier import Verifier
from cloud_worker.worker import Worker
from edge_agent.agent import EdgeAgent
from edge_agent.mqtt_link import MqttLink
from edge_agent.speculative import GenerateOptions, SessionState
from shared import topics
from shared.protocol import Draft, Error, Open, Opened, Verdict, decode, encode
from shared.sampling import SamplingParams, SparseDist
from tests.tiny import load_tiny_pair
from tests.workers import start_worker_processes

GREEDY = SamplingParams()
SAMPLED = SamplingParams(temperature=0.9, top_p=0.95, seed=77)
PROMPTS = [[5, 17, 42, 9], [7, 8, 9], [100, 3, 55, 61, 2], [11, 12]]


class Recorder:
    """Worker metrics that remember each forward's size (the rest are no-ops)."""

    def __init__(self) -> None:
        self.forwards: list[tuple[int, int]] = []
        self.padded: list[int] = []

    def forward(self, sessions: int, positions: int, padded: int) -> None:
        self.forwards.append((sessions, positions))
        self.padded.append(padded)

    def __getattr__(self, _name: str):
        return lambda *a, **k: None


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return load_tiny_pair(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def reference(models):
    return InProcessPair.from_models(models["draft"], models["target"], max_sessions=64)


def agent_for(models, broker, device: str, timeout_s: float = 10.0) -> EdgeAgent:
    link = MqttLink(broker.config(), device=device, round_timeout_s=timeout_s, open_timeout_s=timeout_s)
    link.connect()
    return EdgeAgent(models["draft"], link, defaults=GenerateOptions())


def run_fleet(models, broker, uid: str, plans: list[tuple[float, GenerateOptions]]) -> dict[int, list[int]]:
    """Run one generation per plan (start delay, options) concurrently, each from its own device."""
    out: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def one(i: int, delay: float, opts: GenerateOptions) -> None:
        agent = agent_for(models, broker, f"{uid}-d{i}")
        try:
            time.sleep(delay)
            out[i] = agent.run(PROMPTS[i % len(PROMPTS)], opts).token_ids
        except BaseException as exc:  # surfaced in the test thread
            errors.append(exc)
        finally:
            agent.close()

    threads = [threading.Thread(target=one, args=(i, d, o)) for i, (d, o) in enumerate(plans)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    if errors:
        raise errors[0]
    return out


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
def test_batched_equals_unbatched(models, reference, dev_broker, uid, params, layout) -> None:
    """Mixed γ, one cloud-only session, sessions joining late and leaving early; in either layout."""
    rec = Recorder()
    worker = Worker(
        models["target"], dev_broker.config(), worker_id=f"w-{uid}", metrics=rec, batch_window_ms=30,
        batch_layout=layout,
    )  # fmt: skip
    worker.start()
    plans = [
        (0.0, GenerateOptions(gamma=1, max_new_tokens=20, params=params)),
        (0.0, GenerateOptions(gamma=4, max_new_tokens=10, params=params)),  # leaves early
        (0.3, GenerateOptions(gamma=2, max_new_tokens=24, params=params)),  # joins late
        (0.1, GenerateOptions(mode="cloud-only", max_new_tokens=12, params=params)),
        (0.6, GenerateOptions(gamma=3, max_new_tokens=16, params=params, pipeline=False)),
    ]
    try:
        got = run_fleet(models, dev_broker, uid, plans)
    finally:
        worker.stop()
    for i, (_, opts) in enumerate(plans):
        assert got[i] == reference.run(PROMPTS[i % len(PROMPTS)], opts).token_ids, f"session {i}"
    assert max(s for s, _ in rec.forwards) >= 2, "no forward was shared: the test did not batch"
    assert all(pad >= pos for (_, pos), pad in zip(rec.forwards, rec.padded, strict=True))
    if layout == "packed":  # no padding: a forward computes its real positions
        assert all(pad == pos for (_, pos), pad in zip(rec.forwards, rec.padded, strict=True))
    assert not worker.bad_messages


def test_unbatched_worker_is_one_session_per_forward(models, reference, dev_broker, uid) -> None:
    rec = Recorder()
    worker = Worker(
        models["target"], dev_broker.config(), worker_id=f"w-{uid}", metrics=rec, max_batch_sessions=1
    )
    worker.start()
    plans = [(0.0, GenerateOptions(gamma=g, max_new_tokens=12, params=SAMPLED)) for g in (1, 3, 2)]
    try:
        got = run_fleet(models, dev_broker, uid, plans)
    finally:
        worker.stop()
    for i, (_, opts) in enumerate(plans):
        assert got[i] == reference.run(PROMPTS[i], opts).token_ids
    assert {s for s, _ in rec.forwards} == {1}


def _replies(raw, want: int, timeout: float = 20.0) -> list:
    out, deadline = [], time.monotonic() + timeout
    while len(out) < want and time.monotonic() < deadline:
        try:
            out.append(decode(raw.messages.get(timeout=0.2).payload))
        except queue.Empty:
            continue
    return out


def test_malformed_draft_in_a_batch_fails_alone(models, dev_broker, uid, mqtt_clients) -> None:
    """Three drafts share a forward; the one whose q names a token id >= the vocabulary gets
    bad_message, its batch-mates their (exact) verdicts, and its session keeps working."""
    target = models["target"]
    worker = Worker(target, dev_broker.config(), worker_id=f"w-{uid}", batch_window_ms=300)
    for i in range(20):  # forwards it ran before: it can say what a position costs (CostLine)
        worker.scheduler.line.add(1 + i % 4, 3 + i, 0.4 + 0.024 * (3 + i))
    worker.start()
    raw = mqtt_clients.make(dev_broker.config())
    raw.subscribe(f"{topics.PREFIX}/{uid}/+/down")
    ref = Verifier(target)
    sids = ["a", "b", "c"]
    try:
        for sid in sids:
            msg = Open(sid=sid, epoch=0, ctx=(5, 17, 42), sampling=SAMPLED, draft_model="", target_model="",
                       max_new=16)  # fmt: skip
            ref.open(msg)
            raw.publish(topics.open_topic(uid), encode(msg), response_topic=topics.down_topic(uid, sid))
            assert isinstance(_replies(raw, 1)[0], Opened)

        def good(sid: str) -> Draft:
            q = tuple(SparseDist(ids=(t, t + 1), w=(300, 100)) for t in (7, 8, 9))
            return Draft(sid=sid, epoch=0, seq=0, pos=3, tok=(7, 8, 9), q=q)

        bad = Draft(sid="b", epoch=0, seq=0, pos=3, tok=(7, 8, 9),
                    q=tuple(SparseDist(ids=(t, 5000), w=(1, 1)) for t in (7, 8, 9)))  # fmt: skip
        for d in (good("a"), bad, good("c")):
            raw.publish(topics.up_topic(uid, d.sid), encode(d))
        answers = {r.sid: r for r in _replies(raw, 3)}
        assert (
            isinstance(answers["b"], Error)
            and answers["b"].code == "bad_message"
            and "5000" in answers["b"].detail
        )
        for sid in ("a", "c"):
            v = answers[sid]
            assert isinstance(v, Verdict) and v.batch == 2, v
            assert v.pos_ms is not None and v.pos_ms >= 0, v  # the worker's figure reaches the edge
            assert v.row_med == 4, v  # the last context token + 3 drafts, the rows that ran
            want = ref.verify(good(sid))
            assert (v.n_acc, v.next, v.alpha) == (want.n_acc, want.next, want.alpha)
        raw.publish(topics.up_topic(uid, "b"), encode(good("b")))  # the same seq, now valid
        (v,) = _replies(raw, 1)
        want = ref.verify(good("b"))
        assert isinstance(v, Verdict) and (v.n_acc, v.next) == (want.n_acc, want.next)
    finally:
        worker.stop()
    assert worker.bad_messages["bad_message"] == 1


def test_failover_while_sessions_share_a_batch(models, reference, dev_broker, uid, tmp_path: Path) -> None:
    cfg = dev_broker.config()
    extra = ["--batch-window-ms", "20", "--max-batch-sessions", "8"]
    workers = start_worker_processes(
        cfg, [f"a-{uid}", f"b-{uid}"], target=models["target_dir"], workdir=tmp_path, extra=extra
    )
    agents = []
    opts = [GenerateOptions(gamma=g, max_new_tokens=30, params=SAMPLED) for g in (2, 3, 1)]
    try:  # the workers are stopped whatever fails next: they would answer later tests' opens
        agents = [agent_for(models, dev_broker, f"{uid}-d{i}", timeout_s=5.0) for i in range(len(opts))]
        states = [SessionState() for _ in opts]
        streams = [a.stream(PROMPTS[i], opts[i], state=states[i]) for i, a in enumerate(agents)]
        got: list[list[int]] = [[] for _ in opts]
        for _ in range(4):  # every session under way, sharing its owner's forwards
            for i, ev in enumerate(streams):
                got[i].append(next(ev).token)
        victim = agents[0].link.owner_of(states[0].sid)
        workers[victim].kill()
        threads = [
            threading.Thread(target=lambda i=i: got[i].extend(e.token for e in streams[i])) for i in range(3)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for i in range(3):
            assert got[i] == reference.run(PROMPTS[i], opts[i]).token_ids, f"session {i}"
        assert states[0].failovers == 1
    finally:
        for a in agents:
            a.close()
        for w in workers.values():
            w.proc.kill()


def _queued_job(device: str, sid: str):
    from cloud_worker.batching import Row
    from cloud_worker.scheduler import Job
    from cloud_worker.sessions import Step

    job = Job(f"{device}/{sid}", device, sid, None, "", None, time.perf_counter())
    job.step = Step(job.key, None, Row(None, 0, [1, 2, 3]), None)  # type: ignore[arg-type]
    return job


@pytest.mark.parametrize("window_ms", [0, 300])
def test_worker_waits_briefly_for_the_sessions_it_just_answered(models, dev_broker, uid, window_ms) -> None:
    """After a forward the model thread waits for just-answered sessions (all of them with
    ``batch_window_ms``; otherwise those whose device is owed model time, up to ``fair_wait_ms``
    and a quarter of a mean forward), and stops waiting as soon as they are back."""
    worker = Worker(
        models["target"],
        dev_broker.config(),
        worker_id=f"w-{uid}",
        batch_window_ms=window_ms,
        fair_wait_ms=300,
    )
    sched = worker.scheduler
    worker._intake = sched.push  # the messages below are already-validated jobs
    sched.push(_queued_job("flood", "f"))
    sched.select(lambda job: job.step)
    sched.charge(4.0)  # the flood has had 4 s of model time, calm none: calm is owed
    sched.push(_queued_job("flood", "f"))
    # calm comes back after 50 ms; "gone" (a finished generation) never does
    worker._answered_keys = {"calm/c", "gone/g"} if window_ms else {"calm/c"}

    threading.Timer(0.05, worker.jobs.put, [_queued_job("calm", "c")]).start()
    t0 = time.monotonic()
    worker._await_rejoin()
    waited = time.monotonic() - t0
    assert "calm/c" in sched.queues
    if window_ms:  # waits for every answered session: "gone" holds it to the window
        assert 0.29 <= waited < 1.0
    else:  # only for the owed one, and not a moment after it is back
        assert 0.04 <= waited < 0.25
    assert sched.select(lambda job: job.step)[0][0].device == "calm"  # and it leads

    worker._answered_keys = {"flood/f2"}  # not owed (the flood is ahead): no wait without a window
    t0 = time.monotonic()
    worker._await_rejoin()
    assert (time.monotonic() - t0 < 0.05) == (window_ms == 0)


def _rejoin_rig(models, dev_broker, uid, *, forward_s: float, key: str, gap_s: float):
    """A worker with the rejoin window "auto" whose model loop is driven by hand: one forward of
    ``forward_s`` seconds behind it (its mean forward), and session ``key`` seen coming back
    ``gap_s`` after each of three answers; then another device's work is queued (so waiting
    costs it). The jobs the test feeds are already validated."""
    worker = Worker(models["target"], dev_broker.config(), worker_id=f"w-{uid}", batch_window_ms="auto")
    sched = worker.scheduler
    worker._intake = sched.push
    sched.push(_queued_job("other", "o"))
    sched.select(lambda job: job.step)
    sched.charge(forward_s)
    device, _, sid = key.rpartition("/")
    for _ in range(3):
        sched.answered({key}, time.perf_counter() - gap_s)
        sched.push(_queued_job(device, sid))
        sched.drop(key)
    sched.push(_queued_job("other", "o"))
    return worker, sched


def test_auto_rejoin_window_waits_for_the_sessions_expected_back(models, dev_broker, uid) -> None:
    """``batch_window_ms = "auto"``: after a forward the model thread waits for the answered
    sessions it expects back within half a mean forward (from their own answer-to-request gaps),
    and stops as soon as they are back; a session never seen returning is not waited for."""
    # a mean forward of 1 s; "edge" has come back 80 ms after each answer
    worker, sched = _rejoin_rig(models, dev_broker, uid, forward_s=1.0, key="edge/e", gap_s=0.08)
    assert sched.gap_s("edge/e") == pytest.approx(0.08, abs=0.01)

    worker._answered_keys = {"edge/e", "new/n"}
    threading.Timer(0.05, worker.jobs.put, [_queued_job("edge", "e")]).start()
    t0 = time.monotonic()
    worker._await_rejoin()
    waited = time.monotonic() - t0
    assert "edge/e" in sched.queues and 0.04 <= waited < 0.3, waited

    worker._answered_keys = {"new/n"}  # never seen come back: no wait
    t0 = time.monotonic()
    worker._await_rejoin()
    assert time.monotonic() - t0 < 0.02


def test_auto_rejoin_window_waits_for_a_just_opened_sessions_first_draft(models, dev_broker, uid) -> None:
    """A session whose open the last forward answered has never come back, but its device has
    (its earlier generation's session, 80 ms after each answer): the model thread waits for its
    first draft as it would for the device's drafts, instead of starting a forward without it."""
    worker, sched = _rejoin_rig(models, dev_broker, uid, forward_s=1.0, key="edge/g1", gap_s=0.08)
    assert sched.gap_s("edge/g2") is None
    worker._answered_keys = {"edge/g2"}  # g2's open was answered; its first draft comes 50 ms later
    threading.Timer(0.05, worker.jobs.put, [_queued_job("edge", "g2")]).start()
    t0 = time.monotonic()
    worker._await_rejoin()
    waited = time.monotonic() - t0
    assert "edge/g2" in sched.queues and 0.04 <= waited < 0.3, waited


def test_auto_rejoin_wait_in_vain_is_charged_to_the_awaited_device(models, dev_broker, uid) -> None:
    """The worker waits for a session it expects back; when the wait ends without it, the time
    waited goes on that device's model time (Scheduler.charge_wait), not on anyone else's."""
    # a mean forward of 400 ms: a session back within 200 ms is awaited
    worker, sched = _rejoin_rig(models, dev_broker, uid, forward_s=0.4, key="late/l", gap_s=0.05)
    before = dict(sched.vtime)
    worker._answered_keys = {"late/l"}  # this time it does not come back
    t0 = time.monotonic()
    worker._await_rejoin()
    waited = time.monotonic() - t0
    assert 0.05 <= waited < 0.3, waited
    assert sched.vtime["late"] - before.get("late", 0.0) == pytest.approx(waited, abs=0.02)
    assert sched.vtime.get("other") == before.get("other")


def test_a_new_session_of_the_awaited_device_ends_the_wait(models, dev_broker, uid) -> None:
    """An edge's next generation opens a new session: the session the last answer went to never
    comes back, its device does. The wait ends when the device's new session arrives, and
    nothing is charged (a cloud-only edge, one session a generation, was waited for in vain
    and charged each time)."""
    # a mean forward of 1 s: a session back within 500 ms is awaited
    worker, sched = _rejoin_rig(models, dev_broker, uid, forward_s=1.0, key="edge/g1", gap_s=0.08)
    sched.push(_queued_job("edge", "busy"))  # queued before the wait: not a stand-in
    before = dict(sched.vtime)
    worker._answered_keys = {"edge/g1"}  # its generation ended; the next one opens g2
    threading.Timer(0.05, worker.jobs.put, [_queued_job("edge", "g2")]).start()
    t0 = time.monotonic()
    worker._await_rejoin()
    waited = time.monotonic() - t0
    assert "edge/g2" in sched.queues and 0.04 <= waited < 0.3, waited
    assert sched.vtime.get("edge") == before.get("edge")  # not a wait in vain
    queued = set(sched.queues)
    assert sched.missing({"edge/a", "edge/b"}, queued) == {"edge/a", "edge/b"}  # nothing new since
    assert len(sched.missing({"edge/a", "edge/b"}, queued - {"edge/g2"})) == 1  # one stands in for one
    assert sched.missing({"edge/a"}, queued - {"other/o"}) == {"edge/a"}  # another device's is no stand-in
    sched.answered({"edge/g3"}, time.perf_counter())  # a session the worker has answered before
    sched.push(_queued_job("edge", "g3"))
    assert sched.missing({"edge/a"}, queued) == {"edge/a"}  # is another generation, no stand-in


def test_batch_window_config_takes_auto() -> None:
    from shared.config import load_worker_config

    def window(text: str):
        return load_worker_config(env={"SPECECD_BATCH_WINDOW_MS": text}).batch_window_ms

    assert window("auto") == "auto" and window("AUTO") == "auto"
    assert window("20") == 20.0
    with pytest.raises(Exception, match="'auto' or"):
        window("soon")
