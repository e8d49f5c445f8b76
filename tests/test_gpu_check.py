"""bench/gpu_check.sh, the GPU machine's one prepared script, run here on the CPU with a tiny kit:
every part runs (verify cost on random weights of two shapes, with and without greedy rows; a
random-weight target; the fleet through a real Mosquitto replaying recorded rounds) and its
results come back in one archive, so the script cannot rot between GPU loans."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from bench.cli import main
from tests.brokers import mosquitto_missing
from tests.tiny import make_tiny_model_dir

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_runs_every_part_on_a_tiny_kit(tiny_pair, tmp_path) -> None:
    if mosquitto_missing():
        pytest.skip(mosquitto_missing())
    kit = tmp_path / "kit"
    shape = make_tiny_model_dir(kit / "demo-target", arch="qwen2", seed=2)
    (shape / "model.safetensors").unlink()  # the kit carries the shape, not the weights
    big = make_tiny_model_dir(tmp_path / "big", arch="llama", seed=3)
    (big / "model.safetensors").unlink()
    draft, target = tiny_pair  # the "real pair" whose rounds the fleet replays
    rec = tmp_path / "rec"
    assert main(["--draft", str(draft), "--target", str(target), "--fleet", "1", "--fleet-modes", "speculative",
                 "--fleet-seconds", "1", "--gamma", "2", "--temperature", "0", "--num-prompts", "2",
                 "--max-new-tokens", "8", "--no-progress", "--out", str(rec)]) == 0  # fmt: skip
    (kit / "acceptance.json").write_bytes((rec / "recordings.json").read_bytes())
    out = tmp_path / "out"
    env = {**os.environ, "GPU_KIT": str(kit), "OUT": str(out), "DEVICE": "cpu", "BIG_CONFIG": str(big),
           "PYTHON": sys.executable, "VC_BATCHES": "1,2", "VC_POSITIONS": "1,3", "VC_CACHE": "8",
           "VC_REPEAT": "1", "FLEET_NS": "1,2", "FLEET_SECONDS": "1", "FLEET_WORKERS": "batched,unbatched,cost,packed", "NUM_PROMPTS": "2", "MAX_NEW": "8"}  # fmt: skip
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = (out / "summary.txt").read_text()
    parts = [
        "vc-demo-bf16",
        "target",
        "fleet",
        "vc-8b-bf16",
        "vc-demo-bf16-greedy",
        "vc-demo-fp32",
        "vc-demo-mixed",
    ]
    for part in parts:
        assert f"== {part}: exit 0" in summary, summary[-3000:]
    with tarfile.open(out / "gpu-results.tgz") as tar:
        tar.extractall(tmp_path / "res", filter="data")
    res = tmp_path / "res" / "gpu-res"
    greedy = json.loads((res / "vc-demo-bf16-greedy.json").read_text())
    assert greedy["random_weights"] and greedy["greedy"] and greedy["dtype"] == "torch.bfloat16"
    fleet = json.loads((res / "fleet" / "fleet.json").read_text())
    assert fleet["meta"]["acceptance_from"] == str(kit / "acceptance.json")
    cells = fleet["cells"]
    assert {(c["worker"], c["mode"], c["n"]) for c in cells} == {
        (w, m, n)
        for w in ("batched", "unbatched", "cost", "packed")
        for m in ("speculative", "cloud-only")
        for n in (1, 2)
    }
    assert all(c["mismatches"] == 0 and c["errors"] == 0 and c["committed_tokens"] > 0 for c in cells)
