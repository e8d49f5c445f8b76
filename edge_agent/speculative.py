"""The edge's generation loops over any ``VerifierLink`` (DESIGN §4, §5).

Three modes share this module: ``speculative`` (draft on the edge, verify in the cloud),
``cloud-only`` (the owner decodes with the target alone and streams tokens) and ``edge-only``
(the draft model alone). Each loop is a generator yielding one :class:`TokenEvent` per token,
so callers can stream, and :func:`collect` sums them up.

Numbered steps of a speculative round:
1. draft γ tokens (the drafter rolls its KV cache forward);
2. send the block, wait for the verdict;
3. commit n_acc + 1 tokens and crop the draft cache to the committed length.
On ``resync`` / a lost owner the session is re-opened with ``epoch + 1`` and the full committed
context; when the cloud is unreachable the policy decides (``draft``: continue with the draft
model alone, flagging every such token; ``wait``: block until it is back; ``fail``: raise).
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from edge_agent.drafter import Drafter
from edge_agent.gamma import GAMMA_AUTO, GammaController, GammaPriors, Observation, parse_gamma
from shared.errors import BrokerError, CloudUnavailableError, SessionError
from shared.link import LinkStats, VerifierLink
from shared.protocol import Close, Decode, Draft, Open, Verdict
from shared.sampling import SamplingParams

MODES = ("speculative", "cloud-only", "edge-only")
POLICIES = ("draft", "wait", "fail")
CLOUD_DECODE_CHUNK = 16  # tokens asked per cloud-only request (streamed back one by one)
WAIT_POLL_S = 0.5

# TokenEvent.source values
SRC_DRAFT = "draft"  # a draft token the target accepted
SRC_TARGET = "target"  # sampled from the target (correction, bonus, or cloud-only)
SRC_EDGE = "edge"  # edge-only mode: the draft model alone, by request
SRC_FALLBACK = "fallback"  # the draft model alone because the cloud was unreachable: unverified


@dataclass(frozen=True, slots=True)
class RoundStats:
    """One round trip to the verifier."""

    seq: int
    gamma: int
    n_acc: int
    alpha: tuple[float, ...]  # theoretical acceptance of each judged position
    draft_ms: float
    link_ms: float  # wall time of the verify call
    verify_ms: float  # target forward + acceptance, on the worker
    queue_ms: float  # waiting on the worker before model work
    codec_ms: float  # encode + decode on the edge
    bytes_up: int
    bytes_down: int
    prefetched: int = 0  # draft tokens of this block made ahead, during the previous verify
    gamma_reason: str = ""  # why this γ: "fixed", the prior, or the γ controller's figures
    pred_tokens: float = 0.0  # committed tokens the γ controller expected (actual: n_acc + 1)
    pred_ms: float = 0.0  # round time it expected (actual: draft_ms + link_ms + overhang_ms)
    overhang_ms: float = 0.0  # pipelined: a draft-ahead forward still running when the verdict came

    @property
    def judged(self) -> int:
        """Draft positions actually judged: the accepted ones plus the first rejected one."""
        return min(self.n_acc + 1, self.gamma)

    @property
    def network_ms(self) -> float:
        """Round time that is neither draft nor verify compute: broker, network, worker queue."""
        return max(0.0, self.link_ms - self.verify_ms - self.codec_ms)


@dataclass(frozen=True, slots=True)
class TokenEvent:
    token: int
    source: str
    round: RoundStats | None = None  # set on the last token of a round


@dataclass(frozen=True, slots=True)
class GenerateOptions:
    """Options of one generation (keyword-only)."""

    mode: str = "speculative"
    gamma: int | str = GAMMA_AUTO  # draft tokens per round, or "auto": chosen each round (edge_agent.gamma)
    max_new_tokens: int = 64
    params: SamplingParams = field(default_factory=SamplingParams)
    on_cloud_unreachable: str = "draft"
    draft_model: str = ""
    target_model: str = ""
    wait_timeout_s: float = 300.0
    pipeline: bool = True  # draft the next block while the current one is verified
    gamma_priors: GammaPriors | None = None  # the auto γ controller's priors (None: defaults)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.on_cloud_unreachable not in POLICIES:
            raise ValueError(
                f"on_cloud_unreachable must be one of {POLICIES}, got {self.on_cloud_unreachable!r}"
            )
        object.__setattr__(self, "gamma", parse_gamma(self.gamma))  # "auto" or 1..64, else ValueError
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class SessionState:
    """The session's identity and counters; pass one to :func:`generate` to read them afterwards."""

    sid: str = field(default_factory=lambda: uuid.uuid4().hex)
    epoch: int = -1
    seq: int = 0
    open: bool = False
    failovers: int = 0
    resyncs: int = 0


