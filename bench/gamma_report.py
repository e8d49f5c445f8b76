"""Adaptive γ in the benchmark report: ``auto`` against the fixed-γ sweep of the same run.

For every group of cells that differ only in γ (same mode, temperature, RTT and draft backend)
and that holds an ``auto`` cell and at least one fixed γ, the report gives (issue 13 targets):

- overall: auto's pooled tok/s ÷ the best single fixed γ over the whole prompt mix (target ≥ 1.05);
- per prompt category: auto's pooled tok/s ÷ the best fixed γ *for that category* (target ≥ 0.97);
- what auto chose: mean γ overall and per category, and how its cost model fared: predicted ÷
  actual committed tokens and round time, summed over the rounds it predicted;
- the hindsight ceiling of choosing per prompt: for each (prompt, iteration) the fixed γ that was
  fastest on it, pooled (``oracle_tps``), ÷ the best single fixed γ (``oracle_ratio``). A rule
  that picks one γ per prompt cannot beat it; when it is under 1.05, the overall target needs
  a γ that changes within a generation. At T > 0 the fixed-γ runs are different samples, so the
  oracle also picks the luckiest sample of each prompt: an upper bound that grows with noise.
"""

from __future__ import annotations

from collections import defaultdict

from edge_agent.gamma import GAMMA_AUTO

OVERALL_TARGET = 1.05
CATEGORY_TARGET = 0.97


def _tps(runs: list[dict]) -> float:
    seconds = sum(r["total_ms"] for r in runs) / 1e3
    return sum(r["new_tokens"] for r in runs) / seconds if seconds > 0 else 0.0


def _gamma_stats(runs: list[dict]) -> dict:
    rounds = [x for r in runs for x in r.get("rounds", []) if x.get("gamma", 0) > 0]
    predicted = [x for x in rounds if x.get("pred_ms", 0) > 0]
    hist: dict[int, int] = defaultdict(int)
    for x in rounds:
        hist[x["gamma"]] += 1
    tokens = sum(x["n_acc"] + 1 for x in predicted)
    ms = sum(x["draft_ms"] + x["link_ms"] + x.get("overhang_ms", 0.0) for x in predicted)
    return {
        "gamma_mean": sum(x["gamma"] for x in rounds) / len(rounds) if rounds else None,
        "gamma_hist": dict(sorted(hist.items())),
        "pred_tokens_ratio": sum(x["pred_tokens"] for x in predicted) / tokens if tokens else None,
        "pred_ms_ratio": sum(x["pred_ms"] for x in predicted) / ms if ms else None,
    }


def per_prompt_oracle(fixed: dict[object, list[dict]]) -> tuple[float, dict]:
    """Pooled tok/s if each (prompt, iteration) had run at the fixed γ fastest on it, and that γ
    per prompt. Only (prompt, iteration) pairs that every fixed γ ran count."""
    by: dict[tuple, dict[object, dict]] = defaultdict(dict)
    for g, rs in fixed.items():
        for r in rs:
            by[(r["prompt"], r.get("iteration", 0))][g] = r
    tokens = ms = 0.0
    chosen: dict[str, object] = {}
    for (prompt, it), cell in by.items():
        if len(cell) < len(fixed):
            continue
        g = min(cell, key=lambda k: cell[k]["total_ms"] / max(1, cell[k]["new_tokens"]))
        tokens += cell[g]["new_tokens"]
        ms += cell[g]["total_ms"]
        chosen[f"{prompt}/{it}"] = g
    return (tokens / ms * 1e3 if ms > 0 else 0.0), chosen


