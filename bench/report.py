"""Summing runs into the report: per-cell and per-category figures, speedups, agreement, Markdown.

Acceptance is α̂ = accepted / judged draft positions (a position is judged when every earlier
draft token of its round was accepted: the accepted ones plus the first rejected one), pooled
over all runs of a cell. The theoretical α is the mean of Σ_x min(p(x), q(x)) over the same
judged positions, as the verifier reports them. The original assessment scale applies to α̂.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

from bench import gamma_report
from bench.runner import TARGET_MODES, Cell

ASSESSMENT = ((0.5, "EXCELLENT"), (0.3, "GOOD"), (0.1, "MODERATE"))
ACCEPTANCE_DEFINITION = (
    "α̂ = accepted / judged draft positions, pooled over all runs of a cell (a position is judged "
    "when all earlier draft tokens of its round were accepted); assessment: EXCELLENT > 50%, "
    "GOOD > 30%, MODERATE > 10%, else POOR"
)
ROUND_FIELDS = (
    "draft_ms",
    "codec_ms",
    "net_ms",
    "queue_ms",
    "verify_ms",
    "noncompute_ms",
    "bytes_up",
    "bytes_down",
)


def assess(acceptance: float | None) -> str | None:
    """The original project's verdict on an acceptance rate (None without speculative rounds)."""
    if acceptance is None:
        return None
    for threshold, label in ASSESSMENT:
        if acceptance > threshold:
            return label
    return "POOR"


def _stats(values: list[float]) -> dict:
    if not values:
        return {"median": None, "mean": None}
    return {"median": statistics.median(values), "mean": statistics.fmean(values)}


def summarize(runs: list[dict]) -> dict:
    """Figures of a group of runs (one cell, or one cell and category)."""
    tokens = sum(r["new_tokens"] for r in runs)
    seconds = sum(r["total_ms"] for r in runs) / 1e3
    forwards = sum(r["target_forwards"] or 0 for r in runs)
    spec = [r for r in runs if r.get("judged")]
    judged = sum(r["judged"] for r in spec)
    accepted = sum(r["accepted"] for r in spec)
    drafted = sum(r["drafted"] for r in spec)
    theory = [(r["alpha_theory"], r["judged"]) for r in spec if r.get("alpha_theory") is not None]
    rounds = [x for r in runs for x in r.get("rounds", [])]
    acceptance = accepted / judged if judged else None
    # drafting time per token the round waited for (drafts made ahead during a verify are free)
    fresh = sum(max(x["gamma"] - x.get("prefetched", 0), 0) for x in rounds)
    out = {
        "runs": len(runs),
        "new_tokens": tokens,
        "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,  # pooled: all tokens / all time
        "tokens_per_s_run": _stats([r["tokens_per_s"] for r in runs]),
        "latency_ms": _stats([r["total_ms"] for r in runs]),
        "ttft_ms": _stats([r["ttft_ms"] for r in runs]),
        "drafted": drafted,
        "judged": judged,
        "accepted": accepted,
        "acceptance": acceptance,
        "alpha_theory": sum(a * n for a, n in theory) / sum(n for _, n in theory) if theory else None,
        "target_forwards": forwards,
        "tau": tokens / forwards if forwards else None,
        "forwards_per_token": forwards / tokens if tokens and forwards else None,
        "rounds": len(rounds),
        "round": {f: _stats([x[f] for x in rounds]) for f in ROUND_FIELDS},
        "assessment": assess(acceptance),
        "draft_ms_per_token": sum(x["draft_ms"] for x in rounds) / fresh if fresh else None,
    }
    return out


