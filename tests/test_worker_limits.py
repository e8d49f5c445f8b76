"""Issue 10, worker side: each attack a hostile device made on one worker, as a test through a
real Mosquitto (the dev config and the production one: TLS, passwords, ACL) with a tiny real
target. Every one of them succeeded on the worker before
batching (sessions keyed by sid, no limits after open, no per-device quota, no validation of q).
"""

from __future__ import annotations

import queue
import time

import pytest

from cloud_worker.verifier import Verifier, session_key
from cloud_worker.worker import Worker
from shared import topics
from shared.models import load_model
from shared.protocol import Decode, Draft, Error, Open, Opened, Tokens, Verdict, decode, encode
from shared.sampling import SamplingParams, SparseDist
from tests.tiny import make_tiny_model_dir

pytestmark = pytest.mark.broker  # the brokers come through getfixturevalue, so mark by hand

GREEDY = SamplingParams()
SAMPLED = SamplingParams(temperature=0.9, seed=3)
CTX = (5, 17, 42)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return load_model(str(make_tiny_model_dir(tmp_path_factory.mktemp("t") / "target", arch="llama", seed=2)))


class Rig:
    """Two devices on a real broker, ``v`` (the victim) and ``x`` (the attacker), each its own
    client, whose down-topic messages arrive merged in ``messages``; and the worker's broker login."""

    def __init__(self, broker, mqtt_clients, v: str, x: str, worker_id: str) -> None:
        self.v, self.x, self.worker_id = v, x, worker_id
        self.worker_config = broker.config(worker_id if broker.kind == "prod" else None)
        self.messages: queue.Queue = queue.Queue()
        self.clients = {}
        for dev in (v, x):
            client = mqtt_clients.make(broker.config(dev if broker.kind == "prod" else None))
            client.subscribe(f"{topics.PREFIX}/{dev}/+/down", handler=self.messages.put)
            self.clients[dev] = client

    def publish(self, topic: str, payload: bytes, **kw) -> None:
        """Publish as the device the topic belongs to (its own credentials on the prod broker)."""
        self.clients[topics.parse_topic(topic).device].publish(topic, payload, **kw)


@pytest.fixture(params=["dev", "prod"])
def raw(request, uid, mqtt_clients) -> Rig:
    """The attacks run on the dev broker and on the production config (TLS, passwords, ACL)."""
    if request.param == "dev":
        broker = request.getfixturevalue("dev_broker")
        return Rig(broker, mqtt_clients, f"{uid}-v", f"{uid}-x", f"w-{uid}")
    broker = request.getfixturevalue("prod_broker")
    return Rig(broker, mqtt_clients, "devA", "devB", "worker1")


def start(target, rig: Rig, **kw) -> Worker:
    worker = Worker(target, rig.worker_config, worker_id=rig.worker_id, **kw)
    worker.start()
    return worker


def collect(raw, until, timeout: float = 30.0) -> list:
    """Replies (with their device) until ``until(replies)`` holds or the timeout passes."""
    out: list = []
    deadline = time.monotonic() + timeout
    while not until(out) and time.monotonic() < deadline:
        try:
            msg = raw.messages.get(timeout=0.1)
        except queue.Empty:
            continue
        out.append((topics.parse_topic(msg.topic).device, decode(msg.payload)))
    return out


def send_open(
    raw, device: str, sid: str, *, ctx=CTX, params=GREEDY, max_new: int = 16, mode="speculative"
) -> None:
    msg = Open(sid=sid, epoch=0, ctx=tuple(ctx), sampling=params, draft_model="", target_model="",
               max_new=max_new, mode=mode)  # fmt: skip
    raw.publish(topics.open_topic(device), encode(msg), response_topic=topics.down_topic(device, sid))


def open_and_wait(raw, device: str, sid: str, **kw) -> None:
    send_open(raw, device, sid, **kw)
    got = collect(raw, lambda r: any(m.sid == sid for _, m in r))
    assert [type(m) for d, m in got if m.sid == sid] == [Opened], got


def ask(raw, device: str, msg, timeout: float = 30.0):
    raw.publish(topics.up_topic(device, msg.sid), encode(msg))
    got = collect(raw, lambda r: any(d == device and m.sid == msg.sid for d, m in r), timeout)
    mine = [m for d, m in got if d == device and m.sid == msg.sid]
    assert mine, f"no answer to {msg}"
    return mine[0]