def generate(
    drafter: Drafter | None,
    link: VerifierLink | None,
    prompt_ids: list[int],
    opts: GenerateOptions,
    *,
    eos_ids: frozenset[int] = frozenset(),
    state: SessionState | None = None,
) -> Iterator[TokenEvent]:
    """Generate up to ``opts.max_new_tokens`` tokens after ``prompt_ids``; stops after an EOS."""
    st = state if state is not None else SessionState()
    if opts.mode == "edge-only":
        assert drafter is not None, "edge-only needs a drafter"
        loop = _edge_only(drafter, prompt_ids, opts, SRC_EDGE)
    elif opts.mode == "cloud-only":
        assert link is not None, "cloud-only needs a link"
        loop = _cloud_only(link, prompt_ids, opts, st)
    else:
        assert drafter is not None and link is not None, "speculative needs a drafter and a link"
        loop = _speculative(drafter, link, prompt_ids, opts, st)
    for emitted, event in enumerate(loop, start=1):
        yield event
        if event.token in eos_ids or emitted >= opts.max_new_tokens:
            loop.close()
            return


def _edge_only(
    drafter: Drafter, prompt_ids: list[int], opts: GenerateOptions, source: str
) -> Iterator[TokenEvent]:
    drafter.reset(prompt_ids, opts.params)
    while True:
        block = drafter.propose(1)
        drafter.commit(list(block.tokens))
        yield TokenEvent(block.tokens[0], source)


def _open(
    link: VerifierLink, st: SessionState, ctx: list[int], opts: GenerateOptions, mode: str, done: int = 0
) -> None:
    """(Re-)open the session with the next epoch and the full committed context.

    ``done`` tokens were already generated: a re-open asks only for the rest (a worker refuses an
    open whose context + max_new exceeds its positions, and late in a long generation the full
    ``max_new_tokens`` would)."""
    st.epoch += 1
    link.open(
        Open(
            sid=st.sid,
            epoch=st.epoch,
            ctx=tuple(ctx),
            sampling=opts.params,
            draft_model=opts.draft_model,
            target_model=opts.target_model,
            max_new=max(1, opts.max_new_tokens - done),
            mode=mode,
        )
    )
    st.open = True


def _handle_session_error(exc: SessionError, st: SessionState) -> None:
    """Resync / lost owner: re-open next round. Anything else is not recoverable here."""
    if exc.code == "worker_lost":
        st.failovers += 1
    elif exc.code in ("resync", "stale_epoch"):
        st.resyncs += 1
    else:
        raise exc
    st.open = False


def _wait_for_cloud(link: VerifierLink, opts: GenerateOptions, exc: Exception) -> None:
    deadline = time.monotonic() + opts.wait_timeout_s
    while not link.available():
        if time.monotonic() > deadline:
            raise CloudUnavailableError(
                f"cloud still unreachable after {opts.wait_timeout_s:.0f} s: {exc}"
            ) from exc
        time.sleep(WAIT_POLL_S)


def _ahead_stop(future: Future, sent: float, deadline_ms: float | None) -> Callable[[], bool]:
    """When drafting ahead stops: at the verdict, or at the controller's deadline (ms after
    ``sent``) past which another draft forward would hold the round up more than it saves."""
    if deadline_ms is None:
        return future.done
    return lambda: future.done() or (time.perf_counter() - sent) * 1e3 >= deadline_ms


def _timed_verify(link: VerifierLink, draft: Draft) -> tuple[Verdict, LinkStats, float, float]:
    t0 = time.perf_counter()
    verdict = link.verify(draft)
    t1 = time.perf_counter()
    return verdict, link.last, (t1 - t0) * 1e3, t1  # `last` is per thread: read it here


# What the last session of each (link, draft model) measured, so the next one starts warm
# (draft cost, round trip, verify cost by positions, acceptance by draft confidence). Keyed by
# ids, each checked against a weak reference (an id is reused once its object is gone: a new draft
# model at a freed one's address must not inherit its figures); bounded. A link or draft model
# that takes no weak reference is not remembered.
_LEARNED: dict[tuple[int, int], tuple[weakref.ref, weakref.ref, GammaController]] = {}
_LEARNED_MAX = 64
_learned_lock = threading.Lock()


def _draft_model(drafter: Drafter) -> object:
    return getattr(drafter, "loaded", drafter)


