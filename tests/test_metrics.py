"""``shared.metrics``: both sides' Prometheus metrics, parsed back from the exposition format."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.inprocess import InProcessPair
from edge_agent.agent import EdgeAgent
from edge_agent.speculative import GenerateOptions, RoundStats
from shared.metrics import MAX_CODES, EdgeMetrics, WorkerMetrics
from shared.models import load_model
from shared.sampling import SamplingParams
from tests.tiny import make_tiny_model_dir


def parse(text: bytes | str) -> dict[tuple[str, tuple], float]:
    text = text.decode() if isinstance(text, bytes) else text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def check_conventions(text: bytes, prefix: str) -> None:
    """Our families use the prefix, counters end in _total, and no label names a session."""
    for fam in text_string_to_metric_families(text.decode()):
        if not fam.name.startswith(("spececd_",)):
            continue  # process_* / python_* collectors
        assert fam.name.startswith(prefix), fam.name
        for s in fam.samples:
            assert not {"sid", "session", "device", "worker"} & set(s.labels), s
            if fam.type == "counter" and not s.name.endswith("_created"):
                assert s.name.endswith("_total"), s.name


def test_worker_metrics_count_what_the_worker_reports() -> None:
    m = WorkerMetrics()
    m.session_opened()
    m.session_opened()
    m.session_closed()
    m.set_sessions(1)
    m.verified(4, 3, 0.012, 0.001)
    m.verified(4, 0, 0.010, 0.0)
    m.decoded(16, 0.2)
    m.bad_message("bad_message")
    m.bad_message("bad_message")
    m.bad_message("stale_epoch")
    m.replayed()
    m.evicted()
    m.set_queue_depth(3)
    s = parse(m.render())
    assert value(s, "spececd_worker_sessions_opened_total") == 2
    assert value(s, "spececd_worker_sessions_closed_total") == 1
    assert value(s, "spececd_worker_sessions") == 1
    assert value(s, "spececd_worker_verifications_total") == 2
    assert value(s, "spececd_worker_drafted_tokens_total") == 8
    assert value(s, "spececd_worker_accepted_tokens_total") == 3
    assert value(s, "spececd_worker_verify_seconds_count") == 2
    assert value(s, "spececd_worker_verify_seconds_sum") == pytest.approx(0.022)
    assert value(s, "spececd_worker_verify_seconds_bucket", le="0.01") == 1  # 0.010 <= 0.01
    assert value(s, "spececd_worker_decoded_tokens_total") == 16
    assert value(s, "spececd_worker_bad_messages_total", code="bad_message") == 2
    assert value(s, "spececd_worker_bad_messages_total", code="stale_epoch") == 1
    assert value(s, "spececd_worker_replays_total") == 1
    assert value(s, "spececd_worker_evictions_total") == 1
    assert value(s, "spececd_worker_queue_depth") == 3
    check_conventions(m.render(), "spececd_worker_")


def test_worker_error_codes_stay_bounded() -> None:
    m = WorkerMetrics()
    m.bad_message("Robert'); DROP TABLE")  # not a code: never becomes a label value
    for i in range(MAX_CODES + 10):
        m.bad_message(f"code_{i}")
    codes = {dict(k[1])["code"] for k in parse(m.render()) if k[0] == "spececd_worker_bad_messages_total"}
    assert len(codes) == MAX_CODES + 1 and "other" in codes


def test_worker_metrics_served_over_http() -> None:
    m = WorkerMetrics()
    m.verified(2, 2, 0.001, 0.0)
    server, _thread = m.serve("127.0.0.1", 0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10) as resp:
            s = parse(resp.read())
    finally:
        server.shutdown()
        server.server_close()
    assert value(s, "spececd_worker_accepted_tokens_total") == 2
    assert any(k[0].startswith("process_") for k in s)  # a fresh registry gets the process collector


def round_stats(gamma: int, n_acc: int) -> RoundStats:
    return RoundStats(0, gamma, n_acc, (), 2.0, 30.0, 10.0, 1.0, 0.5, 120, 40)


def test_edge_round_accounting_by_position() -> None:
    m = EdgeMetrics()
    m.observe_round(round_stats(4, 2))  # positions 0, 1 accepted; 2 judged and rejected; 3 unjudged
    m.observe_round(round_stats(4, 4))  # all accepted (bonus token)
    m.observe_round(round_stats(0, 0))  # a cloud-only decode part: no draft
    s = parse(m.render())
    assert value(s, "spececd_edge_rounds_total") == 3
    assert value(s, "spececd_edge_drafted_tokens_total") == 8
    assert value(s, "spececd_edge_judged_tokens_total") == 7
    assert value(s, "spececd_edge_accepted_tokens_total") == 6
    judged = [value(s, "spececd_edge_position_judged_total", position=str(i)) for i in range(5)]
    accepted = [value(s, "spececd_edge_position_accepted_total", position=str(i)) for i in range(5)]
    assert judged == [2, 2, 2, 1, 0] and accepted == [2, 2, 1, 1, 0]
    assert value(s, "spececd_edge_round_seconds_sum") == pytest.approx(0.09)
    assert value(s, "spececd_edge_draft_seconds_count") == 2
    assert value(s, "spececd_edge_link_bytes_total", direction="up") == 360
    assert value(s, "spececd_edge_gamma_count") == 2 and value(s, "spececd_edge_gamma_bucket", le="4.0") == 2
    m.observe_round(round_stats(64, 64))
    positions = {int(dict(k[1])["position"]) for k in parse(m.render()) if "position" in dict(k[1])}
    assert max(positions) == 63
    check_conventions(m.render(), "spececd_edge_")


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> InProcessPair:
    root = tmp_path_factory.mktemp("metrics-models")
    draft = load_model(str(make_tiny_model_dir(root / "d", seed=1, layers=1)))
    target = load_model(str(make_tiny_model_dir(root / "t", seed=2)))
    return InProcessPair.from_models(draft, target)


@pytest.mark.parametrize("mode", ["speculative", "cloud-only", "edge-only"])
def test_edge_metrics_follow_real_generations(pair, mode) -> None:
    opts = GenerateOptions(
        mode=mode, gamma=3, max_new_tokens=12, params=SamplingParams(temperature=0.8, seed=3)
    )
    agent = EdgeAgent(pair.draft, pair.link, defaults=opts)
    m = EdgeMetrics().attach(agent)
    result = agent.run([5, 17, 42, 9], opts)
    s = parse(m.render())
    assert value(s, "spececd_edge_generations_total", mode=mode) == 1
    assert value(s, "spececd_edge_rounds_total") == len(result.rounds)
    tokens = sum(value(s, "spececd_edge_tokens_total", source=src) for src in EdgeMetrics.SOURCES)
    assert tokens == len(result.token_ids) > 0
    assert value(s, "spececd_edge_generation_seconds_count") == 1
    if mode == "speculative":
        assert value(s, "spececd_edge_rounds_total") > 0
        assert value(s, "spececd_edge_drafted_tokens_total") == result.drafted
        assert value(s, "spececd_edge_accepted_tokens_total") == result.accepted <= result.drafted
        assert value(s, "spececd_edge_position_judged_total", position="0") == len(result.rounds)
        assert value(s, "spececd_edge_gamma_sum") == result.drafted
        pred = result.gamma_prediction  # every round but the first (nothing measured yet); fixed γ too
        assert (
            value(s, "spececd_edge_gamma_predicted_rounds_total") == pred["rounds"] == len(result.rounds) - 1
        )
        assert value(s, "spececd_edge_gamma_committed_tokens_total") == pred["tokens"]
        assert value(s, "spececd_edge_gamma_predicted_tokens_total") == pytest.approx(pred["pred_tokens"])
    else:
        assert value(s, "spececd_edge_drafted_tokens_total") == 0
    if mode == "edge-only":
        assert value(s, "spececd_edge_rounds_total") == 0
        assert value(s, "spececd_edge_tokens_total", source="edge") == len(result.token_ids)
