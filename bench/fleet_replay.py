"""Replaying recorded sessions as a fleet: many concurrent sessions from one light process.

Each *slot* is one edge session at a time: it opens a recorded generation under a fresh session
id (on its own device's topics), sends the recorded requests one after the other, each as soon as
the previous answer arrives (closed loop: one request in flight per session, as a real edge), and
checks every answer against the recording. When a generation ends the slot closes it and starts
the next recording of its list, until the measuring window ends (``duration_s``) or its list is
done (``once``).

All the work happens on the MQTT client's network thread, in the message handler: decode the
answer, compare, encode and publish the next request. No model runs here, so a round costs this
process a few hundred microseconds of CPU, far below the worker's forward (the fleet report shows
both per round).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from bench.fleet_record import SPECULATIVE, Recording, with_sid
from shared import topics
from shared.errors import ProtocolError
from shared.mqtt import BrokerConfig, Incoming, make_client
from shared.protocol import Close, Error, Opened, Tokens, Verdict, decode, encode

OPEN_RETRY_S = 0.2  # pause before re-sending an open the worker refused as `overloaded`


@dataclass
class RoundRecord:
    """One answered request: when it went out and came back, what it committed, whether it matched."""

    slot: int
    device: str
    kind: str  # "open", "draft" or "decode"
    t_send: float  # perf_counter seconds
    t_reply: float
    committed: int
    match: bool
    batch: int | None = None  # sessions in the worker's forward, when the verdict says
    batch_pos: int | None = None  # positions in that forward, when the verdict says
    verify_ms: float = 0.0  # the worker's compute for this answer (its timings; summed over a decode's parts)
    queue_ms: float = 0.0  # the wait on the worker before that compute
    gamma: int = 0  # draft tokens of the block (0 for a decode)

    @property
    def latency_ms(self) -> float:
        return (self.t_reply - self.t_send) * 1e3


@dataclass
class GenerationRecord:
    slot: int
    device: str
    prompt: int
    sid: str
    t_start: float
    t_end: float | None = None
    tokens: int = 0  # committed so far (as recorded)
    complete: bool = False  # every request answered, all equal to the recording
    mismatch: str | None = None  # the first difference from the recording
    error: str | None = None  # an error answer or a timeout
    cut: bool = False  # stopped by the end of the measuring window (neither an error nor a mismatch)


@dataclass
class _Slot:
    index: int
    device: str
    recordings: list[Recording]
    cycle: itertools.cycle
    gen: GenerationRecord | None = None
    rec: Recording | None = None
    step: int = -1  # -1: the open is in flight
    epoch: int = 0
    t_send: float = 0.0
    parts: list[int] = field(default_factory=list)
    part_ms: float = 0.0  # verify_ms summed over the decode's parts so far
    answers: int = 0  # draft / decode requests answered in this run
    done: bool = False
    started: int = 0
    state: Any = None  # what a subclass keeps per slot (bench.fleet_gamma: the γ controller)


class Replayer:
    """Runs slots of recorded sessions against the worker pool through one MQTT connection."""

    def __init__(
        self, broker: BrokerConfig, *, round_timeout_s: float = 120.0, tag: str = "", pace: bool = False
    ) -> None:
        self.broker = broker
        self.pace = pace  # wait each block's recorded drafting time before sending it, as the edge did
        self.round_timeout_s = round_timeout_s
        self.tag = tag or uuid.uuid4().hex[:6]
        self.client = make_client(broker, client_id=f"fleet-replay-{self.tag}-{uuid.uuid4().hex[:6]}")
        self._lock = threading.Lock()
        self._by_sid: dict[str, _Slot] = {}
        self._slots: list[_Slot] = []
        self._subscribed: set[str] = set()
        self._stop_at = self._limit = float("inf")
        self._min_rounds = 0
        self._once = False
        self._all_done = threading.Event()
        self._due: list[tuple[float, int, str]] = []  # paced sends: (when, tie-break, sid)
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self.rounds: list[RoundRecord] = []
        self.generations: list[GenerationRecord] = []
        self.stray = 0  # answers for sessions no longer replayed (late, after a timeout)
        self.opens_refused = 0  # opens answered `overloaded` (retried after OPEN_RETRY_S)

    def connect(self) -> None:
        self.client.connect()
        threading.Thread(target=self._pacer, name="fleet-pacer", daemon=True).start()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._wake.notify_all()
        self.client.close()

    def _pacer(self) -> None:
        """Sends delayed requests when they are due: paced drafts, opens retried after `overloaded`."""
        with self._lock:
            while not self._closed:
                now = time.perf_counter()
                while self._due and self._due[0][0] <= now:
                    _, _, sid = heapq.heappop(self._due)
                    slot = self._by_sid.get(sid)
                    if slot is not None and slot.gen is not None and slot.rec is not None:
                        if slot.step < 0:  # an open the worker refused as overloaded: again
                            self._send(
                                slot,
                                topics.open_topic(slot.device),
                                with_sid(slot.rec.open, sid),
                                response=True,
                            )
                        else:
                            self._send_step(slot)
                self._wake.wait(min(0.05, self._due[0][0] - now) if self._due else 0.05)

    def _subscribe_device(self, device: str) -> None:
        if device not in self._subscribed:
            self.client.subscribe(
                f"{topics.PREFIX}/{topics.check_device(device)}/+/down", handler=self._on_reply
            )
            self._subscribed.add(device)

    # -- running -----------------------------------------------------------------------------------

    def run(
        self,
        plan: list[tuple[str, list[Recording]]],
        *,
        duration_s: float | None = None,
        drain_s: float = 600.0,
        min_rounds: int = 0,
    ) -> tuple[float, float]:
        """Run one slot per (device, recordings) of ``plan``; returns (t_start, t_stop) of the window.

        With ``duration_s`` each slot cycles through its recordings until the window closes, then
        finishes its request in flight and closes its session; without it each slot replays its
        list once. Waits at most ``drain_s`` after the window for the last answers. ``min_rounds``
        extends the window (up to 10 × ``duration_s``) until every slot has had that many answers,
        so a cell whose rounds are long compared with the window is still measured."""
        for device, _ in plan:
            self._subscribe_device(device)
        self.rounds, self.generations, self.stray, self.opens_refused = [], [], 0, 0
        self._all_done.clear()
        self._once = duration_s is None
        t0 = time.perf_counter()
        self._stop_at = t0 + duration_s if duration_s is not None else float("inf")
        self._limit = t0 + 10 * duration_s if duration_s is not None else float("inf")
        self._min_rounds = min_rounds
        with self._lock:
            self._slots = [_Slot(i, dev, recs, itertools.cycle(recs)) for i, (dev, recs) in enumerate(plan)]
            self._by_sid.clear()
            for slot in self._slots:
                self._start_generation(slot)
        while not self._all_done.is_set():
            now = time.perf_counter()
            if duration_s is None and now > t0 + drain_s:
                break
            if duration_s is not None and now > self._stop_at + drain_s:
                break
            self._all_done.wait(0.2)
            self._check_timeouts()
        t_stop = min(self._stop_at, time.perf_counter())
        with self._lock:
            for slot in self._slots:
                if not slot.done:  # drain deadline passed: give up on it
                    self._end_generation(slot, error="no answer before the drain deadline")
                    slot.done = True
        return t0, t_stop

    def _window_open(self) -> bool:
        """(Under the lock.) Whether slots may still send; extends the window for ``min_rounds``."""
        now = time.perf_counter()
        if now < self._stop_at:
            return True
        if self._min_rounds and now < self._limit and any(s.answers < self._min_rounds for s in self._slots):
            self._stop_at = now + 0.5
            return True
        return False

    def _check_timeouts(self) -> None:
        now = time.perf_counter()
        with self._lock:
            for slot in self._slots:
                if not slot.done and slot.gen is not None and now - slot.t_send > self.round_timeout_s:
                    self._end_generation(slot, error=f"no answer within {self.round_timeout_s:.0f} s")
                    self._next(slot)

    def _start_generation(self, slot: _Slot) -> None:
        """(Under the lock.) Open the slot's next recording under a new sid."""
        if (self._once and slot.started >= len(slot.recordings)) or not self._window_open():
            slot.done = True
            if all(s.done for s in self._slots):
                self._all_done.set()
            return
        rec = next(slot.cycle)
        slot.started += 1
        sid = f"{self.tag}-s{slot.index}-g{slot.started}-{uuid.uuid4().hex[:6]}"
        slot.rec, slot.step, slot.parts = rec, -1, []
        slot.gen = GenerationRecord(slot.index, slot.device, rec.prompt, sid, time.perf_counter())
        self.generations.append(slot.gen)
        self._by_sid[sid] = slot
        self._send(slot, topics.open_topic(slot.device), with_sid(rec.open, sid), response=True)

    def _send(self, slot: _Slot, topic: str, msg, *, response: bool = False) -> None:
        payload = encode(msg)
        slot.t_send = time.perf_counter()
        down = topics.down_topic(slot.device, msg.sid)
        try:
            self.client.publish(topic, payload, response_topic=down if response else None,
                                correlation_data=f"{msg.sid}:{getattr(msg, 'seq', 'open')}".encode())  # fmt: skip
        except Exception as exc:  # broker gone: this generation fails, the run goes on
            self._end_generation(slot, error=f"publish failed: {exc}")

    def _send_step(self, slot: _Slot) -> None:
        assert slot.rec is not None and slot.gen is not None
        msg = with_sid(slot.rec.steps[slot.step].msg, slot.gen.sid)
        slot.parts, slot.part_ms = [], 0.0
        self._send(slot, topics.up_topic(slot.device, slot.gen.sid), msg, response=True)

    def _end_generation(
        self, slot: _Slot, *, error: str | None = None, mismatch: str | None = None, cut: bool = False
    ) -> None:
        gen = slot.gen
        if gen is None:
            return
        gen.t_end = time.perf_counter()
        gen.error, gen.mismatch, gen.cut = error, mismatch, cut
        gen.complete = error is None and mismatch is None and not cut
        self._by_sid.pop(gen.sid, None)
        slot.gen = None
        with contextlib.suppress(Exception):  # best effort, as the edge does
            self.client.publish(
                topics.up_topic(slot.device, gen.sid), encode(Close(sid=gen.sid, epoch=slot.epoch))
            )

    def _next(self, slot: _Slot) -> None:
        if not slot.done:
            self._start_generation(slot)

    # -- answers (network thread) ------------------------------------------------------------------

    def _on_reply(self, msg: Incoming) -> None:
        t = msg.received_at
        try:
            reply = decode(msg.payload)
        except ProtocolError:
            return
        with self._lock:
            slot = self._by_sid.get(reply.sid)
            if slot is None or slot.gen is None or slot.rec is None:
                self.stray += 1
                return
            self._handle(slot, reply, t)

    def _handle(self, slot: _Slot, reply, t: float) -> None:
        rec, gen = slot.rec, slot.gen
        assert rec is not None and gen is not None
        if isinstance(reply, Error) and reply.code == "overloaded" and slot.step < 0:
            # The worker's per-device open rate (or session quota) refused it: retry as an edge
            # would, after a pause, instead of failing at once into a hot loop of refused opens.
            self.opens_refused += 1
            self._send_later(slot, OPEN_RETRY_S)
            return
        if isinstance(reply, Error):
            self.rounds.append(RoundRecord(slot.index, slot.device, "open" if slot.step < 0 else "step",
                                           slot.t_send, t, 0, False))  # fmt: skip
            self._end_generation(slot, error=f"{reply.code}: {reply.detail[:200]}")
            self._next(slot)
            return
        if slot.step < 0:
            if not isinstance(reply, Opened):
                return
            self.rounds.append(RoundRecord(slot.index, slot.device, "open", slot.t_send, t, 0, True))
            return self._advance(slot)
        self._answer(slot, reply, t)

    def _answer(self, slot: _Slot, reply, t: float) -> None:
        """(Under the lock.) A verdict or decode part for the request in flight: check it against
        the recording, then go on."""
        rec, gen = slot.rec, slot.gen
        assert rec is not None and gen is not None
        step = rec.steps[slot.step]
        if isinstance(reply, Verdict) and reply.seq == step.msg.seq:
            got = (reply.n_acc, reply.next, int(reply.eos))
            kind = "draft"
        elif isinstance(reply, Tokens) and reply.seq == step.msg.seq:
            slot.parts.extend(reply.tok)
            slot.part_ms += reply.verify_ms
            if not reply.done:
                return
            got, kind = tuple(slot.parts), "decode"
        else:
            return
        match = got == tuple(step.expect)
        verify_ms = reply.verify_ms if kind == "draft" else slot.part_ms
        self.rounds.append(RoundRecord(slot.index, slot.device, kind, slot.t_send, t, step.committed, match,
                                       getattr(reply, "batch", None), getattr(reply, "batch_pos", None),
                                       verify_ms, reply.queue_ms,
                                       len(step.msg.tok) if kind == "draft" else 0))  # fmt: skip
        gen.tokens += step.committed
        slot.answers += 1
        if not match:
            self._end_generation(
                slot,
                mismatch=f"step {slot.step} ({kind}): got {got!r:.120}, recorded {tuple(step.expect)!r:.120}",
            )
            return self._next(slot)
        self._advance(slot)

    def _advance(self, slot: _Slot) -> None:
        """Send the next recorded request, or end the generation and begin the next one."""
        assert slot.rec is not None
        slot.step += 1
        if slot.step < len(slot.rec.steps) and self._window_open():
            think = slot.rec.steps[slot.step].draft_ms / 1e3 if self.pace else 0.0
            if think <= 0:
                self._send_step(slot)
                return
            self._send_later(slot, think)
            return
        finished = slot.step >= len(slot.rec.steps)
        self._end_generation(slot, cut=not finished)
        self._next(slot)

    def _send_later(self, slot: _Slot, delay_s: float) -> None:
        """(Under the lock.) Have the pacer send the slot's request in ``delay_s``: its open again
        (step < 0), else its current step. No deadline runs meanwhile (``t_send`` is the send)."""
        assert slot.gen is not None
        slot.t_send = time.perf_counter() + delay_s
        heapq.heappush(self._due, (slot.t_send, id(slot) + slot.step, slot.gen.sid))
        self._wake.notify()


def plan_slots(
    n: int, recordings: list[Recording], *, device_prefix: str
) -> list[tuple[str, list[Recording]]]:
    """``n`` slots, each on its own device, each cycling through ``recordings`` from its own start
    (slot i starts at recording i mod P, so N > P reuses prompts evenly)."""
    p = len(recordings)
    return [(f"{device_prefix}{i:02d}", [recordings[(i + k) % p] for k in range(p)]) for i in range(n)]


def only(recordings: list[Recording], mode: str = SPECULATIVE) -> list[Recording]:
    return [r for r in recordings if r.mode == mode]