def agreement(cells: list[Cell], runs: list[dict]) -> list[dict]:
    """At T = 0: does every target-following cell give the same tokens as the reference cell
    (cloud-only if measured, else the first one) on every (prompt, iteration)?"""
    out = []
    for temp in sorted({c.temperature for c in cells if c.temperature == 0.0}):
        group = [c for c in cells if c.temperature == temp and c.mode in TARGET_MODES]
        if len(group) < 2:
            continue
        ref = next((c for c in group if c.mode == "cloud-only"), group[0])
        by = {(r["cell"], r["prompt"], r["iteration"]): r["token_ids"] for r in runs}
        keys = sorted({(r["prompt"], r["iteration"]) for r in runs if r["cell"] == ref.key})
        for cell in group:
            if cell == ref:
                continue
            diffs = []
            for p, it in keys:
                a, b = by.get((ref.key, p, it)), by.get((cell.key, p, it))
                if a is None or b is None or a == b:
                    continue
                first = next(
                    (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
                )
                diffs.append({"prompt": p, "iteration": it, "first_difference": first})
            out.append({"reference": ref.key, "cell": cell.key, "compared": len(keys), "identical": len(keys) - len(diffs), "differences": diffs})  # fmt: skip
    return out


def build_report(cells: list[Cell], runs: list[dict], meta: dict) -> dict:
    """The whole JSON report: meta, one entry per cell (overall, per category, speedups), agreement, runs."""
    by_cell: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        by_cell[r["cell"]].append(r)
    entries = []
    for cell in cells:
        rs = by_cell.get(cell.key, [])
        cats: dict[str, list[dict]] = defaultdict(list)
        for r in rs:
            cats[r["category"]].append(r)
        entries.append(
            {
                **cell.as_dict(),
                "overall": summarize(rs),
                "by_category": {k: summarize(v) for k, v in sorted(cats.items())},
            }
        )
    tps = {e["key"]: e["overall"]["tokens_per_s"] for e in entries}
    for e, cell in zip(entries, cells, strict=True):
        e["speedup"] = {
            b.key: tps[cell.key] / tps[b.key]
            for b in cells
            if (b.mode, b.backend) != (cell.mode, cell.backend) and cell.comparable(b) and tps.get(b.key)
        }
    return {
        "meta": {**meta, "acceptance_definition": ACCEPTANCE_DEFINITION},
        "cells": entries,
        "agreement": agreement(cells, runs),
        "gamma_auto": gamma_report.auto_vs_fixed(runs),  # auto vs the fixed-γ sweep (issue 13 targets)
        "runs": runs,
    }


def _f(x, fmt: str = ".2f") -> str:
    return "–" if x is None else format(x, fmt)


def markdown(report: dict, plots: dict[str, str] | None = None) -> str:
    """The report as Markdown (tables per section; plots linked by relative path)."""
    meta, cells = report["meta"], report["cells"]
    lines = ["# SpecECD benchmark", ""]
    for k, v in meta.items():
        if k in ("acceptance_definition", "notes"):
            continue
        if isinstance(v, list) and all(isinstance(x, str) for x in v):
            lines += [f"- {k}:"] + [f"  - {x}" for x in v]
        else:
            lines.append(f"- {k}: `{v}`")
    lines += ["", f"Acceptance: {meta['acceptance_definition']}.", ""]
    lines += [f"Note: {n}" for n in meta.get("notes", [])] + [""]
    lines += ["## Per mode", "",
              "| cell | tok/s (pooled) | tok/s median | latency median ms | TTFT median ms | α̂ | α theory | τ | target fwd/token | assessment |",
              "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for e in cells:
        o = e["overall"]
        lines.append(
            f"| {e['key']} | {_f(o['tokens_per_s'])} | {_f(o['tokens_per_s_run']['median'])} | {_f(o['latency_ms']['median'], '.0f')} "
            f"| {_f(o['ttft_ms']['median'], '.0f')} | {_f(o['acceptance'], '.3f')} | {_f(o['alpha_theory'], '.3f')} | {_f(o['tau'])} "
            f"| {_f(o['forwards_per_token'], '.3f')} | {o['assessment'] or '–'} |"
        )
    lines += ["", "## Where a round's time goes (median ms; bytes: mean per round)", "",
              "| cell | rounds | draft | encode+decode | network+broker | queue | verify | non-compute | bytes up | bytes down |",
              "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for e in cells:
        o = e["overall"]
        if not o["rounds"]:
            continue
        rd = o["round"]
        med = [_f(rd[f]["median"]) for f in ROUND_FIELDS[:6]]
        lines.append(
            f"| {e['key']} | {o['rounds']} | "
            + " | ".join(med)
            + f" | {_f(rd['bytes_up']['mean'], '.0f')} | {_f(rd['bytes_down']['mean'], '.0f')} |"
        )
    lines += [
        "",
        "## Speedup (pooled tok/s of the row ÷ the baseline's)",
        "",
        "| cell | against |",
        "|---|---|",
    ]
    for e in cells:
        if e["speedup"]:
            vs = ", ".join(f"{k}: {v:.2f}×" for k, v in e["speedup"].items())
            lines.append(f"| {e['key']} | {vs} |")
    if len(meta.get("draft_backends", [])) > 1 or any(e.get("backend") for e in cells):
        lines += ["", "## Draft backends", "",
                  f"Resident memory of each draft (RSS growth while loading it, MB): {meta.get('draft_resident_mb')}; "
                  f"edge process peak RSS {meta.get('edge_peak_rss_mb')} MB.", "",
                  "| cell | draft ms/token | α̂ | α theory | tok/s (pooled) |", "|---|---|---|---|---|"]  # fmt: skip
        for e in cells:
            if e.get("backend"):
                o = e["overall"]
                lines.append(f"| {e['key']} | {_f(o.get('draft_ms_per_token'))} | {_f(o['acceptance'], '.3f')} "
                             f"| {_f(o['alpha_theory'], '.3f')} | {_f(o['tokens_per_s'])} |")  # fmt: skip
    cats = sorted({c for e in cells for c in e["by_category"]})
    lines += [
        "",
        "## Per category (α̂ / tok/s pooled)",
        "",
        "| cell | " + " | ".join(cats) + " |",
        "|---" * (len(cats) + 1) + "|",
    ]
    for e in cells:
        row = []
        for c in cats:
            o = e["by_category"].get(c)
            row.append("–" if o is None else f"{_f(o['acceptance'], '.2f')} / {_f(o['tokens_per_s'], '.1f')}")
        lines.append(f"| {e['key']} | " + " | ".join(row) + " |")
    if report["agreement"]:
        lines += [
            "",
            "## Outputs at T = 0 (token for token)",
            "",
            "| cell | reference | identical | differences (prompt@iteration: first differing token) |",
            "|---|---|---|---|",
        ]
        for a in report["agreement"]:
            d = (
                ", ".join(
                    f"{x['prompt']}@{x['iteration']}: {x['first_difference']}" for x in a["differences"]
                )
                or "none"
            )
            lines.append(f"| {a['cell']} | {a['reference']} | {a['identical']}/{a['compared']} | {d} |")
    lines += gamma_report.markdown(report.get("gamma_auto", []))
    if plots:
        lines += ["", "## Plots", ""] + [f"![{name}]({path})" for name, path in plots.items()]
    return "\n".join(lines) + "\n"
