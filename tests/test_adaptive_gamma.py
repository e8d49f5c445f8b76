"""γ varying mid-generation leaves the output exact (issue 13), with tiny real models.

γ only changes how many tokens are proposed each round. Greedy output equals the target's own
greedy decoding for any γ schedule. A seeded generation's tokens depend on which positions were
drafted and which were drawn as the target's bonus, so its reference is the exact algorithm
(DESIGN §4) run without any cache on the same γ schedule; pipelined drafting (which reuses drafts
across rounds of different γ) must give exactly those tokens too.
"""

from __future__ import annotations

import time
from concurrent.futures import Future

import pytest
import torch

import edge_agent.speculative as spec
from bench.inprocess import InProcessPair
from cloud_worker.worker import Worker
from edge_agent.agent import EdgeAgent
from edge_agent.gamma import GammaController, GammaDecision
from edge_agent.mqtt_link import MqttLink
from edge_agent.speculative import GenerateOptions
from shared.models import LoadedModel, load_model
from shared.sampling import (
    DEFAULT_SPARSE_K,
    PURPOSE_DRAFT,
    SamplingParams,
    logits_to_probs,
    position_uniform,
    sparsify,
)
from shared.speculative import verify_draft
from tests.tiny import make_tiny_model_dir

PROMPT = [100, 3, 250, 7, 9, 11]
GREEDY = SamplingParams(temperature=0.0)
SAMPLED = SamplingParams(temperature=0.8, top_k=50, seed=13)
NARROW = SamplingParams(temperature=0.8, top_k=16, seed=13)  # within the sparse q's K: q ≈ p
SCHEDULE = [3, 1, 6, 2, 8, 1, 4, 5, 2, 7]
N = 40


class Scripted(GammaController):
    """A controller that plays a fixed γ schedule (cycling), to replay or to vary γ on purpose."""

    def __init__(self, schedule: list[int], stop_below: float = 0.0) -> None:
        super().__init__()
        self.schedule = schedule
        self.stop_below = stop_below

    def decide(self, *, ready: int = 0, remaining: int | None = None) -> GammaDecision:
        g = self.schedule[self.rounds % len(self.schedule)]
        stops = (0.0,) + (self.stop_below,) * (g - 1) if self.stop_below else ()
        return GammaDecision(g, *self.predict(g, ready=ready), "scripted", stops)


@pytest.fixture
def scripted(monkeypatch):
    """``use(schedule, stop_below)``: the next generations play ``schedule`` (ending a block
    before any draft less confident than ``stop_below``)."""

    def use(schedule: list[int], stop_below: float = 0.0) -> None:
        monkeypatch.setattr(
            spec, "gamma_controller", lambda opts, previous=None: Scripted(schedule, stop_below)
        )

    return use


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("models")
    target_dir = make_tiny_model_dir(root / "target", arch="qwen2", seed=2)
    return {
        "draft": load_model(str(make_tiny_model_dir(root / "draft", arch="qwen2", seed=1, layers=1))),
        "target": load_model(str(target_dir)),
        # a draft equal to the target accepts everything: long blocks, pipelined reuse
        "same": load_model(str(target_dir)),
    }


@pytest.fixture(scope="module")
def pair(models) -> InProcessPair:
    return InProcessPair.from_models(models["draft"], models["target"])


def exact_reference(
    draft: LoadedModel,
    target: LoadedModel,
    prompt: list[int],
    schedule: list[int],
    params: SamplingParams,
    n: int,
) -> tuple[list[int], list[int]]:
    """Speculative sampling (DESIGN §4) from scratch, no KV cache: rounds of γ = schedule[r]
    drafts, judged by ``verify_draft`` with the position-keyed uniforms. Returns (tokens, γ used)."""
    ctx, used = list(prompt), []
    with torch.inference_mode():
        while len(ctx) - len(prompt) < n:
            gamma = schedule[len(used) % len(schedule)]
            used.append(gamma)
            xs, qs = [], []
            for _ in range(gamma):
                logits = draft.model(torch.tensor([ctx + xs])).logits[0, -1, : draft.vocab_size]  # [V]
                probs = logits_to_probs(logits, params)  # [V]
                if params.greedy:
                    xs.append(int(probs.argmax()))
                    qs.append(torch.nn.functional.one_hot(torch.tensor(xs[-1]), target.vocab_size).float())
                else:
                    dist = sparsify(probs, DEFAULT_SPARSE_K)
                    xs.append(dist.sample(position_uniform(params.seed, len(ctx) + len(xs), PURPOSE_DRAFT)))
                    qs.append(dist.to_dense(target.vocab_size))
            logits = target.model(torch.tensor([ctx + xs])).logits[0, -(gamma + 1) :, : target.vocab_size]
            p = logits_to_probs(logits, params)  # [γ+1, V]
            pos = len(ctx)
            n_acc, nxt = verify_draft(
                p, torch.tensor(xs), torch.stack(qs),
                uniform=lambda i, purpose, pos=pos: position_uniform(params.seed, pos + i, purpose),
            )  # fmt: skip
            ctx += [*xs[:n_acc], nxt]
    return ctx[len(prompt) : len(prompt) + n], used


