"""Adaptive draft length: a per-session γ controller (issue 13).

Each round the loop asks :meth:`GammaController.decide` for γ and afterwards tells it what
happened (:meth:`GammaController.observe`). The controller picks the γ that maximizes the
expected committed tokens per second of the coming round,

    rate(γ) = E[tokens | γ] / T(γ),
    E[tokens | γ] = (1 − α^(γ+1)) / (1 − α)          (accepted drafts + the correction/bonus),
    T(γ) = d · max(0, γ − ready) + net + Q(γ) + overhang + V(P(γ + 1)),

from figures it measures live, each an exponentially forgetting average (weight ``forget`` per
round, so it follows a changing prompt, network or worker load within a few rounds):

- α: the session's per-token acceptance, a Beta posterior over judged positions (accepted ones
  are successes, the first rejected one a failure) around the prior ``alpha``, holding at most
  ``alpha_window`` positions of evidence so that a change of prompt shows within a few rounds;
- d: the draft's cost per token on this device (``draft_ms`` / tokens drafted in ``propose``);
- ready: drafts already made ahead while the previous block was verified (pipelining), which
  cost nothing now;
- net: the round trip that is neither verify nor queue (``link_ms − verify_ms − queue_ms``);
- Q(γ): the worker's queue time. From a worker that does not say its batch, a mean. From one
  that does (the verdict's ``batch``; one session alone is a batch of 1, whose wait is small)
  a block mostly waits for the forward in flight to end, so the wait is priced as a share of
  the verify cost, Q = s · V(P(γ + 1)), s the session's mean queue ÷ its mean verify time:
  in a fleet of sessions like this one, longer blocks make every forward, and so every wait,
  longer (measured before: a constant wait made the model's round 13–18 % short at 4–8
  sessions, docs/BENCHMARKS.md §6.3);
- overhang: with pipelining, a draft-ahead forward still running when the verdict came;
- V(P): the verify cost of a forward over P positions, as a table: a CPU's cost is a step
  function of P, a GPU's nearly flat; a P not measured recently is read off its neighbours,
  optimistically (see :meth:`GammaController.verify_ms`), so it gets tried. In forwards shared
  with other sessions, where each P is seen rarely, a line fitted to the forwards' positions and
  verify times instead; from a worker that says what one more position costs it (the verdict's
  ``pos_ms``), the line through this session's mean shared forward at that slope (its own line
  takes each row's cost for the positions', docs/BENCHMARKS.md §6.9);
- P(own): the positions of the forward this round's ``own`` positions would be verified in. Alone,
  P = own. In a forward shared by n sessions (the verdict's optional ``batch`` field), the block
  is priced at its fair share, P = n · own: the forward as it would be if every session in it
  sent as many positions. A session that read the others' positions as given (P = others + own)
  would see a long block add little to a long forward, and every session of a busy worker would
  lengthen its blocks together (measured: mean γ 9 at 8 sessions, 0.71× the best fixed γ,
  docs/BENCHMARKS.md §6.3), though the positions it adds cost the worker what anyone's do.
  Without ``batch`` (a worker that does not say): P = others + own, others from ``batch_pos``.

In step with the fleet: in forwards shared with other sessions, a block is at most one position
longer than the fleet's median row (the verdict's ``row_med``, from a worker that pads its
forwards: the median of the latest draft rows of the devices it verified lately, one vote a
device). The fair share above prices a move the sessions make together; a session that goes
alone past the others makes every session of its forward wait for it (the padded forward is as
wide as its widest row, and it starts when the slowest draft arrives, or the late block waits a
forward), and its extra tokens are its own while the wait is everyone's. Under the cap the fleet
still moves: a session may go one position past the median, and the median follows the
sessions' choices (docs/BENCHMARKS.md §6.10).

Early stop: the controller also learns how often a draft of a given confidence (the draft's
top probability) is accepted, and gives the drafter per-position thresholds below which ending
the block there beats going on (:meth:`GammaController._stop_thresholds`). A new session on the
same link and draft model starts from the last one's figures (:meth:`GammaController.successor`).

Pure: no clocks, no I/O; every figure comes in through :class:`Observation`. Exactness does
not depend on it: γ only changes how many tokens are proposed.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

GAMMA_AUTO = "auto"
CONF_EDGES = (0.0, 0.3, 0.5, 0.7, 0.85, 0.95)  # lower edges of the draft-confidence bins
NEVER = 2.0  # a confidence threshold no draft reaches: always stop there
REEXPLORE = 64  # rounds after which a verify time measured once is doubted (and may be re-tried)
CALIBRATIONS_KEPT = 8  # confidence calibrations a controller hands on, one per way of drawing


@dataclass(frozen=True, slots=True)
class GammaPriors:
    """Starting beliefs and tuning of the controller; the defaults suit CPU and GPU targets."""

    gamma: int = 4  # the first round's γ, before anything was measured
    gamma_max: int = 16
    alpha: float = 0.7  # prior per-token acceptance
    alpha_weight: float = 2.0  # worth of the prior, in judged positions
    alpha_window: float = 24.0  # most judged positions of evidence kept (a long block must not swamp)
    slope: float = 0.1  # prior verify cost of one more position, as a share of one position's cost
    forget: float = 0.8  # weight kept by old evidence at each new round
    early_stop: bool = True  # end a block before a draft whose confidence says it will not pay
    conf_weight: float = 2.0  # worth of α̂ as the prior of each confidence bin, in positions
    conf_forget: float = 0.97  # per round, for the confidence bins (each sees few positions)
    verify_smoothing: float = 0.3  # weight of a new verify time in its position count's mean
    fit_forget: float = 0.95  # per round, for the line V(P) = a + b·P fitted to shared forwards

    def __post_init__(self) -> None:
        if not 1 <= self.gamma <= self.gamma_max <= 64:
            raise ValueError(f"need 1 <= gamma <= gamma_max <= 64, got {self.gamma}, {self.gamma_max}")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"prior alpha must be in (0, 1), got {self.alpha}")
        if not (0.0 < self.forget <= 1.0 and 0.0 < self.verify_smoothing <= 1.0):
            raise ValueError(
                f"forget, verify_smoothing must be in (0, 1], got {self.forget}, {self.verify_smoothing}"
            )


@dataclass(frozen=True, slots=True)
class Observation:
    """What one finished round measured."""

    gamma: int  # draft tokens proposed
    n_acc: int  # of them accepted
    draft_ms: float  # drafting time on the critical path (inside propose)
    drafted: int  # tokens drafted in that time (γ − those made ahead)
    link_ms: float  # wall time of the verify call
    verify_ms: float  # target forward + acceptance on the worker
    queue_ms: float  # waiting on the worker
    batch_pos: int | None = None  # positions of the whole batched forward, if the worker says
    batch: int | None = None  # sessions in that forward, if the worker says
    confidence: tuple[float, ...] = ()  # the draft's top probability at each proposed token
    overhang_ms: float = 0.0  # pipelined: a draft-ahead forward that outlived the verdict
    pos_ms: float | None = None  # the worker's cost of one more position in a forward, if it says
    row_med: int | None = None  # the fleet's median row (positions) at the worker, if it says


class RoundCost(NamedTuple):
    """The model's round time T(γ) term by term (ms), and the forward it prices the block in."""

    draft: float  # d · max(0, γ − ready)
    net: float
    overhang: float
    queue: float  # Q(γ)
    verify: float  # V(P(γ + 1))
    positions: int  # P(γ + 1)

    @property
    def total(self) -> float:
        return self.draft + self.net + self.overhang + self.queue + self.verify


