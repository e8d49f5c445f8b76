"""Which queued requests share the next target forward (issue 9, issue 10; docs/ARCHITECTURE.md,
"Worker: batched verification").

Every session has its own FIFO of jobs (opens, drafts, decodes). A forward takes at most ONE job
per session, so a session's requests keep their order and a decode of n tokens is n forwards,
interleaved with everyone else's work.

Who leads (fair in model TIME, not in rows): every device has a virtual time, the seconds of
target forwards charged to it (``charge``: a forward's wall time split over its rows by their
real positions). The device with the least virtual time that has work leads the next forward;
ties go round-robin. A device that has work again keeps what its forwards cost it but comes back
at most ``credit`` seconds (a few forwards) behind the devices with work, or behind the worker's
virtual time when none has work; a new device starts exactly that far behind, and one back from
idle at most level with them (``_place``): going idle between rounds costs a device nothing, a
device idle for long can bank no time and carries no debt, and one that had the worker to itself
is not made to pay for it when another arrives. A flood of long drafts is charged what its
forwards cost and waits while the others catch up.

Who rides along: after the leader, one session from each device in virtual-time order, then
round again, until the forward is full. A padded forward computes rows × its widest row, and
what padding costs depends on the hardware: on a CPU a forward's time grows with every padded
position, on a GPU it is nearly flat up to hundreds of positions (docs/BENCHMARKS.md §4.8). So
the width rule (``width_rule``):

- ``ratio`` (the default): no row rides in a forward more than twice its own length or 3
  positions past it, whichever is more (a 3-token draft is never padded to a 64-token one or to
  a prefill, and drafts of mixed small γ still go together: a 2-position block rides with a
  5-position one); an open's prefill beside others is cut to the current width.
- ``cost``: a row rides when the padded forward is predicted to cost at most
  ``PAD_WASTE`` more than a forward of the same rows' real positions would and, if the row
  widens the forward, at most ``PAD_WASTE`` more than the forward without it, read off the
  worker's own measured forwards (:class:`ForwardCost`). An open's prefill beside others takes
  the widest chunk that passes. Where the measurements cannot say yet (a new worker, a width
  well past any measured), the ``ratio`` rule decides; from there the measured widths grow.
  Built for a GPU worker, where padding is nearly free; on a CPU it padded cloud-only forwards
  by a third and lost a fifth of their throughput (docs/BENCHMARKS.md §4.9), so it is not the
  default until a GPU run shows it pays there.

With ``batch_layout = packed`` (cloud_worker/batching.py) a forward has no padding: each row
costs its own positions, so no width rule applies. A rider no longer than the leader's row always
fits (a 2-position draft rides with a 7-position one, every decode row beside a leading prefill);
a longer one only within the ratio of the leader's row (twice it or 3 positions past it), so the
device owed model time is not made to wait on another's long rows. An open's prefill beside
others is cut to the widest row so far (its positions cost the forward what anyone's do).

While several devices have (or just had) work, the leader's
rows beyond its first stay within its share of ``max_tokens`` (a leading prefill is cut to that
share), and a rider's beyond its first within what the leader holds: a device ahead in model
time cannot lengthen the forward of one behind.

Bounds of a forward: ``max_sessions`` rows and ``max_tokens`` PADDED positions (rows × longest
row: what a padded forward costs; packed: the real positions). The leader's row is always taken; an open's prefill is cut to
fit (the rest is its next step).

A prefill beside drafts and decodes (``shared_prefill``, as chunked prefill in vLLM: the running
sessions first, the prefill in what is left). Once the riders are in, the prefill rows of a
forward that carries other sessions' drafts or decode steps, or leaves some waiting at the head
of their queues, hold at most ``shared_prefill`` positions together; a prefill row the budget
leaves nothing for goes back to the front of its queue (the first keeps at least one position).
``None`` (config "auto"): as many as those drafts and decode steps hold, at least
``PREFILL_FLOOR`` (padded under the width rule ``cost``, no cap: the measured costs already
bound the chunk that rides). On a CPU a forward's time grows with its positions: packed, a
leading prefill chunk of its whole share (64 positions at 8 devices) made every round riding
beside it wait for a forward three times as long (docs/BENCHMARKS.md §4.10); padded, drafts
cannot ride beside a prefill chunk, and a forward of four re-opening sessions' whole prompts
kept them waiting 2–3 s (§4.14). Capped, the forward the drafts ride in or wait for costs about
as much as their own, and the open goes on in the next forwards; after a forward of prefill
only that drafts or decode steps waited for, those lead the next one (whatever their devices'
model time), so they wait for one such forward at most. With no draft or decode step queued, a
prefill still takes its share.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from cloud_worker.sessions import Step, key_device
from shared.protocol import MAX_GAMMA, Draft

MAX_DEVICES = 1024  # devices whose place in the turn order is remembered while they are idle
MAX_QUEUED_PER_SESSION = 8  # an edge has one request out (plus a retry and a close): more is a flood
WIDTH_RATIO = 2  # no row of a forward is padded to more than this many times its own length,
WIDTH_SLACK = 3  # ... or this many positions past it, whichever is more
CREDIT_FORWARDS = 4  # an idle device comes back at most this many (mean) forwards behind the busy ones
RECENT_S = 1.0  # a device that had work this recently (or within 3 mean forwards) counts for the shares
REJOIN_SHARE = 0.5  # rejoin window "auto": wait for sessions back within this share of a mean forward
REJOIN_MARGIN = 2.0  # ... a session's return is expected within its mean gap + this many mean deviations
REJOIN_SLACK_S = 0.005  # ... and this much more (the broker's and the intake's own delay)
PREFILL_FLOOR = 16  # shared_prefill "auto": a prefill beside others gets at least this many positions
GAP_FORGET = 0.8  # weight kept by a session's old return gaps at each new one
MAX_GAPS = 4096  # sessions whose return gap is remembered
WIDTH_RULES = ("cost", "ratio")
PAD_WASTE = 0.25  # width rule "cost": padding may make a forward at most this much slower
COST_SMOOTHING = 0.3  # weight of a new forward time in its bucket's mean (ForwardCost)
LINE_FORGET = 0.98  # weight kept by older forwards at each new one (CostLine: ~50 forwards)
ROW_WINDOW = 32  # last draft rows whose devices vote on the fleet row (the verdicts' ``row_med``)


class _Gap:
    """A session's time from an answer to its next request: a forgetting mean and mean deviation."""

    __slots__ = ("dev", "mean")

    def __init__(self, first: float) -> None:
        self.mean, self.dev = first, 0.0

    def add(self, gap: float) -> None:
        self.dev = GAP_FORGET * self.dev + (1 - GAP_FORGET) * abs(gap - self.mean)
        self.mean = GAP_FORGET * self.mean + (1 - GAP_FORGET) * gap

    @property
    def expected(self) -> float:
        return self.mean + REJOIN_MARGIN * self.dev


