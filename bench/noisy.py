"""``spececd-bench --noisy``: the noisy-neighbour benchmark (issue 10, Targets).

One worker (pinned to its core, its default session limits). A well-behaved device ``good``
generates every prompt once, speculative, replayed from a recording made through this worker
(``bench.fleet_record``), first alone (undisturbed), then again while the device ``noisy`` floods
the same worker (``bench.noisy_flood``: 1000 long opens, back-to-back maximum-length and
all-accepted drafts, giant decodes). Reports:

- whether the good device's output under the flood is identical to its undisturbed run (every
  verdict equal to the recording, every generation complete);
- its throughput under the flood as a share of its undisturbed throughput: the share of the
  worker it still gets (a fair split between two devices is 50 %; target ≥ 40 %);
- its share of all tokens the worker committed in that window (good + flood), for reference;
- the flood's answers by kind and error code, and whether the worker survived.

The flood runs in its own process, niced, on the edge's core, so the good device's replay (this
process) is not slowed by the flood's own CPU and its round times measure the worker.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from bench.fleet import open_broker_and_pin, record_all, start_worker
from bench.fleet_record import save_recordings
from bench.fleet_replay import Replayer, only
from bench.fleet_stats import proc_rss_mb
from bench.procs import Procs, one_thread_env


def _max_positions(target_spec: str) -> int:
    try:
        from transformers import AutoConfig

        return int(getattr(AutoConfig.from_pretrained(target_spec), "max_position_embeddings", 2048))
    except Exception:  # a hub id offline, a .gguf: a safe guess; the worker rejects what does not fit
        return 2048


def _good_run(replayer: Replayer, recs, *, drain_s: float) -> dict:
    t0, _ = replayer.run([("good", recs)], duration_s=None, drain_s=drain_s)
    wall0 = time.time() - (time.perf_counter() - t0)  # the window in wall-clock time, for the flood's buckets
    t_end = max([g.t_end or t0 for g in replayer.generations] + [t0])
    work = [r for r in replayer.rounds if r.kind == "draft"]
    tokens = sum(r.committed for r in work)
    lat = sorted(r.latency_ms for r in work)
    span = max(1e-9, t_end - t0)
    return {
        "generations": len(replayer.generations),
        "complete": sum(g.complete for g in replayer.generations),
        "mismatches": [g.mismatch for g in replayer.generations if g.mismatch],
        "errors": [g.error for g in replayer.generations if g.error],
        "tokens": tokens,
        "seconds": round(span, 3),
        "tokens_per_s": round(tokens / span, 3),
        "round_ms_p50": round(lat[len(lat) // 2], 2) if lat else None,
        "round_ms_max": round(lat[-1], 2) if lat else None,
        "wall_window": (wall0, wall0 + span),
    }


def _flood_tokens(path: Path, window: tuple[float, float]) -> tuple[int, dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return 0, {"flood_report": "missing"}
    lo, hi = window
    tokens = sum(n for b, n in data["buckets"] if lo <= b / 10 <= hi)
    return tokens, data["answers"]


def run_noisy(args, draft_spec: str, target_spec: str, pinning, *, argv_text: str = "") -> Path:
    """The noisy-neighbour benchmark of ``args``; writes noisy.json and noisy.md into ``args.out``."""

    from bench.cli import load_prompts, machine_meta
    from bench.network import wait_worker_online
    from edge_agent.mqtt_link import MqttLink
    from shared.models import load_model

    edge_cores, worker_cores, pin_text = pinning
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    start_broker = args.start_broker if args.start_broker is not None else args.host is None
    old_affinity = os.sched_getaffinity(0)
    report: dict = {"meta": {"command": argv_text, **machine_meta(), "draft": draft_spec, "target": target_spec,
                             "pinning": pin_text, "gamma": args.gamma[0], "temperature": args.temperature[0],
                             "max_new_tokens": args.max_new_tokens, "num_prompts": args.num_prompts,
                             "flood": {"opens": args.noisy_opens, "streams": args.noisy_streams,
                                       "decodes": args.noisy_decodes}}}  # fmt: skip
    with Procs(out / "logs") as procs:
        try:
            broker, cfg = open_broker_and_pin(procs, args, start_broker=start_broker, edge_cores=edge_cores)
            proc, wid, _murl = start_worker(procs, broker, target=target_spec, draft_name=draft_spec,
                                            cores=worker_cores, max_sessions=64, extra=[])  # fmt: skip
            link = MqttLink(cfg, device="good", round_timeout_s=args.round_timeout_s)
            link.connect()
            wait_worker_online(link, wid, proc, procs, args.worker_timeout_s)
            draft = load_model(draft_spec)
            vocab = min(draft.vocab_size, len(draft.tokenizer))
            prompts = load_prompts(args.prompts_file, args.num_prompts, draft.tokenizer)
            recs = only(record_all(link, draft, prompts, args, draft_spec, target_spec, ["speculative"]))
            save_recordings(out / "noisy_recordings.json", recs)
            link.shutdown()
            del draft
            replayer = Replayer(cfg, round_timeout_s=args.round_timeout_s, tag="good")
            replayer.connect()
            alone = _good_run(replayer, recs, drain_s=600)
            # Under the flood a round may wait far longer than alone; bound it so the bench ends.
            replayer.round_timeout_s = max(10.0, 20 * (alone["round_ms_max"] or 1000) / 1e3)
            flood_out = out / "logs" / "flood.json"
            flood_argv = [sys.executable, "-m", "bench.noisy_flood", "--broker", f"{broker[0]}:{broker[1]}",
                          "--device", "noisy", "--target", target_spec, "--draft", draft_spec, "--vocab", str(vocab),
                          "--max-positions", str(_max_positions(target_spec)), "--opens", str(args.noisy_opens),
                          "--streams", str(args.noisy_streams), "--decodes", str(args.noisy_decodes),
                          "--out", str(flood_out)]  # fmt: skip
            flood, _ = procs._spawn(
                "flood", ["nice", "-n", "19", *flood_argv], cores=edge_cores, env=one_thread_env()
            )
            _wait_flooding(procs, flood)
            time.sleep(1.0)  # let the flood fill the worker's queue first
            rss0 = proc_rss_mb(proc.pid)
            crowded = _good_run(replayer, recs, drain_s=replayer.round_timeout_s * 2 * len(recs))
            worker_alive = proc.poll() is None
            rss1 = proc_rss_mb(proc.pid) if worker_alive else None
            flood.terminate()
            flood.wait(30)
            replayer.close()
        finally:
            os.sched_setaffinity(0, old_affinity)
    flood_tokens, answers = _flood_tokens(flood_out, crowded["wall_window"])
    identical = (crowded["complete"] == len(recs) and not crowded["mismatches"]
                 and alone["complete"] == len(recs) and not alone["mismatches"])  # fmt: skip
    share = crowded["tokens_per_s"] / alone["tokens_per_s"] if alone["tokens_per_s"] else 0.0
    report.update(
        alone=alone,
        flooded=crowded,
        identical_output=identical,
        share_of_solo_throughput=round(share, 4),
        good_token_share=round(crowded["tokens"] / max(1, crowded["tokens"] + flood_tokens), 4),
        flood_tokens_in_window=flood_tokens,
        flood_answers=answers,
        worker_alive=worker_alive,
        worker_rss_mb={"flood_start": rss0, "good_done": rss1},
        round_timeout_under_flood_s=replayer.round_timeout_s,
    )
    for run in (alone, crowded):
        run["wall_window"] = [round(x, 3) for x in run["wall_window"]]
    (out / "noisy.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    (out / "noisy.md").write_text(noisy_markdown(report))
    return out


def _wait_flooding(procs: Procs, flood, timeout: float = 60.0) -> None:
    log = procs.workdir / "flood.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if flood.poll() is not None:
            raise RuntimeError(
                f"the flood exited with {flood.returncode}:\n{log.read_text(errors='replace')[-3000:]}"
            )
        if log.exists() and "flooding" in log.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise RuntimeError(f"the flood did not start within {timeout:.0f} s; see {log}")


def noisy_markdown(r: dict) -> str:
    m, a, f = r["meta"], r["alone"], r["flooded"]
    ok = lambda b: "yes" if b else "**no**"  # noqa: E731
    return "\n".join([
        "# Noisy-neighbour benchmark", "", f"`{m['command']}`", "",
        f"Draft `{m['draft']}`, target `{m['target']}`; γ = {m['gamma']}, T = {m['temperature']}, "
        f"{m['num_prompts']} prompts, max {m['max_new_tokens']} new tokens. {m['pinning']}. Flood: "
        f"{m['flood']['opens']} long opens, {m['flood']['streams']} back-to-back max-length draft sessions "
        f"(half crafted to be all accepted), {m['flood']['decodes']} giant decodes.", "",
        "| run | generations complete | tokens | seconds | good tok/s | round p50 / max ms |",
        "|---|---|---|---|---|---|",
        f"| alone | {a['complete']}/{a['generations']} | {a['tokens']} | {a['seconds']} | {a['tokens_per_s']} | "
        f"{a['round_ms_p50']} / {a['round_ms_max']} |",
        f"| under the flood | {f['complete']}/{f['generations']} | {f['tokens']} | {f['seconds']} | "
        f"{f['tokens_per_s']} | {f['round_ms_p50']} / {f['round_ms_max']} |", "",
        f"- Identical output under the flood: {ok(r['identical_output'])}.",
        f"- Good device's throughput under the flood / alone: {100 * r['share_of_solo_throughput']:.1f} % "
        f"(target ≥ 40 %; a fair split is 50 %): {ok(r['share_of_solo_throughput'] >= 0.4)}.",
        f"- Good device's share of the tokens the worker committed in that window: "
        f"{100 * r['good_token_share']:.1f} % ({f['tokens']} vs the flood's {r['flood_tokens_in_window']}).",
        f"- Worker alive after the flood: {ok(r['worker_alive'])}; RSS {r['worker_rss_mb']} MiB.",
        f"- Flood answers: {r['flood_answers']}.",
        f"- Good device errors under the flood: {f['errors'][:3]}; mismatches: {f['mismatches'][:3]}.", "",
    ])  # fmt: skip
