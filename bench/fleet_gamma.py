"""Adaptive γ under load: the fleet benchmark with γ chosen each round (issue 13, BENCHMARKS §6.1).

A recording (``bench.fleet_record``) fixes every block, so a fleet replayed from it cannot show a
γ controller reacting to the worker's load. At T = 0 it does not have to: whatever γ a session
picks, its committed tokens are the target's greedy continuation of the prompt, and the block it
proposes at position p is the draft's greedy continuation of prompt + target[:p]. So one pass per
prompt records a :class:`ChainRecording`: the target's tokens (one cloud-only generation through
the worker) and, at every position, the draft's greedy chain of ``gamma_max`` tokens with the
draft's confidence at each (a real draft model, on this machine). Any γ schedule can then be
replayed, and the worker's verdict for every block is known in advance (``n_acc``: how far the
chain agrees with the target; ``next``: the target's token there), so exactness under batching is
checked as with the recordings.

Each replayed session runs the edge's own :class:`edge_agent.gamma.GammaController`, fed what a
real edge measures: its drafting time, the round trip, the worker's verify and queue time and
batch positions, the draft confidences (early stop included). A fixed γ is the same controller
pinned (``fixed=γ``), so auto and the fixed sweep differ only in the choice of γ. A new session
in a slot starts from the slot's last controller (``successor``), as an edge does on one link.

The edges' drafting is emulated: each block waits γ·d before it is sent, d being the draft's cost
per token measured while the chains were drafted (sequential drafting, as the recordings are made;
no drafting ahead during the verify). The replay itself runs no model.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from bench.fleet_record import CLOUD, SPECULATIVE, record_one
from bench.fleet_replay import Replayer, RoundRecord, _Slot
from edge_agent.gamma import (
    GAMMA_AUTO,
    GammaController,
    GammaDecision,
    GammaPriors,
    Observation,
    RoundCost,
    stop_point,
)
from shared import topics
from shared.protocol import Draft, Open, Verdict, decode, encode

AUTO_SOLO = "auto-solo"  # a γ of the sweep: auto, blind to the worker's fleet row (GammaReplayer)


@dataclass(frozen=True)
class ChainRecording:
    """Everything a T = 0 speculative session of any γ schedule sends and gets, for one prompt.

    ``target[i]`` is the target's greedy token i after the prompt (``max_new`` + 1 of them, fewer
    when it ends in an end-of-sequence token); ``chains[p]`` the draft's greedy block after
    prompt + target[:p], ``conf[p]`` the draft's top probability at each of its tokens."""

    prompt: int
    open: Open  # speculative, greedy, max_new
    target: tuple[int, ...]
    chains: tuple[tuple[int, ...], ...]
    conf: tuple[tuple[float, ...], ...]
    draft_ms: float  # the draft's cost per token, median over the forwards that drafted the chains
    eos_ids: frozenset[int]
    mode: str = SPECULATIVE

    @property
    def max_new(self) -> int:
        return self.open.max_new

    def positions(self) -> int:
        """Committed tokens a generation ends with: ``max_new``, or up to the end-of-sequence token."""
        return min(self.max_new, len(self.target))

    def expect(self, p: int, block: tuple[int, ...]) -> tuple[int, int | None, int]:
        """The verdict (n_acc, next, eos) the target gives ``block`` proposed at position ``p``.
        ``next`` is None where it lies past the recorded end-of-sequence token (every draft
        accepted, the last one that token): unknown, and not checked."""
        n = 0
        while n < len(block) and p + n < len(self.target) and block[n] == self.target[p + n]:
            n += 1
        nxt = self.target[p + n] if p + n < len(self.target) else None
        new = (*block[:n], *(() if nxt is None else (nxt,)))
        return n, nxt, int(any(t in self.eos_ids for t in new))

    def as_json(self) -> dict:
        return {"prompt": self.prompt, "open": encode(self.open).hex(), "target": list(self.target),
                "chains": [list(c) for c in self.chains], "conf": [[round(x, 5) for x in c] for c in self.conf],
                "draft_ms": self.draft_ms, "eos_ids": sorted(self.eos_ids)}  # fmt: skip

    @classmethod
    def from_json(cls, d: dict) -> ChainRecording:
        return cls(d["prompt"], decode(bytes.fromhex(d["open"])), tuple(d["target"]),
                   tuple(tuple(c) for c in d["chains"]), tuple(tuple(c) for c in d["conf"]),
                   d["draft_ms"], frozenset(d["eos_ids"]))  # fmt: skip


