"""Figures of a fleet cell: from the replayer's rounds, the worker's /proc entries and its metrics."""

from __future__ import annotations

import json
import os
import re
import statistics
import threading
import time
import urllib.request
from pathlib import Path

from bench.fleet_replay import GenerationRecord, RoundRecord

_TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (its threads included)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14, 15 of stat)


def proc_rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MiB."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class RssSampler:
    """Samples a process's RSS every ``period_s`` in a thread: ``samples`` is [(seconds, MiB)]."""

    def __init__(self, pid: int, period_s: float = 1.0) -> None:
        self.pid, self.period_s = pid, period_s
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((round(time.monotonic() - self._t0, 2), round(proc_rss_mb(self.pid), 2)))
            except OSError:
                return  # the process is gone
            self._stop.wait(self.period_s)

    def stop(self) -> list[tuple[float, float]]:
        self._stop.set()
        self._thread.join(5)
        return self.samples


def rss_drift(samples: list[tuple[float, float]], warmup_frac: float = 0.1) -> dict:
    """RSS after warm-up vs the end: the "flat within 5 %" check of a long fleet run.

    The reference is the median of the samples in the window right after the first
    ``warmup_frac`` of the run (models loaded, caches grown to their working size); the drift is
    the largest relative deviation of any later sample from it."""
    if len(samples) < 4:
        return {"samples": len(samples)}
    t_end = samples[-1][0]
    later = [m for t, m in samples if t >= warmup_frac * t_end]
    ref = statistics.median(later[: max(1, len(later) // 10)])
    worst = max(later, key=lambda m: abs(m - ref))
    return {"samples": len(samples), "reference_mb": round(ref, 1), "end_mb": samples[-1][1],
            "max_mb": max(m for _, m in samples), "max_drift_pct": round(100 * (worst - ref) / ref, 2),
            "end_drift_pct": round(100 * (samples[-1][1] - ref) / ref, 2)}  # fmt: skip


_SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEinfNa]+)")


def scrape(url: str | None) -> dict[str, float]:
    """The worker's Prometheus metrics, summed over labels ({} when off or unreachable)."""
    if not url:
        return {}
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE_RE.match(line)
        if m and not (m.group(2) or "").count('le="'):
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
    return out


def forward_counts(before: dict[str, float], after: dict[str, float]) -> tuple[float, float, str] | None:
    """(target forwards, positions in them, metric names) during a cell, from the worker's metrics
    when it exports forward counts (a counter or histogram named ``*forward*``); else None."""
    delta = {k: after[k] - before.get(k, 0.0) for k in after if "padded" not in k}
    fwd = [k for k in delta if "forward" in k and k.endswith("_count") and "position" in k]
    fwd += [k for k in delta if "forward" in k and k.endswith("_total") and "position" not in k]
    pos = [k for k in delta if "position" in k and k.endswith("_sum")]
    if not fwd:
        return None
    n_fwd = delta[fwd[0]]
    n_pos = delta[pos[0]] if pos else float("nan")
    return n_fwd, n_pos, ", ".join([fwd[0], *pos[:1]])


def padded_per_forward(before: dict[str, float], after: dict[str, float]) -> float | None:
    """Mean padded positions (rows × widest row) of the cell's forwards, from the worker's
    ``*forward_padded`` histogram when it exports one; else None."""
    delta = {k: after[k] - before.get(k, 0.0) for k in after if "forward_padded" in k}
    n = next((v for k, v in delta.items() if k.endswith("_count")), 0.0)
    total = next((v for k, v in delta.items() if k.endswith("_sum")), None)
    return round(total / n, 3) if n > 0 and total is not None else None


def save_rounds(path: Path, rounds: list[RoundRecord], window: tuple[float, float], n: int) -> None:
    """Every answered request of a cell, one JSON object a line, times in ms from the window's
    start (``counted``: in the cell's figures, see ``counted_from``): what the percentiles are
    made of, so a slow round can be found and set beside the worker's forward log
    (``--log-level debug``)."""
    t_begin, t1 = window
    t0 = counted_from(rounds, window, n)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in sorted(rounds, key=lambda r: r.t_send):
            row = {"slot": r.slot, "kind": r.kind, "send_ms": round(1e3 * (r.t_send - t_begin), 1),
                   "latency_ms": round(r.latency_ms, 1), "committed": r.committed, "gamma": r.gamma,
                   "verify_ms": round(r.verify_ms, 1), "queue_ms": round(r.queue_ms, 1),
                   "batch": r.batch, "batch_pos": r.batch_pos, "match": r.match,
                   "counted": t0 <= r.t_reply <= t1}  # fmt: skip
            f.write(json.dumps(row) + "\n")


def _pct(vals: list[float], q: float) -> float | None:
    if not vals:
        return None
    vals = sorted(vals)
    return round(vals[min(len(vals) - 1, int(q * len(vals)))], 2)


def counted_from(rounds: list[RoundRecord], window: tuple[float, float], n: int) -> float:
    """When a cell's count starts: once each of its ``n`` sessions has had its first answer, at
    most half the window in (``summarize_cell``)."""
    t_begin, t1 = window
    first: dict[int, float] = {}
    for r in rounds:
        if r.kind in ("draft", "decode") and r.t_reply <= t1:
            first[r.slot] = min(first.get(r.slot, r.t_reply), r.t_reply)
    half = t_begin + 0.5 * (t1 - t_begin)
    return min(max(first.values()), half) if len(first) == n else half


def summarize_cell(
    rounds: list[RoundRecord],
    gens: list[GenerationRecord],
    window: tuple[float, float],
    *,
    n: int,
    mode: str,
) -> dict:
    """The replayer's figures of one cell: throughput, per-session rates, latency, exactness.

    Tokens are counted from the moment every session has had its first answer (steady state; at
    most half the window) to the window's end: work in flight at the start of the count is then
    credited about as much as the work in flight at its end is not, whereas counting from the
    very start would charge the N prefills and first rounds, and lose the last rounds, of
    sessions whose rounds are long compared with the window."""
    t_begin, t1 = window
    t0 = counted_from(rounds, window, n)
    span = max(1e-9, t1 - t0)
    inside = [r for r in rounds if t0 <= r.t_reply <= t1]
    work = [r for r in inside if r.kind in ("draft", "decode")]
    tokens = sum(r.committed for r in work)
    per_slot = [sum(r.committed for r in work if r.slot == i) / span for i in range(n)]
    lat = [r.latency_ms for r in work]
    per_tok = [r.latency_ms / r.committed for r in work if r.committed]
    batches = [r.batch for r in work if r.batch is not None]
    batch_pos = [r.batch_pos for r in work if r.batch_pos is not None]
    # Without the worker's own counts: an unbatched worker runs one forward per draft block (γ + 1
    # positions) and one per decoded token (1 position).
    rounds_fwd = sum(1 if r.kind == "draft" else r.committed for r in work)
    rounds_pos = sum(r.gamma + 1 if r.kind == "draft" else r.committed for r in work)
    mism = [g for g in gens if g.mismatch]
    errs = [g for g in gens if g.error]
    return {
        "n": n,
        "mode": mode,
        "window_s": round(span, 2),  # counted part of the window (see above)
        "warmup_s": round(t0 - t_begin, 2),
        "committed_tokens": tokens,
        "server_tokens_per_s": round(tokens / span, 3),
        "session_tokens_per_s": {
            "mean": round(statistics.fmean(per_slot), 3) if per_slot else None,
            "min": round(min(per_slot), 3) if per_slot else None,
            "max": round(max(per_slot), 3) if per_slot else None,
        },
        "rounds": len(work),
        "round_ms": {"p50": _pct(lat, 0.5), "p90": _pct(lat, 0.9), "p99": _pct(lat, 0.99)},
        "ms_per_token": {"p50": _pct(per_tok, 0.5), "p99": _pct(per_tok, 0.99)},
        # a draft round minus the worker's forward: encode, broker, network, queue, decode
        "noncompute_ms_p50": _pct([r.latency_ms - r.verify_ms for r in work if r.kind == "draft"], 0.5),
        "queue_ms_p50": _pct([r.queue_ms for r in work], 0.5),
        "open_ms_p50": _pct([r.latency_ms for r in rounds if r.kind == "open"], 0.5),
        "unbatched_forwards": rounds_fwd,
        "unbatched_positions": rounds_pos,
        "verdict_batch_mean": round(statistics.fmean(batches), 3) if batches else None,
        "verdict_batch_pos_mean": round(statistics.fmean(batch_pos), 3) if batch_pos else None,
        "generations": len(gens),
        "generations_complete": sum(g.complete for g in gens),
        "mismatches": len(mism),
        "first_mismatch": mism[0].mismatch if mism else None,
        "errors": len(errs),
        "first_error": errs[0].error if errs else None,
    }


def add_forward_figures(cell: dict, metrics: tuple[float, float, str] | None) -> None:
    """Target forwards per committed token and positions per forward, from the worker's metrics if
    it exports them, else from the verdicts' batch fields, else one forward per request."""
    tokens = cell["committed_tokens"] or 1
    if metrics is not None and metrics[0] > 0:
        fwd, pos, src = metrics
        cell["forwards_source"] = f"worker metrics ({src})"
    elif cell["verdict_batch_mean"]:
        fwd = cell["rounds"] / cell["verdict_batch_mean"]
        pos = fwd * (cell["verdict_batch_pos_mean"] or float("nan"))
        cell["forwards_source"] = "verdict batch fields"
    else:
        fwd, pos = cell["unbatched_forwards"], cell["unbatched_positions"]
        cell["forwards_source"] = "counted: one forward per draft block or decoded token (unbatched)"
    cell["target_forwards"] = round(fwd, 1)
    cell["forwards_per_token"] = round(fwd / tokens, 4)
    cell["positions_per_forward"] = round(pos / fwd, 3) if fwd and pos == pos else None
