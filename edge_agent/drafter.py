"""The draft model on the edge, with its KV cache (DESIGN §4, §5).

Invariant: ``committed`` holds every committed token; the KV cache holds the first
``cache_len`` of them plus, during a round, the draft tokens fed so far. Tokens not yet in the
cache (the "pending" tail, one or two tokens after a verdict) are fed at the start of the next
forward, which costs about the same as feeding one.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from shared.kvcache import crop, forward_cached
from shared.models import LoadedModel
from shared.sampling import (
    DEFAULT_SPARSE_K,
    PURPOSE_DRAFT,
    SamplingParams,
    SparseDist,
    logits_to_probs,
    position_uniform,
    sparsify,
)


@dataclass(frozen=True, slots=True)
class DraftBlock:
    """γ proposed tokens, their sparse draft distributions (None when greedy) and the cost."""

    pos: int  # absolute position of tokens[0]
    tokens: tuple[int, ...]
    q: tuple[SparseDist, ...] | None
    draft_ms: float


class Drafter:
    """Proposes draft blocks from the draft model and rolls back to the committed length."""

    def __init__(
        self, loaded: LoadedModel, *, sparse_k: int = DEFAULT_SPARSE_K, lock: threading.Lock | None = None
    ) -> None:
        self.loaded = loaded
        # Several drafters (one per concurrent generation) may share one model; the lock keeps
        # their forward passes from running at once on the same weights and cores.
        self.lock = lock if lock is not None else contextlib.nullcontext()
        self.model = loaded.model
        self.vocab_size = loaded.vocab_size
        self.sparse_k = sparse_k
        self.params = SamplingParams()
        self.committed: list[int] = []
        self.cache = DynamicCache()
        self.cache_len = 0

    def reset(self, ctx: list[int], params: SamplingParams) -> None:
        """Start a generation from the context ``ctx`` (at least one token)."""
        if not ctx:
            raise ValueError("the context must hold at least one token")
        self.params = params
        self.committed = list(ctx)
        self.cache = DynamicCache()
        self.cache_len = 0

    @torch.inference_mode()
    def _next_probs(self, new_tokens: list[int]) -> torch.Tensor:
        """Feed ``new_tokens`` on top of the cache; return the next-token distribution [V]."""
        with self.lock:
            logits = forward_cached(self.model, new_tokens, self.cache)[-1, : self.vocab_size]  # [V]
        self.cache_len += len(new_tokens)
        return logits_to_probs(logits, self.params).cpu()

    def propose(self, gamma: int) -> DraftBlock:
        """Draft ``gamma`` tokens after the committed ones. Samples from exactly the sparse q sent."""
        assert gamma >= 1
        t0 = time.perf_counter()
        pos = len(self.committed)
        feed = self.committed[self.cache_len :]
        tokens: list[int] = []
        dists: list[SparseDist] = []
        for j in range(gamma):
            probs = self._next_probs(feed)  # [V]
            if self.params.greedy:
                x = int(probs.argmax())
            else:
                dist = sparsify(probs, self.sparse_k)
                x = dist.sample(position_uniform(self.params.seed, pos + j, PURPOSE_DRAFT))
                dists.append(dist)
            tokens.append(x)
            feed = [x]
        q = None if self.params.greedy else tuple(dists)
        return DraftBlock(pos=pos, tokens=tuple(tokens), q=q, draft_ms=(time.perf_counter() - t0) * 1e3)

    def commit(self, n_accepted: int, tokens: list[int]) -> None:
        """Append the round's committed ``tokens`` (n_accepted draft tokens, then one more) and
        crop the cache to what is still valid: the committed prefix plus the accepted drafts."""
        keep = min(self.cache_len, len(self.committed) + n_accepted)
        self.committed.extend(tokens)
        self.cache_len = crop(self.cache, self.cache_len, keep)

    def rollback(self) -> None:
        """Drop every cached draft token (a round abandoned without a verdict). The last committed
        token leaves the cache too, so the next forward has something to feed."""
        self.cache_len = crop(self.cache, self.cache_len, len(self.committed) - 1)