def record_chain(drafter, link, prompt_index: int, prompt_ids: list[int], opts, *, eos_ids, gamma_max: int):
    """One :class:`ChainRecording`: the target's greedy tokens through ``link`` (a cloud-only
    generation of ``opts.max_new_tokens`` + 1 tokens), then the draft's chain at every position."""
    from shared.sampling import SamplingParams

    if not opts.params.greedy:
        raise ValueError("chain recordings need T = 0: at T > 0 the committed tokens depend on γ")
    longer = dataclasses.replace(opts, mode="cloud-only", max_new_tokens=opts.max_new_tokens + 1)
    cloud = record_one(drafter, link, prompt_index, prompt_ids, longer, eos_ids=eos_ids)
    assert cloud.mode == CLOUD
    target = cloud.tokens
    opened = dataclasses.replace(cloud.open, mode="speculative", max_new=opts.max_new_tokens)
    drafter.reset(list(prompt_ids), SamplingParams(temperature=0.0, seed=opts.params.seed))
    chains, conf, per_token = [], [], []
    # a chain wherever a block may be proposed: at p = max_new - 1 at the latest, or at the
    # end-of-sequence token's own position when the target ends sooner (len(target) <= max_new)
    for p in range(min(opts.max_new_tokens, len(target))):
        block = drafter.propose(gamma_max)
        chains.append(block.tokens)
        conf.append(tuple(round(c, 5) for c in block.confidence))
        if block.tokens and len(block.tokens) > block.prefetched:
            per_token.append(block.draft_ms / (len(block.tokens) - block.prefetched))
        drafter.commit([target[p]])
    return ChainRecording(
        prompt_index, opened, tuple(target), tuple(chains), tuple(conf),
        round(statistics.median(per_token), 3) if per_token else 0.0, frozenset(eos_ids),
    )  # fmt: skip


def record_chains(link, args, draft_spec: str, target_spec: str) -> tuple[list, list]:
    """The γ sweep's chain recordings, drafted with the draft backend the
    edge would use (``--draft-backend``, first value), and the prompts."""
    from bench.cli import load_prompts
    from edge_agent.drafter import load_draft, make_drafter
    from edge_agent.speculative import GenerateOptions
    from shared.sampling import SamplingParams

    draft = load_draft(draft_spec, backend=args.draft_backend[0], threads=1, target=target_spec)
    prompts = load_prompts(args.prompts_file, args.num_prompts, draft.tokenizer)
    drafter = make_drafter(draft)
    chains = []
    for p in prompts:
        opts = GenerateOptions(mode="speculative", gamma=2, max_new_tokens=args.max_new_tokens,
                               params=SamplingParams(temperature=0.0, seed=args.seed + p.index),
                               draft_model=draft_spec, target_model=target_spec)  # fmt: skip
        chains.append(record_chain(drafter, link, p.index, list(p.ids), opts, eos_ids=draft.eos_token_ids,
                                   gamma_max=GammaPriors().gamma_max))  # fmt: skip
    return chains, prompts


class Prediction(NamedTuple):
    """One round of a :class:`GammaReplayer`: what the controller predicted and what happened."""

    t_reply: float  # when the verdict came (perf_counter seconds)
    tokens: float  # predicted committed tokens
    round_ms: float  # predicted round time (drafting + the verify call)
    committed: int  # accepted + 1
    actual_ms: float  # the emulated drafting + the verify call's wall time
    cost: RoundCost | None  # round_ms term by term, as the controller priced it
    measured: RoundCost  # actual_ms term by term: drafting, the rest of the round trip
    # (link − queue − verify), 0, the worker's queue and verify times, the forward's positions


@dataclass
class _Session:
    """A slot's γ controller and the progress of its generation in flight."""

    ctrl: GammaController
    p: int = 0  # committed tokens of this generation
    seq: int = 0
    eos: bool = False
    block: tuple[int, ...] = ()
    conf: tuple[float, ...] = ()
    think_ms: float = 0.0
    decision: GammaDecision | None = None