@pytest.mark.parametrize("pipeline", [True, False], ids=["pipelined", "sequential"])
@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_varying_gamma_gives_the_exact_tokens(models, pair, scripted, params, pipeline) -> None:
    scripted(SCHEDULE)
    res = pair.run(PROMPT, GenerateOptions(gamma="auto", max_new_tokens=N, params=params, pipeline=pipeline))
    ref, used = exact_reference(models["draft"], models["target"], PROMPT, SCHEDULE, params, N)
    assert res.token_ids == ref[: len(res.token_ids)]
    assert len(res.token_ids) == N or res.token_ids[-1] in models["target"].eos_token_ids
    assert [r.gamma for r in res.rounds] == used[: len(res.rounds)]
    assert {r.gamma_reason for r in res.rounds} == {"scripted"}


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_early_stop_on_low_confidence_keeps_the_tokens_exact(models, pair, scripted, params) -> None:
    """Blocks end before a draft whose confidence (the draft's top probability, a function of
    the prefix only) is low: the output is the exact algorithm's on the block lengths used,
    pipelined or not, and the drafts cut off are reused when they still fit."""
    cut = 0.08 if params.greedy else 0.15  # about the tiny draft's median confidence
    runs = {}
    for pipeline in (True, False):
        scripted(SCHEDULE, stop_below=cut)
        opts = GenerateOptions(gamma="auto", max_new_tokens=N, params=params, pipeline=pipeline)
        runs[pipeline] = pair.run(PROMPT, opts)
    on, off = runs[True], runs[False]
    assert on.token_ids == off.token_ids and [r.gamma for r in on.rounds] == [r.gamma for r in off.rounds]
    gammas = [r.gamma for r in off.rounds]
    assert any(g < s for g, s in zip(gammas, SCHEDULE * N, strict=False)), gammas  # some blocks were cut
    ref, _ = exact_reference(models["draft"], models["target"], PROMPT, gammas, params, N)
    assert off.token_ids == ref[: len(off.token_ids)]


def test_greedy_with_auto_gamma_equals_fixed_gamma(models) -> None:
    pair = InProcessPair.from_models(models["draft"], models["target"])
    auto = pair.run(PROMPT, GenerateOptions(gamma="auto", max_new_tokens=N, params=GREEDY))
    fixed = pair.run(PROMPT, GenerateOptions(gamma=3, max_new_tokens=N, params=GREEDY))
    assert auto.token_ids == fixed.token_ids
    assert auto.rounds[0].gamma_reason.startswith("prior") and all(r.gamma_reason for r in auto.rounds)
    assert {r.gamma_reason for r in fixed.rounds} == {"fixed"}
    assert fixed.rounds[0].pred_ms > 0  # the fixed run's predictions start from the auto run's measurements


def test_next_session_starts_from_what_the_last_one_measured(models) -> None:
    pair = InProcessPair.from_models(models["draft"], models["target"])
    first = pair.run(PROMPT, GenerateOptions(gamma="auto", max_new_tokens=N, params=GREEDY))
    second = pair.run([5, 17, 42], GenerateOptions(gamma="auto", max_new_tokens=N, params=GREEDY))
    assert first.rounds[0].gamma_reason.startswith("prior") and first.rounds[0].gamma == 4
    assert second.rounds[0].gamma_reason.startswith("α̂") and second.rounds[0].pred_ms > 0
    other = InProcessPair.from_models(models["draft"], models["target"])  # another link: nothing carried
    assert (
        other.run(PROMPT, GenerateOptions(gamma="auto", max_new_tokens=4))
        .rounds[0]
        .gamma_reason.startswith("prior")
    )


