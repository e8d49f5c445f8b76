"""The target model with one KV cache per session: prefill, one-pass verification, target-only
decoding (DESIGN §4, §5), in steps that many sessions share one forward for.

Per-session invariant: ``tokens`` holds the committed tokens; the KV cache holds the first
``cache_len`` of them (all but the last one or few, which are fed with the next draft).

Every request goes through :meth:`Verifier.prepare`, which validates the WHOLE message against
the session (every field, q's token ids included) and raises ``SessionError`` before any state
moves, or returns the answer at once (a replayed seq), or returns a :class:`Step`: one session's
row of the next forward. :meth:`Verifier.run` runs one forward over many steps' rows
(``cloud_worker.batching``) and finishes each. A decode of n tokens is n steps and an open's
prefill may be several chunks: a step with ``more`` set goes back to the scheduler.

Limits after open: a session never holds more than ``limit = len(ctx) + max_new`` tokens (open
already refuses a limit over the target's positions). A draft reaching past the limit is judged
only up to it (the tokens before the limit are those of the full block; its last token may be
a bonus one past the limit, which the edge drops and the worker never stores); a decode streams
at most what remains; a request at the limit is answered ``error{limit}``.

Sessions are keyed by (device, sid), stored as ``"device/sid"`` (``/`` is in neither; the
in-process link has no device, its key is the sid). Sessions are bounded by count, per device
and cached tokens; victims are taken from the device holding the most (the requester's own on
a tie), least recently used first, and listed in ``evicted`` for the worker to answer.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable

import torch

from cloud_worker.batching import LAYOUTS, Row, forward_packed, forward_rows, packing_supported
from cloud_worker.sessions import Reply, Session, Step, key_device, session_key
from shared.config_keys import DEFAULT_MAX_SESSIONS  # one default: config, worker, verifier
from shared.errors import ConfigError, SessionError
from shared.kvcache import crop
from shared.models import LoadedModel
from shared.protocol import Decode, Draft, Error, Open, Opened, Tokens, Verdict
from shared.sampling import (
    PURPOSE_TARGET,
    logits_to_probs,
    position_uniform,
    sample_from_probs,
)
from shared.speculative import expected_acceptance, verify_draft, verify_greedy

log = logging.getLogger(__name__)
__all__ = ["DEFAULT_MAX_SESSIONS", "Reply", "Step", "Verifier", "session_key"]


class Verifier:
    """Verifies draft blocks for many sessions with one target model (one thread at a time)."""

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        worker_id: str = "local",
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        max_cached_tokens: int = 1 << 20,
        max_sessions_per_device: int = 0,
        batch_layout: str = "padded",
    ) -> None:
        if max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")
        if batch_layout not in LAYOUTS:
            raise ValueError(f"batch_layout must be one of {', '.join(LAYOUTS)}, got {batch_layout!r}")
        if batch_layout == "packed" and (why := packing_supported(loaded.model)) is not None:
            raise ConfigError("batch_layout", batch_layout, f"'padded' for this target ({why})")
        self._batched = forward_packed if batch_layout == "packed" else forward_rows  # many rows, one forward
        self.loaded = loaded
        self.model = loaded.model
        self.vocab_size = loaded.vocab_size
        self.eos_ids = loaded.eos_token_ids
        self.max_positions = int(getattr(self.model.config, "max_position_embeddings", 1 << 30))
        self.worker_id = worker_id
        self.max_sessions = max_sessions
        self.max_cached_tokens = max_cached_tokens
        self.max_per_device = max_sessions_per_device or max_sessions  # 0 = only the global bound
        self.prefill_chunk = 1 << 30  # positions of an open fed per step (the scheduler lowers it)
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        self.evictions = 0
        # (key, session) evicted since the worker last answered them; bounded for callers that never drain
        self.evicted: deque[tuple[str, Session]] = deque(maxlen=max(1024, 4 * max_sessions))

    # -- sessions ---------------------------------------------------------------------------

    def _get(self, key: str, sid: str, epoch: int) -> Session:
        sess = self.sessions.get(key)
        if sess is None:
            raise SessionError("resync", "unknown or evicted session: re-open it", sid=sid)
        if epoch < sess.epoch:
            raise SessionError("stale_epoch", f"epoch {epoch} < current {sess.epoch}", sid=sid)
        if epoch > sess.epoch:
            raise SessionError("resync", f"epoch {epoch} was never opened here", sid=sid)
        return sess

    def _victim(self, device: str, protect: str) -> str | None:
        """The LRU session of the device holding the most sessions (``device`` on a tie)."""
        counts = Counter(key_device(k) for k in self.sessions if k != protect)
        if not counts:
            return None
        top = max(counts.values())
        heaviest = device if counts.get(device) == top else next(d for d, c in counts.items() if c == top)
        return next(k for k in self.sessions if k != protect and key_device(k) == heaviest)

    def _drop(self, key: str) -> None:
        self.evicted.append((key, self.sessions.pop(key)))
        self.evictions += 1

    def _evict_if_needed(self, device: str = "", protect: str = "") -> None:
        """Enforce the per-device, count and cached-token bounds (``protect`` is never the victim)."""
        mine = [k for k in self.sessions if key_device(k) == device and k != protect]
        while len(mine) + (protect in self.sessions) > self.max_per_device and mine:
            self._drop(mine.pop(0))
        while len(self.sessions) > self.max_sessions or (
            len(self.sessions) > 1
            and sum(s.cache_len for s in self.sessions.values()) > self.max_cached_tokens
        ):
            victim = self._victim(device, protect)
            if victim is None:
                return
            self._drop(victim)

    def evict(self, key: str) -> bool:
        """Drop one session (its next request gets ``resync``)."""
        return self.sessions.pop(key, None) is not None

    def close(self, sid: str, epoch: int, *, device: str = "") -> None:
        key = session_key(device, sid)
        sess = self.sessions.get(key)
        if sess is not None and epoch >= sess.epoch:
            del self.sessions[key]

    # -- validation: nothing moves before a request is known good ----------------------------

    def prepare(
        self, msg: Open | Draft | Decode, *, device: str = "", queue_ms: float = 0.0
    ) -> Step | list[Reply]:
        """Validate ``msg`` against its session; return its next step, or its replies when no
        forward is needed. Raises ``SessionError`` with the session untouched."""
        key = session_key(device, msg.sid)
        if isinstance(msg, Open):
            return self._prepare_open(key, msg, queue_ms)
        sess = self._get(key, msg.sid, msg.epoch)
        if msg.seq == sess.last_seq:  # a repeat: the stored answer, never verified twice
            return list(sess.last_replies)
        if msg.seq < sess.last_seq:
            raise SessionError(
                "bad_message", f"seq {msg.seq} is older than the last ({sess.last_seq})", sid=msg.sid
            )
        what = "draft" if isinstance(msg, Draft) else "decode"
        if len(sess.tokens) >= sess.limit:  # checked first: its last verdict may name a token past it
            raise SessionError(
                "limit",
                f"the session holds its limit of {sess.limit} tokens (ctx + max_new): open a new one",
                sid=msg.sid,
            )
        if msg.pos != len(sess.tokens):
            raise SessionError(
                "resync", f"{what} at position {msg.pos}, committed length {len(sess.tokens)}", sid=msg.sid
            )
        if isinstance(msg, Draft):
            step = self._prepare_verify(key, sess, msg, queue_ms)
            self.sessions.move_to_end(key)  # only once the request is known good
            return step
        if msg.n < 1:
            raise SessionError("bad_message", "decode n must be >= 1", sid=msg.sid)
        self.sessions.move_to_end(key)
        return self._decode_step(key, sess, msg, steps=min(msg.n, sess.limit - msg.pos), queue_ms=queue_ms)

    def _prepare_open(self, key: str, msg: Open, queue_ms: float) -> Step | list[Reply]:
        old = self.sessions.get(key)
        if old is not None and msg.epoch < old.epoch:
            raise SessionError("stale_epoch", f"epoch {msg.epoch} < current {old.epoch}", sid=msg.sid)
        if max(msg.ctx) >= self.vocab_size:
            raise SessionError(
                "bad_message", f"token id {max(msg.ctx)} >= vocabulary {self.vocab_size}", sid=msg.sid
            )
        if len(msg.ctx) + msg.max_new > self.max_positions:
            raise SessionError(
                "bad_message",
                f"context {len(msg.ctx)} + max_new {msg.max_new} exceeds the target's {self.max_positions} positions",
                sid=msg.sid,
            )
        sess = Session(
            sid=msg.sid,
            epoch=msg.epoch,
            params=msg.sampling,
            tokens=list(msg.ctx),
            limit=len(msg.ctx) + msg.max_new,
        )
        if len(msg.ctx) == 1:
            return [self._register(key, sess)]
        return self._prefill_step(key, sess, queue_ms)

    def _register(self, key: str, sess: Session) -> Opened:
        self.sessions[key] = sess  # replaces an older epoch
        self.sessions.move_to_end(key)
        self._evict_if_needed(key_device(key), protect=key)
        return Opened(sid=sess.sid, epoch=sess.epoch, worker=self.worker_id, pos=len(sess.tokens))

    def _prefill_step(self, key: str, sess: Session, queue_ms: float) -> Step:
        return Step(key, sess, self._prefill_row(sess), self._finish_prefill, queue_ms)

    def _prefill_row(self, sess: Session) -> Row:
        return Row(
            sess.cache,
            sess.cache_len,
            sess.tokens[sess.cache_len : len(sess.tokens) - 1][: self.prefill_chunk],
            logits=False,  # the first draft's verify feeds the context's last token and reads its logits
        )

    def _finish_prefill(self, step: Step, _logits: torch.Tensor, _ms: float) -> list[Reply]:
        sess = step.sess
        if sess.cache_len < len(sess.tokens) - 1:
            step.more = True  # another chunk: the scheduler re-queues it
            step.row, step.queue_ms = self._prefill_row(sess), 0.0
            return []
        return [self._register(step.key, sess)]

    def _prepare_verify(self, key: str, sess: Session, msg: Draft, queue_ms: float) -> Step:
        if sess.params.greedy != (msg.q is None):
            raise SessionError(
                "bad_message", "q must be omitted exactly when sampling is greedy", sid=msg.sid
            )
        if max(msg.tok) >= self.vocab_size:
            raise SessionError(
                "bad_message", f"draft token id {max(msg.tok)} >= vocabulary {self.vocab_size}", sid=msg.sid
            )
        for i, dist in enumerate(msg.q or ()):
            if max(dist.ids) >= self.vocab_size:
                raise SessionError(
                    "bad_message",
                    f"q[{i}] names token id {max(dist.ids)} >= vocabulary {self.vocab_size}",
                    sid=msg.sid,
                )
        # judge only up to the limit: positions before it come out as from the whole block
        gamma = min(len(msg.tok), sess.limit - msg.pos)
        feed = sess.tokens[sess.cache_len :] + list(msg.tok[:gamma])
        finish = lambda step, logits, fwd_ms: [self._finish_verify(step, msg, gamma, logits, fwd_ms)]  # noqa: E731
        row = Row(sess.cache, sess.cache_len, feed, greedy=sess.params.greedy)
        return Step(key, sess, row, finish, queue_ms)

    # -- model work -------------------------------------------------------------------------

    def run(self, steps: list[Step]) -> list[tuple[Step, list[Reply]]]:
        """ONE forward over the rows of ``steps`` (distinct sessions); finish each step.

        If the forward fails, every session is left as it was and the error propagates."""
        for s in steps:
            s.row.cache, s.row.cache_len = s.sess.cache, s.sess.cache_len
        positions = sum(len(s.row.tokens) for s in steps)
        t0 = time.perf_counter()
        try:
            logits = self._batched(self.model, [s.row for s in steps], self.vocab_size)
        except Exception:
            for s in steps:  # the single-row path grows the cache in place: put it back
                crop(s.sess.cache, s.sess.cache.get_seq_length(), s.sess.cache_len)
            raise
        fwd_ms = (time.perf_counter() - t0) * 1e3
        out = []
        for s, lg in zip(steps, logits, strict=True):
            s.sess.cache, s.sess.cache_len = s.row.cache, s.row.cache_len
            s.batch, s.batch_pos, s.more = len(steps), positions, False
            try:
                out.append((s, s.finish(s, lg, fwd_ms)))
            except Exception as exc:  # a bug in one session's step never fails its batch-mates
                log.exception("finishing a step of session %s failed", s.key)
                self.sessions.pop(s.key, None)  # its state is unknown: the next request gets resync
                s.more = False
                out.append(
                    (
                        s,
                        [
                            Error(
                                sid=s.sess.sid,
                                code="internal",
                                detail=f"{type(exc).__name__}: {exc}",
                                seq=None,
                            )
                        ],
                    )
                )
        self._evict_if_needed()
        return out

    def _finish_verify(
        self, step: Step, msg: Draft, gamma: int, logits: torch.Tensor, fwd_ms: float
    ) -> Verdict:
        t0 = time.perf_counter()
        sess = step.sess
        if msg.q is None:  # greedy (checked in prepare): the same verdict from the argmax alone
            best = logits[-(gamma + 1) :].tolist()  # [γ+1] argmax ids (a greedy row: forward_rows)
            n_acc, nxt = verify_greedy(best, msg.tok[:gamma])
            # one-hot p and q: α_i = 1 where the draft is the argmax, else 0
            alpha = tuple(1.0 if i < n_acc else 0.0 for i in range(min(n_acc + 1, gamma)))
        else:
            p = logits_to_probs(logits[-(gamma + 1) :], sess.params)  # [γ+1, V]
            draft = torch.tensor(msg.tok[:gamma], dtype=torch.long)  # [γ]
            q = torch.stack([d.to_dense(self.vocab_size) for d in msg.q[:gamma]])  # [γ, V]
            seed, pos = sess.params.seed, msg.pos
            n_acc, nxt = verify_draft(
                p, draft, q, uniform=lambda i, purpose: position_uniform(seed, pos + i, purpose)
            )
            judged = min(n_acc + 1, gamma)
            alpha = tuple(round(a, 6) for a in expected_acceptance(p[:judged], q[:judged]).tolist())
        new = [*msg.tok[:n_acc], nxt]
        sess.cache_len = crop(sess.cache, sess.cache_len, len(sess.tokens) + n_acc)
        sess.tokens.extend(new)
        del sess.tokens[sess.limit :]  # a bonus token past the limit is never stored
        verdict = Verdict(
            sid=msg.sid,
            epoch=msg.epoch,
            seq=msg.seq,
            n_acc=n_acc,
            next=nxt,
            eos=any(t in self.eos_ids for t in new),
            verify_ms=fwd_ms + (time.perf_counter() - t0) * 1e3,
            queue_ms=step.queue_ms,
            alpha=alpha,
            batch=step.batch,
            batch_pos=step.batch_pos,
            pos_ms=step.pos_ms,
            row_med=step.row_med,
        )
        sess.last_seq, sess.last_replies = msg.seq, [verdict]
        return verdict

    def _decode_step(self, key: str, sess: Session, msg: Decode, *, steps: int, queue_ms: float) -> Step:
        sess.last_seq, sess.last_replies = msg.seq, []
        parts = iter(range(steps))

        def row_of(sess: Session) -> Row:
            return Row(sess.cache, sess.cache_len, sess.tokens[sess.cache_len :], greedy=sess.params.greedy)

        def finish(step: Step, logits: torch.Tensor, fwd_ms: float) -> list[Reply]:
            part = next(parts)
            t0 = time.perf_counter()
            pos = len(sess.tokens)
            if sess.params.greedy:  # the argmax id (a greedy row): what sampling its one-hot gives
                tok = int(logits[-1])
            else:
                probs = logits_to_probs(logits[-1], sess.params)  # [V]
                tok = sample_from_probs(probs, position_uniform(sess.params.seed, pos, PURPOSE_TARGET))
            sess.tokens.append(tok)
            eos = tok in self.eos_ids
            done = eos or part == steps - 1
            reply = Tokens(
                sid=msg.sid, epoch=msg.epoch, seq=msg.seq, part=part, tok=(tok,), done=done, eos=eos,
                verify_ms=fwd_ms + (time.perf_counter() - t0) * 1e3, queue_ms=step.queue_ms,
                batch=step.batch, batch_pos=step.batch_pos, pos_ms=step.pos_ms,
            )  # fmt: skip
            sess.last_replies.append(reply)
            if not done:  # the next token is the next step, after every other session's turn
                step.more = True
                step.row, step.queue_ms = row_of(sess), 0.0
            return [reply]

        return Step(key, sess, row_of(sess), finish, queue_ms)

    # -- one request at a time (the in-process link, tests) ---------------------------------

    def _complete(
        self, msg: Open | Draft | Decode, device: str, queue_ms: float, emit: Callable[[Reply], None]
    ) -> None:
        prepared = self.prepare(msg, device=device, queue_ms=queue_ms)
        if isinstance(prepared, list):
            for reply in prepared:
                emit(reply)
            return
        step = prepared
        while True:
            step.more = False
            for reply in self.run([step])[0][1]:
                emit(reply)
            if not step.more:
                return

    def open(self, msg: Open, *, device: str = "") -> Opened:
        """Create (or replace with a newer epoch) a session and prefill all but its last token."""
        out: list[Reply] = []
        self._complete(msg, device, 0.0, out.append)
        return out[-1]  # type: ignore[return-value]

    def verify(self, msg: Draft, *, queue_ms: float = 0.0, device: str = "") -> Verdict:
        """Judge a draft block in ONE forward pass over γ+1 positions (DESIGN §4)."""
        out: list[Reply] = []
        self._complete(msg, device, queue_ms, out.append)
        return out[0]  # type: ignore[return-value]

    def decode(
        self, msg: Decode, emit: Callable[[Tokens], None], *, queue_ms: float = 0.0, device: str = ""
    ) -> None:
        """Cloud-only: decode up to ``msg.n`` tokens with the target alone, one ``Tokens`` part each."""
        self._complete(msg, device, queue_ms, emit)  # type: ignore[arg-type]

    @torch.inference_mode()
    def _forward(self, sess: Session, new_tokens: list[int]) -> torch.Tensor:
        """Feed ``new_tokens`` after the session's cache; return logits [len(new_tokens), V]."""
        row = Row(sess.cache, sess.cache_len, list(new_tokens))
        (logits,) = forward_rows(self.model, [row], self.vocab_size)
        sess.cache, sess.cache_len = row.cache, row.cache_len
        return logits
