"""PNG plots of a benchmark report (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

_COLORS = {"speculative": "tab:blue", "cloud-only": "tab:red", "edge-only": "tab:gray",
           "inprocess": "tab:green", "assisted": "tab:purple"}  # fmt: skip
_PARTS = (("draft_ms", "draft"), ("codec_ms", "encode+decode"), ("net_ms", "network+broker"),
          ("queue_ms", "queue"), ("verify_ms", "verify"))  # fmt: skip


def _best_gamma_cells(cells: list[dict]) -> list[dict]:
    """For each (mode, T, RTT) the cell with the highest tokens/s (all cells without γ)."""
    best: dict[tuple, dict] = {}
    for e in cells:
        k = (e["mode"], e["temperature"], e["rtt_ms"])
        if k not in best or e["overall"]["tokens_per_s"] > best[k]["overall"]["tokens_per_s"]:
            best[k] = e
    return [e for e in cells if best.get((e["mode"], e["temperature"], e["rtt_ms"])) is e]


def tokens_per_s(report: dict, path: Path) -> None:
    """Horizontal bars: pooled tokens/s of every cell, coloured by mode."""
    cells = report["cells"]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(cells) + 1.5))
    y = range(len(cells))
    ax.barh(list(y), [e["overall"]["tokens_per_s"] for e in cells],
            color=[_COLORS.get(e["mode"], "black") for e in cells])  # fmt: skip
    ax.set_yticks(list(y), [e["key"] for e in cells], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("tokens/s (all tokens / all time)")
    ax.set_title("Throughput by mode")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def acceptance_by_category(report: dict, path: Path) -> None:
    """Grouped bars: α̂ per prompt category for the speculative cells (best γ of each setting)."""
    cells = [e for e in _best_gamma_cells(report["cells"]) if e["overall"]["acceptance"] is not None]
    cats = sorted({c for e in cells for c in e["by_category"]})
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cats) + 2), 4))
    width = 0.8 / max(1, len(cells))
    for i, e in enumerate(cells):
        vals = [(e["by_category"].get(c) or {}).get("acceptance") or 0.0 for c in cats]
        ax.bar([j + i * width for j in range(len(cats))], vals, width, label=e["key"])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cats))], cats, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("α̂ (accepted / judged)")
    ax.set_title("Acceptance by prompt category")
    if cells:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def round_breakdown(report: dict, path: Path) -> None:
    """Stacked bars: mean milliseconds per round by part, for every cell that has rounds."""
    cells = [e for e in report["cells"] if e["overall"]["rounds"]]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(cells) + 1.8))
    left = [0.0] * len(cells)
    for key, label in _PARTS:
        vals = [e["overall"]["round"][key]["mean"] or 0.0 for e in cells]
        ax.barh(range(len(cells)), vals, left=left, label=label)
        left = [a + b for a, b in zip(left, vals, strict=True)]
    ax.set_yticks(range(len(cells)), [e["key"] for e in cells], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms per round (mean)")
    ax.set_title("Where a round's time goes")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def gamma_sweep(report: dict, path: Path) -> None:
    """Lines: tokens/s against γ for each (mode, T, RTT) measured at several γ."""
    series: dict[tuple, list[tuple[int, float]]] = defaultdict(list)
    auto: dict[tuple, float] = {}  # γ = auto: a dotted line at its tok/s, in the series' colour
    for e in report["cells"]:
        if e["gamma"] == "auto":
            auto[(e["mode"], e["temperature"], e["rtt_ms"])] = e["overall"]["tokens_per_s"]
        elif e["gamma"] is not None:
            series[(e["mode"], e["temperature"], e["rtt_ms"])].append(
                (e["gamma"], e["overall"]["tokens_per_s"])
            )
    fig, ax = plt.subplots(figsize=(7, 4))
    for (mode, temp, rtt), pts in sorted(series.items(), key=str):
        pts.sort()
        label = f"{mode} T={temp:g}" + ("" if rtt is None else f" rtt={rtt:g}ms")
        ax.plot([g for g, _ in pts], [v for _, v in pts], marker="o", label=label,
                color=_COLORS.get(mode), linestyle="-" if temp == 0 else "--")  # fmt: skip
    for (mode, temp, rtt), tps in sorted(auto.items(), key=str):
        ax.axhline(tps, color=_COLORS.get(mode), linestyle=":", linewidth=1.5,
                   label=f"{mode} T={temp:g}" + ("" if rtt is None else f" rtt={rtt:g}ms") + " γ=auto")  # fmt: skip
    for e in report["cells"]:  # baselines without γ as horizontal lines
        if e["mode"] in ("cloud-only", "edge-only"):
            ax.axhline(e["overall"]["tokens_per_s"], color=_COLORS[e["mode"]], linewidth=0.8,
                       linestyle="-" if e["temperature"] == 0 else "--", alpha=0.6)  # fmt: skip
    ax.set_xlabel("γ (draft tokens per round)")
    ax.set_ylabel("tokens/s")
    ax.set_title("γ sweep (grey: edge-only, red: cloud-only)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(report: dict, out_dir: Path) -> dict[str, str]:
    """Write every plot into ``out_dir``; returns {name: file name}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    made = {}
    for name, fn in (("tokens_per_s", tokens_per_s), ("acceptance_by_category", acceptance_by_category),
                     ("round_breakdown", round_breakdown), ("gamma_sweep", gamma_sweep)):  # fmt: skip
        fn(report, out_dir / f"{name}.png")
        made[name] = f"{name}.png"
    return made
