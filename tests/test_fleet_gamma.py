"""The fleet benchmark's adaptive-γ sweep (bench.fleet_gamma, issue 13 under load): chain
recordings from real tiny models, replayed by sessions that choose γ each round, against a real
worker over a real Mosquitto."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from bench.cli import DEFAULT_PROMPTS, load_prompts, main
from bench.fleet_gamma import ChainRecording, GammaReplayer, load_chains, record_chain, save_chains
from bench.fleet_replay import plan_slots
from edge_agent.drafter import make_drafter
from edge_agent.gamma import GAMMA_AUTO, stop_point
from edge_agent.speculative import GenerateOptions
from shared.models import load_model
from shared.sampling import SamplingParams
from tests.brokers import mosquitto_missing
from tests.workers import start_worker_process

MAX_NEW = 12


def _chains(link, draft_dir: Path, target_dir: Path, n_prompts: int = 2) -> list[ChainRecording]:
    draft = load_model(str(draft_dir))
    drafter = make_drafter(draft)
    out = []
    for p in load_prompts(DEFAULT_PROMPTS, n_prompts, draft.tokenizer):
        opts = GenerateOptions(mode="speculative", gamma=2, max_new_tokens=MAX_NEW,
                               params=SamplingParams(temperature=0.0, seed=3 + p.index),
                               draft_model="tiny-draft", target_model=str(target_dir))  # fmt: skip
        out.append(record_chain(drafter, link, p.index, list(p.ids), opts, eos_ids=draft.eos_token_ids,
                                gamma_max=8))  # fmt: skip
    return out


def test_stop_point_is_the_drafters_cut_rule() -> None:
    assert stop_point((0.9, 0.2, 0.9), (0.0, 0.5, 0.5), 3) == 1
    assert stop_point((0.9, 0.9, 0.2), (0.0, 0.5, 0.5), 3) == 2
    assert stop_point((0.9, 0.9, 0.2), (0.0, 0.5, 0.5), 2) is None  # beyond γ: not looked at
    assert stop_point((0.1, 0.9), (0.0, 0.5, 0.5), 3) is None  # position 0 never cuts; only drafts made
    assert stop_point((0.1, 0.1), (), 2) is None  # no thresholds: no cut


def test_chain_verdicts_follow_the_target() -> None:
    from shared.protocol import Open

    opened = Open(sid="s", epoch=0, ctx=(1, 2), sampling=SamplingParams(), draft_model="d", target_model="t",
                  max_new=3)  # fmt: skip
    rec = ChainRecording(0, opened, (5, 6, 9, 7), ((5, 6, 8), (6, 9, 7), (8,)), ((1.0,) * 3,) * 3, 10.0,
                         frozenset({9}))  # fmt: skip
    assert rec.expect(0, (5, 6, 8)) == (2, 9, 1)  # two accepted, the target's 9 (an end token) next
    assert rec.expect(0, (4,)) == (0, 5, 0)
    assert rec.expect(1, (6, 9)) == (2, 7, 1)  # an accepted end token counts as eos
    assert rec.positions() == 3
    ended = dataclasses.replace(rec, target=(5, 6, 9))  # the target's generation ends at 9
    assert ended.expect(1, (6, 9)) == (2, None, 1)  # the end token accepted last: what follows is unknown
    assert ChainRecording.from_json(json.loads(json.dumps(rec.as_json()))) == rec


def test_a_target_that_ends_early_has_a_chain_at_its_end_token(tiny_pair, monkeypatch) -> None:
    """A prompt whose target ends with its end token before max_new: a session can stand at
    that token's position (every token before it committed) and must propose a block there, so
    the recording holds a chain for it (it did not: 96-token replays died on an IndexError)."""
    import bench.fleet_gamma as fg
    from bench.fleet_record import CLOUD, Recording
    from shared.protocol import Open

    draft_dir, _ = tiny_pair
    draft = load_model(str(draft_dir))
    eos = sorted(draft.eos_token_ids)[0]
    ended = (11, 12, 13, 14, eos)  # the target's greedy tokens: it ends after 5 of max 12

    def cloud_only(drafter, link, index, ids, opts, *, eos_ids):
        opened = Open(sid="s", epoch=0, ctx=tuple(ids), sampling=SamplingParams(), draft_model="d",
                      target_model="t", max_new=opts.max_new_tokens, mode="cloud")  # fmt: skip
        return Recording(index, CLOUD, opened, (), ended)

    monkeypatch.setattr(fg, "record_one", cloud_only)
    opts = GenerateOptions(mode="speculative", gamma=2, max_new_tokens=MAX_NEW, params=SamplingParams(temperature=0.0),
                           draft_model="d", target_model="t")  # fmt: skip
    drafter = make_drafter(draft)
    rec = record_chain(drafter, None, 0, [3, 4, 5], opts, eos_ids=draft.eos_token_ids, gamma_max=4)
    assert rec.positions() == 5 and len(rec.chains) == 5  # positions 0..4, the end token's included
    assert rec.expect(4, rec.chains[4][:1])[2] == 1  # the verdict there ends the generation


def test_gamma_replay_matches_the_target_for_fixed_and_auto_gamma(dev_broker, tiny_pair, tmp_path) -> None:
    """Sessions replayed from chains, at a fixed γ and choosing γ each round, get exactly the
    verdicts the target's greedy tokens imply, commit the whole generation, and vary γ under
    auto; a chain recording with one wrong target token is reported as a mismatch."""
    from edge_agent.mqtt_link import MqttLink

    draft_dir, target_dir = tiny_pair
    cfg = dev_broker.config()
    wp = start_worker_process(cfg, worker_id="fleetg-t1", target=str(target_dir), workdir=tmp_path)
    try:
        link = MqttLink(cfg, device="fleetgrec", round_timeout_s=30)
        link.connect()
        mixed = _chains(link, draft_dir, target_dir)  # a different draft: blocks get rejected
        same = _chains(link, target_dir, target_dir, n_prompts=1)  # the target as draft: all accepted
        link.shutdown()
        for rec in mixed + same:
            assert len(rec.target) == MAX_NEW + 1 or rec.target[-1] in rec.eos_ids
            assert len(rec.chains) == rec.positions() == min(MAX_NEW, len(rec.target))
            assert all(len(c) == 8 for c in rec.chains) and rec.draft_ms > 0
        assert all(c[:4] == tuple(same[0].target[p : p + 4]) for p, c in enumerate(same[0].chains[:4]))
        path = tmp_path / "chains.json"
        save_chains(path, mixed)
        assert load_chains(path) == mixed
        for gamma in (2, GAMMA_AUTO):
            rp = GammaReplayer(cfg, gamma=gamma, draft_ms=1.0, round_timeout_s=30)
            rp.connect()
            try:
                rp.run(plan_slots(3, mixed + same, device_prefix=f"tg{gamma}"), duration_s=None, drain_s=120)
            finally:
                rp.close()
            gens = rp.generations
            assert len(gens) == 3 * 3
            assert [g.mismatch or g.error for g in gens] == [None] * len(gens)
            assert all(g.complete for g in gens)
            want = {r.prompt: r.positions() for r in mixed + same}
            assert sorted(g.tokens for g in gens) == sorted(3 * [want[r.prompt] for r in mixed + same])
            sent = [r.gamma for r in rp.rounds if r.kind == "draft"]
            if gamma == 2:
                assert set(sent) <= {1, 2} and 2 in sent  # 1 only where the generation's end caps it
            else:
                assert len(set(sent)) > 1 and max(sent) > 2, sent  # all-accepted sessions lengthen blocks
            assert len(rp.predictions) == len(sent)
            for x in rp.predictions:  # each round's terms add up to its predicted and measured time
                assert x.cost.total == pytest.approx(x.round_ms)
                assert x.measured.total == pytest.approx(x.actual_ms)
                assert x.measured.verify > 0 and x.measured.positions >= 2 and x.cost.positions >= 2
        # One wrong target token: the replay notices at that position.
        bad = dataclasses.replace(mixed[0], target=(mixed[0].target[0] + 1, *mixed[0].target[1:]))
        rp = GammaReplayer(cfg, gamma=2, draft_ms=0.0, round_timeout_s=30)
        rp.connect()
        try:
            rp.run([("tgbad", [bad])], duration_s=None, drain_s=60)
        finally:
            rp.close()
        (gen,) = rp.generations
        assert not gen.complete and gen.mismatch is not None and gen.mismatch.startswith("position 0")
    finally:
        wp.terminate()


def test_fleet_gamma_sweep_report(tiny_pair, tmp_path) -> None:
    """``spececd-bench --fleet N --fleet-gamma 2,auto,auto-solo`` runs one cell per (N, γ) with no
    mismatch and reports auto against the best fixed γ (auto-solo, auto blind to the worker's
    fleet row, is not a fixed γ); at T > 0 it refuses with what to do."""
    if mosquitto_missing():
        pytest.skip(mosquitto_missing())
    draft, target = tiny_pair
    base = ["--draft", str(draft), "--target", str(target), "--num-prompts", "2", "--max-new-tokens", "8",
            "--no-progress", "--worker-timeout-s", "90", "--fleet", "1,2", "--fleet-seconds", "2",
            "--fleet-gamma", "2,auto,auto-solo"]  # fmt: skip
    assert main([*base, "--temperature", "0.8", "--out", str(tmp_path / "hot")]) == 2
    out = tmp_path / "fleet"
    assert main([*base, "--temperature", "0", "--out", str(out)]) == 0
    report = json.loads((out / "fleet.json").read_text())
    cells = {(c["mode"], c["n"]): c for c in report["cells"]}
    assert set(cells) == {(f"speculative γ={g}", n) for g in ("2", "auto", "auto-solo") for n in (1, 2)}
    for c in cells.values():
        assert c["mismatches"] == 0 and c["errors"] == 0, c
        assert c["server_tokens_per_s"] > 0 and c["gamma_mean"] >= 1
    assert cells[("speculative γ=2", 2)]["gamma_mean"] <= 2
    assert set(cells[("speculative γ=2", 2)]["gamma_sent"]) <= {"1", "2"}  # cut at a generation's end
    auto = cells[("speculative γ=auto", 2)]
    assert sum(auto["gamma_sent"].values()) > 0 and 1 <= len(auto["last_reasons"]) <= 2
    assert all("α̂=" in r or "prior" in r for r in auto["last_reasons"]), auto["last_reasons"]
    assert len(json.loads((out / "chains.json").read_text())) == 2
    md = (out / "fleet.md").read_text()
    assert "## Adaptive γ under load" in md and "| default | 2 |" in md and "Auto's choices" in md
    assert "| 2 | auto-solo | " in md and "N = 2, auto-solo: γ" in md
    rows = [line for line in md.splitlines() if line.startswith("| default | 2 | ")]
    row = next(line for line in rows if line.count("|") > 9)  # the sweep's row, not the terms'
    assert row.split(" | ")[5] == "2"  # the best fixed γ: auto-solo is not one
    assert not any("fleet row" in r for r in cells[("speculative γ=auto-solo", 2)]["last_reasons"])
    for c in cells.values():  # each slot's first round, priced before any verify was measured, is left out
        assert 0 < c["priced"] <= c["predicted"] - c["n"], c
    terms = cells[("speculative γ=auto", 2)]["round_terms"]
    assert set(terms) == {"draft", "net", "overhang", "queue", "verify", "positions"}
    assert terms["verify"][1] > 0 and terms["positions"][1] >= 2
    assert "| default | 2 | auto | " in md  # the term-by-term table
