"""The acceptance rule emits tokens distributed exactly as the target p (Leviathan et al. 2023).

Statistical test: for synthetic per-position p and q, the token emitted at block position i
(over many independent blocks) must follow p_i. Chi-square goodness of fit at significance
1e-3 per position, fixed seeds (so the outcome is deterministic). With N = 6000 blocks and a
vocabulary of 6, a wrong residual or a bonus drawn from the wrong row moves the emitted
distribution by >= 0.1 total variation, which gives a chi-square far above the 1e-3 threshold;
`test_detects_wrong_residual` and `test_detects_missing_bonus` check that power directly.
"""

from __future__ import annotations

import pytest
import torch

from shared import speculative
from shared.sampling import (
    PURPOSE_TARGET,
    SamplingParams,
    SparseDist,
    logits_to_probs,
    position_uniform,
    sample_from_probs,
    sparsify,
)
from shared.speculative import expected_acceptance, verify_draft, verify_greedy

V = 6
N = 6000
SIGNIFICANCE = 1e-3


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square p-value of observed ``counts`` [V] against ``probs`` [V]."""
    support = probs > 0
    if (counts[~support] > 0).any():
        return 0.0  # emitted a token the target gives zero probability
    n = counts.sum()
    expected = probs[support].double() * n
    stat = ((counts[support].double() - expected) ** 2 / expected).sum()
    dof = int(support.sum()) - 1
    if dof == 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))


def make_case(kind: str, gamma: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic target p [γ+1, V] and draft q [γ, V] of a named shape."""

    def rand_dist(rows: int, temp: float) -> torch.Tensor:
        return (torch.randn(rows, V, generator=gen) / temp).softmax(-1)

    p = rand_dist(gamma + 1, 1.0)
    if kind == "peaked":
        q = rand_dist(gamma, 0.2)
    elif kind == "flat":
        q = torch.full((gamma, V), 1.0 / V)
    elif kind == "disjoint":  # q lives where p does not, and the other way round
        p = torch.zeros(gamma + 1, V)
        p[:, :3] = rand_dist(gamma + 1, 1.0)[:, :3]
        p = p / p.sum(-1, keepdim=True)
        q = torch.zeros(gamma, V)
        q[:, 3:] = rand_dist(gamma, 1.0)[:, 3:]
        q = q / q.sum(-1, keepdim=True)
    elif kind == "equal":
        q = p[:gamma].clone()
    elif kind == "sparse":  # the quantized top-K form that travels on the wire
        q = torch.stack([sparsify(row, k=4).to_dense(V) for row in rand_dist(gamma, 0.7)])
    else:
        raise ValueError(kind)
    return p, q


