"""Sampling transforms shared by the drafter and the verifier (DESIGN §4).

p (target) and q (draft) MUST come from the same transform, so both sides call
:func:`logits_to_probs`. The draft distribution that travels is sparse and quantized
(top-K ids with integer uint16 weights); the edge samples from exactly that distribution,
so the q the verifier sees is the true draft distribution (Quantize-Sample-and-Verify).

Randomness is position-keyed: every draw is a pure function of (seed, absolute position,
purpose), so any worker reproduces the same draws after a failover.
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass

import torch

from shared.errors import ProtocolError

DEFAULT_SPARSE_K = 32
MAX_WEIGHT_SUM = 65535  # weights are uint16 and their sum must fit too
MAX_TOKEN_ID = 2**32 - 1

# Purposes of position-keyed draws; the values are part of the wire contract (changing one
# changes every seeded output), so they are fixed small integers.
PURPOSE_DRAFT = 1  # the edge samples draft token x_i
PURPOSE_ACCEPT = 2  # the verifier's accept test for x_i
PURPOSE_NEXT = 3  # the verifier's correction or bonus token
PURPOSE_TARGET = 4  # target-only (cloud-only) sampling

# Temperatures below this are greedy on both sides. Dividing logits by a tiny temperature
# overflows float32 (1e-45 gives inf - inf = NaN in softmax); 1e-3 already puts all but
# ~e^-1000 of the mass on the argmax, so greedy is the distribution such a temperature defines.
GREEDY_BELOW = 1e-3


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Temperature, top-k and top-p as in transformers; a temperature below ``GREEDY_BELOW``
    (0 included) means greedy."""

    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, int | float) and math.isfinite(self.temperature)):
            raise ProtocolError("temperature", f"must be a finite number, got {self.temperature!r}")
        if self.temperature < 0:
            raise ProtocolError("temperature", f"must be >= 0, got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ProtocolError("top_k", f"must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not (isinstance(self.top_p, int | float) and 0.0 < self.top_p <= 1.0):
            raise ProtocolError("top_p", f"must be in (0, 1] (1 disables it), got {self.top_p!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ProtocolError("seed", f"must be an integer in [0, 2**63), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        """True below ``GREEDY_BELOW``: the edge and the worker both decide by this property."""
        return self.temperature < GREEDY_BELOW


def logits_to_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Turn logits ``[..., V]`` into the sampling distribution ``[..., V]`` (float32).

    Greedy (temperature below ``GREEDY_BELOW``) gives a one-hot distribution at the argmax (lowest id on ties),
    so the acceptance rule needs no special case.
    """
    logits = logits.float()
    if params.greedy:
        idx = logits.argmax(dim=-1, keepdim=True)  # [..., 1]
        return torch.zeros_like(logits).scatter_(-1, idx, 1.0)
    logits = logits / params.temperature
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]  # [..., 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the mass before it already reaches top_p; the first always stays
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(dim=-1)


@dataclass(frozen=True, slots=True)
class SparseDist:
    """One draft position's distribution: token ``ids`` with integer ``w``; q(id) = w / sum(w)."""

    ids: tuple[int, ...]
    w: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.w):
            raise ProtocolError("q", f"ids and w differ in length ({len(self.ids)} != {len(self.w)})")
        if not self.ids:
            raise ProtocolError("q", "a sparse distribution needs at least one entry")
        if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i <= MAX_TOKEN_ID for i in self.ids):
            raise ProtocolError("q.ids", "token ids must be integers in [0, 2**32)")
        if len(set(self.ids)) != len(self.ids):
            raise ProtocolError("q.ids", "token ids must be unique")
        if any(isinstance(x, bool) or not isinstance(x, int) or not 1 <= x <= 65535 for x in self.w):
            raise ProtocolError("q.w", "weights must be integers in [1, 65535]")
        if sum(self.w) > MAX_WEIGHT_SUM:
            raise ProtocolError("q.w", f"weights must sum to at most {MAX_WEIGHT_SUM}, got {sum(self.w)}")

    @property
    def total(self) -> int:
        return sum(self.w)

    def prob(self, token: int) -> float:
        for i, w in zip(self.ids, self.w, strict=True):
            if i == token:
                return w / self.total
        return 0.0

    def to_dense(self, vocab_size: int) -> torch.Tensor:
        """Expand to a dense ``[V]`` float32 tensor."""
        if max(self.ids) >= vocab_size:
            raise ProtocolError("q.ids", f"token id {max(self.ids)} is outside the vocabulary ({vocab_size})")
        out = torch.zeros(vocab_size, dtype=torch.float32)
        out[torch.tensor(self.ids, dtype=torch.long)] = torch.tensor(self.w, dtype=torch.float32) / self.total
        return out

    def sample(self, u: float) -> int:
        """Inverse-CDF sample with a uniform ``u`` in [0, 1), in exact integer arithmetic."""
        target = min(int(u * self.total), self.total - 1)
        acc = 0
        for i, w in zip(self.ids, self.w, strict=True):
            acc += w
            if target < acc:
                return i
        raise AssertionError("unreachable: target < total")


def sparsify(probs: torch.Tensor, k: int = DEFAULT_SPARSE_K) -> SparseDist:
    """Keep the top-``k`` entries of ``probs`` ``[V]`` and quantize them to uint16 weights.

    Entries whose weight rounds to zero are dropped; the argmax always survives.
    """
    assert probs.dim() == 1, "expects one position [V]"
    values, ids = torch.topk(probs.float(), min(k, probs.shape[-1]))  # [k], [k]
    keep = values > 0
    values, ids = values[keep], ids[keep]
    w = torch.floor(values / values.sum() * MAX_WEIGHT_SUM).to(torch.int64)  # sum <= MAX_WEIGHT_SUM
    w[0] = max(int(w[0]), 1)
    nz = w > 0
    return SparseDist(ids=tuple(ids[nz].tolist()), w=tuple(w[nz].tolist()))


def position_uniform(seed: int, position: int, purpose: int) -> float:
    """A uniform draw in [0, 1) that depends only on (seed, absolute position, purpose).

    Counter-based (a keyed hash), so both sides and any worker reproduce it without state.
    """
    digest = hashlib.blake2b(struct.pack("<QQQ", seed, position, purpose), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 11) * (1.0 / (1 << 53))


def sample_from_probs(probs: torch.Tensor, u: float) -> int:
    """Inverse-CDF sample from ``probs`` ``[V]`` with uniform ``u`` (float64 cumsum, deterministic)."""
    cdf = probs.double().cumsum(dim=-1)  # [V]
    target = torch.tensor([u * float(cdf[-1])], dtype=torch.float64)
    idx = int(torch.searchsorted(cdf, target, right=True)[0])
    idx = min(idx, probs.shape[-1] - 1)
    while probs[idx] <= 0 and idx > 0:  # never land on a zero-probability tail entry
        idx -= 1
    return idx
