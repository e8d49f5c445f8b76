"""The target model with one KV cache per session: prefill, one-pass verification, target-only
decoding (DESIGN §4, §5).

Per-session invariant: ``tokens`` holds the committed tokens; the KV cache holds the first
``cache_len`` of them (all but the last one or few, which are fed with the next draft).
Sessions are bounded (count and cached tokens); the least recently used is evicted, and a
later request for it gets ``SessionError("resync")`` so the edge re-opens it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from shared.config_keys import DEFAULT_MAX_SESSIONS  # one default: config, worker, verifier
from shared.errors import SessionError
from shared.kvcache import crop, forward_cached
from shared.models import LoadedModel
from shared.protocol import Decode, Draft, Open, Opened, Tokens, Verdict
from shared.sampling import (
    PURPOSE_TARGET,
    SamplingParams,
    logits_to_probs,
    position_uniform,
    sample_from_probs,
)
from shared.speculative import expected_acceptance, verify_draft


@dataclass
class _Session:
    sid: str
    epoch: int
    params: SamplingParams
    tokens: list[int]
    max_new: int
    cache: DynamicCache = field(default_factory=DynamicCache)
    cache_len: int = 0
    last_seq: int = -1
    last_replies: list = field(default_factory=list)  # the answer to last_seq, replayed on a repeat


class Verifier:
    """Verifies draft blocks for many sessions with one target model (one thread at a time)."""

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        worker_id: str = "local",
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        max_cached_tokens: int = 1 << 20,
    ) -> None:
        if max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")
        self.loaded = loaded
        self.model = loaded.model
        self.vocab_size = loaded.vocab_size
        self.eos_ids = loaded.eos_token_ids
        self.max_positions = int(getattr(self.model.config, "max_position_embeddings", 1 << 30))
        self.worker_id = worker_id
        self.max_sessions = max_sessions
        self.max_cached_tokens = max_cached_tokens
        self.sessions: OrderedDict[str, _Session] = OrderedDict()
        self.evictions = 0

    # -- sessions ---------------------------------------------------------------------------

    def _get(self, sid: str, epoch: int) -> _Session:
        sess = self.sessions.get(sid)
        if sess is None:
            raise SessionError("resync", "unknown or evicted session: re-open it", sid=sid)
        if epoch < sess.epoch:
            raise SessionError("stale_epoch", f"epoch {epoch} < current {sess.epoch}", sid=sid)
        if epoch > sess.epoch:
            raise SessionError("resync", f"epoch {epoch} was never opened here", sid=sid)
        self.sessions.move_to_end(sid)
        return sess

    def _evict_if_needed(self) -> None:
        while len(self.sessions) > self.max_sessions or (
            len(self.sessions) > 1
            and sum(s.cache_len for s in self.sessions.values()) > self.max_cached_tokens
        ):
            self.sessions.popitem(last=False)
            self.evictions += 1

    def evict(self, sid: str) -> bool:
        """Drop one session (its next request gets ``resync``)."""
        return self.sessions.pop(sid, None) is not None

    def close(self, sid: str, epoch: int) -> None:
        sess = self.sessions.get(sid)
        if sess is not None and epoch >= sess.epoch:
            del self.sessions[sid]

    # -- model work -------------------------------------------------------------------------

    @torch.inference_mode()
    def _forward(self, sess: _Session, new_tokens: list[int]) -> torch.Tensor:
        """Feed ``new_tokens`` after the session's cache; return logits [len(new_tokens), V]."""
        logits = forward_cached(self.model, new_tokens, sess.cache)[:, : self.vocab_size]  # [k, V]
        sess.cache_len += len(new_tokens)
        return logits.float().cpu()

    def open(self, msg: Open) -> Opened:
        """Create (or replace with a newer epoch) a session and prefill all but its last token."""
        old = self.sessions.get(msg.sid)
        if old is not None and msg.epoch < old.epoch:
            raise SessionError("stale_epoch", f"epoch {msg.epoch} < current {old.epoch}", sid=msg.sid)
        if not msg.ctx:
            raise SessionError("bad_message", "ctx must hold at least one token", sid=msg.sid)
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
        sess = _Session(
            sid=msg.sid, epoch=msg.epoch, params=msg.sampling, tokens=list(msg.ctx), max_new=msg.max_new
        )
        self.sessions[msg.sid] = sess
        self.sessions.move_to_end(msg.sid)
        if len(msg.ctx) > 1:
            self._forward(sess, list(msg.ctx[:-1]))
        self._evict_if_needed()
        return Opened(sid=msg.sid, epoch=msg.epoch, worker=self.worker_id, pos=len(sess.tokens))

    def _check_seq(self, sess: _Session, seq: int) -> list | None:
        """A repeated seq is answered from memory; an older one is refused."""
        if seq == sess.last_seq:
            return sess.last_replies
        if seq < sess.last_seq:
            raise SessionError(
                "bad_message", f"seq {seq} is older than the last ({sess.last_seq})", sid=sess.sid
            )
        return None

    def verify(self, msg: Draft, *, queue_ms: float = 0.0) -> Verdict:
        """Judge a draft block in ONE forward pass over γ+1 positions (DESIGN §4)."""
        sess = self._get(msg.sid, msg.epoch)
        replay = self._check_seq(sess, msg.seq)
        if replay is not None:
            return replay[0]
        if msg.pos != len(sess.tokens):
            raise SessionError(
                "resync", f"draft at position {msg.pos}, committed length {len(sess.tokens)}", sid=msg.sid
            )
        if sess.params.greedy != (msg.q is None):
            raise SessionError(
                "bad_message", "q must be omitted exactly when sampling is greedy", sid=msg.sid
            )
        if max(msg.tok) >= self.vocab_size:
            raise SessionError("bad_message", f"draft token id {max(msg.tok)} >= vocabulary", sid=msg.sid)
        gamma = len(msg.tok)
        t0 = time.perf_counter()
        logits = self._forward(sess, sess.tokens[sess.cache_len :] + list(msg.tok))[
            -(gamma + 1) :
        ]  # [γ+1, V]
        p = logits_to_probs(logits, sess.params)  # [γ+1, V]
        draft = torch.tensor(msg.tok, dtype=torch.long)  # [γ]
        if msg.q is None:
            q = torch.nn.functional.one_hot(draft, self.vocab_size).float()  # [γ, V]
        else:
            q = torch.stack([d.to_dense(self.vocab_size) for d in msg.q])  # [γ, V]
        seed, pos = sess.params.seed, msg.pos
        n_acc, nxt = verify_draft(
            p, draft, q, uniform=lambda i, purpose: position_uniform(seed, pos + i, purpose)
        )
        judged = min(n_acc + 1, gamma)
        alpha = tuple(round(a, 6) for a in expected_acceptance(p[:judged], q[:judged]).tolist())
        new = [*msg.tok[:n_acc], nxt]
        sess.cache_len = crop(sess.cache, sess.cache_len, len(sess.tokens) + n_acc)
        sess.tokens.extend(new)
        verdict = Verdict(
            sid=msg.sid,
            epoch=msg.epoch,
            seq=msg.seq,
            n_acc=n_acc,
            next=nxt,
            eos=any(t in self.eos_ids for t in new),
            verify_ms=(time.perf_counter() - t0) * 1e3,
            queue_ms=queue_ms,
            alpha=alpha,
        )
        sess.last_seq, sess.last_replies = msg.seq, [verdict]
        self._evict_if_needed()
        return verdict

    def decode(self, msg: Decode, emit: Callable[[Tokens], None], *, queue_ms: float = 0.0) -> None:
        """Cloud-only: decode up to ``msg.n`` tokens with the target alone, one ``Tokens`` part each."""
        sess = self._get(msg.sid, msg.epoch)
        replay = self._check_seq(sess, msg.seq)
        if replay is not None:
            for part in replay:
                emit(part)
            return
        if msg.pos != len(sess.tokens):
            raise SessionError(
                "resync", f"decode at position {msg.pos}, committed length {len(sess.tokens)}", sid=msg.sid
            )
        sess.last_seq, sess.last_replies = msg.seq, []
        for part in range(msg.n):
            t0 = time.perf_counter()
            logits = self._forward(sess, sess.tokens[sess.cache_len :])[-1]  # [V]
            probs = logits_to_probs(logits, sess.params)
            pos = len(sess.tokens)
            tok = sample_from_probs(probs, position_uniform(sess.params.seed, pos, PURPOSE_TARGET))
            sess.tokens.append(tok)
            eos = tok in self.eos_ids
            reply = Tokens(
                sid=msg.sid,
                epoch=msg.epoch,
                seq=msg.seq,
                part=part,
                tok=(tok,),
                done=eos or part == msg.n - 1,
                eos=eos,
                verify_ms=(time.perf_counter() - t0) * 1e3,
                queue_ms=queue_ms if part == 0 else 0.0,
            )
            sess.last_replies.append(reply)
            emit(reply)
            if eos:
                break
        self._evict_if_needed()
