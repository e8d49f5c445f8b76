"""``spececd-bench --fleet 1,2,4,8,16``: N concurrent edge sessions against ONE worker (issue 9 §4).

1. Start a broker (ours, unless --host/--port) and a worker pinned to one core, one torch thread.
2. Record: generate every prompt once for real through that worker (draft model in this process,
   sequential drafting, fixed seed), speculative and cloud-only (``bench.fleet_record``).
3. Replay: for each N and mode, N sessions replay the recordings concurrently from this process,
   pinned to the other core, for ``--fleet-seconds`` (``bench.fleet_replay``); every answer is
   checked against the recording (exactness under batching).
4. Report per cell: server tokens/s, per-session tokens/s, p50/p99 round latency, target forwards
   per committed token, positions per forward, the replayer's and the worker's CPU per round
   (``fleet.json``, ``fleet.md``, ``fleet_throughput.png``).

Several worker configurations (``--fleet-worker NAME=ARGS``, ``--fleet-unbatched``) run one after
the other against the same recordings; ``--fleet-worker-checkout NAME=PATH`` runs one of them from
another checkout (an earlier commit), so a change is measured beside what it replaced. ``--fleet-duration S`` runs one long cell instead and
samples the worker's RSS (the "flat within 5 %" target).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import time
import uuid
from pathlib import Path
from typing import Any

from bench.fleet_gamma import GammaReplayer, gamma_figures, gamma_mode, record_chains, save_chains
from bench.fleet_record import CLOUD, SPECULATIVE, Recording, record_one, save_recordings
from bench.fleet_replay import Replayer, only, plan_slots
from bench.fleet_stats import (
    RssSampler,
    add_forward_figures,
    forward_counts,
    padded_per_forward,
    proc_cpu_s,
    proc_rss_mb,
    rss_drift,
    save_rounds,
    scrape,
    summarize_cell,
)
from bench.procs import Procs, free_port, one_thread_env

FLEET_MODES = {"speculative": SPECULATIVE, "cloud-only": CLOUD}
# Config keys that switch batching off in the worker, tried in order (the worker's batching work
# names it); the value makes one session per forward: today's unbatched worker.
MIN_ROUNDS = 4  # every session answered at least this often per cell (the window grows if need be)
UNBATCHED_KEYS = (("max_batch_sessions", "1"), ("batch_max_sessions", "1"), ("max_batch", "1"))


class FleetUsageError(Exception):
    """Bad fleet options; the message says what to do."""


def unbatched_args() -> list[str]:
    """Worker flags that run it unbatched, from the config keys it has."""
    from shared.config import flag_name
    from shared.config_keys import KEYS

    for key, value in UNBATCHED_KEYS:
        if key in KEYS:
            return [flag_name(key), value]
    raise FleetUsageError(
        "this worker has no batching switch (none of the config keys "
        f"{', '.join(k for k, _ in UNBATCHED_KEYS)}): it is unbatched already. Drop --fleet-unbatched, "
        "or name worker flags yourself with --fleet-worker NAME='--flag value'"
    )


def worker_configs(args) -> list[tuple[str, list[str]]]:
    """(name, extra worker flags) of every worker configuration to run."""
    configs: list[tuple[str, list[str]]] = []
    for spec in args.fleet_worker or []:
        name, sep, rest = spec.partition("=")
        if not sep or not name.strip():
            raise FleetUsageError(
                f"--fleet-worker {spec!r}: write NAME=FLAGS, e.g. unbatched='--max-batch-sessions 1'"
            )
        configs.append((name.strip(), shlex.split(rest)))
    if args.fleet_unbatched:
        if not configs:
            configs.append(("batched", []))
        configs.append(("unbatched", unbatched_args()))
    return configs or [("default", [])]


def worker_checkouts(args, configs: list[tuple[str, list[str]]]) -> dict[str, tuple[Path, str]]:
    """Worker configuration name -> (checkout, its commit) from ``--fleet-worker-checkout
    NAME=PATH``: that configuration's worker runs the code of another checkout of this project
    (``git worktree add ../before HEAD~1``), so a change and what it replaced run side by side in
    one bench, against the same recordings."""
    import subprocess

    names = {name for name, _ in configs}
    out: dict[str, tuple[Path, str]] = {}
    for spec in args.fleet_worker_checkout or []:
        name, sep, path = spec.partition("=")
        name = name.strip()
        if not sep or name not in names:
            raise FleetUsageError(
                f"--fleet-worker-checkout {spec!r}: write NAME=PATH, NAME one of the --fleet-worker names "
                f"({', '.join(sorted(names))})"
            )
        root = Path(path).expanduser().resolve()
        if not (root / "cloud_worker" / "cli.py").is_file():
            raise FleetUsageError(
                f"--fleet-worker-checkout {spec!r}: {root} holds no cloud_worker/cli.py; give a checkout of "
                "this project, e.g. one made with `git worktree add /tmp/before HEAD~1`"
            )
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=False).stdout.strip()  # fmt: skip
        out[name] = (root, head or "unknown commit")
    return out


def start_worker(
    procs: Procs,
    broker,
    *,
    target: str,
    draft_name: str,
    cores,
    max_sessions: int,
    extra: list[str],
    checkout: Path | None = None,
):
    """A ``spececd-worker`` with metrics on a free port; returns (proc, worker id, metrics URL).
    ``checkout``: run the worker code of that checkout instead of this one's."""
    import sys

    worker_id = f"fleet-{uuid.uuid4().hex[:8]}"
    port = free_port()
    argv = [sys.executable, "-m", "cloud_worker.cli", "--broker", f"{broker[0]}:{broker[1]}", "--target", target,
            "--draft", draft_name, "--worker-id", worker_id, "--max-sessions", str(max_sessions),
            "--metrics-listen", f"127.0.0.1:{port}", *extra]  # fmt: skip
    env = one_thread_env()
    if checkout is not None:  # its packages first on the path (`-m` also puts the cwd first)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(checkout), env.get("PYTHONPATH")]))
    proc, _log = procs._spawn(f"worker-{worker_id}", argv, cores=cores, env=env, cwd=checkout)
    return proc, worker_id, f"http://127.0.0.1:{port}/metrics"