@dataclass(frozen=True, slots=True)
class GammaDecision:
    """γ for the next round, the model's prediction for it, and why."""

    gamma: int
    tokens: float  # predicted committed tokens (accepted + 1)
    round_ms: float  # predicted round time: critical-path drafting + the verify call
    reason: str
    stop_below: tuple[float, ...] = ()  # per position: end the block before a draft less confident
    cost: RoundCost | None = None  # round_ms term by term

    @property
    def rate(self) -> float:
        """Predicted committed tokens per second."""
        return self.tokens / self.round_ms * 1e3 if self.round_ms > 0 else 0.0


def stop_point(confidence: Sequence[float], stop_below: Sequence[float], gamma: int) -> int | None:
    """Where an early stop ends a block of ``gamma`` drafts: the first i ≥ 1 whose draft's
    confidence is below ``stop_below[i]`` (None: the block is not cut). ``confidence`` may hold
    fewer than ``gamma`` entries (the drafts made so far); only those are looked at. Exact: it
    reads the draft's q at a position, never the token drawn from it."""
    n = min(gamma, len(confidence), len(stop_below))
    return next((i for i in range(1, n) if confidence[i] < stop_below[i]), None)


def expected_tokens(alpha: float, gamma: int) -> float:
    """E[committed tokens] of a round of γ drafts at per-token acceptance α: (1 − α^(γ+1)) / (1 − α)."""
    if alpha >= 1.0 - 1e-9:
        return float(gamma + 1)
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