def greedy_continuation(target, n: int) -> list[int]:
    """The target's own greedy tokens after CTX (drafts of exactly these are all accepted)."""
    ref = Verifier(target)
    ref.open(Open(sid="ref", epoch=0, ctx=CTX, sampling=GREEDY, draft_model="", target_model="", max_new=n))
    parts: list = []
    ref.decode(Decode(sid="ref", epoch=0, seq=0, pos=len(CTX), n=n), parts.append)
    return [*CTX, *(p.tok[0] for p in parts)]


def test_giant_decode_is_one_step_per_round_and_bounded(target, raw) -> None:
    """#2: decode n = 2**31-1 streams at most max_new tokens, one per forward, while another
    device's draft is answered in between."""
    worker = start(target, raw)
    try:
        v, x = raw.v, raw.x
        open_and_wait(raw, x, "big", max_new=200, mode="cloud")
        open_and_wait(raw, v, "ok")
        raw.publish(topics.up_topic(x, "big"), encode(Decode(sid="big", epoch=0, seq=0, pos=3, n=2**31 - 1)))
        first = collect(raw, lambda r: len(r) >= 1)
        assert isinstance(first[0][1], Tokens)
        raw.publish(topics.up_topic(v, "ok"), encode(Draft(sid="ok", epoch=0, seq=0, pos=3, tok=(1, 2))))
        got = first + collect(
            raw, lambda r: any(isinstance(m, Tokens) and m.done for _, m in r) and any(d == v for d, _ in r)
        )
        parts = [m for _, m in got if isinstance(m, Tokens)]
        assert [p.part for p in parts] == list(range(len(parts)))
        assert parts[-1].done and not any(p.done for p in parts[:-1])
        assert len(parts) == 200 or parts[-1].eos  # never more than max_new
        # the other device's verdict came while the decode was still streaming
        order = [d for d, _ in got]
        assert isinstance(got[order.index(v)][1], Verdict)
        assert order.index(v) < len(got) - 1 - order[::-1].index(x)
        key = session_key(x, "big")
        assert len(worker.verifier.sessions[key].tokens) <= len(CTX) + 200
    finally:
        worker.stop()


def test_all_accepted_drafts_stop_at_the_limit(target, raw) -> None:
    """#3: drafts that are always accepted never grow a session past len(ctx) + max_new."""
    worker = start(target, raw)
    cont = greedy_continuation(target, 40)
    try:
        v = raw.v
        open_and_wait(raw, v, "grow", max_new=20)
        pos, seq, verdicts = 3, 0, []
        while True:
            reply = ask(raw, v, Draft(sid="grow", epoch=0, seq=seq, pos=pos, tok=tuple(cont[pos : pos + 8])))
            if not isinstance(reply, Verdict):
                break
            verdicts.append(reply)
            pos, seq = pos + reply.n_acc + 1, seq + 1
            assert seq < 10, "the session kept growing"
        assert isinstance(reply, Error) and reply.code == "limit" and "23" in reply.detail
        assert [v.n_acc for v in verdicts] == [8, 8, 2]  # the last block judged only up to the limit
        assert [v.next for v in verdicts[:2]] == [cont[11], cont[20]]
        assert worker.verifier.sessions[session_key(v, "grow")].tokens == cont[:23]
        reply = ask(raw, v, Decode(sid="grow", epoch=0, seq=seq + 1, pos=23, n=5))
        assert isinstance(reply, Error) and reply.code == "limit"
    finally:
        worker.stop()


def test_open_flood_evicts_only_the_flooders_sessions(target, raw) -> None:
    """#4: 30 opens of one device on a 4-session worker: the other device's live session keeps
    working, and each evicted session of the flooder is told at once (resync)."""
    worker = start(target, raw, max_sessions=4, max_opens_per_s_per_device=0)
    try:
        v, x = raw.v, raw.x
        open_and_wait(raw, v, "live")
        first = ask(raw, v, Draft(sid="live", epoch=0, seq=0, pos=3, tok=(1,)))
        assert isinstance(first, Verdict)
        for i in range(30):
            send_open(raw, x, f"f{i}", ctx=list(range(1, 101)))
        flood = collect(
            raw,
            lambda r: (
                sum(isinstance(m, Opened) for _, m in r) >= 30
                and sum(isinstance(m, Error) for _, m in r) >= 27
            ),
            timeout=120,
        )
        assert all(d == x for d, _ in flood), "the victim device got a message from the flood"
        resyncs = {m.sid for _, m in flood if isinstance(m, Error) and m.code == "resync"}
        assert len(resyncs) == 27  # all but the flooder's 3 newest, told at once
        reply = ask(raw, v, Draft(sid="live", epoch=0, seq=1, pos=4 + first.n_acc, tok=(1,)))
        assert isinstance(reply, Verdict), reply
        assert session_key(v, "live") in worker.verifier.sessions
    finally:
        worker.stop()


