"""The fleet and noisy-neighbour benchmarks (bench/fleet*.py, bench/noisy*.py) on tiny models and a
real Mosquitto: replayed sessions get the recorded verdicts (and a tampered recording is caught),
the reports carry their figures, and a flooding device leaves a well-behaved one's output intact."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest

from bench.cli import DEFAULT_PROMPTS, load_prompts, main
from bench.fleet import record_all
from bench.fleet_record import CLOUD, SPECULATIVE, Step, load_recordings
from bench.fleet_replay import Replayer, only, plan_slots
from shared.models import load_model
from tests.brokers import mosquitto_missing
from tests.workers import start_worker_process

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = [
    "--num-prompts",
    "2",
    "--max-new-tokens",
    "8",
    "--gamma",
    "2",
    "--no-progress",
    "--worker-timeout-s",
    "90",
]


def _args(**kw) -> argparse.Namespace:
    base = dict(temperature=[0.8], top_k=0, top_p=1.0, seed=5, gamma=[2], max_new_tokens=10)
    return argparse.Namespace(**{**base, **kw})


def test_replay_gets_the_recorded_answers_and_catches_a_difference(dev_broker, tiny_pair, tmp_path) -> None:
    """Three concurrent replays of each recorded generation (seeded T = 0.8, speculative and
    cloud-only) get exactly the recorded verdicts and tokens; a recording with one changed token is
    reported as a mismatch at that step; a paced replay waits the recorded drafting time."""
    from edge_agent.mqtt_link import MqttLink

    draft_dir, target_dir = tiny_pair
    cfg = dev_broker.config()
    wp = start_worker_process(cfg, worker_id="fleet-t1", target=str(target_dir), workdir=tmp_path)
    try:
        link = MqttLink(cfg, device="fleetrec", round_timeout_s=30)
        link.connect()
        draft = load_model(str(draft_dir))
        prompts = load_prompts(DEFAULT_PROMPTS, 2, draft.tokenizer)
        recs = record_all(
            link, draft, prompts, _args(), "tiny-draft", str(target_dir), ["speculative", "cloud-only"]
        )
        link.shutdown()
        assert {r.mode for r in recs} == {SPECULATIVE, CLOUD}
        assert all(r.steps and r.tokens for r in recs)
        for r in only(recs, SPECULATIVE):  # the recording is what the edge committed, round by round
            assert sum(s.committed for s in r.steps) == len(r.tokens)
        replayer = Replayer(cfg, round_timeout_s=30)
        replayer.connect()
        try:
            for mode in (SPECULATIVE, CLOUD):
                mine = only(recs, mode)
                replayer.run(plan_slots(3, mine, device_prefix=f"t{mode[0]}"), duration_s=None, drain_s=120)
                gens = replayer.generations
                assert len(gens) == 3 * len(mine)
                assert [g.mismatch or g.error for g in gens] == [None] * len(gens)
                assert all(g.complete for g in gens)
                by_prompt = {r.prompt: len(r.tokens) for r in mine}
                assert all(g.tokens == by_prompt[g.prompt] for g in gens)
            # One recorded answer changed: the replay must notice, at that step.
            rec = only(recs, SPECULATIVE)[0]
            step = rec.steps[1] if len(rec.steps) > 1 else rec.steps[0]
            k = rec.steps.index(step)
            wrong = Step(step.msg, (step.expect[0], step.expect[1] + 1, step.expect[2]), step.committed)
            bad = dataclasses.replace(rec, steps=(*rec.steps[:k], wrong, *rec.steps[k + 1 :]))
            replayer.run([("tbad", [bad])], duration_s=None, drain_s=60)
            (gen,) = replayer.generations
            assert not gen.complete
            assert gen.mismatch is not None and gen.mismatch.startswith(f"step {k} (draft)")
            # A window too short for any round grows until every session has had 3 answers.
            plan = plan_slots(2, only(recs, SPECULATIVE), device_prefix="tmin")
            t0, t1 = replayer.run(plan, duration_s=0.01, min_rounds=3, drain_s=60)
            answered = [sum(r.slot == i and r.kind == "draft" for r in replayer.rounds) for i in (0, 1)]
            assert min(answered) >= 3 and t1 - t0 > 0.01
        finally:
            replayer.close()
        # Paced: each block waits its recorded drafting time (here 50 ms) before it is sent.
        paced = Replayer(cfg, round_timeout_s=30, pace=True)
        paced.connect()
        try:
            rec = only(recs, SPECULATIVE)[0]
            slow = dataclasses.replace(
                rec, steps=tuple(dataclasses.replace(s, draft_ms=50.0) for s in rec.steps)
            )
            paced.run([("tpace", [slow])], duration_s=None, drain_s=60)
            (gen,) = paced.generations
            assert gen.complete
            assert gen.t_end - gen.t_start >= 0.05 * len(rec.steps)
            # a round's latency is send -> answer: the drafting wait is not in it
            assert (
                sum(r.latency_ms for r in paced.rounds) / 1e3 + 0.05 * len(rec.steps)
                <= gen.t_end - gen.t_start
            )
        finally:
            paced.close()
    finally:
        wp.terminate()


@pytest.fixture(scope="module")
def fleet_run(tiny_pair, tmp_path_factory) -> tuple[dict, Path]:
    if mosquitto_missing():
        pytest.skip(mosquitto_missing())
    out = tmp_path_factory.mktemp("fleet-out")
    draft, target = tiny_pair
    argv = ["--draft", str(draft), "--target", str(target), *TINY, "--temperature", "0.8", "--fleet", "1,3",
            "--fleet-seconds", "3", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    return json.loads((out / "fleet.json").read_text()), out


def test_fleet_report_has_every_cell_and_no_mismatch(fleet_run) -> None:
    report, out = fleet_run
    cells = {(c["mode"], c["n"]): c for c in report["cells"]}
    assert set(cells) == {(m, n) for m in ("speculative", "cloud-only") for n in (1, 3)}
    for (_mode, n), c in cells.items():
        assert c["mismatches"] == 0 and c["errors"] == 0, c
        assert c["generations_complete"] >= n
        assert c["committed_tokens"] > 0 and c["server_tokens_per_s"] > 0
        assert c["session_tokens_per_s"]["min"] > 0  # every session was served
        assert c["round_ms"]["p50"] <= c["round_ms"]["p99"]
        assert c["target_forwards"] > 0 and c["forwards_per_token"] > 0
        assert c["positions_per_forward"] >= 1
        assert c["replayer_cpu_ms_per_round"] > 0 and c["worker_cpu_ms_per_round"] > 0
        assert c["forwards_source"]
        # the per-session rates add up to the server's
        assert c["session_tokens_per_s"]["mean"] * n == pytest.approx(c["server_tokens_per_s"], rel=0.01)
    assert len(report["recordings"]) == 4  # 2 prompts × 2 modes
    assert len(load_recordings(out / "recordings.json")) == 4
    assert (out / "fleet_throughput.png").read_bytes()[:8] == PNG_MAGIC
    md = (out / "fleet.md").read_text()
    assert "| default | speculative | 3 |" in md and "fleet_throughput.png" in md
    # every cell's answered requests are on file, and the counted ones are what its figures say
    for (mode, n), c in cells.items():
        rows = [json.loads(line) for line in (out / "rounds" / f"default-{mode}-{n}.jsonl").open()]
        counted = [r for r in rows if r["counted"] and r["kind"] in ("draft", "decode")]
        assert len(counted) == c["rounds"]
        assert sum(r["committed"] for r in counted) == c["committed_tokens"]
        assert {r["slot"] for r in counted} == set(range(n))
        assert any(r["kind"] == "open" for r in rows)


@pytest.fixture(scope="module")
def noisy_run(tiny_pair, tmp_path_factory) -> dict:
    if mosquitto_missing():
        pytest.skip(mosquitto_missing())
    out = tmp_path_factory.mktemp("noisy-out")
    draft, target = tiny_pair
    argv = ["--draft", str(draft), "--target", str(target), *TINY, "--noisy", "--noisy-opens", "200",
            "--noisy-streams", "2", "--noisy-decodes", "1", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "noisy.json").read_text())
    assert (out / "noisy.md").read_text().startswith("# Noisy-neighbour benchmark")
    return report


def test_noisy_report_measures_both_runs(noisy_run) -> None:
    r = noisy_run
    alone = r["alone"]
    assert alone["complete"] == alone["generations"] == 2 and not alone["mismatches"] and not alone["errors"]
    assert alone["tokens"] > 0 and alone["tokens_per_s"] > 0
    assert r["flooded"]["generations"] == 2
    assert r["flood_answers"]  # the flood reached the worker and got answers
    assert {"share_of_solo_throughput", "good_token_share", "identical_output", "worker_alive"} <= set(r)


def test_noisy_neighbour_leaves_the_good_device_unharmed(noisy_run) -> None:
    """Issue 10: under the flood the well-behaved device completes with identical output and is not
    starved. The ≥ 40 % share target is for the demo pair (the benchmark measures it): on tiny
    models a forward costs little more than its overhead, so sharing a forward with the flood's
    64-token rows costs the good device more than it would on a real target."""
    r = noisy_run
    assert r["worker_alive"]
    assert r["flooded"]["errors"] == [] and r["flooded"]["mismatches"] == []
    assert r["identical_output"]
    assert r["share_of_solo_throughput"] >= 0.05


def test_opens_refused_as_overloaded_are_retried(dev_broker, tiny_pair, tmp_path) -> None:
    """A worker whose per-device open rate refuses a fleet slot's next open answers `overloaded`:
    the replayer retries it after a pause (as an edge would) instead of failing the generation."""
    from edge_agent.mqtt_link import MqttLink
    from shared.config_keys import KEYS

    if "max_opens_per_s_per_device" not in KEYS:
        pytest.skip("this worker has no per-device open rate")
    draft_dir, target_dir = tiny_pair
    cfg = dev_broker.config()
    wp = start_worker_process(cfg, worker_id="fleet-t2", target=str(target_dir), workdir=tmp_path,
                              extra=["--max-opens-per-s-per-device", "2"])  # fmt: skip
    try:
        link = MqttLink(cfg, device="fleetrec2", round_timeout_s=30)
        link.connect()
        draft = load_model(str(draft_dir))
        prompts = load_prompts(DEFAULT_PROMPTS, 1, draft.tokenizer)
        recs = record_all(
            link, draft, prompts, _args(max_new_tokens=3), "tiny-draft", str(target_dir), ["speculative"]
        )
        link.shutdown()
        replayer = Replayer(cfg, round_timeout_s=30)
        replayer.connect()
        try:
            replayer.run([("tquota", recs)], duration_s=4.0, drain_s=30)
        finally:
            replayer.close()
        assert replayer.opens_refused > 0
        assert [g.error or g.mismatch for g in replayer.generations] == [None] * len(replayer.generations)
        assert sum(g.complete for g in replayer.generations) >= 3  # ~2 opens/s for 4 s, burst aside
    finally:
        wp.terminate()


def test_a_worker_configuration_runs_from_another_checkout(tmp_path) -> None:
    """``--fleet-worker-checkout NAME=PATH``: that configuration's worker runs the checkout's code
    (a change beside what it replaced, in one run); a name or folder that is wrong is refused."""
    from bench.fleet import FleetUsageError, start_worker, worker_checkouts
    from bench.procs import Procs

    other = tmp_path / "before"
    (other / "cloud_worker").mkdir(parents=True)
    (other / "cloud_worker" / "__init__.py").write_text("")
    (other / "cloud_worker" / "cli.py").write_text(  # stands in for an earlier commit's worker
        "import sys, pathlib\npathlib.Path(sys.argv[sys.argv.index('--worker-id') + 1] + '.ran').write_text(__file__)\n"
    )
    configs = [("before", []), ("after", [])]
    args = argparse.Namespace(fleet_worker_checkout=[f"before={other}"])
    assert worker_checkouts(args, configs) == {"before": (other.resolve(), "unknown commit")}
    with Procs(tmp_path / "logs") as procs:
        proc, wid, _url = start_worker(procs, ("127.0.0.1", 1), target="t", draft_name="d", cores=None,
                                       max_sessions=4, extra=[], checkout=other.resolve())  # fmt: skip
        assert proc.wait(timeout=60) == 0
    assert (other / f"{wid}.ran").read_text() == str(other.resolve() / "cloud_worker" / "cli.py")
    for bad in ("nobody=" + str(other), "before", f"before={tmp_path}"):
        with pytest.raises(FleetUsageError, match="--fleet-worker-checkout"):
            worker_checkouts(argparse.Namespace(fleet_worker_checkout=[bad]), configs)