def open_broker_and_pin(procs: Procs, args, *, start_broker: bool, edge_cores) -> tuple[tuple[str, int], Any]:
    """The broker (our own, or ``--host/--port``) and its ``BrokerConfig``, with the edge side
    pinned to its cores and one torch thread: how the fleet and noisy-neighbour benchmarks start."""
    import torch

    from shared.mqtt import BrokerConfig

    broker = procs.start_broker() if start_broker else (args.host or "127.0.0.1", args.port or 1883)
    if edge_cores:
        os.sched_setaffinity(0, edge_cores)
    torch.set_num_threads(1)
    return broker, BrokerConfig(host=broker[0], port=broker[1])


def record_all(
    link, draft, prompts, args, draft_spec: str, target_spec: str, modes: list[str]
) -> list[Recording]:
    """Generate every prompt once per mode through ``link`` and keep the messages (see fleet_record)."""
    from edge_agent.drafter import Drafter
    from edge_agent.speculative import GenerateOptions
    from shared.sampling import SamplingParams

    drafter = Drafter(draft)
    recs = []
    for mode in modes:
        for p in prompts:
            params = SamplingParams(temperature=args.temperature[0], top_k=args.top_k, top_p=args.top_p,
                                    seed=args.seed + p.index)  # fmt: skip
            opts = GenerateOptions(mode=mode, gamma=args.gamma[0], max_new_tokens=args.max_new_tokens,
                                   params=params, draft_model=draft_spec, target_model=target_spec)  # fmt: skip
            recs.append(record_one(drafter, link, p.index, list(p.ids), opts, eos_ids=draft.eos_token_ids))
    return recs


