"""What one batched target forward costs against the same work one session at a time.

For B sessions (each with its own KV cache of about ``--cache-len`` tokens) and k new positions
per session, it times ONE padded forward over all B rows (``cloud_worker.batching.forward_rows``,
the worker's batched path) and B separate single-session forwards (the unbatched worker), and
reports both, their ratio and the batched forward in units of one single-token step.
``--ragged`` spreads the cache lengths over [L/2, L] to show what padding the caches costs.
The batched forward is also split into its phases (stacking the caches, the model, moving the
logits to the host, splitting the caches back), each timed after the device is done.

``--layout padded,packed`` times each layout of the batched forward (cloud_worker/batching.py),
alternating, in one run; ``--mix`` gives the rows of one forward the ``--positions`` values in turn
(blocks of mixed lengths, as sessions with different γ send) instead of one k per forward.

``--random`` builds the model from the folder's ``config.json`` with random weights
(``bench.random_models``): a forward's cost does not depend on the weights' values, so a GPU
machine the weights cannot reach can still time the demo target's or the 8B default's shape.

    python -m bench.verify_cost --model /path/to/target [--random] [--device auto] [--dtype auto]
        [--cache-len 96] [--batches 1,2,4,8,16] [--positions 1,3] [--repeat 3] [--threads 1]
        [--ragged] [--greedy] [--cpu-linear onednn,torch] [--layout padded,packed] [--mix] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

import torch
from transformers import DynamicCache

from cloud_worker import invariant
from cloud_worker.batching import LAYOUTS, Row, forward_packed, forward_rows
from shared.cpu_linear import use_onednn_linears
from shared.kvcache import crop, forward_cached
from shared.models import load_model


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _sync(model) -> None:
    """Wait for the model's device, so a host clock read after it times finished work."""
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


def _caches(model, vocab: int, lengths: list[int], rng: random.Random) -> list[DynamicCache]:
    out = []
    with torch.inference_mode():
        for n in lengths:
            cache = DynamicCache()
            forward_cached(model, [rng.randrange(vocab) for _ in range(n)], cache)
            out.append(cache)
    return out