def _learned(drafter: Drafter, link: VerifierLink) -> GammaController | None:
    model = _draft_model(drafter)
    with _learned_lock:
        entry = _LEARNED.get((id(link), id(model)))
    if entry is None:
        return None
    link_ref, model_ref, ctrl = entry
    return ctrl if link_ref() is link and model_ref() is model else None


def _remember(drafter: Drafter, link: VerifierLink, ctrl: GammaController) -> None:
    model = _draft_model(drafter)
    try:
        refs = weakref.ref(link), weakref.ref(model)
    except TypeError:  # no weak references: nothing is remembered
        return
    with _learned_lock:
        _LEARNED[(id(link), id(model))] = (*refs, ctrl)
        while len(_LEARNED) > _LEARNED_MAX:
            _LEARNED.pop(next(iter(_LEARNED)))


def gamma_controller(opts: GenerateOptions, previous: GammaController | None = None) -> GammaController:
    """The per-session γ controller of ``opts``: adaptive for ``"auto"``, else pinned (it then
    only predicts). ``previous``: the last session's controller on the same link and draft model,
    whose measurements it starts from (unless ``opts.gamma_priors`` asks for other priors)."""
    fixed = None if opts.gamma == GAMMA_AUTO else int(opts.gamma)
    draws = draws_key(opts.params)
    if previous is not None and opts.gamma_priors in (None, previous.priors):
        return previous.successor(fixed=fixed, draws=draws)
    return GammaController(opts.gamma_priors, fixed=fixed, draws=draws)


def draws_key(params: SamplingParams) -> tuple[float, int, float] | None:
    """How a session draws, as far as the acceptance of a draft of given confidence depends on
    it: None when greedy (any temperature below GREEDY_BELOW), else (temperature, top-k, top-p).
    The seed does not change the calibration."""
    return None if params.greedy else (float(params.temperature), params.top_k, float(params.top_p))


def _speculative(
    drafter: Drafter, link: VerifierLink, prompt_ids: list[int], opts: GenerateOptions, st: SessionState
) -> Iterator[TokenEvent]:
    drafter.reset(prompt_ids, opts.params)
    ctrl = gamma_controller(opts, _learned(drafter, link))
    # With pipelining the verify call runs in this helper thread while the drafter runs ahead.
    pool = ThreadPoolExecutor(1, thread_name_prefix="spececd-verify") if opts.pipeline else None
    try:
        while True:
            try:  # 0. choose γ: drafts already made ahead cost nothing now; never more than still wanted
                done = len(drafter.committed) - len(prompt_ids)
                choice = ctrl.decide(ready=len(drafter.pending), remaining=opts.max_new_tokens - done)
                if st.open:
                    # 1. draft (or take the drafts made ahead); may end early on an unconfident draft
                    block = drafter.propose(choice.gamma, stop_below=choice.stop_below)
                elif pool is None:
                    done = len(drafter.committed) - len(prompt_ids)
                    _open(link, st, drafter.committed, opts, "speculative", done)
                    block = drafter.propose(choice.gamma, stop_below=choice.stop_below)
                else:  # the worker prefills while the draft model does: both are on the critical path
                    done = len(drafter.committed) - len(prompt_ids)
                    opening = pool.submit(_open, link, st, list(drafter.committed), opts, "speculative", done)
                    block = drafter.propose(choice.gamma, stop_below=choice.stop_below)
                    opening.result()
                choice = ctrl.revise(choice, len(block.tokens), ready=block.prefetched)  # an early stop's cut
                draft = Draft(
                    sid=st.sid, epoch=st.epoch, seq=st.seq, pos=block.pos, tok=block.tokens, q=block.q
                )
                overhang_ms = 0.0
                if pool is None:  # 2. verify
                    verdict, cost, link_ms, _ = _timed_verify(link, draft)
                else:
                    sent = time.perf_counter()
                    future = pool.submit(_timed_verify, link, draft)
                    drafter.extend(  # bonus + next block, while it still pays before the verdict
                        ctrl.lookahead(choice.gamma),
                        stop=_ahead_stop(future, sent, ctrl.draft_ahead_ms(choice.gamma)),
                    )
                    verdict, cost, link_ms, t_done = future.result()
                    # a draft-ahead forward that was running when the verdict came holds the round up
                    overhang_ms = max(0.0, (time.perf_counter() - t_done) * 1e3)
            except SessionError as exc:
                drafter.rollback()
                _handle_session_error(exc, st)
                continue
            except (BrokerError, CloudUnavailableError) as exc:
                drafter.rollback()
                st.open = False
                if opts.on_cloud_unreachable == "fail":
                    raise CloudUnavailableError(f"cloud unreachable and the policy is 'fail': {exc}") from exc
                if opts.on_cloud_unreachable == "wait":
                    _wait_for_cloud(link, opts, exc)
                    continue
                yield from _fallback_until_back(drafter, link, opts)
                continue
            st.seq += 1
            n = verdict.n_acc
            new = [*block.tokens[:n], verdict.next]
            ctrl.observe(
                Observation(
                    gamma=len(block.tokens), n_acc=n, draft_ms=block.draft_ms,
                    drafted=len(block.tokens) - block.prefetched, link_ms=link_ms,
                    verify_ms=verdict.verify_ms, queue_ms=verdict.queue_ms,
                    batch_pos=getattr(verdict, "batch_pos", None),  # set by workers that batch verifies
                    pos_ms=getattr(verdict, "pos_ms", None),
                    row_med=getattr(verdict, "row_med", None),
                    batch=getattr(verdict, "batch", None),
                    confidence=block.confidence, overhang_ms=overhang_ms,
                )
            )  # fmt: skip
            drafter.commit(new)  # 3. commit; the cache keeps what still agrees
            stats = RoundStats(
                seq=draft.seq,
                gamma=len(block.tokens),
                n_acc=n,
                alpha=verdict.alpha,
                draft_ms=block.draft_ms,
                link_ms=link_ms,
                verify_ms=verdict.verify_ms,
                queue_ms=verdict.queue_ms,
                codec_ms=cost.codec_ms,
                bytes_up=cost.bytes_up,
                bytes_down=cost.bytes_down,
                prefetched=block.prefetched,
                gamma_reason=choice.reason,
                pred_tokens=choice.tokens,
                pred_ms=choice.round_ms,
                overhang_ms=overhang_ms,
            )
            for i, tok in enumerate(new):
                last = i == len(new) - 1
                yield TokenEvent(tok, SRC_TARGET if last else SRC_DRAFT, stats if last else None)
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
        if st.open:
            _close_quietly(link, st)
        if ctrl.rounds:
            _remember(drafter, link, ctrl)