class GammaReplayer(Replayer):
    """Replays :class:`ChainRecording` sessions, each choosing γ with its own controller.

    ``gamma``: ``"auto"``, ``"auto-solo"`` (auto without the worker's ``row_med``: each session
    on its own, as before the fleet row) or a fixed int; ``draft_ms``: the emulated drafting cost per token
    (None: each recording's measured one). Rounds are recorded with the γ sent (``gamma``), and
    each answered round's :class:`Prediction` in ``predictions``."""

    def __init__(self, broker, *, gamma: int | str, draft_ms: float | None = None,
                 priors: GammaPriors | None = None, **kw) -> None:  # fmt: skip
        super().__init__(broker, **kw)
        self.fixed = None if gamma in (GAMMA_AUTO, AUTO_SOLO) else int(gamma)
        self.solo = gamma == AUTO_SOLO
        self.draft_ms = draft_ms
        self.priors = priors
        self.predictions: list[Prediction] = []
        self.reasons: list[tuple[float, int, str]] = []  # (when, slot, the controller's reason)

    def run(self, plan, **kw):
        self.predictions, self.reasons = [], []
        return super().run(plan, **kw)

    def _session(self, slot: _Slot) -> _Session:
        old: _Session | None = slot.state
        ctrl = old.ctrl.successor(fixed=self.fixed) if old else GammaController(self.priors, fixed=self.fixed)
        slot.state = _Session(ctrl)
        return slot.state

    def _advance(self, slot: _Slot) -> None:
        """Choose the next block and send it after its drafting time, or end the generation."""
        rec = slot.rec
        assert isinstance(rec, ChainRecording) and slot.gen is not None
        st = self._session(slot) if slot.step < 0 else slot.state
        slot.step += 1
        finished = st.eos or st.p >= rec.positions()
        if finished or not self._window_open():
            self._end_generation(slot, cut=not finished)
            self._next(slot)
            return
        choice = st.ctrl.decide(ready=0, remaining=rec.max_new - st.p)
        self.reasons.append((time.perf_counter(), slot.index, choice.reason))
        chain, conf = rec.chains[st.p], rec.conf[st.p]
        gamma = max(1, min(choice.gamma, len(chain), len(rec.target) - 1 - st.p))
        gamma = stop_point(conf, choice.stop_below, gamma) or gamma
        draft_ms = rec.draft_ms if self.draft_ms is None else self.draft_ms
        st.block, st.conf, st.decision = chain[:gamma], conf[:gamma], st.ctrl.revise(choice, gamma)
        st.think_ms = gamma * draft_ms
        self._send_later(slot, st.think_ms / 1e3)  # the edge drafts meanwhile

    def _send_step(self, slot: _Slot) -> None:
        rec, st, gen = slot.rec, slot.state, slot.gen
        assert isinstance(rec, ChainRecording) and gen is not None
        msg = Draft(sid=gen.sid, epoch=rec.open.epoch, seq=st.seq, pos=len(rec.open.ctx) + st.p, tok=st.block)
        slot.parts, slot.part_ms = [], 0.0
        self._send(slot, topics.up_topic(slot.device, gen.sid), msg, response=True)

    def _answer(self, slot: _Slot, reply, t: float) -> None:
        rec, st, gen = slot.rec, slot.state, slot.gen
        assert isinstance(rec, ChainRecording) and gen is not None
        if not (isinstance(reply, Verdict) and reply.seq == st.seq):
            return
        expect = rec.expect(st.p, st.block)
        got = (reply.n_acc, reply.next if expect[1] is not None else None, int(reply.eos))
        committed = min(reply.n_acc + 1, rec.max_new - st.p)
        link_ms = (t - slot.t_send) * 1e3
        self.rounds.append(RoundRecord(slot.index, slot.device, "draft", slot.t_send, t, committed, got == expect,
                                       reply.batch, reply.batch_pos, reply.verify_ms, reply.queue_ms,
                                       len(st.block)))  # fmt: skip
        gen.tokens += committed
        slot.answers += 1
        if got != expect:
            self._end_generation(
                slot, mismatch=f"position {st.p} (γ {len(st.block)}): got {got}, expected {expect}"
            )
            self._next(slot)
            return
        d = st.decision
        assert d is not None
        own = len(st.block) + 1
        measured = RoundCost(st.think_ms, link_ms - reply.queue_ms - reply.verify_ms, 0.0, reply.queue_ms,
                             reply.verify_ms, reply.batch_pos if reply.batch_pos is not None else own)  # fmt: skip
        self.predictions.append(
            Prediction(t, d.tokens, d.round_ms, reply.n_acc + 1, st.think_ms + link_ms, d.cost, measured)
        )
        st.ctrl.observe(
            Observation(
                gamma=len(st.block), n_acc=reply.n_acc, draft_ms=st.think_ms, drafted=len(st.block),
                link_ms=link_ms, verify_ms=reply.verify_ms, queue_ms=reply.queue_ms,
                batch_pos=reply.batch_pos, batch=reply.batch, confidence=st.conf, pos_ms=reply.pos_ms,
                row_med=None if self.solo else reply.row_med,
            )
        )  # fmt: skip
        st.p += reply.n_acc + 1
        st.seq += 1
        st.eos = bool(reply.eos)
        self._advance(slot)