def test_a_session_drawing_otherwise_keeps_the_costs_not_the_calibration(models) -> None:
    """The edge hands each session's figures to the next on the link, keyed by how it draws:
    a sampled session after a greedy one starts from the measured costs but not from greedy's
    calibration of confidence against acceptance; a greedy one after it gets greedy's back."""
    pair = InProcessPair.from_models(models["draft"], models["target"])
    pair.run(PROMPT, GenerateOptions(gamma="auto", max_new_tokens=N, params=GREEDY))
    learned = spec._learned(pair.drafter, pair.link)
    assert learned is not None and learned.draws is None
    greedy_bins = [list(b) for b in learned._conf]
    assert sum(a + r for a, r in greedy_bins) > 0
    sampled = spec.gamma_controller(GenerateOptions(gamma="auto", params=SAMPLED), learned)
    assert sampled.draws == (0.8, 50, 1.0) and all(a + r == 0 for a, r in sampled._conf)
    assert not sampled.decide().reason.startswith("prior")  # the costs came along
    pair.run(PROMPT, GenerateOptions(gamma="auto", max_new_tokens=N, params=SAMPLED))
    after = spec._learned(pair.drafter, pair.link)
    greedy_again = spec.gamma_controller(GenerateOptions(gamma="auto", params=GREEDY), after)
    assert greedy_again._conf == greedy_bins


def test_a_new_draft_model_at_a_freed_ones_address_starts_cold() -> None:
    """What a session learned is kept per (link, draft model), keyed by ids and checked by weak
    references to both: a draft model that reuses a freed one's id does not inherit its figures."""

    class Link:  # any object: the registry only keys and references it
        pass

    class Model:
        pass

    link, old, new = Link(), Model(), Model()
    ctrl = GammaController()
    spec._remember(type("D", (), {"loaded": old})(), link, ctrl)
    assert spec._learned(type("D", (), {"loaded": old})(), link) is ctrl
    # the freed model's id handed to a new one: its entry, with the old model's weak reference
    entry = spec._LEARNED.pop((id(link), id(old)))
    spec._LEARNED[(id(link), id(new))] = entry
    del old
    assert spec._learned(type("D", (), {"loaded": new})(), link) is None
    assert spec._learned(type("D", (), {"loaded": new})(), Link()) is None


@pytest.mark.parametrize("params", [GREEDY, NARROW], ids=["greedy", "sampled"])
def test_auto_gamma_grows_with_a_slow_round_trip_and_stays_exact(models, scripted, params) -> None:
    """A draft equal to the target passes every block and a verify round trip is slow: the
    controller lengthens the blocks, pipelined drafts are reused across rounds of different γ,
    and replaying the γ it chose without pipelining gives the same tokens."""
    same = InProcessPair.from_models(models["same"], models["target"])
    real_verify = same.link.verify

    def slow_verify(msg):  # a far-away verifier: 60 ms a round trip
        time.sleep(0.06)
        return real_verify(msg)

    same.link.verify = slow_verify
    auto = same.run(PROMPT, GenerateOptions(gamma="auto", max_new_tokens=60, params=params, pipeline=True))
    gammas = [r.gamma for r in auto.rounds]
    assert auto.accepted >= 0.9 * auto.drafted  # q is p quantized: rejections are rare
    assert gammas[0] == 4 and max(gammas[2:]) > 4, gammas  # the prior, then longer within 2 rounds
    assert len(set(gammas)) > 1
    if params.greedy:  # sampled, the bonus rarely equals the draft made ahead (other uniforms)
        assert sum(r.prefetched for r in auto.rounds) > 0
    assert all(r.pred_tokens > 0 and r.pred_ms > 0 for r in auto.rounds[1:])

    same.link.verify = real_verify
    scripted(gammas)
    replay = same.run(PROMPT, GenerateOptions(gamma="auto", max_new_tokens=60, params=params, pipeline=False))
    assert replay.token_ids == auto.token_ids
    assert all(r.overhang_ms == 0.0 for r in replay.rounds)  # nothing drafts ahead without pipelining
    assert all(r.overhang_ms >= 0.0 for r in auto.rounds) and any(r.overhang_ms > 0.0 for r in auto.rounds)
    if params.greedy:
        ref, _ = exact_reference(models["same"], models["target"], PROMPT, [4], params, 60)
        assert auto.token_ids == ref[: len(auto.token_ids)]


def test_auto_gamma_never_drafts_past_the_tokens_wanted(models) -> None:
    fresh = InProcessPair.from_models(models["draft"], models["target"])
    res = fresh.run(PROMPT, GenerateOptions(gamma="auto", max_new_tokens=3, params=GREEDY))
    assert res.rounds[0].gamma == 2  # the prior's 4, capped: a round yields up to γ + 1 tokens