def _fallback_until_back(drafter: Drafter, link: VerifierLink, opts: GenerateOptions) -> Iterator[TokenEvent]:
    """Draft-only tokens, flagged, one at a time until the cloud is reachable again."""
    while True:
        block = drafter.propose(1)
        drafter.commit(list(block.tokens))
        yield TokenEvent(block.tokens[0], SRC_FALLBACK)
        if link.available():
            return


def _cloud_only(
    link: VerifierLink, prompt_ids: list[int], opts: GenerateOptions, st: SessionState
) -> Iterator[TokenEvent]:
    committed = list(prompt_ids)
    try:
        while True:
            try:
                if not st.open:
                    _open(link, st, committed, opts, "cloud", len(committed) - len(prompt_ids))
                t0 = time.perf_counter()
                remaining = opts.max_new_tokens - (len(committed) - len(prompt_ids))
                n = max(
                    1, min(CLOUD_DECODE_CHUNK, remaining)
                )  # never make the worker decode tokens nobody wants
                req = Decode(sid=st.sid, epoch=st.epoch, seq=st.seq, pos=len(committed), n=n)
                for part in link.decode(req):
                    link_ms = (time.perf_counter() - t0) * 1e3
                    committed.extend(part.tok)
                    cost = link.last
                    stats = RoundStats(
                        seq=req.seq, gamma=0, n_acc=0, alpha=(), draft_ms=0.0, link_ms=link_ms,
                        verify_ms=part.verify_ms, queue_ms=part.queue_ms, codec_ms=cost.codec_ms,
                        bytes_up=cost.bytes_up if part.part == 0 else 0, bytes_down=cost.bytes_down,
                    )  # fmt: skip
                    for tok in part.tok:
                        yield TokenEvent(tok, SRC_TARGET, stats)
                    t0 = time.perf_counter()
                st.seq += 1
            except SessionError as exc:
                _handle_session_error(exc, st)
            except (BrokerError, CloudUnavailableError) as exc:
                st.open = False
                if opts.on_cloud_unreachable == "wait":
                    _wait_for_cloud(link, opts, exc)
                    continue
                raise CloudUnavailableError(f"cloud-only mode and the cloud is unreachable: {exc}") from exc
    finally:
        if st.open:
            _close_quietly(link, st)


def _close_quietly(link: VerifierLink, st: SessionState) -> None:
    with contextlib.suppress(Exception):  # best effort: the worker evicts idle sessions anyway
        link.close(Close(sid=st.sid, epoch=st.epoch))