def emitted_counts(p, q, gamma, seed, verify=verify_draft):
    """Run N blocks; return counts[i] of tokens emitted at block position i, and n_accepted total."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.zeros(gamma + 1, V, dtype=torch.long)
    accepted = 0
    for _ in range(N):
        draft = torch.multinomial(q, 1, generator=gen).squeeze(-1)  # [γ]
        n, nxt = verify(p, draft, q, gen)
        for i in range(n):
            counts[i, draft[i]] += 1
        counts[n, nxt] += 1
        accepted += n
    return counts, accepted


@pytest.mark.parametrize("kind", ["peaked", "flat", "disjoint", "equal", "sparse"])
@pytest.mark.parametrize("gamma", [1, 2, 4, 8])
def test_emitted_tokens_follow_target(kind: str, gamma: int) -> None:
    gen = torch.Generator().manual_seed(1000 * gamma + len(kind))
    p, q = make_case(kind, gamma, gen)
    counts, _ = emitted_counts(p, q, gamma, seed=gamma)
    for i in range(gamma + 1):
        if counts[i].sum() < 200:  # positions almost never reached (e.g. disjoint supports)
            continue
        pval = chi2_pvalue(counts[i], p[i])
        assert pval > SIGNIFICANCE, f"position {i}: emitted {counts[i].tolist()} vs p {p[i].tolist()}"


def test_acceptance_rate_matches_theory() -> None:
    gen = torch.Generator().manual_seed(7)
    p, q = make_case("peaked", 1, gen)
    _, accepted = emitted_counts(p, q, 1, seed=3)
    alpha = float(expected_acceptance(p[:1], q)[0])
    se = (alpha * (1 - alpha) / N) ** 0.5
    assert abs(accepted / N - alpha) < 4 * se


def test_greedy_one_hot_accepts_exactly_the_argmax() -> None:
    p = torch.eye(V)[[2, 4, 1, 5]]  # target argmax: 2, 4, 1, then bonus 5
    q = torch.eye(V)[[2, 4, 0]]
    n, nxt = verify_draft(p, torch.tensor([2, 4, 0]), q, None)
    assert (n, nxt) == (2, 1)
    n, nxt = verify_draft(p, torch.tensor([2, 4, 1]), torch.eye(V)[[2, 4, 1]], None)
    assert (n, nxt) == (3, 5)


def test_greedy_shortcut_equals_the_one_hot_rule() -> None:
    """The worker's T = 0 path (``verify_greedy`` on the argmax) gives the verdict and α of the
    general rule on one-hot p and q, and the cloud-only argmax the token that sampling the one-hot
    distribution gives, on logits with many ties (small integers) and drafts near the argmax."""
    gen = torch.Generator().manual_seed(7)
    greedy = SamplingParams(temperature=0.0, top_k=0, top_p=1.0, seed=3)
    for trial in range(400):
        gamma = 1 + trial % 6
        logits = torch.randint(0, 3, (gamma + 1, V), generator=gen).float()  # ties everywhere
        p = logits_to_probs(logits, greedy)
        best = logits.argmax(dim=-1)
        draft = best[:gamma].clone()
        flips = torch.rand(gamma, generator=gen) < 0.3
        draft[flips] = torch.randint(0, V, (int(flips.sum()),), generator=gen)
        q = torch.eye(V)[draft]
        want = verify_draft(p, draft, q, uniform=lambda i, purpose: position_uniform(3, 50 + i, purpose))
        got = verify_greedy(best.tolist(), draft.tolist())
        assert got == want
        judged = min(got[0] + 1, gamma)
        assert expected_acceptance(p[:judged], q[:judged]).tolist() == [
            1.0 if i < got[0] else 0.0 for i in range(judged)
        ]
        u = position_uniform(3, trial, PURPOSE_TARGET)
        assert sample_from_probs(p[-1], u) == int(logits[-1].argmax())


def test_identical_draft_is_always_accepted() -> None:
    gen = torch.Generator().manual_seed(0)
    p = (torch.randn(5, V, generator=gen)).softmax(-1)
    for _ in range(500):
        draft = torch.multinomial(p[:4], 1, generator=gen).squeeze(-1)
        n, _ = verify_draft(p, draft, p[:4], gen)
        assert n == 4


def test_position_keyed_uniforms_are_reproducible() -> None:
    gen = torch.Generator().manual_seed(1)
    p, q = make_case("peaked", 4, gen)
    draft = torch.multinomial(q, 1, generator=gen).squeeze(-1)
    calls: list[tuple[int, int]] = []

    def uniform(i: int, purpose: int) -> float:
        calls.append((i, purpose))
        return ((i * 7 + purpose * 3) % 10) / 10

    first = verify_draft(p, draft, q, uniform=uniform)
    assert verify_draft(p, draft, q, uniform=uniform) == first
    assert calls[: len(calls) // 2] == calls[len(calls) // 2 :]


def test_zero_draft_probability_is_an_error() -> None:
    p = torch.full((2, V), 1.0 / V)
    q = torch.eye(V)[[0]]
    with pytest.raises(ValueError, match="zero draft probability"):
        verify_draft(p, torch.tensor([3]), q, None)


def _wrong_residual(p, draft, q, gen):
    """A broken rule: corrections drawn from p instead of norm(max(0, p − q))."""
    real = speculative.sample_from_probs
    try:
        speculative.sample_from_probs = lambda probs, u: real(p[0], u)
        return verify_draft(p, draft, q, gen)
    finally:
        speculative.sample_from_probs = real


def _missing_bonus(p, draft, q, gen):
    """A broken rule: the bonus token drawn from the last draft row instead of p_{γ+1}."""
    n, nxt = verify_draft(p, draft, q, gen)
    if n == len(draft):
        nxt = int(torch.multinomial(p[n - 1], 1, generator=gen))
    return n, nxt


@pytest.mark.parametrize("broken", [_wrong_residual, _missing_bonus])
def test_statistical_test_detects_broken_rules(broken) -> None:
    gen = torch.Generator().manual_seed(5)
    p, q = make_case("peaked", 1, gen)
    counts, _ = emitted_counts(p, q, 1, seed=11, verify=broken)
    pvals = [chi2_pvalue(counts[i], p[i]) for i in range(2) if counts[i].sum() >= 200]
    assert min(pvals) < SIGNIFICANCE


def test_sparse_sampling_follows_quantized_weights() -> None:
    dist = SparseDist(ids=(3, 1, 5), w=(30000, 20000, 10000))
    counts = torch.zeros(V, dtype=torch.long)
    gen = torch.Generator().manual_seed(2)
    for u in torch.rand(N, generator=gen, dtype=torch.float64).tolist():
        counts[dist.sample(u)] += 1
    assert chi2_pvalue(counts, dist.to_dense(V)) > SIGNIFICANCE