def test_bad_gamma_option_is_refused() -> None:
    for bad in (0, 65, "fast", 2.5):
        with pytest.raises(ValueError, match="gamma must be 'auto' or an integer"):
            GenerateOptions(gamma=bad)
    assert GenerateOptions().gamma == "auto"
    assert GenerateOptions(gamma="5").gamma == 5


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_auto_gamma_through_a_real_broker(models, dev_broker, uid, params) -> None:
    """Over Mosquitto and a real worker, auto γ gives the tokens of the exact algorithm on the
    γ schedule it chose (replayed in-process, no network)."""
    worker = Worker(models["target"], dev_broker.config(), worker_id=f"w-{uid}")
    worker.start()
    link = MqttLink(dev_broker.config(), device=uid, round_timeout_s=10.0, open_timeout_s=10.0)
    link.connect()
    agent = EdgeAgent(
        models["draft"], link, defaults=GenerateOptions(gamma="auto", max_new_tokens=N, params=params)
    )
    try:
        remote = agent.run(PROMPT)
    finally:
        agent.close()
        worker.stop()
    assert not worker.bad_messages
    gammas = [r.gamma for r in remote.rounds]
    assert all(r.gamma_reason for r in remote.rounds) and all(r.bytes_up > 0 for r in remote.rounds)
    ref, _ = exact_reference(models["draft"], models["target"], PROMPT, gammas, params, N)
    assert remote.token_ids == ref[: len(remote.token_ids)]


def test_api_request_takes_auto_or_a_fixed_gamma(models, pair) -> None:
    from edge_agent.api_text import parse_request

    agent = EdgeAgent(models["draft"], pair.link, defaults=GenerateOptions(gamma=3))
    body = {"model": "m", "prompt": "hi", "spececd": {"gamma": "auto"}}
    assert parse_request(agent, body, "completion", context=None).opts.gamma == "auto"
    body["spececd"] = {"gamma": 6}
    assert parse_request(agent, body, "completion", context=None).opts.gamma == 6
    del body["spececd"]
    assert parse_request(agent, body, "completion", context=None).opts.gamma == 3


def test_drafter_ends_the_block_before_an_unconfident_draft(models) -> None:
    from edge_agent.drafter import Drafter

    drafter = Drafter(models["draft"])
    for params in (GREEDY, SAMPLED):
        drafter.reset(PROMPT, params)
        full = drafter.propose(6)
        assert len(full.confidence) == 6 and all(0.0 < c <= 1.0 for c in full.confidence)
        drafter.reset(PROMPT, params)
        cut = drafter.propose(6, stop_below=(0.0, 0.0, 2.0))  # position 2 never confident enough
        assert cut.tokens == full.tokens[:2] and cut.confidence == pytest.approx(full.confidence[:2])
        assert [t for t, _ in drafter.pending] == list(full.tokens[:3])  # the cut-off draft stays pending


def test_drafting_ahead_stops_at_the_verdict_or_the_deadline() -> None:
    """The pipelined loop's stop for drafting ahead: the verdict, or the controller's deadline
    (ms after the block was sent); without a deadline only the verdict."""
    pending: Future = Future()
    assert not spec._ahead_stop(pending, time.perf_counter(), None)()
    assert not spec._ahead_stop(pending, time.perf_counter(), 60_000.0)()
    assert spec._ahead_stop(pending, time.perf_counter() - 0.2, 150.0)()  # sent 200 ms ago
    assert spec._ahead_stop(pending, time.perf_counter(), -1.0)()  # due before it was sent
    pending.set_result(None)
    assert spec._ahead_stop(pending, time.perf_counter(), None)()
    assert spec._ahead_stop(pending, time.perf_counter(), 60_000.0)()


def test_a_poor_slow_draft_stops_drafting_ahead_before_the_verdict(models, monkeypatch) -> None:
    """Pipelined auto with a draft that is slow (40 ms a token) and poor (a different model):
    drafting ahead toward the free-draft optimum ran a forward past almost every verdict; with
    the controller's deadline the rounds' overhang is a fraction of what it was, and the tokens
    are the same."""
    pair = InProcessPair.from_models(models["draft"], models["target"])
    real_draft, real_verify = pair.drafter._draft_one, pair.link.verify

    def slow_draft():
        time.sleep(0.04)
        return real_draft()

    def far_verify(msg):
        time.sleep(0.15)
        return real_verify(msg)

    monkeypatch.setattr(pair.drafter, "_draft_one", slow_draft)
    pair.link.verify = far_verify
    opts = GenerateOptions(gamma="auto", max_new_tokens=30, params=GREEDY, pipeline=True)
    with_deadline = pair.run(PROMPT, opts)
    monkeypatch.setattr(GammaController, "draft_ahead_ms", lambda self, gamma: None)
    until_verdict = pair.run(PROMPT, opts)

    def mean_overhang(res) -> float:
        later = res.rounds[2:]  # once the draft's cost is measured
        return sum(r.overhang_ms for r in later) / len(later)

    assert with_deadline.token_ids == until_verdict.token_ids
    assert mean_overhang(until_verdict) > 10.0, mean_overhang(until_verdict)
    assert mean_overhang(with_deadline) < 0.5 * mean_overhang(until_verdict), (
        mean_overhang(with_deadline),
        mean_overhang(until_verdict),
    )