def measure(
    model,
    vocab: int,
    b: int,
    k: int | list[int],
    lengths: list[int],
    repeat: int,
    rng: random.Random,
    greedy: bool = False,
    layout: str = "padded",
) -> dict:
    """Median ms of one batched forward and of b single forwards (b sessions × k new tokens;
    ``k`` a list: row i gets k[i % len(k)] new tokens)."""
    ks = [k[i % len(k)] for i in range(b)] if isinstance(k, list) else [k] * b
    forward = forward_packed if layout == "packed" else forward_rows
    caches = _caches(model, vocab, lengths, rng)
    news = [[rng.randrange(vocab) for _ in range(n)] for n in ks]
    batched, single, phases = [], [], []
    with torch.inference_mode():
        for i in range(2 * repeat + 1):  # the first round warms up; the last `repeat` split the phases
            split: dict[str, float] | None = {} if i > repeat else None
            rows = [Row(c, n, list(t), greedy=greedy) for c, n, t in zip(caches, lengths, news, strict=True)]
            _sync(model)
            t0 = time.perf_counter()
            forward(model, rows, vocab, phases_ms=split)
            if split is None:
                batched.append((time.perf_counter() - t0) * 1e3)
            else:
                phases.append(split)
            for c, n in zip(caches, lengths, strict=True):  # one row runs in place: restore it
                crop(c, c.get_seq_length(), n)
            if split is not None:
                continue
            _sync(model)
            t0 = time.perf_counter()
            for c, n, t in zip(caches, lengths, news, strict=True):
                forward_cached(model, t, c)
                crop(c, n + len(t), n)
            _sync(model)
            single.append((time.perf_counter() - t0) * 1e3)
    return {
        "B": b,
        "k": k,
        "layout": layout,
        "positions": sum(ks),
        "batched_ms": statistics.median(batched[1:]),
        "unbatched_ms": statistics.median(single[1:]),
        "phases_ms": {
            name: round(statistics.median(p.get(name, 0.0) for p in phases), 3) for name in phases[0]
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.verify_cost", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="target model: folder, GGUF or hub id (as spececd-worker)")
    ap.add_argument("--random", action="store_true",
                    help="random weights of the --model folder's config.json (timing only; no weights needed)")  # fmt: skip
    ap.add_argument("--cache-len", type=int, default=96)
    ap.add_argument("--batches", type=_ints, default=[1, 2, 4, 8, 16])
    ap.add_argument("--positions", type=_ints, default=[1, 3])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--ragged", action="store_true", help="cache lengths spread over [L/2, L]")
    ap.add_argument("--greedy", action="store_true",
                    help="T = 0 rows: only each position's argmax comes back to the host, as the worker does")  # fmt: skip
    ap.add_argument("--cpu-linear", type=_kernels, default=["onednn"], metavar="onednn,torch,invariant",
                    help="the worker's cpu_linear: linear layers through oneDNN (default) or torch's own; "
                    "'invariant': torch's own in the worker's shape-invariant forwards (invariant = on); "
                    "a comma list measures each, alternating, in one run")  # fmt: skip
    ap.add_argument("--layout", type=_layouts, default=["padded"], metavar="padded,packed",
                    help="the worker's batch_layout; a comma list measures each, alternating, in one run")  # fmt: skip
    ap.add_argument("--mix", action="store_true",
                    help="the rows of one forward take the --positions values in turn (mixed lengths)")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = {}
    for kernel in args.cpu_linear:  # one copy of the model per kernel choice
        try:
            loaded = (
                _random_model(args)
                if args.random
                else load_model(args.model, device=args.device, dtype=args.dtype)
            )
        except (OSError, ValueError) as exc:  # a missing config.json, a bad --device/--dtype
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if kernel == "onednn":
            use_onednn_linears(loaded.model)
        elif kernel == "invariant":  # torch's kernels, as the worker's invariant forwards run them
            print(f"invariant: {invariant.apply(loaded.model, loaded.vocab_size)}")
        models[kernel] = loaded.model
    vocab = loaded.vocab_size
    rng = random.Random(args.seed)
    steps = {
        kn: measure(m, vocab, 1, 1, [args.cache_len], args.repeat, rng)["unbatched_ms"]
        for kn, m in models.items()
    }
    print(f"model {args.model}, cache {args.cache_len}: one step (B=1, k=1) = "
          + ", ".join(f"{steps[kn]:.1f} ms ({kn})" for kn in models))  # fmt: skip
    print(f"{'kernels':>8} {'layout':>7} {'B':>3} {'k':>5} {'batched ms':>11} {'B single ms':>12} {'speed-up':>9} "
          f"{'x one step':>11}  phases ms (stack/model/logits/split)")  # fmt: skip
    rows: dict[str, list[dict]] = {kn: [] for kn in models}
    for k in [args.positions] if args.mix else args.positions:
        for b in args.batches:
            if args.ragged:
                lengths = [rng.randint(args.cache_len // 2, args.cache_len) for _ in range(b)]
            else:
                lengths = [args.cache_len] * b
            for kn, model in models.items():
                for layout in args.layout:
                    r = measure(
                        model, vocab, b, k, lengths, args.repeat, rng, greedy=args.greedy, layout=layout
                    )
                    r["speedup"] = r["unbatched_ms"] / r["batched_ms"]
                    r["x_step"] = r["batched_ms"] / steps[kn]
                    rows[kn].append(r)
                    ph = r["phases_ms"]
                    split = "/".join(f"{ph.get(x, 0.0):.2f}" for x in ("stack", "model", "logits", "split"))
                    ktext = "mix" if isinstance(k, list) else str(k)
                    print(f"{kn:>8} {layout:>7} {b:>3} {ktext:>5} {r['batched_ms']:>11.2f} {r['unbatched_ms']:>12.2f} "
                          f"{r['speedup']:>9.2f} {r['x_step']:>11.2f}  {split}", flush=True)  # fmt: skip
    if args.json:
        out = {"model": args.model, "random_weights": args.random, "device": str(loaded.model.device),
               "dtype": str(loaded.model.dtype), "cache_len": args.cache_len, "ragged": args.ragged, "greedy": args.greedy,
               "kernels": {kn: {"step_ms": steps[kn], "rows": rows[kn]} for kn in models}}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


def _random_model(args):
    """The --model folder's architecture with random weights, as a ``LoadedModel``-like record."""
    from types import SimpleNamespace

    from bench.random_models import config_of, random_model
    from shared.models import resolve_device_dtype

    dev, dt = resolve_device_dtype(args.device, args.dtype)
    config = config_of(args.model)
    return SimpleNamespace(model=random_model(config, seed=args.seed, dtype=dt, device=str(dev), on_device=True),
                           vocab_size=config.vocab_size)  # fmt: skip


def _layouts(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in names if x not in LAYOUTS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(LAYOUTS)} (comma list), got {text!r}")
    return list(dict.fromkeys(names))


def _kernels(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in names if x not in ("onednn", "torch", "invariant")]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"choose from onednn, torch, invariant (comma list), got {text!r}")
    return list(dict.fromkeys(names))


if __name__ == "__main__":
    sys.exit(main())