def record_transplanted(
    link, target, prompts, args, draft_spec: str, target_spec: str, modes: list[str]
) -> list[Recording]:
    """``--fleet-acceptance``: this target's cloud-only recordings, and speculative ones that
    replay the acceptance recorded elsewhere round by round (``bench.fleet_record.transplant``).
    ``target`` (the model behind ``--draft``, used here for its tokenizer only) drafts nothing."""
    from bench.fleet_record import load_recordings, transplant

    try:
        accepted = {r.prompt: r for r in load_recordings(args.fleet_acceptance) if r.mode == SPECULATIVE}
    except (OSError, ValueError, KeyError) as exc:
        raise FleetUsageError(f"--fleet-acceptance {args.fleet_acceptance}: cannot read it ({exc})") from exc
    missing = [p.index for p in prompts if p.index not in accepted]
    if missing:
        raise FleetUsageError(f"--fleet-acceptance has no speculative recording of prompt(s) {missing}: "
                              "record it with the same --num-prompts (spececd-bench --fleet 1 --fleet-modes speculative)")  # fmt: skip
    longest = max(len(m.msg.tok) for r in accepted.values() for m in r.steps)
    # this target's greedy continuation, a block past the generation (the last round's next token)
    longer = argparse.Namespace(**{**vars(args), "max_new_tokens": args.max_new_tokens + longest + 1})
    conts = record_all(link, target, prompts, longer, draft_spec, target_spec, ["cloud-only"])
    recs = []
    if "speculative" in modes:
        for cont in conts:  # its open is this target's (transplant takes max_new from the acceptance)
            try:
                recs.append(transplant(accepted[cont.prompt], cont.tokens, cont.open,
                                       eos_ids=target.eos_token_ids, vocab_size=target.vocab_size))  # fmt: skip
            except ValueError as exc:
                raise FleetUsageError(f"--fleet-acceptance: {exc}") from exc
    if "cloud-only" in modes:
        recs.extend(record_all(link, target, prompts, args, draft_spec, target_spec, ["cloud-only"]))
    return recs


def run_cell(replayer: Replayer, recs: list, *, n: int, mode: str, seconds: float,
             worker_pid: int, metrics_url: str, device_prefix: str | None = None,
             rounds_file: Path | None = None) -> dict:  # fmt: skip
    """One (N, mode) cell: N slots replaying ``recs`` for ``seconds``; returns its figures.
    ``recs``: recordings of that mode (``Recording`` or, for the γ sweep, ``ChainRecording``);
    ``rounds_file``: where to write every answered request of the cell (``save_rounds``)."""
    before = scrape(metrics_url)
    cpu_w0, cpu_r0 = proc_cpu_s(worker_pid), time.process_time()
    plan = plan_slots(n, recs, device_prefix=device_prefix or f"fleet{mode[:1]}")
    t0, t1 = replayer.run(plan, duration_s=seconds, min_rounds=MIN_ROUNDS)
    cpu_w, cpu_r = proc_cpu_s(worker_pid) - cpu_w0, time.process_time() - cpu_r0
    cell = summarize_cell(replayer.rounds, replayer.generations, (t0, t1), n=n, mode=mode)
    if rounds_file is not None:
        save_rounds(rounds_file, replayer.rounds, (t0, t1), n)
    after = scrape(metrics_url)
    add_forward_figures(cell, forward_counts(before, after))
    cell["padded_per_forward"] = padded_per_forward(before, after)
    rounds = max(1, len([r for r in replayer.rounds if r.kind != "open"]))
    wall = time.perf_counter() - t0  # the window plus the drain: what both CPU figures cover
    cell.update(
        replayer_cpu_ms_per_round=round(1e3 * cpu_r / rounds, 3),
        worker_cpu_ms_per_round=round(1e3 * cpu_w / rounds, 3),
        replayer_cpu_ms_per_token=round(1e3 * cpu_r / max(1, cell["committed_tokens"]), 3),
        worker_cpu_ms_per_token=round(1e3 * cpu_w / max(1, cell["committed_tokens"]), 3),
        worker_busy=round(cpu_w / wall, 3),  # ~1.0: the worker's core was the bottleneck
        replayer_busy=round(cpu_r / wall, 3),
        worker_rss_mb=round(proc_rss_mb(worker_pid), 1),
        stray_answers=replayer.stray,
        opens_refused=replayer.opens_refused,  # `overloaded` (the worker's per-device open rate), retried
    )
    if isinstance(replayer, GammaReplayer):
        cell.update(gamma_figures(replayer, t0, t1))
    return cell


