"""The llama.cpp draft through the whole edge (issue 12): the bench with both backends side by
side, the edge CLI and local API, and `make demo`, all on a tiny GGUF draft and a torch target."""

from __future__ import annotations

import json
import os
import urllib.request

import pytest
import torch

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (extra [llamacpp])")

from edge_agent.agent import EdgeAgent
from edge_agent.drafter import make_drafter
from edge_agent.drafter_llamacpp import load_llamacpp_draft
from edge_agent.speculative import GenerateOptions
from shared.sampling import SamplingParams
from tests.brokers import mosquitto_missing
from tests.tiny import make_tiny_model_dir
from tests.tiny_gguf import write_tiny_gguf

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(draft folder, draft GGUF, target folder): tiny qwen2 models sharing one tokenizer."""
    root = tmp_path_factory.mktemp("llamacpp-edge")
    draft_dir = make_tiny_model_dir(root / "draft", arch="qwen2", seed=1, layers=1)
    gguf = write_tiny_gguf(draft_dir, root / "draft.gguf")
    target_dir = make_tiny_model_dir(root / "target", arch="qwen2", seed=2)
    return draft_dir, gguf, target_dir


def test_bench_runs_both_draft_backends_side_by_side(models, tmp_path, monkeypatch) -> None:
    """spececd-bench --draft-backend torch,llama.cpp on tiny models: one cell per backend for the
    drafting modes, the same greedy tokens everywhere, draft cost and resident memory reported."""
    from bench.cli import main

    if mosquitto_missing():
        pytest.skip(mosquitto_missing())
    monkeypatch.setenv("SPECECD_CACHE", str(tmp_path / "cache"))  # the torch backend converts the GGUF here
    _, gguf, target_dir = models
    out = tmp_path / "out"
    argv = ["--draft", str(gguf), "--target", str(target_dir), "--draft-backend", "torch,llama.cpp",
            "--modes", "speculative,cloud-only,edge-only,inprocess", "--num-prompts", "2",
            "--max-new-tokens", "6", "--gamma", "3", "--out", str(out), "--no-progress",
            "--warmup-tokens", "1", "--worker-timeout-s", "60"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    keys = {c["key"] for c in report["cells"]}
    assert keys == {
        "speculative[torch] T=0 γ=3 rtt=0ms", "speculative[llama.cpp] T=0 γ=3 rtt=0ms", "cloud-only T=0 rtt=0ms",
        "edge-only[torch] T=0", "edge-only[llama.cpp] T=0", "inprocess[torch] T=0 γ=3", "inprocess[llama.cpp] T=0 γ=3",
    }  # fmt: skip
    assert report["meta"]["draft_backends"] == ["torch", "llama.cpp"]
    assert set(report["meta"]["draft_resident_mb"]) == {"torch", "llama.cpp"}
    by = {c["key"]: c for c in report["cells"]}
    spec = by["speculative[llama.cpp] T=0 γ=3 rtt=0ms"]
    assert spec["overall"]["draft_ms_per_token"] > 0
    assert "speculative[torch] T=0 γ=3 rtt=0ms" in spec["speedup"]
    assert all(a["identical"] == a["compared"] == 2 for a in report["agreement"])
    edge = {r["draft_backend"]: r["token_ids"] for r in report["runs"] if r["mode"] == "edge-only"}
    assert edge["torch"] == edge["llama.cpp"], "the same f32 weights draft the same greedy tokens"
    assert "## Draft backends" in (out / "report.md").read_text()


def test_the_edge_cli_and_api_run_a_gguf_draft(models, capsys) -> None:
    """`spececd-edge generate --draft x.gguf --target DIR` (edge-only) and the local HTTP API with
    the llama.cpp draft: the same tokens as the drafter alone."""
    from edge_agent.api import create_app, start_server
    from edge_agent.cli import main

    _, gguf, target_dir = models
    argv = ["generate", "The capital of France", "--raw", "--json", "--mode", "edge-only", "--draft", str(gguf),
            "--target", str(target_dir), "--draft-backend", "llama.cpp", "--draft-threads", "1",
            "--max-new-tokens", "8"]  # fmt: skip
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    draft = load_llamacpp_draft(gguf, threads=1, tokenizer=str(target_dir))
    agent = EdgeAgent(
        draft, None, defaults=GenerateOptions(mode="edge-only", max_new_tokens=8, params=GREEDY)
    )
    assert agent.context_length == draft.n_ctx
    prompt = agent.encode_prompt("The capital of France", chat=False)
    ggml = make_drafter(draft)
    ggml.reset(prompt, GREEDY)
    assert out["token_ids"] == list(ggml.propose(len(out["token_ids"])).tokens)

    handle = start_server(create_app(agent, model_name="tiny", max_queue=2))
    try:
        body = json.dumps({"model": "tiny", "prompt": "The capital of France", "max_tokens": 8,
                           "temperature": 0, "spececd": {"mode": "edge-only"}}).encode()  # fmt: skip
        req = urllib.request.Request(
            handle.url + "/completions", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            reply = json.loads(resp.read())
    finally:
        handle.stop()
    assert reply["choices"][0]["text"] == agent.decode(out["token_ids"])


def test_make_demo_runs_the_gguf_draft_on_llama_cpp(models, capsys, monkeypatch) -> None:
    """`make demo` (bench/demo.py) on the tiny pair: broker, worker (torch target) and the edge
    with the GGUF draft itself, on llama.cpp."""

    from bench import demo
    from tests.brokers import mosquitto_missing

    if mosquitto_missing():
        pytest.skip(mosquitto_missing())
    _, gguf, target_dir = models
    monkeypatch.setattr(demo, "ensure_models", lambda: (gguf, target_dir))
    affinity, threads = os.sched_getaffinity(0), torch.get_num_threads()
    try:
        assert demo.run("The capital of France", max_new_tokens=6, gamma=2, temperature=0.0) == 0
    finally:  # the demo pins this process to one core and one torch thread
        os.sched_setaffinity(0, affinity)
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert "edge: draft runs on llama.cpp" in err and "6 tokens" in err
