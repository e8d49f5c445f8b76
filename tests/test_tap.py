"""spececd-tap: decoded traffic, text payloads, malformed payloads, against a real broker."""

from __future__ import annotations

import subprocess
import sys
import time

from shared.mqtt import Incoming
from shared.protocol import Draft, Open, encode
from shared.sampling import SamplingParams
from shared.tap import format_message, main
from shared.topics import open_topic, status_topic, up_topic


def _incoming(topic: str, payload: bytes, **props: object) -> Incoming:
    base = dict(response_topic=None, correlation_data=None, content_type=None, message_expiry=None)
    return Incoming(topic=topic, payload=payload, retain=False, received_at=0.0, **{**base, **props})


def test_format_decodes_a_message_with_its_properties():
    draft = Draft(sid="s1", epoch=2, seq=7, pos=40, tok=(11, 12, 13))
    text = format_message(
        _incoming(
            up_topic("devA", "s1"),
            encode(draft),
            content_type="application/cbor",
            response_topic="spececd/v1/devA/s1/down",
            correlation_data=b"\x00\x07",
            message_expiry=5,
        )
    )
    header, body = text.split("\n")
    assert header.startswith(f"spececd/v1/devA/s1/up  draft  {len(encode(draft))} B  [")
    assert "response-topic=spececd/v1/devA/s1/down" in header
    assert "correlation-data=0007" in header and "expiry=5s" in header
    assert "seq=7" in body and "pos=40" in body and "tok=(11, 12, 13)" in body and "q=None" in body
    assert body.strip().startswith("γ=3 ")  # the draft length chosen this round


def test_format_cuts_long_id_lists():
    msg = Open(
        sid="s1",
        epoch=0,
        ctx=tuple(range(100)),
        sampling=SamplingParams(),
        draft_model="d",
        target_model="t",
        max_new=8,
    )
    body = format_message(_incoming(open_topic("devA"), encode(msg))).split("\n")[1]
    assert "ctx=(0, 1, 2, 3, 4, 5, 6, 7, ... 92 more)" in body
    assert "sampling=SamplingParams(temperature=0.0" in body


def test_format_shows_text_and_malformed_payloads_without_raising():
    assert "text  6 B" in format_message(_incoming(status_topic("w1"), b"online"))
    for payload in (b"\xa1\x61", b"\xff" * 40, b"", b"{not cbor}"):
        text = format_message(_incoming(up_topic("devA", "s1"), payload, content_type="application/cbor"))
        assert "MALFORMED" in text and "invalid message field" in text


def test_unreachable_broker_exits_2_with_the_reason(capsys):
    assert main(["--broker", "127.0.0.1:1", "--count", "1"]) == 2
    assert "cannot reach the MQTT broker at 127.0.0.1:1" in capsys.readouterr().err


def test_tap_prints_traffic_from_a_real_broker(dev_broker, mqtt_clients, uid):
    device = f"dev{uid}"
    tap = subprocess.Popen(
        [sys.executable, "-m", "shared.tap", f"spececd/v1/{device}/#", "--broker",
         f"127.0.0.1:{dev_broker.port}", "--count", "3", "--timeout", "30"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        ready = tap.stderr.readline()  # printed after the SUBACK
        assert "subscribed to" in ready, ready + tap.stderr.read()
        pub = mqtt_clients.make(dev_broker.config())
        draft = Draft(sid=uid, epoch=0, seq=3, pos=9, tok=(5, 6))
        pub.publish(up_topic(device, uid), encode(draft), correlation_data=b"\x03")
        pub.publish(open_topic(device), b"\xa1\x61", wait=True)  # truncated CBOR
        pub.publish(f"spececd/v1/{device}/note", b"hello", content_type=None, wait=True)
        out, err = tap.communicate(timeout=30)
    finally:
        if tap.poll() is None:
            tap.kill()
            tap.wait()
    assert tap.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) == 6, out
    assert lines[0].startswith(f"{up_topic(device, uid)}  draft  ")
    assert "correlation-data=03" in lines[0] and "content-type=application/cbor" in lines[0]
    assert "seq=3" in lines[1] and "tok=(5, 6)" in lines[1]
    assert lines[2].startswith(f"{open_topic(device)}  MALFORMED  2 B")
    assert lines[4].startswith(f"spececd/v1/{device}/note  text  5 B") and "'hello'" in lines[5]


def test_tap_times_out_with_status_1(dev_broker, uid):
    start = time.monotonic()
    rc = main(
        [f"{uid}/nothing", "--broker", f"127.0.0.1:{dev_broker.port}", "--count", "1", "--timeout", "0.3"]
    )
    assert rc == 1
    assert time.monotonic() - start < 3
