"""What one session's T = 0 verdict and cloud-only token cost the worker on the host, per path.

The general acceptance rule on one-hot distributions (``logits_to_probs`` + ``verify_draft`` +
``expected_acceptance`` over [γ + 1, V] tensors, and ``sample_from_probs`` for a decode token)
against the argmax shortcut the worker takes at T = 0 (``verify_greedy``; the argmax itself is
taken on the model's device there, and timed here on the host, where a CPU worker takes it). Both
paths run interleaved on the same random logits, so machine noise hits them alike; they are
checked to agree.

    python -m bench.verdict_cost [--vocab 151936] [--gamma 2] [--repeat 300]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from shared.sampling import SamplingParams, logits_to_probs, position_uniform, sample_from_probs
from shared.speculative import expected_acceptance, verify_draft, verify_greedy

GREEDY = SamplingParams(temperature=0.0, top_k=0, top_p=1.0, seed=1)


def general(logits: torch.Tensor, tok: list[int]) -> tuple:
    gamma, vocab = len(tok), logits.shape[-1]
    p = logits_to_probs(logits[-(gamma + 1) :], GREEDY)
    draft = torch.tensor(tok, dtype=torch.long)
    q = torch.nn.functional.one_hot(draft, vocab).float()
    n, nxt = verify_draft(p, draft, q, uniform=lambda i, purpose: position_uniform(1, 10 + i, purpose))
    judged = min(n + 1, gamma)
    return n, nxt, tuple(round(a, 6) for a in expected_acceptance(p[:judged], q[:judged]).tolist())


def shortcut(logits: torch.Tensor, tok: list[int]) -> tuple:
    gamma = len(tok)
    n, nxt = verify_greedy(logits[-(gamma + 1) :].argmax(dim=-1).tolist(), tok)
    return n, nxt, tuple(1.0 if i < n else 0.0 for i in range(min(n + 1, gamma)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.verdict_cost", description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--gamma", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    paths = {
        "verdict, general rule": lambda lg, tok: general(lg, tok),
        "verdict, argmax": lambda lg, tok: shortcut(lg, tok),
        "decode token, sampling": lambda lg, tok: sample_from_probs(logits_to_probs(lg[-1], GREEDY), 0.5),
        "decode token, argmax": lambda lg, tok: int(lg[-1].argmax()),
    }
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.repeat):
        logits = torch.randn(args.gamma + 1, args.vocab, generator=gen)
        best = logits.argmax(dim=-1).tolist()
        tok = [best[0], (best[1] + 1) % args.vocab, *best[2 : args.gamma]][
            : args.gamma
        ]  # one accepted, one not
        got = {}
        for name, fn in paths.items():
            t0 = time.perf_counter()
            got[name] = fn(logits, tok)
            times[name].append((time.perf_counter() - t0) * 1e3)
        if (
            got["verdict, general rule"] != got["verdict, argmax"]
            or got["decode token, sampling"] != got["decode token, argmax"]
        ):
            print(f"error: the paths disagree: {got}", file=sys.stderr)
            return 1
    for name, ts in times.items():
        print(f"{name:>24}: median {statistics.median(ts):.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
