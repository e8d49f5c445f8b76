"""spececd-bench: a smoke run on tiny models (report structure and consistency, not speed), the
delay proxy measured with pings, and the CLI's errors."""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time
from pathlib import Path

import pytest
import torch

from bench.cli import DEFAULT_PROMPTS, load_prompts, main
from bench.procs import Procs
from bench.report import assess
from bench.runner import Cell, make_cells
from shared.models import load_model
from tests.brokers import mosquitto_missing

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAX_NEW = 6


@pytest.fixture(scope="module")
def smoke(tiny_pair, tmp_path_factory) -> tuple[dict, Path]:
    """One bench run with every mode: T 0 and 0.8, γ 3, RTT 0 and 10 ms, two prompts."""
    if mosquitto_missing():
        pytest.skip(mosquitto_missing())
    out = tmp_path_factory.mktemp("bench-out")
    draft, target = tiny_pair
    argv = ["--draft", str(draft), "--target", str(target), "--num-prompts", "2", "--max-new-tokens",
            str(MAX_NEW), "--gamma", "3", "--temperature", "0,0.8", "--rtt-ms", "0,10", "--out", str(out),
            "--no-progress", "--warmup-tokens", "1", "--worker-timeout-s", "60",
            "--worker-args", "--max-batch-sessions 1"]  # fmt: skip
    assert main(argv) == 0
    return json.loads((out / "report.json").read_text()), out


def test_worker_args_reach_the_worker(smoke) -> None:
    report, out = smoke
    assert report["meta"]["worker_args"] == ["--max-batch-sessions", "1"]
    (log,) = (out / "logs").glob("worker-*.log")
    assert "1 per forward" in log.read_text()  # the worker's own line: it got the flag


def _greedy(model, prompt: list[int], n: int, eos: frozenset[int]) -> list[int]:
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            if ids[-1] in eos:
                break
    return ids[len(prompt) :]