def auto_vs_fixed(runs: list[dict]) -> list[dict]:
    """One entry per group of cells that differ only in γ and include ``auto`` (see module doc)."""
    groups: dict[tuple, dict[object, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if r.get("gamma") is None:
            continue
        key = (r["mode"], r["temperature"], r.get("rtt_ms"), r.get("backend"))
        groups[key][r["gamma"]].append(r)
    out = []
    for (mode, temp, rtt, backend), by_gamma in groups.items():
        auto = by_gamma.get(GAMMA_AUTO)
        fixed = {g: rs for g, rs in by_gamma.items() if g != GAMMA_AUTO}
        if not auto or not fixed:
            continue
        overall = {g: _tps(rs) for g, rs in fixed.items()}
        best = max(overall, key=lambda g: overall[g])
        cats = sorted({r["category"] for r in auto})
        per_cat = {}
        for c in cats:
            fixed_c = {g: _tps([r for r in rs if r["category"] == c]) for g, rs in fixed.items()}
            best_c = max(fixed_c, key=lambda g: fixed_c[g])
            auto_runs = [r for r in auto if r["category"] == c]
            auto_c = _tps(auto_runs)
            per_cat[c] = {
                "auto_tps": auto_c, "best_gamma": best_c, "best_tps": fixed_c[best_c],
                "ratio": auto_c / fixed_c[best_c] if fixed_c[best_c] else None,
                **_gamma_stats(auto_runs),
            }  # fmt: skip
        auto_tps = _tps(auto)
        ratio = auto_tps / overall[best] if overall[best] else None
        oracle_tps, oracle_gamma = per_prompt_oracle(fixed)
        cat_ratios = [v["ratio"] for v in per_cat.values() if v["ratio"] is not None]
        out.append(
            {
                "mode": mode, "temperature": temp, "rtt_ms": rtt, "backend": backend,
                "auto_tps": auto_tps, "best_gamma": best, "best_tps": overall[best], "ratio": ratio,
                "fixed_tps": {str(g): v for g, v in sorted(overall.items())},
                "oracle_tps": oracle_tps, "oracle_gamma": oracle_gamma,
                "oracle_ratio": oracle_tps / overall[best] if overall[best] and oracle_tps else None,
                "by_category": per_cat,
                "targets_met": ratio is not None and ratio >= OVERALL_TARGET
                and all(x >= CATEGORY_TARGET for x in cat_ratios),
                **_gamma_stats(auto),
            }
        )  # fmt: skip
    return out


def _f(x, fmt: str = ".2f") -> str:
    return "–" if x is None else format(x, fmt)


def markdown(entries: list[dict]) -> list[str]:
    """Markdown lines of the section (empty when no run had both auto and a fixed γ)."""
    if not entries:
        return []
    lines = [
        "",
        "## Adaptive γ: auto against the fixed-γ sweep",
        "",
        f"auto ÷ best single fixed γ over all prompts (target ≥ {OVERALL_TARGET}); per category, auto ÷ "
        f"the best fixed γ for that category (target ≥ {CATEGORY_TARGET}); per-prompt oracle: each "
        "prompt at the fixed γ that was fastest on it, in hindsight, ÷ the best single fixed γ (what "
        "choosing one γ per prompt could reach at most; at T > 0 it also picks each prompt's luckiest "
        "sample); predicted ÷ actual: the controller's cost model against what happened.",
        "",
        "| cells | auto tok/s | best fixed | auto ÷ best | per-prompt oracle ÷ best "
        "| per category: auto ÷ best (best γ, auto mean γ) "
        "| auto mean γ | predicted ÷ actual tokens, round ms | targets |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        name = f"{e['mode']}{'[' + e['backend'] + ']' if e['backend'] else ''} T={e['temperature']:g}"
        if e["rtt_ms"] is not None:
            name += f" rtt={e['rtt_ms']:g}ms"
        cats = ", ".join(
            f"{c} {_f(v['ratio'])} (γ={v['best_gamma']}, {_f(v['gamma_mean'], '.1f')})"
            for c, v in e["by_category"].items()
        )
        lines.append(
            f"| {name} | {_f(e['auto_tps'])} | {_f(e['best_tps'])} (γ={e['best_gamma']}) | {_f(e['ratio'])} "
            f"| {_f(e['oracle_ratio'])} | {cats} | {_f(e['gamma_mean'], '.1f')} | {_f(e['pred_tokens_ratio'])}, {_f(e['pred_ms_ratio'])} "
            f"| {'met' if e['targets_met'] else 'missed'} |"
        )
    return lines
