"""The draft model on the edge, with its KV cache (DESIGN §4, §5).

State: ``committed`` tokens, then ``pending`` drafts (a chain: each was sampled given the
committed tokens and the drafts before it). The KV cache holds a prefix of
``committed + pending`` and never its last token, which is fed by the next forward. Drafts may
run ahead of the block in flight (pipelining, see ``extend``): when the verdict accepts the
whole block and its bonus token equals the next pending draft, the drafts after it are still
conditioned on exactly the committed prefix, so they are reused as the next block.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from edge_agent.gamma import stop_point
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
    draft_ms: float  # drafting time spent in propose() (not counting drafts made ahead)
    prefetched: int = 0  # tokens of this block drafted ahead, while the previous round was verified
    confidence: tuple[float, ...] = ()  # the draft's top probability at each token (early stopping)


class Drafter:
    """Proposes draft blocks from the draft model and rolls back to what the verifier kept.

    This class runs a transformers model in torch; ``edge_agent.drafter_llamacpp.LlamaCppDrafter``
    runs a GGUF through llama.cpp. They differ only in ``_logits`` (feed what the cache lacks,
    return the last position's logits) and ``_crop`` (forget cached positions): the sampling, the
    sparse q and the pending-draft bookkeeping below are one code path for both backends.
    """

    def __init__(
        self, loaded: LoadedModel, *, sparse_k: int = DEFAULT_SPARSE_K, lock: threading.Lock | None = None
    ) -> None:
        self.loaded = loaded
        # Several drafters (one per concurrent generation) may share one model; the lock keeps
        # their forward passes from running at once on the same weights and cores.
        self.lock = lock if lock is not None else contextlib.nullcontext()
        self.vocab_size = loaded.vocab_size
        self.sparse_k = sparse_k
        self.params = SamplingParams()
        self.committed: list[int] = []
        self.pending: list[tuple[int, SparseDist | None]] = []  # drafts after `committed`
        self.pending_conf: list[float] = []  # the draft's top probability at each pending draft
        self.cache_len = 0
        self._init_backend()

    def _init_backend(self) -> None:
        self.model = self.loaded.model
        self.cache = DynamicCache()

    def reset(self, ctx: list[int], params: SamplingParams) -> None:
        """Start a generation from the context ``ctx`` (at least one token)."""
        if not ctx:
            raise ValueError("the context must hold at least one token")
        self.params = params
        self.committed = list(ctx)
        self.pending, self.pending_conf = [], []
        self.cache_len = 0
        self._init_backend()

    def _sequence(self) -> list[int]:
        return self.committed + [t for t, _ in self.pending]

    @torch.inference_mode()
    def _logits(self, seq: list[int]) -> torch.Tensor:
        """Feed ``seq[cache_len:]`` (never empty) and return the logits ``[V]`` after ``seq``."""
        with self.lock:
            logits = forward_cached(self.model, seq[self.cache_len :], self.cache)[
                -1, : self.vocab_size
            ]  # [V]
        self.cache_len = len(seq)
        return logits

    def _crop(self, keep: int) -> None:
        """Forget cached positions from ``keep`` on."""
        self.cache_len = crop(self.cache, self.cache_len, keep)

    @torch.inference_mode()
    def _draft_one(self) -> None:
        """Feed what the cache lacks, sample the next draft from exactly its sparse q."""
        seq = self._sequence()
        logits = self._logits(seq)  # [V]
        probs = logits_to_probs(logits, self.params).cpu()  # [V]
        if self.params.greedy:
            self.pending_conf.append(float(logits.float().softmax(-1).max()))  # q is one-hot: the model's own
            self.pending.append((int(probs.argmax()), None))
            return
        dist = sparsify(probs, self.sparse_k)
        self.pending_conf.append(max(dist.w) / dist.total)  # top probability of the q sent
        self.pending.append((dist.sample(position_uniform(self.params.seed, len(seq), PURPOSE_DRAFT)), dist))

    def propose(self, gamma: int, *, stop_below: Sequence[float] = ()) -> DraftBlock:
        """The next ``gamma`` drafts after the committed tokens, reusing those drafted ahead.

        ``stop_below[i]``: end the block before draft i (i ≥ 1) when its confidence (the draft's
        top probability there) is below it. Exact: whether position i is proposed depends on q_i,
        never on the token drawn from it (which stays pending, for reuse next round)."""
        assert gamma >= 1
        t0 = time.perf_counter()
        prefetched = min(len(self.pending), gamma)

        def cut() -> int | None:
            return stop_point(self.pending_conf, stop_below, gamma)

        while len(self.pending) < gamma and cut() is None:
            self._draft_one()
        gamma = cut() or gamma
        prefetched = min(prefetched, gamma)
        block = self.pending[:gamma]
        q = None if self.params.greedy else tuple(d for _, d in block)  # type: ignore[misc]
        return DraftBlock(
            pos=len(self.committed),
            tokens=tuple(t for t, _ in block),
            q=q,
            draft_ms=(time.perf_counter() - t0) * 1e3,
            prefetched=prefetched,
            confidence=tuple(self.pending_conf[:gamma]),
        )

    def extend(self, max_tokens: int, *, stop: Callable[[], bool]) -> int:
        """Draft up to ``max_tokens`` more tokens beyond the pending ones, one at a time, until
        ``stop()`` (e.g. the verdict arrived). Returns how many were drafted."""
        n = 0
        while n < max_tokens and not stop():
            self._draft_one()
            n += 1
        return n

    def commit(self, tokens: list[int]) -> None:
        """Append the round's committed ``tokens`` (accepted drafts, then the correction or bonus).

        Pending drafts that agree with them are consumed; the rest stay valid only if every
        committed token matched (then they were drafted from the same prefix). The cache keeps
        its longest prefix that still agrees with ``committed + pending``."""
        before = self._sequence()[: self.cache_len]
        drafts = [t for t, _ in self.pending]
        agree = drafts[: len(tokens)] == tokens[: len(drafts)]
        self.pending = self.pending[len(tokens) :] if agree else []
        self.pending_conf = self.pending_conf[len(tokens) :] if agree else []
        self.committed.extend(tokens)
        after = self._sequence()
        lcp = next((i for i, (a, b) in enumerate(zip(before, after, strict=False)) if a != b), len(before))
        self._crop(min(self.cache_len, lcp, len(after) - 1))

    def rollback(self) -> None:
        """Drop every draft (a round abandoned without a verdict). The last committed token
        leaves the cache too, so the next forward has something to feed."""
        self.pending, self.pending_conf = [], []
        self._crop(min(self.cache_len, len(self.committed) - 1))


DRAFT_BACKENDS = ("auto", "torch", "llama.cpp")


def resolve_backend(spec: str, backend: str = "auto") -> str:
    """ "torch" or "llama.cpp" for the draft ``spec``: "auto" runs a ``.gguf`` file with llama.cpp
    when llama-cpp-python is installed (else converts it for torch, with a warning)."""
    if backend not in DRAFT_BACKENDS:
        raise ValueError(f"draft backend {backend!r} is unknown: use one of {', '.join(DRAFT_BACKENDS)}")
    if backend != "auto":
        return backend
    if not str(spec).lower().endswith(".gguf"):
        return "torch"
    from edge_agent.drafter_llamacpp import llama_cpp_available

    if llama_cpp_available():
        return "llama.cpp"
    logging.getLogger(__name__).warning(
        "llama-cpp-python is not installed: converting the GGUF draft %s for torch instead "
        "(pip install 'spececd[llamacpp]' runs it directly, smaller and faster)",
        spec,
    )
    return "torch"


def load_draft(
    spec: str,
    *,
    backend: str = "auto",
    threads: int = 0,
    target: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    offline: bool = True,
):
    """Load the draft model for ``backend`` (see :func:`resolve_backend`).

    torch: ``shared.models.load_model`` (a GGUF is converted once); ``threads`` > 0 sets torch's
    thread count. llama.cpp: the GGUF itself, ``threads`` llama.cpp threads (0: the cores this
    process may use), the tokenizer of ``target`` (checked against the GGUF's vocabulary)."""
    kind = resolve_backend(spec, backend)
    if kind == "llama.cpp":
        if not str(spec).lower().endswith(".gguf"):
            from shared.errors import ModelLoadError

            raise ModelLoadError(
                spec, ["draft backend llama.cpp"], "the llama.cpp backend runs a .gguf file: pass one as "
                "--draft, or use --draft-backend torch for a folder or hub id",
            )  # fmt: skip
        from edge_agent.drafter_llamacpp import load_llamacpp_draft

        return load_llamacpp_draft(spec, threads=threads, tokenizer=target)
    from shared.models import load_model

    if threads > 0:
        torch.set_num_threads(threads)
    return load_model(spec, device=device, dtype=dtype, offline=offline)


def make_drafter(draft, *, lock: threading.Lock | None = None, sparse_k: int = DEFAULT_SPARSE_K) -> Drafter:
    """A fresh drafter (its own KV state) for a draft made by :func:`load_draft`."""
    if getattr(draft, "backend", "torch") == "llama.cpp":
        from edge_agent.drafter_llamacpp import LlamaCppDrafter

        return LlamaCppDrafter(draft, lock=lock, sparse_k=sparse_k)
    return Drafter(draft, lock=lock, sparse_k=sparse_k)