def test_report_has_every_mode_and_setting(smoke) -> None:
    report, out = smoke
    keys = {c["key"] for c in report["cells"]}
    assert keys == {
        "speculative T=0 γ=3 rtt=0ms", "speculative T=0 γ=3 rtt=10ms", "speculative T=0.8 γ=3 rtt=0ms",
        "speculative T=0.8 γ=3 rtt=10ms", "cloud-only T=0 rtt=0ms", "cloud-only T=0 rtt=10ms",
        "cloud-only T=0.8 rtt=0ms", "cloud-only T=0.8 rtt=10ms", "edge-only T=0", "edge-only T=0.8",
        "inprocess T=0 γ=3", "inprocess T=0.8 γ=3", "assisted T=0 γ=3", "assisted T=0.8 γ=3",
    }  # fmt: skip
    assert len(report["runs"]) == 14 * 2
    md = (out / "report.md").read_text()
    for section in (
        "## Per mode",
        "## Where a round's time goes",
        "## Speedup",
        "## Per category",
        "## Outputs at T = 0",
    ):
        assert section in md
    assert "α̂ = accepted / judged" in report["meta"]["acceptance_definition"]
    for name in ("tokens_per_s", "acceptance_by_category", "round_breakdown", "gamma_sweep"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000, name
        assert f"({name}.png)" in md


def test_figures_are_internally_consistent(smoke) -> None:
    report, _ = smoke
    for c in report["cells"]:
        o = c["overall"]
        assert o["runs"] == 2 and 0 < o["new_tokens"] <= 2 * MAX_NEW
        assert o["tokens_per_s"] > 0 and o["ttft_ms"]["median"] <= o["latency_ms"]["median"]
        if c["mode"] in ("speculative", "inprocess"):
            assert o["accepted"] <= o["judged"] <= o["drafted"]
            assert 0.0 <= o["acceptance"] <= 1.0 and o["assessment"] == assess(o["acceptance"])
            assert o["tau"] >= 1.0 and o["forwards_per_token"] <= 1.0
            assert o["rounds"] == o["target_forwards"]
            if c["temperature"] == 0:  # one-hot p and q: Σ min(p, q) is the accept indicator itself
                assert o["alpha_theory"] == pytest.approx(o["acceptance"])
        if c["mode"] == "cloud-only":
            assert o["tau"] == 1.0 and o["target_forwards"] == o["new_tokens"]
        if c["mode"] == "edge-only":
            assert o["target_forwards"] == 0 and o["rounds"] == 0
        if c["mode"] == "speculative":
            rd = o["round"]
            assert rd["bytes_up"]["mean"] > 0 and rd["bytes_down"]["mean"] > 0
            assert rd["noncompute_ms"]["median"] >= rd["codec_ms"]["median"]
        for b, ratio in c["speedup"].items():
            base = next(x for x in report["cells"] if x["key"] == b)
            assert ratio == pytest.approx(o["tokens_per_s"] / base["overall"]["tokens_per_s"])
    for r in report["runs"]:  # per speculative round: its parts fit inside its link time
        for x in r["rounds"] if r["mode"] in ("speculative", "inprocess") else ():
            assert x["n_acc"] <= x["gamma"]
            assert x["codec_ms"] + x["net_ms"] + x["queue_ms"] + x["verify_ms"] <= x["link_ms"] + 0.05


def test_rtt_shows_up_where_it_should(smoke) -> None:
    report, _ = smoke
    by = {c["key"]: c["overall"] for c in report["cells"]}
    for t in ("0", "0.8"):
        near, far = by[f"speculative T={t} γ=3 rtt=0ms"], by[f"speculative T={t} γ=3 rtt=10ms"]
        assert far["round"]["net_ms"]["median"] - near["round"]["net_ms"]["median"] > 8.0


def test_outputs_agree_at_t0(smoke, tiny_pair) -> None:
    report, _ = smoke
    runs = {(r["cell"], r["prompt"]): r["token_ids"] for r in report["runs"]}
    followers = ["speculative T=0 γ=3 rtt=0ms", "speculative T=0 γ=3 rtt=10ms", "cloud-only T=0 rtt=10ms",
                 "inprocess T=0 γ=3", "assisted T=0 γ=3"]  # fmt: skip
    for p in (0, 1):
        ref = runs[("cloud-only T=0 rtt=0ms", p)]
        assert len(ref) >= 1
        for key in followers:
            assert runs[(key, p)] == ref, (key, p)
    assert all(a["identical"] == a["compared"] == 2 for a in report["agreement"])
    draft = load_model(str(tiny_pair[0]))
    prompts = load_prompts(DEFAULT_PROMPTS, 2, draft.tokenizer)
    for prompt in prompts:
        ref = _greedy(draft.model, list(prompt.ids), MAX_NEW, draft.eos_token_ids)
        assert runs[("edge-only T=0", prompt.index)] == ref


def test_make_cells_gives_each_mode_only_its_own_axes() -> None:
    cells = make_cells(
        ["speculative", "cloud-only", "edge-only", "inprocess", "assisted"], [0.0], [2, 4], [0.0, 20.0]
    )
    modes = [c.mode for c in cells]
    assert modes.count("speculative") == 4 and modes.count("cloud-only") == 2
    assert modes.count("edge-only") == 1 and modes.count("inprocess") == 2 and modes.count("assisted") == 2
    spec = Cell("speculative", 0.0, 4, 20.0)
    assert spec.comparable(Cell("inprocess", 0.0, 4)) and not spec.comparable(Cell("inprocess", 0.0, 2))
    assert spec.comparable(Cell("edge-only", 0.0)) and not spec.comparable(Cell("edge-only", 0.8))
    assert not spec.comparable(Cell("cloud-only", 0.0, None, 0.0))


def test_assessment_thresholds_are_the_original_ones() -> None:
    assert [assess(a) for a in (0.51, 0.5, 0.31, 0.3, 0.11, 0.1, 0.0)] == [
        "EXCELLENT", "GOOD", "GOOD", "MODERATE", "MODERATE", "POOR", "POOR",
    ]  # fmt: skip
    assert assess(None) is None


# --------------------------------------------------------------------------- delay proxy


def _echo_server() -> tuple[socket.socket, int]:
    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=lambda c=conn: _echo(c), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


def _echo(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(4096):
            conn.sendall(data)


def _ping_ms(port: int, n: int = 12) -> float:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        times = []
        for i in range(n):
            t0 = time.perf_counter()
            s.sendall(b"ping%02d" % i)
            got = b""
            while len(got) < 6:
                got += s.recv(64)
            times.append((time.perf_counter() - t0) * 1e3)
            assert got == b"ping%02d" % i
    return statistics.median(times)


@pytest.mark.parametrize("rtt_ms", [0.0, 40.0])
def test_delay_proxy_adds_the_round_trip_it_is_told(rtt_ms: float, tmp_path: Path) -> None:
    srv, port = _echo_server()
    try:
        with Procs(tmp_path) as procs:
            _host, proxy_port = procs.start_proxy(("127.0.0.1", port), rtt_ms)
            median = _ping_ms(proxy_port)
    finally:
        srv.close()
    assert rtt_ms <= median < rtt_ms + 15.0, median


# --------------------------------------------------------------------------- CLI errors


def test_cli_without_models_or_demo_pair_says_what_to_do(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("SPECECD_CACHE", str(tmp_path / "empty-cache"))
    assert main(["--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "spececd-models fetch-demo" in err and "--draft" in err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--num-prompts", "11"], "--num-prompts must be in 1..10"),
        (["--modes", "speculative,warp"], "unknown mode(s) warp"),
        (["--gamma", "0"], "--gamma values must be in 1..64"),
        (["--host", "127.0.0.1"], "give both --host and --port"),
        (["--draft", "x"], "pass both --draft and --target"),
    ],
)
def test_cli_rejects_bad_input_clearly(argv, needle, tiny_pair, tmp_path, capsys) -> None:
    if "--draft" not in argv:
        argv = [*argv, "--draft", str(tiny_pair[0]), "--target", str(tiny_pair[1])]
    if "--modes" not in argv:
        argv = [*argv, "--modes", "edge-only"]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    assert needle in capsys.readouterr().err


def test_only_speculative_over_mqtt_drafts_ahead(tiny_pair) -> None:
    """In one process on one core there is nothing to overlap: `inprocess` drafts sequentially,
    like its networked partner `speculative-seq`; `--no-pipeline` turns it off for all."""
    from bench.runner import Edge

    draft, target = (load_model(str(p)) for p in tiny_pair)
    edge = Edge(draft, target, {}, max_new_tokens=4)
    piped = {m: edge.options(Cell(m, 0.0, 2, 0.0 if m.startswith("spec") else None), seed=1).pipeline
             for m in ("speculative", "speculative-seq", "inprocess")}  # fmt: skip
    assert piped == {"speculative": True, "speculative-seq": False, "inprocess": False}
    off = Edge(draft, target, {}, max_new_tokens=4, pipeline=False)
    assert off.options(Cell("speculative", 0.0, 2, 0.0), seed=1).pipeline is False
