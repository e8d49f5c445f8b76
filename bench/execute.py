"""One benchmark run end to end: processes, models, the schedule, the report files."""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
from pathlib import Path

from bench.cli import load_prompts, machine_meta
from bench.network import setup_network, shutdown_links
from bench.plots import write_plots
from bench.procs import Procs
from bench.report import build_report, markdown
from bench.runner import NETWORK_MODES, Edge, make_cells, run_all


def _progress_bar(total: int, disabled: bool):
    from tqdm import tqdm

    bar = tqdm(total=total, unit="run", disable=disabled, dynamic_ncols=True)

    def step(rec: dict) -> None:
        bar.set_postfix_str(f"{rec['cell']} p{rec['prompt']}: {rec['tokens_per_s']:.1f} tok/s", refresh=False)
        bar.update(1)

    return bar, step


def _rss_mb() -> float:
    """This process's resident memory now (MB), from /proc (0 where there is none)."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) / 1024
    except (OSError, StopIteration, ValueError):
        return 0.0


def load_drafts(draft_spec: str, target_spec: str, backends: list[str], threads: int) -> tuple[dict, dict]:
    """{backend: draft} in ``backends`` order, and each one's resident memory: the RSS this
    process grew by while loading it and running one warm-up forward (MB)."""
    from edge_agent.drafter import load_draft, make_drafter, resolve_backend
    from shared.sampling import SamplingParams

    drafts, rss = {}, {}
    for name in backends:
        kind = resolve_backend(draft_spec, name)
        if kind in drafts:
            continue
        before = _rss_mb()
        draft = load_draft(draft_spec, backend=kind, threads=threads, target=target_spec)
        warm = make_drafter(draft)
        warm.reset([int(next(iter(draft.eos_token_ids), 0))], SamplingParams())
        warm.propose(2)
        drafts[kind] = draft
        rss[kind] = round(_rss_mb() - before, 1)
    return drafts, rss


def execute(
    args: argparse.Namespace,
    draft_spec: str,
    target_spec: str,
    pinning: tuple[set[int] | None, set[int] | None, str],
    *,
    argv_text: str = "",
) -> Path:
    """Run every cell of ``args`` and write report.json, report.md and the plots into ``args.out``."""
    import torch
    import transformers

    from shared.models import load_model

    transformers.logging.set_verbosity_error()
    from edge_agent.drafter import resolve_backend

    # "auto" means one of the two: resolve first, so "auto,llama.cpp" is one backend, not two
    asked = getattr(args, "draft_backend", None) or ["auto"]
    backends = list(dict.fromkeys(resolve_backend(draft_spec, b) for b in asked))
    cells = make_cells(args.modes, args.temperature, args.gamma, args.rtt_ms, backends)
    edge_cores, worker_cores, pin_text = pinning
    networked = any(c.mode in NETWORK_MODES for c in cells)
    need_target = any(c.mode in ("inprocess", "assisted") for c in cells)
    start_broker = args.start_broker if args.start_broker is not None else args.host is None
    broker = None if start_broker else (args.host or "127.0.0.1", args.port or 1883)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    old_affinity, old_threads = os.sched_getaffinity(0), torch.get_num_threads()
    links: dict = {}
    start_load = [round(x, 2) for x in os.getloadavg()]  # the machine may be shared: say how busy it was
    meta: dict = {"command": argv_text, **machine_meta(), "draft": draft_spec, "target": target_spec,
                  "pinning": pin_text, "edge_threads": args.threads, "max_new_tokens": args.max_new_tokens,
                  "iterations": args.iterations, "num_prompts": args.num_prompts, "seed": args.seed,
                  "top_k": args.top_k, "top_p": args.top_p,
                  "pipelined_drafting": not args.no_pipeline}  # fmt: skip
    with Procs(out / "logs") as procs:
        try:
            if networked:  # start the worker first: it loads the target while we load ours
                rtts = sorted({c.rtt_ms for c in cells if c.rtt_ms is not None})
                links, net_meta = setup_network(
                    procs, broker=broker, rtts=rtts, target_spec=target_spec, draft_name=draft_spec,
                    worker_cores=worker_cores, round_timeout_s=args.round_timeout_s,
                    worker_timeout_s=args.worker_timeout_s, worker_args=args.worker_args,
                )  # fmt: skip
                meta.update(net_meta)
            if edge_cores:
                os.sched_setaffinity(0, edge_cores)
            torch.set_num_threads(args.threads)
            if "assisted" in args.modes:  # transformers' assisted generation needs the torch draft
                backends.append("torch")
            rss_start = _rss_mb()
            drafts, draft_rss = load_drafts(draft_spec, target_spec, backends, args.threads)
            meta["draft_backends"] = list(drafts)
            meta["draft_resident_mb"] = draft_rss  # RSS growth of loading each draft (+ one forward)
            meta["edge_rss_mb"] = {"before_drafts": round(rss_start, 1), "after_drafts": round(_rss_mb(), 1)}
            target = load_model(target_spec) if need_target else None
            prompts = load_prompts(args.prompts_file, args.num_prompts, next(iter(drafts.values())).tokenizer)
            edge = Edge(drafts, target, links, max_new_tokens=args.max_new_tokens, top_k=args.top_k,
                        top_p=args.top_p, draft_name=draft_spec, target_name=target_spec,
                        pipeline=not args.no_pipeline)  # fmt: skip
            total = len(cells) * len(prompts) * args.iterations
            bar, step = _progress_bar(total, args.no_progress)
            with bar:
                runs = run_all(edge, cells, prompts, iterations=args.iterations, seed=args.seed,
                               progress=step, warmup_tokens=args.warmup_tokens)  # fmt: skip
        finally:
            shutdown_links(links)
            os.sched_setaffinity(0, old_affinity)
            torch.set_num_threads(old_threads)
    meta["edge_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    meta["load_avg_1_5_15min"] = {"start": start_load, "end": [round(x, 2) for x in os.getloadavg()]}
    meta["prompts"] = [f"{p.index}: [{p.category}] {p.text}" for p in prompts]
    meta["notes"] = [
        "every model forward runs on one torch thread of one core in every mode; the in-process modes "
        "(inprocess, assisted, edge-only) run both models in the edge process on the edge's core",
        "RTT 0 connects the edge straight to the broker; other RTTs go through bench/delay_proxy.py",
    ]
    report = build_report(cells, runs, meta)
    plots = write_plots(report, out)
    (out / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    (out / "report.md").write_text(markdown(report, plots))
    logging.getLogger(__name__).info("wrote %s", out)
    return out
