"""``spececd-bench --fleet-acceptance``: the rounds of a recording made with one pair, replayed on
another target (bench.fleet_record.transplant). The worker's verdicts on the transplanted blocks
must be exactly the recorded acceptance, with this target's own tokens."""

from __future__ import annotations

import argparse
import json

import pytest

from bench.cli import DEFAULT_PROMPTS, load_prompts, main
from bench.fleet import record_all
from bench.fleet_record import CLOUD, SPECULATIVE, load_recordings, transplant
from cloud_worker.local_link import LocalLink
from cloud_worker.verifier import Verifier
from shared.models import load_model
from tests.brokers import mosquitto_missing
from tests.tiny import make_tiny_model_dir

MAX_NEW = 10


def _args(**kw) -> argparse.Namespace:
    base = dict(temperature=[0.0], top_k=0, top_p=1.0, seed=5, gamma=[3], max_new_tokens=MAX_NEW)
    return argparse.Namespace(**{**base, **kw})


def _link(model) -> LocalLink:
    return LocalLink(Verifier(model, worker_id="w"))


@pytest.fixture(scope="module")
def other_target(tmp_path_factory):
    """A second target of the same tokenizer: another seed, another depth."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("other"), arch="qwen2", seed=9, layers=3)


def test_transplanted_rounds_get_the_recorded_acceptance_on_another_target(tiny_pair, other_target) -> None:
    draft_dir, target_dir = tiny_pair
    draft, target, other = (load_model(str(p)) for p in (draft_dir, target_dir, other_target))
    prompts = load_prompts(DEFAULT_PROMPTS, 2, draft.tokenizer)
    accepted = record_all(_link(target), draft, prompts, _args(), "d", "t", ["speculative"])
    conts = record_all(
        _link(other), other, prompts, _args(max_new_tokens=MAX_NEW + 4), "d", "o", ["cloud-only"]
    )
    clouds = record_all(_link(other), other, prompts, _args(), "d", "o", ["cloud-only"])
    assert {r.mode for r in accepted} == {SPECULATIVE} and {r.mode for r in clouds} == {CLOUD}
    for acc, cont, cloud in zip(accepted, conts, clouds, strict=True):
        rec = transplant(
            acc, cont.tokens, cloud.open, eos_ids=other.eos_token_ids, vocab_size=other.vocab_size
        )
        assert rec.mode == SPECULATIVE and rec.open.mode == "speculative"
        assert rec.tokens == cloud.tokens  # the other target's own greedy output
        # the same rounds: positions and accepted counts as recorded with the first pair
        assert [(s.msg.pos, s.expect[0]) for s in rec.steps] == [(s.msg.pos, s.expect[0]) for s in acc.steps][
            : len(rec.steps)
        ]
        assert sum(s.committed for s in rec.steps) == len(rec.tokens)
        # and the other target's real verifier gives exactly the expected verdicts
        link = _link(other)
        link.open(rec.open)
        for step in rec.steps:
            v = link.verify(step.msg)
            assert (v.n_acc, v.next, int(v.eos)) == step.expect
    assert any(s.expect[0] < 3 for r in accepted for s in r.steps)  # rejections were transplanted too


def test_transplant_refuses_what_does_not_fit(tiny_pair, other_target) -> None:
    draft_dir, target_dir = tiny_pair
    draft, target, other = (load_model(str(p)) for p in (draft_dir, target_dir, other_target))
    prompts = load_prompts(DEFAULT_PROMPTS, 2, draft.tokenizer)
    (acc, acc1) = record_all(_link(target), draft, prompts, _args(), "d", "t", ["speculative"])
    (cloud, _) = record_all(_link(other), other, prompts, _args(), "d", "o", ["cloud-only"])
    kw = dict(eos_ids=other.eos_token_ids, vocab_size=other.vocab_size)
    with pytest.raises(ValueError, match="other prompt tokens"):
        transplant(acc1, cloud.tokens, cloud.open, **kw)
    with pytest.raises(ValueError, match="a block longer"):
        transplant(acc, (), cloud.open, **kw)
    with pytest.raises(ValueError, match="must be speculative"):
        transplant(cloud, cloud.tokens, cloud.open, **kw)
    (hot,) = record_all(
        _link(target), draft, prompts[:1], _args(temperature=[0.8]), "d", "t", ["speculative"]
    )
    if hot.steps[0].msg.q is not None:
        with pytest.raises(ValueError, match="greedy"):
            transplant(hot, cloud.tokens, cloud.open, **kw)


def test_fleet_bench_replays_recorded_acceptance_on_another_target(tiny_pair, other_target, tmp_path) -> None:
    """End to end through a real Mosquitto and worker: record the acceptance with the pair, then
    run the fleet on the other target with --fleet-acceptance: no mismatch, the same rounds."""
    if mosquitto_missing():
        pytest.skip(mosquitto_missing())
    draft, target = tiny_pair
    common = ["--num-prompts", "2", "--max-new-tokens", str(MAX_NEW), "--gamma", "2", "--temperature", "0",
              "--no-progress", "--worker-timeout-s", "90", "--fleet-seconds", "2"]  # fmt: skip
    first = tmp_path / "acc"
    assert main(["--draft", str(draft), "--target", str(target), *common, "--fleet", "1",
                 "--fleet-modes", "speculative", "--out", str(first)]) == 0  # fmt: skip
    second = tmp_path / "other"
    assert main(["--draft", str(other_target), "--target", str(other_target), *common, "--fleet", "1,2",
                 "--fleet-acceptance", str(first / "recordings.json"), "--out", str(second)]) == 0  # fmt: skip
    report = json.loads((second / "fleet.json").read_text())
    assert report["meta"]["acceptance_from"].endswith("recordings.json")
    cells = {(c["mode"], c["n"]): c for c in report["cells"]}
    assert set(cells) == {(m, n) for m in ("speculative", "cloud-only") for n in (1, 2)}
    assert all(
        c["mismatches"] == 0 and c["errors"] == 0 and c["committed_tokens"] > 0 for c in cells.values()
    )
    old = {r.prompt: r for r in load_recordings(first / "recordings.json")}
    new = [r for r in load_recordings(second / "recordings.json") if r.mode == SPECULATIVE]
    assert len(new) == 2
    for r in new:
        assert [s.expect[0] for s in r.steps] == [s.expect[0] for s in old[r.prompt].steps][: len(r.steps)]
    # greedy only
    assert main(["--draft", str(other_target), "--target", str(other_target), *common[:-5], "--temperature", "0.8",
                 "--fleet", "1", "--fleet-acceptance", str(first / "recordings.json"), "--out", str(tmp_path / "x")]) == 2  # fmt: skip
