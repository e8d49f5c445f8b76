"""The fleet and noisy-neighbour reports: JSON, a Markdown table, a PNG of throughput against N."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

_COLOR = {"speculative": "tab:blue", "cloud-only": "tab:red"}
_LINES = ("-", "--", ":", "-.")  # one per worker configuration


def _padded(cell: dict) -> str:
    """ " (P)": the mean padded positions of the cell's forwards, when the worker exports them."""
    p = cell.get("padded_per_forward")
    return f" ({p})" if p is not None else ""


def plot_throughput(cells: list[dict], path: Path) -> Path | None:
    """Server committed tokens/s against N, one line per (worker configuration, mode)."""
    if not cells:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    workers = list(dict.fromkeys(c["worker"] for c in cells))
    for key in sorted({(c["worker"], c["mode"]) for c in cells}):
        pts = sorted((c["n"], c["server_tokens_per_s"]) for c in cells if (c["worker"], c["mode"]) == key)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if key[1] == "speculative" else "s",
                linestyle=_LINES[workers.index(key[0]) % len(_LINES)], color=_COLOR.get(key[1], "black"),
                label=f"{key[1]}, {key[0]} worker")  # fmt: skip
    ax.set_ylim(bottom=0)
    ns = sorted({c["n"] for c in cells})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("concurrent sessions N (one worker, one core)")
    ax.set_ylabel("server committed tokens/s")
    ax.set_title("Fleet: server throughput against N")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}×" if a and b else "–"


def targets(cells: list[dict]) -> list[str]:
    """The issue's fleet targets, as far as the cells of this run allow."""
    lines: list[str] = []
    by = {(c["worker"], c["mode"], c["n"]): c for c in cells}
    workers = sorted({c["worker"] for c in cells})
    for w in workers:
        s8, c8 = by.get((w, "speculative", 8)), by.get((w, "cloud-only", 8))
        if s8 and c8:
            lines.append(f"- {w}: speculative / cloud-only server tokens/s at N = 8: "
                         f"{_ratio(s8['server_tokens_per_s'], c8['server_tokens_per_s'])} (target ≥ 1.8×)")  # fmt: skip
        s1 = by.get((w, "speculative", 1))
        if s1 and s1.get("noncompute_ms_p50") is not None:
            lines.append(f"- {w}: non-compute time of a speculative round at N = 1, median: "
                         f"{s1['noncompute_ms_p50']} ms (target: no worse than 3.2 ms)")  # fmt: skip
        if s8 and s1:
            lines.append(f"- {w}: speculative p99 round at N = 8 / p50 round at N = 1: "
                         f"{_ratio(s8['round_ms']['p99'], s1['round_ms']['p50'])} (target ≤ 2.5×)")  # fmt: skip
    if "unbatched" in workers:
        for w in (x for x in workers if x != "unbatched"):
            a, b = by.get((w, "speculative", 8)), by.get(("unbatched", "speculative", 8))
            if a and b:
                lines.append(f"- {w} / unbatched speculative server tokens/s at N = 8: "
                             f"{_ratio(a['server_tokens_per_s'], b['server_tokens_per_s'])} (target ≥ 2.2×)")  # fmt: skip
    for w in workers:
        for mode in ("speculative", "cloud-only"):
            series = sorted(
                (c["n"], c["server_tokens_per_s"]) for c in cells if (c["worker"], c["mode"]) == (w, mode)
            )
            if len(series) > 1:
                best = max(series, key=lambda p: p[1])
                lines.append(f"- {w} {mode}: peak {best[1]:.2f} tok/s at N = {best[0]}")
    return lines


def gamma_section(cells: list[dict]) -> list[str]:
    """The adaptive-γ sweep under load (``--fleet-gamma``): per worker and N, each γ's server
    tokens/s, and auto against the best fixed γ (issue 13: target ≥ 1.05× the best single fixed γ)."""
    from bench.fleet_gamma import GAMMA_MODE

    sweep = [c for c in cells if c["mode"].startswith(GAMMA_MODE)]
    if not sweep:
        return []
    gammas = list(dict.fromkeys(c["mode"].removeprefix(GAMMA_MODE) for c in sweep))
    out = ["", "## Adaptive γ under load", "",
           "Sessions replayed from the draft's greedy chains, each choosing γ every round with the edge's "
           "controller (auto) or pinned to a fixed γ; drafting time emulated at the measured cost per token.", "",
           "| worker | N | " + " | ".join(f"γ = {g} tok/s" for g in gammas) + " | best fixed | auto ÷ best | "
           "auto mean γ | auto predicted ÷ actual tokens, round ms |",
           "|---|---|" + "---|" * len(gammas) + "---|---|---|---|"]  # fmt: skip
    by = {(c["worker"], c["n"], c["mode"].removeprefix(GAMMA_MODE)): c for c in sweep}
    for w, n in sorted({(c["worker"], c["n"]) for c in sweep}):
        row = [by.get((w, n, g)) for g in gammas]
        rates = {g: c["server_tokens_per_s"] for g, c in zip(gammas, row, strict=True) if c}
        fixed = {g: r for g, r in rates.items() if not g.startswith("auto")}
        best = max(fixed, key=fixed.__getitem__) if fixed else None
        auto = by.get((w, n, "auto"))
        ratio = _ratio(rates.get("auto"), fixed.get(best)) if best else "–"
        extra = (f"{auto.get('gamma_mean')} | {auto.get('pred_tokens_ratio')}, {auto.get('pred_round_ratio')}"
                 if auto else "– | –")  # fmt: skip
        cols = " | ".join(f"{c['server_tokens_per_s']:.2f}" if c else "–" for c in row)
        out.append(f"| {w} | {n} | {cols} | {best or '–'} | {ratio} | {extra} |")
    return out + round_terms_section(sweep)


