"""Keep an edge's draft busy, to measure what its drafting costs a worker on the same machine.

The bench runs edge and worker on two cores of one machine; they share the memory bus, which
two machines would not. Run this on the edge's core while ``bench.verify_cost`` times the target
on the other, and compare with ``verify_cost`` alone:

    taskset -c 0 python -m bench.draft_loop --draft model.gguf --target TARGET --seconds 120 &
    OMP_NUM_THREADS=1 taskset -c 1 python -m bench.verify_cost --model TARGET --batches 1 ...

It drafts as the edge does (the project's drafter, T = 0): blocks of ``--gamma`` tokens, each
committed whole, restarting from the prompt when the context reaches ``--max-ctx`` tokens.
Prints the drafts made and the mean cost of one when it ends.
"""

from __future__ import annotations

import argparse
import sys
import time

PROMPT = "Explain in a few sentences how speculative decoding speeds up large language model inference."


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.draft_loop", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--draft", required=True, help="draft model: GGUF file, folder or hub id (as spececd-edge)"
    )
    ap.add_argument("--target", required=True, help="the target (its tokenizer tokenizes the prompt)")
    ap.add_argument("--backend", default="auto", choices=("auto", "torch", "llama.cpp"))
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--max-ctx", type=int, default=256)
    args = ap.parse_args(argv)

    from edge_agent.drafter import load_draft, make_drafter
    from shared.sampling import SamplingParams

    draft = load_draft(args.draft, backend=args.backend, threads=1, target=args.target)
    prompt = list(draft.tokenizer(PROMPT)["input_ids"])
    drafter = make_drafter(draft)
    params = SamplingParams(temperature=0.0)
    drafter.reset(prompt, params)
    made, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
        block = drafter.propose(args.gamma)
        drafter.commit(list(block.tokens))
        made += len(block.tokens)
        if len(drafter.committed) >= args.max_ctx or not block.tokens:
            drafter.reset(prompt, params)
    spent = time.perf_counter() - t0
    print(
        f"drafted {made} tokens in {spent:.1f} s: {1e3 * spent / max(1, made):.1f} ms a token",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