def run_gamma_cell(
    cfg, chains: list, gamma, *, n: int, args, worker_pid: int, metrics_url: str, tag: str
) -> dict:
    """One (N, γ) cell of the adaptive-γ sweep: N sessions replaying the chains, each choosing
    γ with its own controller (``gamma`` "auto") or pinned to ``gamma``."""
    replayer = GammaReplayer(cfg, gamma=gamma, round_timeout_s=max(args.round_timeout_s, 600.0),
                             tag=f"{tag}g{gamma}")  # fmt: skip
    replayer.connect()
    try:
        return run_cell(replayer, chains, n=n, mode=gamma_mode(gamma), seconds=args.fleet_seconds,
                        worker_pid=worker_pid, metrics_url=metrics_url, device_prefix=f"fleetg{gamma}")  # fmt: skip
    finally:
        replayer.close()


def run_fleet(args, draft_spec: str, target_spec: str, pinning, *, argv_text: str = "") -> Path:
    """The whole fleet benchmark of ``args``; writes fleet.json/.md/.png into ``args.out``."""

    from bench.cli import load_prompts, machine_meta
    from bench.fleet_report import write_fleet_report
    from bench.network import wait_worker_online
    from edge_agent.mqtt_link import MqttLink
    from shared.models import load_model

    edge_cores, worker_cores, pin_text = pinning
    gammas = args.fleet_gamma or []
    modes = args.fleet_modes if args.fleet_modes is not None else ([] if gammas else list(FLEET_MODES))
    if gammas and args.temperature[0] > 0:
        raise FleetUsageError("--fleet-gamma replays T = 0 sessions (at T > 0 the tokens depend on γ): "
                              "add --temperature 0")  # fmt: skip
    if args.fleet_acceptance and (args.temperature[0] > 0 or gammas):
        raise FleetUsageError("--fleet-acceptance replays greedy rounds: use it with --temperature 0 "
                              "and without --fleet-gamma")  # fmt: skip
    if gammas and args.fleet_duration is not None:
        raise FleetUsageError("--fleet-gamma runs the sweep; drop --fleet-duration")
    bad = [m for m in modes if m not in FLEET_MODES]
    if bad:
        raise FleetUsageError(
            f"--fleet-modes: unknown {', '.join(bad)}; choose from {', '.join(FLEET_MODES)}"
        )
    configs = worker_configs(args)
    checkouts = worker_checkouts(args, configs)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    ns = sorted(set(args.fleet))
    long_run = args.fleet_duration is not None
    start_broker = args.start_broker if args.start_broker is not None else args.host is None
    meta = {"command": argv_text, **machine_meta(), "draft": draft_spec, "target": target_spec,
            "pinning": pin_text, "gamma": args.gamma[0], "temperature": args.temperature[0],
            "max_new_tokens": args.max_new_tokens, "num_prompts": args.num_prompts, "seed": args.seed,
            "fleet_seconds": args.fleet_seconds, "long_run_s": args.fleet_duration, "paced": args.fleet_pace,
            "worker_configs": {name: shlex.join(extra) for name, extra in configs},
            "worker_checkouts": {name: f"{root} at {head}" for name, (root, head) in checkouts.items()},
            "load_avg_start": [round(x, 2) for x in os.getloadavg()]}  # fmt: skip
    cells: list[dict] = []
    long: dict = {}
    recs: list[Recording] = []
    chains: list = []
    old_affinity = os.sched_getaffinity(0)
    with Procs(out / "logs") as procs:
        try:
            broker, cfg = open_broker_and_pin(procs, args, start_broker=start_broker, edge_cores=edge_cores)
            max_sessions = max(64, 2 * max(ns))
            for ci, (name, extra) in enumerate(configs):
                proc, wid, murl = start_worker(procs, broker, target=target_spec, draft_name=draft_spec,
                                               cores=worker_cores, max_sessions=max_sessions, extra=extra,
                                               checkout=checkouts.get(name, (None,))[0])  # fmt: skip
                link = MqttLink(cfg, device="fleetrec", round_timeout_s=args.round_timeout_s)
                link.connect()
                wait_worker_online(link, wid, proc, procs, args.worker_timeout_s)
                rss = RssSampler(proc.pid, period_s=1.0 if long_run else 2.0).start()
                if ci == 0:  # record once, against the first configuration, one session at a time
                    if modes:
                        draft = load_model(draft_spec)
                        prompts = load_prompts(args.prompts_file, args.num_prompts, draft.tokenizer)
                        if args.fleet_acceptance:
                            recs = record_transplanted(
                                link, draft, prompts, args, draft_spec, target_spec, modes
                            )
                            meta["acceptance_from"] = str(args.fleet_acceptance)
                        else:
                            recs = record_all(link, draft, prompts, args, draft_spec, target_spec,
                                              ["speculative" if m == "speculative" else "cloud-only" for m in modes])  # fmt: skip
                        save_recordings(out / "recordings.json", recs)
                        del draft  # the replay needs no model
                    if gammas:
                        chains, prompts = record_chains(link, args, draft_spec, target_spec)
                        save_chains(out / "chains.json", chains)
                        meta["chain_draft_ms_per_token"] = [round(c.draft_ms, 1) for c in chains]
                    meta["prompts"] = [f"{p.index}: [{p.category}] {p.text}" for p in prompts]
                link.shutdown()
                replayer = Replayer(
                    cfg, round_timeout_s=max(args.round_timeout_s, 600.0), tag=f"c{ci}", pace=args.fleet_pace
                )
                replayer.connect()
                try:
                    if long_run:
                        long = {"worker": name, **run_cell(replayer, only(recs, FLEET_MODES[modes[0]]),
                                n=max(ns), mode=modes[0], seconds=args.fleet_duration, worker_pid=proc.pid,
                                metrics_url=murl)}  # fmt: skip
                    else:
                        for n in ns:
                            for mode in modes:
                                cell = run_cell(replayer, only(recs, FLEET_MODES[mode]), n=n, mode=mode,
                                                seconds=args.fleet_seconds, worker_pid=proc.pid, metrics_url=murl,
                                                rounds_file=out / "rounds" / _file_name(f"{name}-{mode}-{n}.jsonl"))  # fmt: skip
                                cells.append({"worker": name, **cell})
                                _progress(args, cells[-1])
                            for g in gammas:  # the adaptive-γ sweep under load (issue 13)
                                cells.append({"worker": name, **run_gamma_cell(cfg, chains, g, n=n, args=args,
                                              worker_pid=proc.pid, metrics_url=murl, tag=f"c{ci}")})  # fmt: skip
                                _progress(args, cells[-1])
                finally:
                    replayer.close()
                samples = rss.stop()
                if long_run:
                    long["rss"] = rss_drift(samples)
                    long["rss_samples"] = samples
                _stop(proc)
        finally:
            os.sched_setaffinity(0, old_affinity)
    meta["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    report = {"meta": meta, "cells": cells, "long_run": long,
              "recordings": [{"prompt": r.prompt, "mode": r.mode, "rounds": r.rounds, "tokens": len(r.tokens)}
                             for r in recs],
              "fleet_gamma": [str(g) for g in gammas]}  # fmt: skip
    write_fleet_report(report, out)
    return out