class _Ewma:
    """A forgetting mean: each update keeps ``forget`` of the old evidence weight."""

    __slots__ = ("total", "weight")

    def __init__(self) -> None:
        self.total = 0.0
        self.weight = 0.0

    def add(self, value: float, forget: float) -> None:
        self.total = self.total * forget + value
        self.weight = self.weight * forget + 1.0

    def mean(self, default: float) -> float:
        return self.total / self.weight if self.weight > 1e-9 else default


class _Seen:
    """The verify time of one position count: a smoothed mean and the round it was last seen."""

    __slots__ = ("last", "mean")

    def __init__(self, mean: float, last: int) -> None:
        self.mean = mean
        self.last = last


class GammaController:
    """Picks each round's γ for one session; ``fixed`` pins it (then it only predicts)."""

    def __init__(
        self, priors: GammaPriors | None = None, *, fixed: int | None = None, draws: Hashable = None
    ) -> None:
        self.priors = priors or GammaPriors()
        self.draws = draws  # how the session draws (temperature, top-k, top-p): the calibration's key
        if fixed is not None and not 1 <= fixed <= 64:
            raise ValueError(f"fixed gamma must be in 1..64, got {fixed}")
        self.fixed = fixed
        self.rounds = 0
        self._acc = 0.0  # forgetting counts of accepted / rejected judged positions
        self._rej = 0.0
        self._draft = _Ewma()  # ms per drafted token
        self._net = _Ewma()
        self._queue = _Ewma()
        self._verified = _Ewma()  # verify_ms (the queue share is queue ÷ this)
        self._line = _LineFit()  # verify_ms against batch_pos, over forwards of a batching worker
        self._overhang = _Ewma()
        self._others = _Ewma()  # positions of other sessions in the same forward
        self._sessions = _Ewma()  # sessions in the forward (the verdict's `batch`), when known
        self._positions = _Ewma()  # positions of those forwards (`batch_pos`)
        self._pos_ms = _Ewma()  # the worker's cost of one more position (the verdict's `pos_ms`)
        self._row_med: int | None = None  # the fleet's median row, last said (the verdict's `row_med`)
        self._verify: dict[int, _Seen] = {}  # positions of a forward -> its verify_ms
        self._measured = False  # costs known (from a round of this session or an earlier one)
        self._conf = [[0.0, 0.0] for _ in CONF_EDGES]  # per confidence bin: [accepted, rejected]
        self._calibrations: dict[Hashable, list[list[float]]] = {}  # bins of other draws, newest last

    # ------------------------------------------------------------------ learning
    def observe(self, obs: Observation) -> None:
        """Fold one finished round into the estimates."""
        f = self.priors.forget
        self.rounds += 1
        self._measured = True
        judged = min(obs.n_acc + 1, obs.gamma)
        self._acc = self._acc * f + obs.n_acc
        self._rej = self._rej * f + (judged - obs.n_acc)
        held = self._acc + self._rej
        if held > self.priors.alpha_window:  # keep the newest evidence worth a window of positions
            self._acc *= self.priors.alpha_window / held
            self._rej *= self.priors.alpha_window / held
        for b in self._conf:
            b[0] *= self.priors.conf_forget
            b[1] *= self.priors.conf_forget
        for i, c in enumerate(obs.confidence[:judged]):
            self._conf[_bin(c)][0 if i < obs.n_acc else 1] += 1.0
        if obs.drafted > 0:
            self._draft.add(obs.draft_ms / obs.drafted, f)
        self._net.add(max(0.0, obs.link_ms - obs.verify_ms - obs.queue_ms), f)
        self._queue.add(obs.queue_ms, f)
        self._verified.add(obs.verify_ms, f)
        self._overhang.add(obs.overhang_ms, f)
        own = obs.gamma + 1  # the pending token + γ drafts
        positions = obs.batch_pos if obs.batch_pos is not None and obs.batch_pos >= own else own
        self._others.add(positions - own, f)
        if obs.batch is not None and obs.batch >= 1:
            self._sessions.add(float(obs.batch), f)
            if obs.batch_pos is not None:
                self._line.add(float(positions), obs.verify_ms, self.priors.fit_forget)
                self._positions.add(float(positions), f)
            if obs.pos_ms is not None:
                self._pos_ms.add(obs.pos_ms, f)
            if obs.row_med is not None:
                self._row_med = obs.row_med
        entry = self._verify.get(positions)
        if entry is None:
            self._verify[positions] = _Seen(obs.verify_ms, self.rounds)
        else:
            entry.mean += self.priors.verify_smoothing * (obs.verify_ms - entry.mean)
            entry.last = self.rounds

    @property
    def alpha(self) -> float:
        """Posterior mean of the per-token acceptance."""
        p = self.priors
        return (self._acc + p.alpha * p.alpha_weight) / (self._acc + self._rej + p.alpha_weight)

    def verify_ms(self, positions: int) -> float:
        """Predicted verify cost of a forward over ``positions`` positions (0 before any round).

        A count seen in the last ``REEXPLORE`` rounds gives its measured mean. Any other is read
        off its nearest neighbours: from the nearest count below along the prior shape
        V(P) ∝ 1 + ρ(P − 1), at most the nearest count above; with only counts above, in
        proportion to P. Optimistic on purpose: a γ not yet tried gets tried once and is then
        known (and tried again only when its figure is old, in case the worker got faster).

        In forwards shared by other sessions (a batching worker says ``batch``, on average 1.5 or
        more), the cost is read off a line fitted to the forwards' (positions, verify_ms), when
        their positions vary enough to fit one: each P of a busy worker is seen rarely, and the
        table's optimistic reading of the counts between made the round 17–20 % short at 4–8
        sessions (docs/BENCHMARKS.md §6.5). When the worker says ``pos_ms``, the line goes through
        the session's mean shared forward at that slope instead (:meth:`_anchor`, §6.9)."""
        if self._shared() and (anchor := self._anchor()) is not None:
            v, p, b = anchor
            return max(0.0, v + b * (positions - p))
        line = self._line.line() if self._shared() else None
        if line is not None:
            return max(0.0, line[0] + line[1] * positions)
        fresh = {k: e.mean for k, e in self._verify.items() if self.rounds - e.last <= REEXPLORE}
        if positions in fresh:
            return fresh[positions]
        near = fresh or {k: e.mean for k, e in self._verify.items()}
        if not near:
            return 0.0
        rho = self.priors.slope
        below = [k for k in near if k < positions]
        above = [k for k in near if k > positions]
        guess = math.inf
        if below:
            k = max(below)
            guess = near[k] * (1.0 + rho * (positions - 1)) / (1.0 + rho * (k - 1))
        if above:
            k = min(above)
            guess = min(guess, near[k]) if below else near[k] * positions / k
        old = self._verify.get(positions)
        return min(guess, old.mean) if old is not None else guess

    # ------------------------------------------------------------------ deciding
    def predict(self, gamma: int, *, ready: int = 0) -> tuple[float, float]:
        """(expected committed tokens, expected round ms) of a round of ``gamma`` drafts."""
        return expected_tokens(self.alpha, gamma), self.cost(gamma, ready=ready).total

    def cost(self, gamma: int, *, ready: int = 0) -> RoundCost:
        """The expected round time of ``gamma`` drafts, term by term."""
        queue, verify, positions = self._wait_and_verify(gamma + 1)
        draft = self._draft.mean(0.0) * max(0, gamma - ready)
        return RoundCost(draft, self._net.mean(0.0), self._overhang.mean(0.0), queue, verify, positions)

    def wait_and_verify_ms(self, own: int) -> float:
        """Q + V: the worker's queue wait and verify cost of a block of ``own`` positions (see the
        module docstring): when the worker says its batch, the wait is a share of the verify cost."""
        queue, verify, _ = self._wait_and_verify(own)
        return queue + verify

    def _wait_and_verify(self, own: int) -> tuple[float, float, int]:
        positions = self.forward_positions(own)
        v = self.verify_ms(positions)
        if self._sessions.weight > 0:
            return v * self.queue_share, v, positions
        return self._queue.mean(0.0), v, positions

    @property
    def queue_share(self) -> float:
        """s: the worker's queue wait as a share of its verify cost, mean queue ÷ mean verify
        (a ratio of means: the mean of per-round ratios underweights the long forwards, where
        the waits are long too, and left the wait 20–28 % short at 4–8 sessions, §6.5)."""
        return self._queue.mean(0.0) / max(self._verified.mean(0.0), 1e-9)

    def _anchor(self) -> tuple[float, float, float] | None:
        """(V̄, P̄, b): the mean verify time and positions of the shared forwards this session
        rode in, and the worker's own cost of one more position (``pos_ms``), when it says."""
        if self._pos_ms.weight <= 0 or self._positions.weight <= 0:
            return None
        return self._verified.mean(0.0), self._positions.mean(0.0), self._pos_ms.mean(0.0)

    def _shared(self) -> bool:
        return self._sessions.weight > 0 and self._sessions.mean(1.0) >= 1.5

    def revise(self, choice: GammaDecision, gamma: int, *, ready: int = 0) -> GammaDecision:
        """``choice`` re-predicted for the block actually sent, when an early stop (or the
        drafts left) made it ``gamma`` long instead: what the round is then expected to give."""
        if gamma == choice.gamma:
            return choice
        return self._decision(gamma, ready, f"{choice.reason} cut γ={gamma}", choice.stop_below)

    def forward_positions(self, own: int) -> int:
        """P(own): the positions a forward holding ``own`` of this session's is priced at (see the
        module docstring): ``own`` alone, n · own in a forward of n sessions, else others + own."""
        if self._sessions.weight > 0:
            return max(own, round(self._sessions.mean(1.0) * own))
        return round(self._others.mean(0.0)) + own

    def in_step(self) -> int | None:
        """The longest γ that keeps a block in step with the fleet (module docstring): one position
        past the fleet's median row, γ + 1 ≤ row_med + 1, while this session shares forwards;
        None when it does not or the worker does not say."""
        if self._row_med is None or not self._shared():
            return None
        return max(1, self._row_med)

    def decide(self, *, ready: int = 0, remaining: int | None = None) -> GammaDecision:
        """γ for the next round. ``ready``: drafts already made ahead (free now); ``remaining``:
        tokens the generation still wants (a round yields at most γ + 1, so γ ≤ remaining − 1)."""
        if self.fixed is not None:
            return self._decision(self.fixed, ready, "fixed")
        cap = self.priors.gamma_max
        if remaining is not None:
            cap = max(1, min(cap, remaining - 1))
        if (step := self.in_step()) is not None:
            cap = min(cap, step)
        if not self._measured:
            g = min(self.priors.gamma, cap)
            return self._decision(g, ready, f"prior γ={self.priors.gamma} α={self.priors.alpha:.2f}")
        best = max(range(1, cap + 1), key=lambda g: _rate(*self.predict(g, ready=ready)))
        stops = self._stop_thresholds(best, ready) if self.priors.early_stop else ()
        return self._decision(best, ready, self._reason(best, ready, cap, stops), stops)

    def _decision(self, gamma: int, ready: int, reason: str, stops: tuple[float, ...] = ()) -> GammaDecision:
        cost = self.cost(gamma, ready=ready)
        return GammaDecision(gamma, expected_tokens(self.alpha, gamma), cost.total, reason, stops, cost)

    def accept_prob(self, confidence: float) -> float:
        """Calibrated chance that a draft of this confidence is accepted (its bin, around α̂)."""
        acc, rej = self._conf[_bin(confidence)]
        w = self.priors.conf_weight
        return (acc + w * self.alpha) / (acc + rej + w)

    def _stop_thresholds(self, gamma: int, ready: int) -> tuple[float, ...]:
        """Per position i ≥ 1: the confidence below which ending the block before draft i beats
        going on to γ. Ending there: E_A tokens in T_A; going on: E_A + S·a·G tokens in T_B,
        S = α̂^i (the chance the block gets that far), a = the draft's calibrated acceptance,
        G = 1 + α̂ + … + α̂^(γ−i−1). Going on pays iff a > a* = E_A·(T_B/T_A − 1) / (S·G); the
        threshold is the lowest confidence bin from which every bin's calibrated acceptance
        reaches a*. Before the bins have evidence every bin sits at α̂, so nothing stops."""
        alpha, d = self.alpha, self._draft.mean(0.0)
        base = self._net.mean(0.0) + self._overhang.mean(0.0)
        qv = self.wait_and_verify_ms
        cal = [self.accept_prob(edge) for edge in CONF_EDGES]
        out = [0.0]
        for i in range(1, gamma):
            t_a = d * max(0, i + 1 - ready) + base + qv(i + 1)  # x_i is drafted either way
            t_b = d * max(0, gamma - ready) + base + qv(gamma + 1)
            e_a, s = expected_tokens(alpha, i), alpha**i
            g = expected_tokens(alpha, gamma - i - 1)
            need = e_a * (t_b / t_a - 1.0) / (s * g) if t_a > 0 and s * g > 0 else 0.0
            lowest = len(CONF_EDGES)
            while lowest > 0 and cal[lowest - 1] >= need:
                lowest -= 1
            out.append(CONF_EDGES[lowest] if lowest < len(CONF_EDGES) else NEVER)
        return tuple(out)

    def lookahead(self, gamma: int) -> int:
        """How many tokens to draft ahead while a block of ``gamma`` is verified: the bonus
        candidate plus the block the controller would pick if they were all free (no longer than
        the fleet's row lets it send, :meth:`in_step`)."""
        if self.fixed is not None or not self._measured:
            return gamma + 1
        top = min(self.priors.gamma_max, self.in_step() or self.priors.gamma_max)  # what it may send
        free = max(range(1, top + 1), key=lambda g: _rate(*self.predict(g, ready=g)))
        return max(gamma, free) + 1

    def draft_ahead_ms(self, gamma: int) -> float | None:
        """The latest moment, in ms after a block of ``gamma`` was sent, at which starting one more
        draft-ahead forward still pays (None: no limit, draft ahead until the verdict).

        A forward started with r ms left before the verdict holds the round up by max(0, d − r)
        (the overhang) whatever the verdict, and saves d in the next round only if the drafts
        ahead are kept: every draft accepted and the bonus equal to the first draft ahead, a
        chance of about α̂^(γ+1). Starting pays iff d − r < α̂^(γ+1) · d, so drafting ahead stops
        d · (1 − α̂^(γ+1)) before the verdict is due (net + queue + verify of the block). Without
        it an auto session drafting toward the free-draft optimum ran a forward past nearly
        every verdict (38 ms a round with the torch draft, docs/BENCHMARKS.md §6.5), and a fixed
        γ whose block ahead takes longer to draft than the verify ran past it (98 ms a round at
        γ 4, §6.6). Before any round nothing is known: no limit."""
        if not self._measured:
            return None
        cost = self.cost(gamma)
        due = cost.net + cost.queue + cost.verify
        return due - self._draft.mean(0.0) * (1.0 - self.alpha ** (gamma + 1))

    def successor(self, *, fixed: int | None = None, draws: Hashable = None) -> GammaController:
        """A controller for the next session of the same draft model and link: it keeps what
        this one measured of the device, the network and the worker (draft cost, round trip,
        queue, batch occupancy, verify cost by positions) and of the draft pair (acceptance by
        draft confidence), so its first round needs no guess. The acceptance α starts again
        from the prior: it belongs to the prompt (and a benchmark that runs one prompt in
        several cells in a row must not hand one cell's α̂ to the next).

        ``draws``: how the next session samples (the edge passes temperature, top-k and top-p).
        The calibration of confidence against acceptance belongs to it: greedy acceptance is
        "the target's argmax is the draft", sampled acceptance min(1, p/q) of the tempered,
        truncated q whose top probability the confidence then is. A session drawing otherwise
        than this one starts from the calibration last learned for its own way of drawing (the
        last ``CALIBRATIONS_KEPT`` are kept), or from none."""
        nxt = GammaController(self.priors, fixed=fixed, draws=draws)
        nxt._draft, nxt._net, nxt._queue, nxt._others = (
            copy.copy(self._draft),
            copy.copy(self._net),
            copy.copy(self._queue),
            copy.copy(self._others),
        )
        nxt._overhang = copy.copy(self._overhang)
        nxt._verified = copy.copy(self._verified)
        nxt._line = copy.copy(self._line)
        nxt._sessions = copy.copy(self._sessions)
        nxt._positions = copy.copy(self._positions)
        nxt._pos_ms = copy.copy(self._pos_ms)
        nxt._row_med = self._row_med
        nxt._verify = {k: _Seen(e.mean, e.last - self.rounds) for k, e in self._verify.items()}  # same ages
        nxt._measured = self._measured
        kept = dict(self._calibrations)
        kept[self.draws] = self._conf  # this session's calibration, the newest
        while len(kept) > CALIBRATIONS_KEPT:
            kept.pop(next(iter(kept)))
        own = kept.pop(draws, None)
        if own is not None:
            nxt._conf = [list(b) for b in own]
        nxt._calibrations = {k: [list(b) for b in v] for k, v in kept.items()}
        return nxt

    def _reason(self, gamma: int, ready: int, cap: int, stops: tuple[float, ...] = ()) -> str:
        others = round(self._others.mean(0.0))
        fp = self.forward_positions
        parts = [
            f"α̂={self.alpha:.2f}",
            f"draft={self._draft.mean(0.0):.1f}ms/tok",
            f"verify({fp(gamma + 1)})={self.verify_ms(fp(gamma + 1)):.1f}ms",
            f"verify({fp(2)})={self.verify_ms(fp(2)):.1f}ms",
            f"net={self._net.mean(0.0):.1f}ms",
            f"queue={self._queue.mean(0.0):.1f}ms",
        ]
        if ready:
            parts.append(f"ready={ready}")
        if self._shared():
            parts.append(f"batch×{self._sessions.mean(1.0):.1f}")
            if (anchor := self._anchor()) is not None:
                parts.append(f"V≈{anchor[0]:.0f}+{anchor[2]:.1f}·(P−{anchor[1]:.0f})")
            elif (line := self._line.line()) is not None:
                parts.append(f"V≈{line[0]:.0f}+{line[1]:.1f}·P")
            if (step := self.in_step()) is not None:
                parts.append(f"fleet row {self._row_med}: γ≤{step}")
        elif others:
            parts.append(f"batch+{others}")
        if cap < self.priors.gamma_max:
            parts.append(f"cap={cap}")
        if any(stops):
            parts.append("stop<" + "/".join(f"{c:.2f}" for c in stops[1:]))
        return " ".join(parts)


