"""The noisy neighbour: one device flooding the worker pool at full rate (issue 10).

``python -m bench.noisy_flood --broker HOST:PORT --device noisy ...`` (started by ``bench.noisy``):

- a burst of ``--opens`` opens with contexts of nearly the target's whole length, fire and forget;
- ``--streams`` sessions sending maximum-length drafts (64 tokens) back to back, each as soon as
  the previous verdict is in; the even ones at T = 1 with q(x) tiny for every drafted token, so
  that everything is accepted and the session grows as fast as it can; the odd ones greedy;
- ``--decodes`` cloud-only sessions asking for 2³¹ − 1 tokens at once.

Every session that ends or gets an error is re-opened under a new session id, until SIGTERM or
``--seconds``. Writes ``--out``: the answers it got, by kind and error code, and its committed
tokens per 100 ms bucket (wall-clock time), so the caller can count them inside its own window.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import threading
import time
import uuid
from collections import Counter

from shared import topics
from shared.errors import ProtocolError
from shared.mqtt import BrokerConfig, Incoming, make_client
from shared.protocol import (
    COUNT_LIMIT,
    MAX_GAMMA,
    Decode,
    Draft,
    Error,
    Open,
    Opened,
    Tokens,
    Verdict,
    decode,
    encode,
)
from shared.sampling import SamplingParams, SparseDist

SHORT_CTX = 8


class Flood:
    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.rng = random.Random(args.seed)
        self.client = make_client(
            BrokerConfig.parse_hostport(args.broker), client_id=f"flood-{uuid.uuid4().hex[:6]}"
        )
        self.lock = threading.Lock()
        self.sessions: dict[str, dict] = {}  # sid -> {kind, pos, seq}
        self.answers: Counter[str] = Counter()
        self.buckets: Counter[int] = Counter()  # int(wall time * 10) -> committed tokens
        self.stop = threading.Event()

    def toks(self, n: int) -> tuple[int, ...]:
        return tuple(self.rng.randrange(self.a.vocab) for _ in range(n))

    def publish(self, topic: str, msg, *, response: bool = True) -> None:
        down = topics.down_topic(self.a.device, msg.sid)
        try:
            self.client.publish(topic, encode(msg), response_topic=down if response else None)
        except Exception:
            self.answers["publish_failed"] += 1

    def open(self, kind: str) -> None:
        """(Under the lock.) A new flood session of ``kind``: burst, accept, greedy or decode."""
        sid = f"n{kind[0]}{uuid.uuid4().hex[:20]}"
        m = self.a.max_positions
        ctx_len = max(1, m - 1) if kind == "burst" else SHORT_CTX
        ctx_len = min(ctx_len, 511) if kind == "burst" else ctx_len
        temp = 1.0 if kind == "accept" else 0.0
        msg = Open(sid=sid, epoch=0, ctx=self.toks(ctx_len), sampling=SamplingParams(temperature=temp, seed=7),
                   draft_model=self.a.draft, target_model=self.a.target, max_new=max(1, m - ctx_len),
                   mode="cloud" if kind == "decode" else "speculative")  # fmt: skip
        self.sessions[sid] = {"kind": kind, "pos": ctx_len, "seq": 0}
        self.publish(topics.open_topic(self.a.device), msg)

    def request(self, sid: str) -> None:
        """(Under the lock.) The session's next request at full rate."""
        s = self.sessions[sid]
        up = topics.up_topic(self.a.device, sid)
        if s["kind"] == "decode":
            self.publish(up, Decode(sid=sid, epoch=0, seq=s["seq"], pos=s["pos"], n=COUNT_LIMIT - 1))
            return
        tok = self.toks(MAX_GAMMA)
        q = None
        if s["kind"] == "accept":  # q(x) = 1/65535: p(x)/q(x) >= 1 almost surely, so all are accepted
            q = tuple(SparseDist(ids=(x, (x + 1) % self.a.vocab), w=(1, 65534)) for x in tok)
        self.publish(up, Draft(sid=sid, epoch=0, seq=s["seq"], pos=s["pos"], tok=tok, q=q))

    def on_reply(self, msg: Incoming) -> None:
        try:
            reply = decode(msg.payload)
        except ProtocolError:
            self.answers["undecodable"] += 1
            return
        with self.lock:
            s = self.sessions.get(reply.sid)
            if s is None or self.stop.is_set():
                return
            bucket = int(time.time() * 10)
            if isinstance(reply, Error):
                self.answers[f"error:{reply.code}"] += 1
                self.renew(reply.sid)
            elif isinstance(reply, Opened):
                self.answers["opened"] += 1
                if s["kind"] != "burst":
                    self.request(reply.sid)
            elif isinstance(reply, Verdict):
                self.answers["verdict"] += 1
                self.buckets[bucket] += reply.n_acc + 1
                s["pos"] += reply.n_acc + 1
                s["seq"] += 1
                self.request(reply.sid)
            elif isinstance(reply, Tokens):
                self.answers["tokens"] += 1
                self.buckets[bucket] += len(reply.tok)
                if reply.done:
                    self.renew(reply.sid)

    def renew(self, sid: str) -> None:
        """(Under the lock.) Replace a finished or refused session by a new one of its kind."""
        s = self.sessions.pop(sid)
        if s["kind"] != "burst":
            self.open(s["kind"])

    def run(self) -> None:
        self.client.connect()
        self.client.subscribe(f"{topics.PREFIX}/{self.a.device}/+/down", handler=self.on_reply)
        with self.lock:
            for i in range(self.a.streams):
                self.open("accept" if i % 2 == 0 else "greedy")
            for _ in range(self.a.decodes):
                self.open("decode")
            for _ in range(self.a.opens):
                self.open("burst")
        print("flooding", flush=True)
        self.stop.wait(self.a.seconds)
        self.stop.set()
        self.client.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.noisy_flood", description=__doc__.splitlines()[0])
    ap.add_argument("--broker", required=True)
    ap.add_argument("--device", default="noisy")
    ap.add_argument("--target", required=True)
    ap.add_argument("--draft", default="")
    ap.add_argument("--vocab", type=int, required=True)
    ap.add_argument("--max-positions", type=int, required=True)
    ap.add_argument("--opens", type=int, default=1000)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--decodes", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=3600.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    flood = Flood(args)
    signal.signal(signal.SIGTERM, lambda *_: flood.stop.set())
    try:
        flood.run()
    finally:
        with flood.lock:
            report = {"answers": dict(flood.answers), "buckets": sorted(flood.buckets.items())}
        with open(args.out, "w") as fh:
            json.dump(report, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
