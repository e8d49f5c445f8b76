"""The exact acceptance rule of speculative sampling (DESIGN §4).

Leviathan, Kalman, Matias (2023), "Fast Inference from Transformers via Speculative Decoding",
Algorithm 1. Names follow the paper: **p is the target** distribution, **q is the draft**
distribution, γ is the number of drafted tokens.

Glossary (as in vLLM's rejection sampler):
- *accepted* tokens: the leading draft tokens x_1..x_n that passed the test u < p(x)/q(x);
- *recovered* (correction) token: drawn from norm(max(0, p_i − q_i)) at the first rejection i;
- *bonus* token: drawn from p_{γ+1} when all γ draft tokens were accepted.
Each call emits n accepted tokens plus exactly one recovered or bonus token.

The output then follows p exactly, whatever q is, provided q is the distribution the draft
tokens were really sampled from (the edge samples from the quantized sparse q it sends).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from shared.sampling import PURPOSE_ACCEPT, PURPOSE_NEXT, sample_from_probs

# A source of uniforms keyed by (index within the block, purpose); see shared.sampling.
UniformFn = Callable[[int, int], float]


def verify_draft(
    p: torch.Tensor,  # [γ+1, V] target probabilities
    draft_tokens: torch.Tensor,  # [γ] draft token ids
    q: torch.Tensor,  # [γ, V] draft probabilities (dense)
    generator: torch.Generator | None = None,
    *,
    uniform: UniformFn | None = None,
) -> tuple[int, int]:
    """Judge one draft block; return ``(n_accepted, next_token)``.

    For i = 1..γ accept x_i with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection
    return the correction drawn from norm(max(0, p_i − q_i)); if all are accepted return a bonus
    token drawn from p_{γ+1}. Greedy decoding works through one-hot p and q: a token is accepted
    iff it is the target's argmax, and the correction/bonus is the target's argmax.

    Uniform draws come from ``uniform(i, purpose)`` when given (position-keyed randomness, so
    any worker reproduces them), else from ``torch.rand`` with ``generator``.
    """
    gamma = draft_tokens.shape[0]
    assert draft_tokens.dim() == 1 and gamma >= 1, "draft_tokens must be [γ] with γ >= 1"
    assert p.dim() == 2 and p.shape[0] == gamma + 1, f"p must be [γ+1, V], got {tuple(p.shape)}"
    assert q.shape == (gamma, p.shape[1]), f"q must be [γ, V] = {(gamma, p.shape[1])}, got {tuple(q.shape)}"

    def draw(i: int, purpose: int) -> float:
        if uniform is not None:
            return uniform(i, purpose)
        return float(torch.rand((), generator=generator, dtype=torch.float64))

    for i in range(gamma):
        x = int(draft_tokens[i])
        p_x, q_x = float(p[i, x]), float(q[i, x])
        if q_x <= 0.0:
            raise ValueError(f"draft token {x} at block index {i} has zero draft probability q")
        r = draw(i, PURPOSE_ACCEPT)
        if r * q_x < p_x:  # r < min(1, p/q) without dividing
            continue
        residual = (p[i] - q[i]).clamp_min(0.0)  # [V]
        if float(residual.sum()) <= 0.0:  # p == q up to rounding: rejection had probability ~0
            residual = p[i]
        return i, sample_from_probs(residual, draw(i, PURPOSE_NEXT))
    return gamma, sample_from_probs(p[gamma], draw(gamma, PURPOSE_NEXT))


def verify_greedy(target_tokens: Sequence[int], draft_tokens: Sequence[int]) -> tuple[int, int]:
    """``verify_draft`` at T = 0 without building distributions; returns ``(n_accepted, next_token)``.

    ``target_tokens`` are the target's argmax (lowest id on ties, as ``logits_to_probs``) at the
    γ + 1 positions of the block. With one-hot p and q a draft token is accepted iff it is the
    target's argmax, and the correction or bonus is the target's argmax there: so the draft is
    accepted up to its first difference from ``target_tokens``, and the next token is the target's
    at that position. Same result as ``verify_draft``, without its [γ+1, V] tensors (the worker
    otherwise spends more on them than on a GPU forward's share per session)."""
    gamma = len(draft_tokens)
    assert len(target_tokens) == gamma + 1, (
        f"need γ + 1 = {gamma + 1} target tokens, got {len(target_tokens)}"
    )
    n = 0
    while n < gamma and draft_tokens[n] == target_tokens[n]:
        n += 1
    return n, int(target_tokens[n])


def expected_acceptance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Theoretical per-position acceptance α_i = Σ_x min(p_i(x), q_i(x)) for ``[n, V]`` inputs → ``[n]``."""
    return torch.minimum(p, q).sum(dim=-1)