def _file_name(text: str) -> str:
    """``text`` with whatever a file name should not hold (a worker's NAME is the user's) as ``_``."""
    return re.sub(r"[^\w.+-]", "_", text)


def _stop(proc, timeout: float = 30.0) -> None:
    """SIGTERM one worker and wait for it (the next configuration needs the core)."""
    import subprocess

    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _progress(args, cell: dict) -> None:
    if not args.no_progress:
        print(f"fleet {cell['worker']} N={cell['n']} {cell['mode']}: {cell['server_tokens_per_s']} tok/s, "
              f"p99 {cell['round_ms']['p99']} ms, mismatches {cell['mismatches']}, errors {cell['errors']}",
              flush=True)  # fmt: skip


def add_fleet_arguments(ap) -> None:
    """The fleet and noisy-neighbour options of ``spececd-bench``."""
    from bench.cli import _list

    g = ap.add_argument_group("fleet (issue 9) and noisy neighbour (issue 10)")
    g.add_argument(
        "--fleet",
        type=_list(int),
        default=None,
        metavar="N,N,...",
        help="run the fleet benchmark: N concurrent sessions against one worker, for each N",
    )
    g.add_argument("--fleet-seconds", type=float, default=60.0, help="measuring window per (worker, N, mode)")
    g.add_argument(
        "--fleet-modes",
        type=_list(str),
        default=None,
        help="comma list of speculative, cloud-only (default: both, or none with --fleet-gamma)",
    )
    g.add_argument(
        "--fleet-gamma",
        type=_list(_gamma_value),
        default=None,
        metavar="G,G,...",
        help="adaptive γ under load (T = 0): per N, sessions that choose γ each round (auto) or keep "
        "a fixed γ, replayed from the draft's greedy chains with emulated drafting time, e.g. 1,2,3,4,auto; "
        "auto-solo: auto that ignores the worker's fleet row (row_med), to measure what keeping in step does",
    )
    g.add_argument(
        "--fleet-acceptance",
        type=Path,
        default=None,
        metavar="RECORDINGS.json",
        help="replay the speculative sessions with the per-round acceptance of these recordings "
        "(a fleet run's recordings.json, T = 0, same prompts) instead of drafting here: for a target "
        "whose real draft cannot run beside it, e.g. random weights of the demo target's shape on a GPU",
    )
    g.add_argument(
        "--fleet-worker",
        action="append",
        metavar="NAME=FLAGS",
        help="a worker configuration to run (repeatable), e.g. unbatched='--max-batch-sessions 1'",
    )
    g.add_argument(
        "--fleet-worker-checkout",
        action="append",
        metavar="NAME=PATH",
        help="run worker configuration NAME from another checkout of this project (e.g. "
        "`git worktree add /tmp/before HEAD~1`): a change and what it replaced side by side in one run",
    )
    g.add_argument(
        "--fleet-unbatched",
        action="store_true",
        help="also run the worker with batching off (today's one-session-per-forward worker)",
    )
    g.add_argument(
        "--fleet-pace",
        action="store_true",
        help="wait each draft block's recorded drafting time before sending it (edges that draft, "
        "instead of a saturating load)",
    )
    g.add_argument(
        "--fleet-duration",
        type=float,
        default=None,
        metavar="S",
        help="instead of the sweep: one long cell at the largest N, sampling the worker's RSS",
    )
    g.add_argument(
        "--noisy",
        action="store_true",
        help="run the noisy-neighbour benchmark: one device floods while another generates",
    )
    g.add_argument("--noisy-opens", type=int, default=1000, help="opens in the flood's burst")
    g.add_argument(
        "--noisy-streams",
        type=int,
        default=4,
        help="flood sessions sending max-length all-accepted drafts back to back",
    )
    g.add_argument("--noisy-decodes", type=int, default=2, help="flood sessions asking for giant decodes")  # fmt: skip


def _gamma_value(text: str) -> int | str:
    from bench.fleet_gamma import AUTO_SOLO
    from edge_agent.gamma import parse_gamma

    return AUTO_SOLO if text.strip().lower() == AUTO_SOLO else parse_gamma(text.strip())


def main_fleet(args, draft_spec: str, target_spec: str, pinning, argv_text: str) -> int:
    """Run ``--fleet`` / ``--noisy`` (whichever is given); returns the exit code."""
    import sys

    try:
        if args.fleet is not None:
            if any(n < 1 or n > 256 for n in args.fleet) or args.fleet_seconds <= 0:
                raise FleetUsageError("--fleet values must be in 1..256 and --fleet-seconds > 0")
            out = run_fleet(args, draft_spec, target_spec, pinning, argv_text=argv_text)
            print(f"spececd-bench: fleet report in {out / 'fleet.md'}")
        if args.noisy:
            from bench.noisy import run_noisy

            out = run_noisy(args, draft_spec, target_spec, pinning, argv_text=argv_text)
            print(f"spececd-bench: noisy-neighbour report in {out / 'noisy.md'}")
    except FleetUsageError as exc:
        print(f"spececd-bench: {exc}", file=sys.stderr)
        return 2
    return 0
