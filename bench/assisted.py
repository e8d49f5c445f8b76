"""transformers' own assisted generation (``generate(..., assistant_model=draft)``) on our pair.

The baseline "what the library gives you": same prompts, same models in the same process, γ
candidate tokens per round (``num_assistant_tokens`` with the constant schedule and no confidence
early-stop, so its γ means ours), greedy at temperature 0 and sampled otherwise (transformers'
own random draws, so sampled outputs differ from ours token for token but follow the target's
distribution). Target forward passes are counted with a forward hook on the target model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers.generation.streamers import BaseStreamer

from edge_agent.speculative import GenerateOptions
from shared.models import LoadedModel


class _FirstTokenClock(BaseStreamer):
    """Notes when the first generated token arrives (the first ``put`` is the prompt)."""

    def __init__(self) -> None:
        self.puts = 0
        self.first: float | None = None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2 and self.first is None:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


@dataclass
class AssistedResult:
    """The figures of one assisted generation (no per-round statistics: transformers keeps none)."""

    token_ids: list[int]
    ttft_ms: float
    total_ms: float
    target_forwards: int
    text: str = ""

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / (self.total_ms / 1e3) if self.total_ms > 0 else 0.0

    @property
    def tau(self) -> float | None:
        return len(self.token_ids) / self.target_forwards if self.target_forwards else None

    def summary(self) -> dict:
        """The keys of ``GenerationResult.summary`` that assisted generation can fill."""
        return {
            "new_tokens": len(self.token_ids),
            "rounds": self.target_forwards,
            "drafted": None,
            "judged": None,
            "accepted": None,
            "acceptance": None,
            "alpha_theory": None,
            "tau": self.tau,
            "target_forwards": self.target_forwards,
            "fallback_tokens": 0,
            "failovers": 0,
            "resyncs": 0,
            "ttft_ms": self.ttft_ms,
            "total_ms": self.total_ms,
            "tokens_per_s": self.tokens_per_s,
        }


def run_assisted(
    draft: LoadedModel, target: LoadedModel, prompt_ids: list[int], opts: GenerateOptions
) -> AssistedResult:
    """One assisted generation of up to ``opts.max_new_tokens`` tokens after ``prompt_ids``."""
    gc = draft.model.generation_config
    if opts.gamma == "auto":  # transformers' own adaptive schedule: +2 after a fully accepted block, else -1
        gc.num_assistant_tokens, gc.num_assistant_tokens_schedule = 4, "heuristic"
    else:
        gc.num_assistant_tokens, gc.num_assistant_tokens_schedule = opts.gamma, "constant"
    gc.assistant_confidence_threshold = 0.0
    p = opts.params
    sampling: dict = {"do_sample": False}
    if not p.greedy:
        sampling = {"do_sample": True, "temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p}
        torch.manual_seed(p.seed)
    forwards = 0

    def count(_module, _args, _out) -> None:
        nonlocal forwards
        forwards += 1

    ids = torch.tensor([prompt_ids], device=target.device)  # [1, S]
    clock = _FirstTokenClock()
    handle = target.model.register_forward_hook(count)
    try:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = target.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                assistant_model=draft.model,
                max_new_tokens=opts.max_new_tokens,
                pad_token_id=target.tokenizer.pad_token_id or min(target.eos_token_ids or {0}),
                eos_token_id=sorted(target.eos_token_ids) or None,
                repetition_penalty=1.0,
                streamer=clock,
                **sampling,
            )  # [1, S + n]
        total_ms = (time.perf_counter() - t0) * 1e3
    finally:
        handle.remove()
    tokens = [int(t) for t in out[0, len(prompt_ids) :]]
    ttft_ms = ((clock.first or time.perf_counter()) - t0) * 1e3
    text = target.tokenizer.decode(tokens, skip_special_tokens=True)
    return AssistedResult(tokens, ttft_ms, total_ms, forwards, text)
