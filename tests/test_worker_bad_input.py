"""Bad input published straight to a worker's topics (DESIGN §3, §5).

Every case: the documented error reply or drop, the counter incremented, the worker alive, and
a normal session served afterwards. Documented behaviour (docs/ARCHITECTURE.md, "Worker: bad
input"): undecodable or mistyped payloads get ``error{bad_message}`` on the device's own down
topic when the session id is known, else they are dropped; unknown/evicted sessions get
``error{resync}``; stale epochs are dropped; a repeated seq is answered from memory.
"""

from __future__ import annotations

import queue

import cbor2
import pytest

from cloud_worker.worker import Worker
from edge_agent.agent import EdgeAgent
from edge_agent.mqtt_link import MqttLink
from edge_agent.speculative import GenerateOptions
from shared import topics
from shared.models import load_model
from shared.protocol import MAX_PAYLOAD_BYTES, Close, Draft, Error, Open, Opened, Verdict, decode, encode
from shared.sampling import SamplingParams
from tests.tiny import make_tiny_model_dir

GREEDY = SamplingParams()


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return load_model(str(make_tiny_model_dir(tmp_path_factory.mktemp("t") / "target", arch="llama", seed=2)))


@pytest.fixture
def rig(target, dev_broker, uid, mqtt_clients):
    """A worker, and a raw client acting as device ``uid`` that sees the device's down topics."""
    worker = Worker(target, dev_broker.config(), worker_id=f"w-{uid}")
    worker.start()
    raw = mqtt_clients.make(dev_broker.config())
    raw.subscribe(f"{topics.PREFIX}/{uid}/+/down")
    yield worker, raw, uid
    worker.stop()


def replies(raw, timeout: float = 2.0) -> list:
    out = []
    try:
        while True:
            out.append(decode(raw.messages.get(timeout=timeout).payload))
            timeout = 0.2
    except queue.Empty:
        return out


def open_session(raw, device: str, sid: str, epoch: int = 0) -> Opened:
    msg = Open(sid=sid, epoch=epoch, ctx=(1, 2, 3), sampling=GREEDY, draft_model="", target_model="",
               max_new=16, mode="speculative")  # fmt: skip
    raw.publish(topics.open_topic(device), encode(msg), response_topic=topics.down_topic(device, sid))
    (opened,) = replies(raw)
    assert isinstance(opened, Opened) and opened.epoch == epoch
    return opened


def draft(sid: str, *, epoch: int = 0, seq: int = 0, pos: int = 3) -> Draft:
    return Draft(sid=sid, epoch=epoch, seq=seq, pos=pos, tok=(4, 5), q=None)


def test_malformed_cbor_on_open_with_own_response_topic_gets_error(rig) -> None:
    worker, raw, dev = rig
    raw.publish(topics.open_topic(dev), b"\xff\x00garbage", response_topic=topics.down_topic(dev, "s1"))
    (err,) = replies(raw)
    assert isinstance(err, Error) and err.code == "bad_message" and err.sid == "s1"
    assert worker.bad_messages["bad_message"] == 1


def test_malformed_cbor_on_open_without_response_topic_is_dropped(rig) -> None:
    worker, raw, dev = rig
    raw.publish(topics.open_topic(dev), b"\x82\x01")  # a CBOR array, not a message
    assert replies(raw, timeout=1.0) == []
    assert worker.bad_messages["bad_message"] == 1


def test_response_topic_of_another_device_is_not_used(rig, mqtt_clients, dev_broker) -> None:
    worker, raw, dev = rig
    spy = mqtt_clients.make(dev_broker.config())
    spy.subscribe(f"{topics.PREFIX}/victim-{dev}/+/down")
    raw.publish(topics.open_topic(dev), b"\xff", response_topic=topics.down_topic(f"victim-{dev}", "s1"))
    with pytest.raises(queue.Empty):
        spy.messages.get(timeout=1.0)
    assert worker.bad_messages["bad_message"] == 1