class _LineFit:
    """A forgetting least-squares line y = a + b·x (b ≥ 0: a forward never gets cheaper with
    more positions); None until the x seen vary enough to fit one."""

    __slots__ = ("s0", "sx", "sxx", "sxy", "sy")

    def __init__(self) -> None:
        self.s0 = self.sx = self.sxx = self.sy = self.sxy = 0.0

    def add(self, x: float, y: float, forget: float) -> None:
        self.s0 = self.s0 * forget + 1.0
        self.sx = self.sx * forget + x
        self.sxx = self.sxx * forget + x * x
        self.sy = self.sy * forget + y
        self.sxy = self.sxy * forget + x * y

    def line(self, min_weight: float = 3.0, min_var: float = 1.0) -> tuple[float, float] | None:
        if self.s0 < min_weight:
            return None
        mx, my = self.sx / self.s0, self.sy / self.s0
        var = self.sxx / self.s0 - mx * mx
        if var < min_var:
            return None
        b = max(0.0, (self.sxy / self.s0 - mx * my) / var)
        return my - b * mx, b


def _bin(confidence: float) -> int:
    return sum(confidence >= edge for edge in CONF_EDGES[1:])


def _rate(tokens: float, ms: float) -> float:
    return tokens / max(ms, 1e-6)


def parse_gamma(value: object) -> int | str:
    """``"auto"`` or an int 1..64 (from a flag, a config file or an API request)."""
    if isinstance(value, str) and value.strip().lower() == GAMMA_AUTO:
        return GAMMA_AUTO
    if isinstance(value, str):
        try:
            value = int(value.strip(), 10)
        except ValueError:
            raise ValueError(f"gamma must be 'auto' or an integer 1..64, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
        raise ValueError(f"gamma must be 'auto' or an integer 1..64, got {value!r}")
    return value