def test_open_rate_per_device(target, raw) -> None:
    worker = start(target, raw, max_opens_per_s_per_device=5)
    try:
        v, x = raw.v, raw.x
        for i in range(20):
            send_open(raw, x, f"r{i}")
        send_open(raw, v, "calm")
        got = collect(raw, lambda r: len(r) >= 21)
        over = [m for d, m in got if d == x and isinstance(m, Error) and m.code == "overloaded"]
        assert len(over) >= 10
        assert any(d == v and isinstance(m, Opened) for d, m in got)
    finally:
        worker.stop()


def test_same_sid_from_another_device_is_another_session(target, raw) -> None:
    """#5: an open of the same sid from another device never touches the first device's session."""
    worker = start(target, raw)
    ref = Verifier(target)
    try:
        v, x = raw.v, raw.x
        open_and_wait(raw, v, "shared")
        ref.open(
            Open(sid="shared", epoch=0, ctx=CTX, sampling=GREEDY, draft_model="", target_model="", max_new=16)
        )
        open_and_wait(raw, x, "shared", ctx=(1, 2, 3, 4, 5, 6))
        mine = ask(raw, v, Draft(sid="shared", epoch=0, seq=0, pos=3, tok=(7, 8)))
        want = ref.verify(Draft(sid="shared", epoch=0, seq=0, pos=3, tok=(7, 8)))
        assert isinstance(mine, Verdict) and (mine.n_acc, mine.next) == (want.n_acc, want.next)
        theirs = ask(raw, x, Draft(sid="shared", epoch=0, seq=0, pos=6, tok=(7,)))
        assert isinstance(theirs, Verdict)
    finally:
        worker.stop()


def test_bad_q_id_is_refused_and_the_session_keeps_working(target, raw) -> None:
    """#6: a q naming a token id >= the vocabulary gets bad_message before any state moves."""
    worker = start(target, raw)
    ref = Verifier(target)
    try:
        v = raw.v
        open_and_wait(raw, v, "q", params=SAMPLED)
        ref.open(
            Open(sid="q", epoch=0, ctx=CTX, sampling=SAMPLED, draft_model="", target_model="", max_new=16)
        )
        sess = worker.verifier.sessions[session_key(v, "q")]
        before = (list(sess.tokens), sess.cache_len, sess.cache.get_seq_length(), sess.last_seq)
        bads = [
            Draft(sid="q", epoch=0, seq=0, pos=3, tok=(7,), q=(SparseDist(ids=(7, 1 << 20), w=(1, 1)),)),
            Draft(sid="q", epoch=0, seq=0, pos=3, tok=(4000,), q=(SparseDist(ids=(4000,), w=(1,)),)),
            Draft(sid="q", epoch=0, seq=0, pos=3, tok=(7,), q=None),  # sampled sessions need q
            Decode(sid="q", epoch=0, seq=0, pos=3, n=0),
        ]
        for bad in bads:
            err = ask(raw, v, bad)
            assert isinstance(err, Error) and err.code == "bad_message", err
            after = worker.verifier.sessions[session_key(v, "q")]
            assert after is sess
            assert (list(sess.tokens), sess.cache_len, sess.cache.get_seq_length(), sess.last_seq) == before
        good = Draft(
            sid="q",
            epoch=0,
            seq=0,
            pos=3,
            tok=(7, 9),
            q=(SparseDist(ids=(7, 8), w=(3, 1)), SparseDist(ids=(9,), w=(1,))),
        )
        verdict = ask(raw, v, good)
        want = ref.verify(good)
        assert isinstance(verdict, Verdict) and (verdict.n_acc, verdict.next, verdict.alpha) == (
            want.n_acc,
            want.next,
            want.alpha,
        )
    finally:
        worker.stop()
    assert worker.bad_messages["bad_message"] == len(bads)
