"""Summing a generation's token events into the figures DESIGN §4 and §7 ask for."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from edge_agent.speculative import SRC_FALLBACK, RoundStats, SessionState, TokenEvent


@dataclass
class GenerationResult:
    """Tokens, where each came from, and per-round statistics of one generation."""

    token_ids: list[int] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    rounds: list[RoundStats] = field(default_factory=list)
    ttft_ms: float = 0.0
    total_ms: float = 0.0
    failovers: int = 0
    resyncs: int = 0
    text: str = ""

    @property
    def drafted(self) -> int:
        return sum(r.gamma for r in self.rounds)

    @property
    def judged(self) -> int:
        return sum(r.judged for r in self.rounds)

    @property
    def accepted(self) -> int:
        return sum(r.n_acc for r in self.rounds)

    @property
    def acceptance(self) -> float | None:
        """Per-token acceptance α̂ = accepted / judged positions (None without speculative rounds)."""
        return self.accepted / self.judged if self.judged else None

    @property
    def alpha_theory(self) -> float | None:
        """Mean theoretical acceptance Σ_x min(p, q) over the same judged positions."""
        vals = [a for r in self.rounds for a in r.alpha]
        return statistics.fmean(vals) if vals else None

    @property
    def target_forwards(self) -> int:
        """Target forward passes: one per speculative round, one per cloud-only token."""
        return len(self.rounds)

    @property
    def tau(self) -> float | None:
        """Block efficiency τ: tokens emitted per target forward pass (verified tokens only)."""
        verified = len(self.token_ids) - self.fallback_tokens
        return verified / self.target_forwards if self.target_forwards else None

    @property
    def gamma_mean(self) -> float | None:
        """Mean γ over the speculative rounds (the adaptive controller's choices, or the fixed γ)."""
        spec = [r.gamma for r in self.rounds if r.gamma > 0]
        return statistics.fmean(spec) if spec else None

    @property
    def gamma_prediction(self) -> dict | None:
        """How the γ controller's predictions compared with what happened, over the rounds it
        predicted (not the first, taken from the prior): summed predicted and actual committed
        tokens and round time, each ratio actual / predicted."""
        rounds = [r for r in self.rounds if r.gamma > 0 and r.pred_ms > 0]
        if not rounds:
            return None
        tokens = (sum(r.pred_tokens for r in rounds), sum(r.n_acc + 1 for r in rounds))
        ms = (sum(r.pred_ms for r in rounds), sum(r.draft_ms + r.link_ms + r.overhang_ms for r in rounds))
        return {
            "rounds": len(rounds),
            "pred_tokens": tokens[0], "tokens": tokens[1], "tokens_ratio": tokens[1] / tokens[0],
            "pred_ms": ms[0], "ms": ms[1], "ms_ratio": ms[1] / ms[0],
        }  # fmt: skip

    @property
    def fallback_tokens(self) -> int:
        return sum(1 for s in self.sources if s == SRC_FALLBACK)

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / (self.total_ms / 1e3) if self.total_ms > 0 else 0.0

    def summary(self) -> dict:
        """JSON-ready figures (the ``--json`` output of the CLI without the text)."""
        return {
            "new_tokens": len(self.token_ids),
            "rounds": len(self.rounds),
            "drafted": self.drafted,
            "judged": self.judged,
            "accepted": self.accepted,
            "acceptance": self.acceptance,
            "alpha_theory": self.alpha_theory,
            "tau": self.tau,
            "gamma_mean": self.gamma_mean,
            "gamma_prediction": self.gamma_prediction,
            "target_forwards": self.target_forwards,
            "fallback_tokens": self.fallback_tokens,
            "failovers": self.failovers,
            "resyncs": self.resyncs,
            "ttft_ms": self.ttft_ms,
            "total_ms": self.total_ms,
            "tokens_per_s": self.tokens_per_s,
        }

    def rounds_as_dicts(self) -> list[dict]:
        return [asdict(r) for r in self.rounds]


def collect(events: Iterable[TokenEvent], *, state: SessionState | None = None) -> GenerationResult:
    """Drain ``events`` into a :class:`GenerationResult`, timing the first token and the total."""
    result = GenerationResult()
    t0 = time.perf_counter()
    seen: set[int] = set()
    for ev in events:
        if not result.token_ids:
            result.ttft_ms = (time.perf_counter() - t0) * 1e3
        result.token_ids.append(ev.token)
        result.sources.append(ev.source)
        if ev.round is not None and id(ev.round) not in seen:
            seen.add(id(ev.round))
            result.rounds.append(ev.round)
    result.total_ms = (time.perf_counter() - t0) * 1e3
    if state is not None:
        result.failovers, result.resyncs = state.failovers, state.resyncs
    return result
