"""spececd-bench with ``--gamma auto`` beside a fixed-γ sweep (issue 13), on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.cli import main
from bench.gamma_report import auto_vs_fixed
from tests.brokers import mosquitto_missing
from tests.tiny import make_tiny_model_dir

HOLDOUT = Path(__file__).resolve().parent.parent / "bench" / "prompts_holdout.json"


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[dict, Path]:
    if mosquitto_missing():
        pytest.skip(mosquitto_missing())
    root = tmp_path_factory.mktemp("bench-gamma")
    draft = make_tiny_model_dir(root / "draft", arch="qwen2", seed=1, layers=1)
    target = make_tiny_model_dir(root / "target", arch="qwen2", seed=2)
    out = root / "out"
    argv = ["--draft", str(draft), "--target", str(target), "--modes", "speculative,inprocess,assisted",
            "--num-prompts", "3", "--prompts-file", str(HOLDOUT), "--max-new-tokens", "8",
            "--gamma", "2,3,auto", "--temperature", "0,0.8", "--rtt-ms", "0,10", "--out", str(out),
            "--no-progress", "--warmup-tokens", "1", "--worker-timeout-s", "60"]  # fmt: skip
    assert main(argv) == 0
    return json.loads((out / "report.json").read_text()), out


def test_auto_sits_beside_the_fixed_sweep(report) -> None:
    rep, out = report
    keys = {c["key"] for c in rep["cells"]}
    assert {"speculative T=0 γ=auto rtt=0ms", "speculative T=0.8 γ=auto rtt=10ms", "inprocess T=0 γ=auto",
            "assisted T=0.8 γ=auto", "speculative T=0 γ=2 rtt=10ms"} <= keys  # fmt: skip
    groups = {(e["mode"], e["temperature"], e["rtt_ms"]) for e in rep["gamma_auto"]}
    assert groups == {("speculative", t, r) for t in (0.0, 0.8) for r in (0.0, 10.0)} | {
        (m, t, None) for m in ("inprocess", "assisted") for t in (0.0, 0.8)
    }
    for e in rep["gamma_auto"]:
        assert e["best_gamma"] in (2, 3) and e["ratio"] == pytest.approx(e["auto_tps"] / e["best_tps"])
        assert set(e["oracle_gamma"].values()) <= {2, 3} and len(e["oracle_gamma"]) == 3
        assert set(e["by_category"]) == {r["category"] for r in rep["runs"]}
        if e["mode"] != "assisted":  # the edge's own loop records its choices and predictions
            assert e["gamma_mean"] is not None and sum(e["gamma_hist"].values()) > 0
            assert e["pred_tokens_ratio"] is not None and e["pred_ms_ratio"] is not None
    auto_rounds = [x for r in rep["runs"] if r["gamma"] == "auto" for x in r["rounds"]]
    assert auto_rounds and all(x["gamma_reason"] for x in auto_rounds)
    md = (out / "report.md").read_text()
    assert "## Adaptive γ: auto against the fixed-γ sweep" in md
    assert (out / "gamma_sweep.png").exists()


def test_auto_gives_the_fixed_gamma_tokens_at_t0(report) -> None:
    rep, _ = report
    by = {(r["cell"], r["prompt"], r["iteration"]): r["token_ids"] for r in rep["runs"]}
    for (cell, prompt, it), toks in by.items():
        if "T=0 " in cell and "γ=auto" in cell and not cell.startswith("assisted"):
            assert toks == by[(cell.replace("γ=auto", "γ=2"), prompt, it)]


def test_holdout_prompts_are_a_second_set() -> None:
    held = json.loads(HOLDOUT.read_text())
    tuned = json.loads((HOLDOUT.parent / "prompts.json").read_text())
    assert len(held) == 10 and all(set(p) == {"category", "prompt"} for p in held)
    assert not {p["prompt"] for p in held} & {p["prompt"] for p in tuned}
    assert {p["category"] for p in held} == {p["category"] for p in tuned}


def _run(gamma, prompt: int, total_ms: float, tokens: int = 10, category: str = "c") -> dict:
    return {"mode": "speculative", "temperature": 0.0, "rtt_ms": 0.0, "backend": None, "gamma": gamma,
            "prompt": prompt, "iteration": 0, "category": category, "total_ms": total_ms,
            "new_tokens": tokens, "rounds": []}  # fmt: skip


def test_the_per_prompt_oracle_is_each_prompts_fastest_fixed_gamma() -> None:
    # prompt 0 is fastest at γ 2, prompt 1 at γ 3; γ 2 is the best single γ (3000 ms against 3200)
    runs = [_run(2, 0, 1000), _run(2, 1, 2000), _run(3, 0, 1600), _run(3, 1, 1600),
            _run("auto", 0, 1100), _run("auto", 1, 1700)]  # fmt: skip
    (e,) = auto_vs_fixed(runs)
    assert e["best_gamma"] == 2 and e["best_tps"] == pytest.approx(20 / 3.0)
    assert e["oracle_gamma"] == {"0/0": 2, "1/0": 3}
    assert e["oracle_tps"] == pytest.approx(20 / 2.6)
    assert e["oracle_ratio"] == pytest.approx(3.0 / 2.6)
    assert e["ratio"] == pytest.approx(3.0 / 2.8)
    # a prompt that one fixed γ did not run is left out of the oracle, not counted as free
    (e,) = auto_vs_fixed([*runs, _run(2, 2, 500)])
    assert e["oracle_gamma"] == {"0/0": 2, "1/0": 3}