def _remember(gaps: OrderedDict[str, _Gap], key: str, gap: float, most: int) -> None:
    """Add ``gap`` to ``gaps[key]`` (a new entry if none), keeping at most ``most`` keys (least
    recently added go first)."""
    known = gaps.get(key)
    if known is None:
        gaps[key] = _Gap(gap)
        if len(gaps) > most:
            gaps.popitem(last=False)
    else:
        known.add(gap)
        gaps.move_to_end(key)


@dataclass
class Job:
    """One request of one session, and, once validated, the step it runs as."""

    key: str
    device: str
    sid: str
    msg: Any  # Open | Draft | Decode
    down: str
    incoming: Any  # the MQTT message (correlation data), or None
    received_at: float  # time.perf_counter() when it arrived
    step: Step | None = None
    prefill: bool = False


class Scheduler:
    """Per-session queues; forwards led by the device with the least model time (one job per
    session per forward)."""

    def __init__(
        self,
        *,
        max_tokens: int = 512,
        max_sessions: int = 32,
        width_rule: str = "ratio",
        packed: bool = False,
        shared_prefill: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_tokens < 1 or max_sessions < 1:
            raise ValueError("max_tokens and max_sessions must be >= 1")
        if shared_prefill is not None and shared_prefill < 1:
            raise ValueError(f"shared_prefill must be >= 1 or None (auto), got {shared_prefill}")
        if width_rule not in WIDTH_RULES:
            raise ValueError(f"width_rule must be one of {', '.join(WIDTH_RULES)}, got {width_rule!r}")
        self.max_tokens = max_tokens
        self.max_sessions = max_sessions
        self.width_rule = width_rule
        self.packed = packed  # the forward packs its rows (batch_layout "packed"): no padding, no width rule
        self.shared_prefill = shared_prefill  # prefill positions beside drafts/decodes (None: auto)
        self.cost = ForwardCost()  # this worker's batched forwards: seconds by padded positions
        self.line = CostLine()  # every forward: seconds against rows and padded positions
        self._rows: deque[tuple[str, int]] = deque(maxlen=ROW_WINDOW)  # (device, positions): last draft rows
        self.queues: dict[str, deque[Job]] = {}
        self.devices: OrderedDict[str, deque[str]] = OrderedDict()  # device -> its sessions with work
        self._queued = 0
        self._clock = clock
        self.vtime: dict[str, float] = {}  # device -> seconds of forwards charged to it
        self._seen: dict[str, float] = {}  # device -> when it last had work (clock)
        self._forward_s = 0.0  # a running mean of a forward's wall time
        self.last_rows: list[tuple[str, int]] = []  # (device, positions) of the last selected forward
        self._vnow = 0.0  # the worker's virtual time: the furthest a served device has got
        # devices placed by ``push`` (new, or back from idle) and not charged since -> the floor
        # they were placed against: the floor the next arrival is placed against, too
        self._placed: dict[str, float] = {}
        self._answered_at: dict[str, float] = {}  # session -> when its last answer went out
        self._gaps: OrderedDict[str, _Gap] = OrderedDict()  # session -> answer-to-next-request gap (s)
        # device -> the same gaps over all its sessions: what a session it has just opened is expected
        # to take (an edge's next generation is a new session whose first draft follows its open)
        self._device_gaps: OrderedDict[str, _Gap] = OrderedDict()
        self._prefill_first = False  # the last forward: prefill only, drafts or decodes waited for it

    def __len__(self) -> int:
        return self._queued  # a plain int: safe to read from another thread (metrics)

    @property
    def credit(self) -> float:
        """The most model time (s) an idle device may be behind the others when it comes back."""
        return CREDIT_FORWARDS * self._forward_s

    def _busy_floor(self) -> float:
        """The least model time of the devices with work (the worker's virtual time when none has)."""
        busy = [self.vtime.get(d, 0.0) for d, t in self.devices.items() if t]
        return min(busy) if busy else self._vnow

    def _placement_floor(self) -> float:
        """What a device that comes back from idle (or is new) is placed ``credit`` behind: the
        least model time of the devices with work, counting one placed so and not served since
        at the floor it was placed against. Otherwise devices arriving together cascade: each
        would go ``credit`` behind the one placed just before it (eight edges opening at once
        spread over seven credits, and the first waited seconds whenever their rows did not
        fit one forward)."""
        busy = [self._placed.get(d, self.vtime.get(d, 0.0)) for d, t in self.devices.items() if t]
        return min(busy) if busy else self._vnow

    def push(self, job: Job, *, front: bool = False) -> bool:
        """Queue ``job`` behind its session's others (``front``: a continuing step, before them).
        False (not queued) when the session already has ``MAX_QUEUED_PER_SESSION`` jobs waiting."""
        q = self.queues.get(job.key)
        if q is not None and len(q) >= MAX_QUEUED_PER_SESSION and not front:
            return False
        if not front:
            self._learn_gap(job.key, job.received_at)
        if q is None:
            q = self.queues[job.key] = deque()
            if job.device not in self.devices and len(self.devices) >= MAX_DEVICES:
                for idle in [d for d, turn in self.devices.items() if not turn]:
                    del self.devices[idle]
                    self.vtime.pop(idle, None)
                    self._seen.pop(idle, None)
                    self._placed.pop(idle, None)
            turn = self.devices.setdefault(job.device, deque())
            if not turn:  # the device is between rounds, back from idle, or new
                self._place(job.device)
            turn.append(job.key)
        if front:
            q.appendleft(job)
        else:
            q.append(job)
        self._queued += 1
        return True

    def drop(self, key: str) -> list[Job]:
        """Remove and return every queued job of session ``key``."""
        q = self.queues.pop(key, None)
        if q is None:
            return []
        self._queued -= len(q)
        turn = self.devices.get(q[0].device)
        if turn is not None and key in turn:
            turn.remove(key)  # the device keeps its place in the turn order
        return list(q)

    def _pop(self, key: str) -> Job:
        q = self.queues[key]
        job = q.popleft()
        self._queued -= 1
        if not q:
            del self.queues[key]
            self.devices[job.device].remove(key)  # the device keeps its place in the turn order
        return job

    @property
    def _recent_s(self) -> float:
        """How long after its last work a device still counts as busy (for the shares, and
        between rounds)."""
        return max(RECENT_S, 3 * self._forward_s)

    def _place(self, device: str) -> None:
        """Where a device that has work again starts in model time: where its own forwards put
        it, but at most ``credit`` behind the devices with work (a new device: exactly that).
        Back from idle (no work within ``_recent_s``) it is also at most level with them: it
        carries no debt. A device once served far more than the others (it had the worker
        alone, or the others are new) would otherwise wait behind each newcomer until that one
        caught up, whenever their rows did not fit one forward: a fleet-γ run at N = 8 held such
        devices' drafts for 4–8 s. It gets no credit for the idle spell either, so a device that
        floods, pauses and floods again gains nothing by the pause."""
        ref = self._placement_floor()
        floor = ref - self.credit
        own = self.vtime.get(device, floor)
        away = self._clock() - self._seen.get(device, -math.inf) > self._recent_s
        placed = min(max(own, floor), ref) if away else max(own, floor)
        if device not in self.vtime or placed != own:
            self.vtime[device] = placed
            self._placed[device] = ref
        else:  # it stands where its own forwards put it
            self._placed.pop(device, None)

    def owed(self, keys: set[str]) -> set[str]:
        """Those of ``keys`` (sessions just answered, not queued again yet) whose device would
        lead the next forward if its request were here: it has less model time than every device
        with work. Waiting briefly for them keeps a device that is between rounds from losing its
        turn to an expensive forward of a device that is ahead."""
        if not any(self.devices.values()):
            return set()
        ahead = self._busy_floor()
        return {
            key for key in keys if key not in self.queues and self.vtime.get(key_device(key), 0.0) < ahead
        }

    def answered(self, keys: set[str], at: float) -> None:
        """Sessions whose answer went out at ``at`` (``time.perf_counter()``, the clock of
        ``Job.received_at``): the gap to each one's next request is learned when it arrives."""
        for key in keys:
            self._answered_at.pop(key, None)  # to the end: the oldest entries go first below
            self._answered_at[key] = at
        if len(self._answered_at) > MAX_GAPS:  # sessions that never came back
            for key in list(self._answered_at)[: len(self._answered_at) - MAX_GAPS]:
                del self._answered_at[key]

    def _learn_gap(self, key: str, received_at: float) -> None:
        at = self._answered_at.pop(key, None)
        if at is None or received_at < at:
            return
        _remember(self._gaps, key, received_at - at, MAX_GAPS)
        _remember(self._device_gaps, key_device(key), received_at - at, MAX_DEVICES)

    def _expected_gap(self, key: str) -> _Gap | None:
        """Session ``key``'s own return gaps; for a session not seen coming back yet, its
        device's (over its earlier sessions): the first draft after an open follows the open's
        answer as the edge's drafts follow their verdicts. None for a device never seen back."""
        gap = self._gaps.get(key)
        return gap if gap is not None else self._device_gaps.get(key_device(key))

    def rejoining(self, keys: set[str]) -> tuple[set[str], float]:
        """The rejoin window "auto": of ``keys`` (sessions just answered), those not queued again
        that usually come back within ``REJOIN_SHARE`` of a mean forward (their mean gap), and
        how long to wait for them (s): until the latest of them is expected (mean + 2 mean
        deviations: an edge whose drafting time varies with its γ), at most that share. A session
        back that soon would otherwise wait a whole forward in the queue and cost a forward of
        its own; one that is slower (a far edge, a slow draft) is not waited for, nor one the
        worker has not yet seen come back (a session just opened is expected as its device's
        earlier sessions came back: ``_expected_gap``), nor one whose device is more than ``credit`` ahead of
        the devices with work in model time: a wait that ends without the session is charged to
        its device (``charge_wait``), so a device that comes back quickly for a while and then
        late, over and over, buys those waits with its own share of the worker."""
        limit = REJOIN_SHARE * self._forward_s
        cutoff = self._busy_floor() + self.credit
        due = {
            key: gap.expected
            for key in keys
            if key not in self.queues
            and (gap := self._expected_gap(key)) is not None
            and gap.mean <= limit
            and self.vtime.get(key_device(key), 0.0) <= cutoff
        }
        if not due:
            return set(), 0.0
        return set(due), min(limit, max(due.values()) + REJOIN_SLACK_S)

    def missing(self, awaited: set[str], before: set[str]) -> set[str]:
        """Those of ``awaited`` (sessions waited for) not back yet. A new session of the same
        device (never answered before; queued since the wait began, so not in ``before``, the
        sessions queued then) stands in for one of them: an edge's next generation opens a new
        session, so the session a generation's last answer went to never comes back, its device
        does (one new session for one awaited session). Another session the device already had
        is no stand-in: it is another generation running beside the awaited one."""
        queued = self.queues.keys()
        gone: dict[str, list[str]] = {}
        for key in sorted(awaited - queued):
            gone.setdefault(key_device(key), []).append(key)
        if not gone:
            return set()
        new: dict[str, int] = {}
        for key in queued - before - awaited:
            device = key_device(key)
            if device in gone and key not in self._gaps and key not in self._answered_at:
                new[device] = new.get(device, 0) + 1
        return {key for device, keys in gone.items() for key in keys[new.get(device, 0) :]}

    def charge_wait(self, keys: set[str], seconds: float) -> None:
        """The worker waited ``seconds`` for sessions ``keys`` and they did not come: charge the
        wait to their devices' model time, split evenly (idle model time is model time)."""
        devices = {key_device(k) for k in keys}
        if not devices or seconds <= 0:
            return
        for device in devices:
            self.vtime[device] = self.vtime.get(device, self._vnow) + seconds / len(devices)
            self._vnow = max(self._vnow, self.vtime[device])
            self._placed.pop(device, None)

    def gap_s(self, key: str) -> float | None:
        """The expected gap (s) between an answer to session ``key`` and its next request."""
        gap = self._gaps.get(key)
        return None if gap is None else gap.expected

    @property
    def pos_ms(self) -> float | None:
        """What one more padded position costs a forward of this worker (ms), from its recent
        forwards (:class:`CostLine`); None until they vary enough to say."""
        return self.line.pos_ms()

    @property
    def row_med(self) -> int | None:
        """The fleet's typical block, + 1 (the verdicts' ``row_med``): over the devices with a draft
        row among the last ``ROW_WINDOW`` this worker selected, the median of each one's latest
        row. An adaptive edge keeps its block within one position of it while it shares forwards
        (edge_agent/gamma.py), because a padded forward is as wide as its widest row. One vote a
        device: a device cannot cap every other device's blocks by flooding short ones. None
        before any draft row, and from a packed worker, where a row costs its own positions only."""
        if not self._rows or self.packed:
            return None
        latest = sorted(dict(self._rows).values())  # each device's latest row
        # the lower median: a row that was sent; a row can carry uncached tokens besides the
        # block, so it is held to the longest block a verdict may name (MAX_GAMMA + 1)
        return min(latest[(len(latest) - 1) // 2], MAX_GAMMA + 1)

    @property
    def forward_s(self) -> float:
        """A running mean of a forward's wall time (s)."""
        return self._forward_s

    def charge(self, seconds: float, *, measured: bool = True) -> None:
        """Charge the last selected forward's wall time to its devices, by real positions;
        ``measured``: the forward ran to the end, so its time is also a cost measurement."""
        rows, self.last_rows = self.last_rows, []
        total = sum(k for _, k in rows)
        if not total or seconds < 0:
            return
        if measured and len(rows) > 1 and not self.packed:  # a single row runs unpadded: another path
            self.cost.add(self.padded(rows), seconds)
        if measured:
            self.line.add(len(rows), self.padded(rows), seconds)
        self._forward_s = seconds if not self._forward_s else 0.8 * self._forward_s + 0.2 * seconds
        now = self._clock()
        for device, k in rows:
            self.vtime[device] = self.vtime.get(device, 0.0) + seconds * k / total
            self._vnow = max(self._vnow, self.vtime[device])
            self._placed.pop(device, None)
            self._seen[device] = now  # it had work until now (a long forward is no time away)

    def padded(self, rows: list[tuple[str, int]]) -> int:
        """The positions a forward of ``rows`` (device, positions) computes: rows × its widest row,
        or, packed, the rows' own."""
        ks = [k for _, k in rows]
        return sum(ks) if self.packed else len(ks) * max(ks, default=0)

    def select(self, prepare: Callable[[Job], Step | None]) -> list[tuple[Job, Step]]:
        """Take the jobs of the next forward. ``prepare(job)`` validates a job and returns its
        step, or answers it and returns None (then the session's next job is considered)."""
        now = self._clock()
        for device, turn in self.devices.items():
            if turn:
                self._seen[device] = now
        recent = self._recent_s
        for device in [d for d, t in self._seen.items() if now - t > recent]:
            del self._seen[device]
        # a device's share of the forward's positions while others have (or just had) work: its
        # first row always goes in, more only within the share (the rest waits for the next forward)
        fair = self.max_tokens // max(1, len(self._seen))
        # stable: equal virtual times keep the round-robin order
        order = sorted(self.devices, key=lambda d: self.vtime.get(d, 0.0))
        if self._prefill_first:  # the last forward was a prefill the drafts waited for: they lead now
            self._prefill_first = False
            order.sort(key=self._head_is_prefill)
        batch: list[tuple[Job, Step]] = []
        fit = _Fit(
            self.max_tokens,
            fair,
            alone=len(self._seen) <= 1,
            cost=self.cost if self.width_rule == "cost" and not self.packed else None,
            packed=self.packed,
        )
        taken: set[str] = set()
        served: list[str] = []
        whole: dict[str, list[int]] = {}
        progress = True
        while progress and len(batch) < self.max_sessions:
            progress = False
            for device in order:
                if len(batch) >= self.max_sessions:
                    break
                turn = self.devices.get(device)
                key = next((k for k in turn if k not in taken), None) if turn else None
                if key is None:
                    continue
                step = None
                while step is None and key in self.queues:
                    job = self.queues[key][0]
                    step = prepare(job)
                    if step is None:
                        self._pop(key)  # answered without a forward (error or replay)
                if step is None:
                    progress = True
                    continue
                if job.prefill:  # its whole chunk, should the cap send it back (``_cap_prefill``)
                    whole[key] = list(step.row.tokens)
                k = fit.take(job, step, device)
                taken.add(key)
                if k is None:
                    continue  # does not fit: first in line next time
                self._pop(key)
                batch.append((job, step))
                served.append(key)
                progress = True
        for job in self._cap_prefill(batch):  # back to the front of its queue, as it was
            served.remove(job.key)
            job.step.row.tokens[:] = whole[job.key]  # type: ignore[union-attr]
            self._unpop(job)
        self.last_rows = [(job.device, len(step.row.tokens)) for job, step in batch]
        self._rows.extend(
            row for (job, _), row in zip(batch, self.last_rows, strict=True) if isinstance(job.msg, Draft)
        )
        firsts = [key.rpartition("/")[0] for key in served]
        for key, device in zip(served, firsts, strict=True):  # served ones go to the back
            if device in self.devices:
                self.devices.move_to_end(device)
                turn = self.devices[device]
                if key in turn:
                    turn.remove(key)
                    turn.append(key)
        if firsts and next(iter(self.devices), None) == firsts[0]:
            self.devices.move_to_end(firsts[0])  # every device was served: the next round starts one later
        return batch

    def _cap_prefill(self, batch: list[tuple[Job, Step]]) -> list[Job]:
        """Cut the prefill rows of a forward that carries drafts or decode steps, or leaves some
        waiting, to ``shared_prefill`` positions together (module docstring), in the order they
        were taken; a prefill row the budget leaves nothing for leaves the forward (returned, to
        be queued again), except the first, which keeps at least one position."""
        if not any(job.prefill for job, _ in batch):
            return []  # most forwards: no queue scan
        if self.shared_prefill is None and self.width_rule == "cost" and not self.packed:
            return []  # auto under the cost rule: the measured costs already bound a riding chunk
        others = sum(len(step.row.tokens) for job, step in batch if not job.prefill) + self._waiting(batch)
        if not others:
            return []
        left = self.shared_prefill if self.shared_prefill is not None else max(PREFILL_FLOOR, others)
        self._prefill_first = all(job.prefill for job, _ in batch)  # the waiting ones lead next
        dropped: list[Job] = []
        for job, step in batch:
            if not job.prefill:
                continue
            if left <= 0 and len(batch) - len(dropped) > 1:
                dropped.append(job)
                continue
            keep = max(1, left)
            del step.row.tokens[keep:]
            left -= keep
        if dropped:
            batch[:] = [(job, step) for job, step in batch if all(job is not d for d in dropped)]
        return dropped

    def _head_is_prefill(self, device: str) -> bool:
        """Whether ``device``'s next job in turn is a prefill (or it has none)."""
        turn = self.devices.get(device)
        q = self.queues.get(turn[0]) if turn else None
        return q is None or q[0].prefill

    def _waiting(self, batch: list[tuple[Job, Step]]) -> int:
        """The positions of the drafts and decode steps this forward leaves queued at the head of
        their sessions' queues (a draft: its block and the token before it; a decode step: one)."""
        taken = {job.key for job, _ in batch}
        total = 0
        for key, q in self.queues.items():
            job = q[0]
            if key in taken or job.prefill:
                continue
            if job.step is not None:
                total += len(job.step.row.tokens)
            else:
                total += len(job.msg.tok) + 1 if isinstance(job.msg, Draft) else 1
        return total

    def _unpop(self, job: Job) -> None:
        """Undo ``_pop`` of ``job``: back at the front of its session's queue."""
        q = self.queues.get(job.key)
        if q is None:
            q = self.queues[job.key] = deque()
            self.devices.setdefault(job.device, deque()).appendleft(job.key)
        q.appendleft(job)
        self._queued += 1


def _widest_for(k: int) -> int:
    """The widest forward a row of ``k`` positions may be padded into (width rule ``ratio``)."""
    return max(WIDTH_RATIO * k, k + WIDTH_SLACK)


class CostLine:
    """A forward's wall time as a + c · rows + b · padded positions, fitted by forgetting least
    squares (weight ``LINE_FORGET`` per forward) over every forward this worker ran; ``b`` is what
    the verdicts report as ``pos_ms``.

    Why the worker fits it and not each edge: an edge sees only the forwards its own blocks rode
    in, where the positions grow with the sessions in the forward (n rows of about its own
    length), so a line through its (positions, verify time) points charges the cost of each
    row to the positions: its slope came out at 38–76 ms a position under load where the
    worker's forwards cost 24 (docs/BENCHMARKS.md §6.9), and an adaptive edge chose γ = 1. The
    worker sees forwards of every shape (one session's verify, prefills, n decode rows)."""

    MIN_WEIGHT = 5.0  # forwards' worth of evidence before it says anything
    MIN_VAR = 1.0  # the padded positions must vary this much (their variance) to fit a slope

    def __init__(self) -> None:
        # forgetting sums over x = (1, rows, padded): xtx[0, 0] is the evidence's weight,
        # xtx[0, 2] and xtx[2, 2] the sums of the padded positions and of their squares
        self._xtx = np.zeros((3, 3))
        self._xty = np.zeros(3)

    def add(self, rows: int, padded: int, seconds: float) -> None:
        x = np.array([1.0, float(rows), float(padded)])
        self._xtx = LINE_FORGET * self._xtx + np.outer(x, x)
        self._xty = LINE_FORGET * self._xty + x * seconds

    def pos_ms(self) -> float | None:
        """b in ms (>= 0), or None before ``MIN_WEIGHT`` forwards whose positions vary enough."""
        weight = float(self._xtx[0, 0])
        if weight < self.MIN_WEIGHT:
            return None
        mean = float(self._xtx[0, 2]) / weight
        if float(self._xtx[2, 2]) / weight - mean * mean < self.MIN_VAR:
            return None
        # a whisper of ridge on a and c: rows that never vary leave them to share, not b
        ridge = np.diag([1.0, 1.0, 0.0]) * 1e-9 * float(np.trace(self._xtx))
        coef = np.linalg.lstsq(self._xtx + ridge, self._xty, rcond=None)[0]
        return max(0.0, float(coef[2]) * 1e3)


class ForwardCost:
    """What a batched forward (two rows or more) costs this worker, in seconds, against its
    padded positions (rows × widest row), learned from its own forwards: a smoothed mean per
    bucket of positions (exact up to 16, then eight buckets an octave), made non-decreasing by
    isotonic regression and read between buckets along a line.

    It says nothing (None) before two buckets were measured, or for positions more than twice
    past the widest measured: there it would be a guess, and the width rule falls back to
    ``ratio``. Up to twice past, it extends the last measured segment, so a worker whose forward
    is flat (a GPU) tries wider forwards and so measures them, and one whose cost climbs (a CPU)
    does not. The positions' cache lengths are left out: at a session's few hundred cached
    tokens a forward's cost is set by its rows and new positions (docs/BENCHMARKS.md §4.4)."""

    MAX_BUCKETS = 256

    def __init__(self) -> None:
        self._mean: dict[int, float] = {}  # bucket (its lowest positions) -> mean seconds
        self._curve: tuple[list[int], list[float]] | None = None  # sorted buckets, fitted means

    @staticmethod
    def bucket(positions: int) -> int:
        if positions <= 16:
            return max(1, positions)
        return round(2 ** (math.floor(math.log2(positions) * 8) / 8))

    def add(self, positions: int, seconds: float) -> None:
        key = self.bucket(positions)
        self._curve = None  # refitted at the next read, not at every read of a forward's choice
        old = self._mean.get(key)
        if old is None:
            if len(self._mean) >= self.MAX_BUCKETS:
                return
            self._mean[key] = seconds
        else:
            self._mean[key] = old + COST_SMOOTHING * (seconds - old)

    def seconds(self, positions: int) -> float | None:
        """The predicted time of a batched forward over ``positions`` padded positions, or None."""
        if len(self._mean) < 2:
            return None
        if self._curve is None:
            keys = sorted(self._mean)
            self._curve = keys, _isotonic([self._mean[key] for key in keys])  # more positions never cost less
        keys, curve = self._curve
        x = self.bucket(positions)
        if x > 2 * keys[-1]:
            return None
        if x <= keys[0]:
            return curve[0]
        i = bisect.bisect_left(keys, x)
        if i < len(keys) and keys[i] == x:
            return curve[i]
        lo = i - 1 if i < len(keys) else len(keys) - 2  # beyond the last: extend the last segment
        hi = lo + 1
        slope = (curve[hi] - curve[lo]) / (keys[hi] - keys[lo])
        return curve[lo] + slope * (x - keys[lo])

    def padding_pays(self, rows: int, width: int, real: int, *, was: int | None = None) -> bool | None:
        """Whether ``rows`` rows padded to ``width`` cost at most ``PAD_WASTE`` more than a
        forward of their ``real`` positions and, when the last row widened the forward from
        ``was`` padded positions, at most ``PAD_WASTE`` more than that forward did (the rows
        already in are not made to wait much longer for the one added); None where the
        measurements cannot say."""
        padded, unpadded = self.seconds(rows * width), self.seconds(real)
        before = self.seconds(was) if was is not None else None
        if padded is None or unpadded is None or (was is not None and before is None):
            return None
        limit = (1.0 + PAD_WASTE) * min(unpadded, before if before is not None else math.inf)
        return padded <= limit


def _isotonic(values: list[float]) -> list[float]:
    """The non-decreasing sequence nearest to ``values`` in least squares (pool adjacent
    violators): one slow forward raises its neighbours a little, not every wider bucket to it."""
    blocks: list[list[float]] = []  # [sum, count] of pooled runs
    for v in values:
        blocks.append([v, 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    return [total / count for total, count in blocks for _ in range(int(count))]


class _Fit:
    """The rows of one forward so far, and whether another fits (module docstring)."""

    def __init__(
        self,
        max_tokens: int,
        fair: int,
        *,
        alone: bool,
        cost: ForwardCost | None = None,
        packed: bool = False,
    ) -> None:
        self.max_tokens, self.fair, self.alone, self.cost, self.packed = max_tokens, fair, alone, cost, packed
        self.rows = self.width = self.narrowest = self.real = self.lead = 0
        self.used: dict[str, int] = {}
        self.leader = ""

    def take(self, job: Job, step: Step, device: str) -> int | None:
        """The row length ``step`` runs with in this forward (its prefill cut), or None when it
        does not fit; a row that fits is counted in."""
        tokens = step.row.tokens
        k = len(tokens)
        if not self.rows:  # the leader: always in; a prefill cut to the budget (its share when shared)
            room = self.max_tokens if self.alone else max(1, self.fair)
            if job.prefill and k > room:
                del tokens[room:]
                k = room
            self.narrowest = self.lead = k
            self.leader = device
        else:
            if job.prefill and k > self.width:  # beside others: the widest chunk that still fits
                k = self._prefill_width(k, device)
            if not self._fits(k, device):
                return None
            if job.prefill:
                del tokens[k:]
        self.rows += 1
        self.width = max(self.width, k)
        self.narrowest = min(self.narrowest, k)
        self.real += k
        self.used[device] = self.used.get(device, 0) + k
        return k

    def _fits(self, k: int, device: str, *, measured: bool = False) -> bool:
        """Whether a row of ``k`` positions fits; ``measured``: only if the costs say so (a
        prefill widens the forward on measurements only, never under the ratio rule)."""
        width = max(self.width, k)
        if (self.real + k if self.packed else (self.rows + 1) * width) > self.max_tokens:
            return False
        if self.used.get(device, 0) and self.used[device] + k > self._share(device):
            return False
        if self.packed:  # no padding: any row shorter than the leader's, a longer one within the ratio
            return k <= _widest_for(self.lead)
        was = self.rows * self.width if width > self.width else None  # the row widens the forward
        pays = (
            None
            if self.cost is None
            else self.cost.padding_pays(self.rows + 1, width, self.real + k, was=was)
        )
        if pays is None:  # width rule "ratio", or the costs cannot say yet
            return not measured and width <= _widest_for(min(k, self.narrowest))
        return pays

    def _prefill_width(self, k: int, device: str) -> int:
        """The chunk of a ``k``-token prefill riding beside the rows so far: under the rule
        ``cost``, the longest that fits (the costs grow with the width, so a binary search);
        else (or when none longer does) the current width, so it never widens the forward."""
        floor = max(self.width, 1)
        if self.cost is None or not self._fits(floor + 1, device, measured=True):
            return floor
        lo, hi = floor + 1, min(k, self.max_tokens // (self.rows + 1))
        while lo < hi:  # the longest chunk in [lo, hi] that fits; lo always does
            mid = (lo + hi + 1) // 2
            if self._fits(mid, device, measured=True):
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _share(self, device: str) -> int:
        """The most positions ``device`` may hold in this forward beyond its first row: the
        leader's device its share of the budget; a rider no more than the leader's device holds,
        so the forward of a device owed model time is not lengthened by the rows of one ahead."""
        if device == self.leader:
            return self.fair
        return min(self.fair, self.used.get(self.leader, 0))