def round_terms_section(sweep: list[dict]) -> list[str]:
    """Each γ cell's round, term by term: the controller's predicted mean against the measured
    one (ms; positions of the forward), so a round predicted short shows which term is short."""
    from bench.fleet_gamma import GAMMA_MODE, TERMS

    rows = [c for c in sweep if c.get("round_terms")]
    if not rows:
        return []
    out = ["", "Predicted / measured mean per round (ms; positions: of the forward the block was verified in; "
           "net: the round trip beyond queue and verify):", "",
           "| worker | N | γ | " + " | ".join(TERMS) + " |", "|---|---|---|" + "---|" * len(TERMS)]  # fmt: skip
    for c in sorted(rows, key=lambda c: (c["worker"], c["n"], c["mode"])):
        terms = c["round_terms"]
        cols = " | ".join(f"{terms[t][0]:g} / {terms[t][1]:g}" for t in TERMS)
        out.append(f"| {c['worker']} | {c['n']} | {c['mode'].removeprefix(GAMMA_MODE)} | {cols} |")
    auto = [c for c in rows if c["mode"].startswith(f"{GAMMA_MODE}auto") and c.get("gamma_sent")]
    if auto:
        out += [
            "",
            "Auto's choices: rounds per γ sent, and each session slot's last reason in the window:",
            "",
        ]
    for c in auto:
        sent = ", ".join(f"γ {g}: {k}" for g, k in c["gamma_sent"].items())
        out.append(f"- {c['worker']}, N = {c['n']}, {c['mode'].removeprefix(GAMMA_MODE)}: {sent}")
        out += [f"  - `{reason}`" for reason in c.get("last_reasons", [])]
    return out


def fleet_markdown(report: dict, plot: Path | None) -> str:
    meta, cells, long = report["meta"], report["cells"], report.get("long_run") or {}
    out = ["# Fleet benchmark", "", f"`{meta['command']}`", "",
           f"Draft `{meta['draft']}`, target `{meta['target']}`; γ = {meta['gamma']}, T = {meta['temperature']}, "
           f"max {meta['max_new_tokens']} new tokens, {meta['num_prompts']} prompts, {meta['fleet_seconds']} s per cell, "
        f"{'paced by the recorded drafting time' if meta.get('paced') else 'saturating (no drafting time between rounds)'}. "
           f"{meta['pinning']}. {meta['machine']}, torch {meta['torch']}; load average "
           f"{meta['load_avg_start']} → {meta.get('load_avg_end')}.", ""]  # fmt: skip
    checkouts = meta.get("worker_checkouts") or {}
    for name, flags in meta["worker_configs"].items():
        line = f"- worker `{name}`: `spececd-worker {flags}`".rstrip()
        out.append(line + (f", the code of {checkouts[name]}" if name in checkouts else ""))
    if cells:
        out += ["", "| worker | mode | N | server tok/s | session tok/s (min–max) | round p50 / p99 ms | "
                "queue / non-compute p50 ms | fwd / token | pos / fwd (padded) | replayer / worker CPU ms per round | worker busy | "
                "mismatches | errors |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for c in cells:
            s = c["session_tokens_per_s"]
            out.append(
                f"| {c['worker']} | {c['mode']} | {c['n']} | {c['server_tokens_per_s']:.2f} | "
                f"{s['mean']} ({s['min']}–{s['max']}) | {c['round_ms']['p50']} / {c['round_ms']['p99']} | "
                f"{c['queue_ms_p50']} / {c['noncompute_ms_p50']} | {c['forwards_per_token']} | {c['positions_per_forward']}{_padded(c)} | "
                f"{c['replayer_cpu_ms_per_round']} / {c['worker_cpu_ms_per_round']} | {c['worker_busy']} | "
                f"{c['mismatches']} | {c['errors']} |"
            )
        sources = sorted({c["forwards_source"] for c in cells})
        out += ["", f"Forwards from: {'; '.join(sources)}.", "", "Targets:", *targets(cells)]
        refused = [
            f"{c['worker']} {c['mode']} N={c['n']}: {c['opens_refused']}"
            for c in cells
            if c.get("opens_refused")
        ]
        if refused:
            out.append(f"- opens refused as `overloaded` and retried after 0.2 s: {'; '.join(refused)}")
        bad = [c for c in cells if c["mismatches"] or c["errors"]]
        for c in bad:
            out.append(f"- {c['worker']} {c['mode']} N={c['n']}: first mismatch {c['first_mismatch']!r}, "
                       f"first error {c['first_error']!r}")  # fmt: skip
    out += gamma_section(cells)
    if plot is not None:
        out += ["", f"![server throughput against N]({plot.name})"]
    if long:
        r = long.get("rss", {})
        out += ["", f"## Long run: {long['worker']}, N = {long['n']}, {long['mode']}, {long['window_s']} s", "",
                f"{long['server_tokens_per_s']} tok/s, round p50/p99 {long['round_ms']['p50']} / "
                f"{long['round_ms']['p99']} ms, mismatches {long['mismatches']}, errors {long['errors']}.", "",
                f"Worker RSS: reference {r.get('reference_mb')} MiB (after the first 10 % of the run), end "
                f"{r.get('end_mb')} MiB, max {r.get('max_mb')} MiB; largest drift {r.get('max_drift_pct')} % "
                "(target: within 5 %)."]  # fmt: skip
    return "\n".join(out) + "\n"


def write_fleet_report(report: dict, out: Path) -> None:
    """fleet.json, fleet.md and fleet_throughput.png in ``out``."""
    plot = plot_throughput(report["cells"], out / "fleet_throughput.png")
    (out / "fleet.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    (out / "fleet.md").write_text(fleet_markdown(report, plot))