def test_wrong_types_on_up_get_bad_message(rig) -> None:
    worker, raw, dev = rig
    open_session(raw, dev, "s2")
    bad = cbor2.dumps({"v": 1, "t": "draft", "sid": "s2", "epoch": "zero", "seq": 0, "pos": 3, "tok": [1]})
    raw.publish(topics.up_topic(dev, "s2"), bad)
    (err,) = replies(raw)
    assert err.code == "bad_message" and "epoch" in err.detail
    assert worker.bad_messages["bad_message"] == 1


def test_oversized_payload_gets_bad_message(rig) -> None:
    worker, raw, dev = rig
    open_session(raw, dev, "s3")
    raw.publish(topics.up_topic(dev, "s3"), b"\x00" * (MAX_PAYLOAD_BYTES + 1))
    (err,) = replies(raw)
    assert err.code == "bad_message"
    assert worker.bad_messages["bad_message"] == 1


def test_evicted_session_gets_resync(rig) -> None:
    worker, raw, dev = rig
    open_session(raw, dev, "s4")
    worker.verifier.evict(f"{dev}/s4")  # sessions are keyed by (device, sid)
    raw.publish(topics.up_topic(dev, "s4"), encode(draft("s4")))
    (err,) = replies(raw)
    assert err.code == "resync" and err.seq == 0
    assert worker.bad_messages["resync"] == 1


def test_stale_epoch_is_dropped(rig) -> None:
    worker, raw, dev = rig
    open_session(raw, dev, "s5", epoch=0)
    open_session(raw, dev, "s5", epoch=1)
    raw.publish(topics.up_topic(dev, "s5"), encode(draft("s5", epoch=0)))
    assert replies(raw, timeout=1.0) == []
    assert worker.bad_messages["stale_epoch"] == 1


def test_repeated_seq_is_answered_from_memory(rig) -> None:
    worker, raw, dev = rig
    open_session(raw, dev, "s6")
    payload = encode(draft("s6"))
    raw.publish(topics.up_topic(dev, "s6"), payload)
    (first,) = replies(raw)
    raw.publish(topics.up_topic(dev, "s6"), payload)
    (second,) = replies(raw)
    assert isinstance(first, Verdict) and second == first  # same verify_ms: not verified twice
    assert len(worker.verifier.sessions[f"{dev}/s6"].tokens) == 3 + first.n_acc + 1


def test_sid_in_payload_must_match_topic(rig) -> None:
    _worker, raw, dev = rig
    open_session(raw, dev, "s7")
    raw.publish(topics.up_topic(dev, "s7"), encode(draft("other")))
    (err,) = replies(raw)
    assert err.code == "bad_message" and err.sid == "s7"


def test_other_sessions_unaffected(rig, target, dev_broker) -> None:
    worker, raw, dev = rig
    for junk in (b"\xff", b"", cbor2.dumps([1] * 10), b"\x9f" * 1000):
        raw.publish(topics.open_topic(dev), junk)
    link = MqttLink(dev_broker.config(), device=f"{dev}-ok", round_timeout_s=3.0)
    link.connect()
    try:
        agent = EdgeAgent(target, link, defaults=GenerateOptions(gamma=2, max_new_tokens=8))
        out = agent.run([1, 2, 3])
        assert len(out.token_ids) == 8 or out.token_ids[-1] in target.eos_token_ids
    finally:
        link.shutdown()
    assert worker.bad_messages["bad_message"] == 4
    assert worker._thread is not None and worker._thread.is_alive()


def test_other_message_type_on_open_gets_bad_message(rig) -> None:
    worker, raw, dev = rig
    raw.publish(topics.open_topic(dev), encode(Close(sid="s8", epoch=0)))
    (err,) = replies(raw)
    assert err.code == "bad_message" and err.sid == "s8" and "expected an open" in err.detail
    assert worker.bad_messages["bad_message"] == 1