def gamma_figures(replayer: GammaReplayer, t0: float, t1: float) -> dict:
    """What the γ choice did in a cell: mean γ sent, and the controller's predicted ÷ actual
    committed tokens and round time (rounds answered inside the window). Predictions count from
    a slot's first measured round on: before it the controller knows no verify cost (the first
    session of a slot starts from its priors) and prices the round at its drafting alone, which
    says nothing about the model (``priced``: the rounds counted, of ``predicted``)."""
    inside = [r for r in replayer.rounds if r.kind == "draft" and t0 <= r.t_reply <= t1]
    window = [x for x in replayer.predictions if t0 <= x.t_reply <= t1]
    pred = [x for x in window if x.cost is None or x.cost.verify > 0]
    pred_tok, act_tok = sum(x.tokens for x in pred), sum(x.committed for x in pred)
    pred_ms, act_ms = sum(x.round_ms for x in pred), sum(x.actual_ms for x in pred)
    last = {slot: reason for t, slot, reason in replayer.reasons if t0 <= t <= t1}
    return {
        "gamma_mean": round(statistics.fmean(r.gamma for r in inside), 2) if inside else None,
        "gamma_sent": dict(sorted(Counter(r.gamma for r in inside).items())),  # γ sent -> rounds
        "last_reasons": [last[slot] for slot in sorted(last)],  # each slot's last choice in the window
        "pred_tokens_ratio": round(pred_tok / act_tok, 3) if act_tok else None,
        "pred_round_ratio": round(pred_ms / act_ms, 3) if act_ms else None,
        "round_terms": round_terms(pred),
        "priced": len(pred),
        "predicted": len(window),
    }


TERMS = ("draft", "net", "overhang", "queue", "verify", "positions")


def round_terms(pred: list[Prediction]) -> dict[str, list[float]]:
    """Per term of the round (:class:`RoundCost`), the mean the controller predicted and the mean
    measured, over rounds the controller priced term by term: where the predicted round time goes wrong."""
    both = [x for x in pred if x.cost is not None]
    if not both:
        return {}
    return {
        name: [round(statistics.fmean(getattr(x.cost, name) for x in both), 2),
               round(statistics.fmean(getattr(x.measured, name) for x in both), 2)]
        for name in TERMS
    }  # fmt: skip


GAMMA_MODE = "speculative γ="  # a fleet cell's mode name for the adaptive sweep: this + the γ


def gamma_mode(gamma: int | str) -> str:
    """The fleet cell's mode name for a γ of the adaptive sweep."""
    return f"{GAMMA_MODE}{gamma}"


def save_chains(path: Path, recs: list[ChainRecording]) -> None:
    import json

    path.write_text(json.dumps([r.as_json() for r in recs]))


def load_chains(path: Path) -> list[ChainRecording]:
    import json

    return [ChainRecording.from_json(d) for d in json.loads(path.read_text())]
