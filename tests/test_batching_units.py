"""The parts of batched verification without a broker: the padded forward, Verifier.run over
many sessions, the scheduler's fairness and bounds, the per-device open rate, bench.verify_cost."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import statistics

import cbor2
import pytest
import torch
from transformers import DynamicCache

from cloud_worker.batching import Row, forward_packed, forward_rows, packing_supported
from cloud_worker.quotas import OpenRate
from cloud_worker.scheduler import Job, Scheduler
from cloud_worker.verifier import Step, Verifier
from shared.errors import ConfigError, ProtocolError
from shared.kvcache import forward_cached
from shared.models import load_model
from shared.protocol import Decode, Draft, Open, Tokens, Verdict
from shared.sampling import SamplingParams
from tests.tiny import make_tiny_model_dir
from tests.verdicts import assert_one_forward_answers_as_alone


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def target(request, tmp_path_factory):
    return load_model(
        str(make_tiny_model_dir(tmp_path_factory.mktemp(request.param) / "t", arch=request.param, seed=2))
    )


def _cache(model, tokens: list[int]) -> DynamicCache:
    cache = DynamicCache()
    if tokens:
        with torch.inference_mode():
            forward_cached(model, tokens, cache)
    return cache


LAYOUTS = [pytest.param(forward_rows, id="padded"), pytest.param(forward_packed, id="packed")]


@pytest.mark.parametrize("forward", LAYOUTS)
def test_batched_forward_equals_single_forwards(target, forward) -> None:
    rng = random.Random(0)
    v = target.vocab_size
    for _ in range(6):
        specs = [([rng.randrange(v) for _ in range(rng.randint(0, 30))], [rng.randrange(v) for _ in range(rng.randint(1, 6))]) for _ in range(rng.randint(2, 5))]  # fmt: skip
        rows = [Row(_cache(target.model, past), len(past), new) for past, new in specs]
        batched = forward(target.model, rows, v)
        for (past, new), row, got in zip(specs, rows, batched, strict=True):
            ref_cache = _cache(target.model, past)
            (want,) = forward_rows(target.model, [Row(ref_cache, len(past), new)], v)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)  # float rounding only
            assert torch.equal(got.argmax(-1), want.argmax(-1))
            assert row.cache_len == len(past) + len(new) == row.cache.get_seq_length()
            nxt = [rng.randrange(v)]  # the returned cache continues like the unbatched one
            with torch.inference_mode():
                a = forward_cached(target.model, nxt, row.cache)
                b = forward_cached(target.model, nxt, ref_cache)
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("launch_bound", [False, True], ids=["cpu-copies", "gpu-copies"])
@pytest.mark.parametrize("dims", [(8, 8, 8), (8, 4, 8)], ids=["one-shape", "mixed-shapes"])
def test_stack_and_split_copy_each_rows_positions_exactly(dims, launch_bound, monkeypatch) -> None:
    """The caches are stacked left-padded and split back exactly: on a GPU with one layer shape
    through one buffer whose views the layers are (one stacked copy per row), else per layer."""
    from cloud_worker import batching
    from cloud_worker.batching import _split, _stack, cache_of, layer_kv

    monkeypatch.setattr(batching, "_launch_bound", lambda t: launch_bound)

    gen = torch.Generator().manual_seed(1)
    lengths = [5, 0, 2]
    caches = [cache_of([(torch.randn(1, 2, n, d, generator=gen), torch.randn(1, 2, n, d, generator=gen)) for d in dims]) if n else DynamicCache() for n in lengths]  # fmt: skip
    rows = [Row(c, n, [1]) for c, n in zip(caches, lengths, strict=True)]
    kvs = [layer_kv(c) for c in caches]
    past = layer_kv(_stack(rows, kvs, 5))
    for layer, (keys, values) in enumerate(past):
        assert keys.shape == (3, 2, 5, dims[layer])
        for i, n in enumerate(lengths):
            assert not keys[i, :, : 5 - n].any() and not values[i, :, : 5 - n].any()  # padding
            if n:
                assert torch.equal(keys[i, :, 5 - n :], kvs[i][layer][0][0])
                assert torch.equal(values[i, :, 5 - n :], kvs[i][layer][1][0])
    row0 = _split(past, 0, 0, 5)
    assert row0.get_seq_length() == 5
    for (k, v), (k0, v0) in zip(layer_kv(row0), kvs[0], strict=True):
        assert torch.equal(k, k0) and torch.equal(v, v0)
        assert k.untyped_storage().data_ptr() != past[0][0].untyped_storage().data_ptr()  # its own memory
    row2 = _split(past, 2, 3, 5)
    for (k, _), (k2, _) in zip(layer_kv(row2), kvs[2], strict=True):
        assert torch.equal(k, k2)


@pytest.mark.parametrize("forward", LAYOUTS)
@pytest.mark.parametrize("pattern", [(True,), (True, True, True), (True, False, True, False), (False, False)])
def test_greedy_rows_get_the_argmax_of_their_logits(target, pattern, forward) -> None:
    """A greedy row (T = 0) gets its positions' argmax ids, taken where the model runs, instead of
    its [k, V] logits; other rows in the same forward still get their full logits, unchanged."""
    rng = random.Random(len(pattern))
    v = target.vocab_size
    specs = [([rng.randrange(v) for _ in range(rng.randint(1, 20))], [rng.randrange(v) for _ in range(rng.randint(1, 5))]) for _ in pattern]  # fmt: skip
    full = forward(target.model, [Row(_cache(target.model, p), len(p), t) for p, t in specs], v)
    mixed_rows = [
        Row(_cache(target.model, p), len(p), t, greedy=g) for (p, t), g in zip(specs, pattern, strict=True)
    ]
    mixed = forward(target.model, mixed_rows, v)
    for g, want, got, (p, t), row in zip(pattern, full, mixed, specs, mixed_rows, strict=True):
        if g:
            assert got.dtype == torch.long and got.shape == (len(t),)
            assert torch.equal(got, want.argmax(dim=-1))
        else:
            assert torch.equal(got, want)
        assert row.cache_len == len(p) + len(t)  # the cache grows the same either way


def test_packed_rows_without_logits_leave_the_same_cache_and_skip_the_projection(target) -> None:
    """A packed forward with prefill chunks (no logits wanted) beside verify rows: the verify rows
    get the logits of their single forwards, the chunks an empty [0, V], and every cache continues
    as after its own forward."""
    rng = random.Random(7)
    v = target.vocab_size
    specs = [([rng.randrange(v) for _ in range(rng.randint(0, 12))], [rng.randrange(v) for _ in range(rng.randint(1, 9))], want) for want in (True, False, True, False)]  # fmt: skip
    rows = [Row(_cache(target.model, p), len(p), t, logits=w) for p, t, w in specs]
    out = forward_packed(target.model, rows, v)
    for (p, t, w), row, got in zip(specs, rows, out, strict=True):
        ref = _cache(target.model, p)
        (want,) = forward_rows(target.model, [Row(ref, len(p), t)], v)
        if w:
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        else:
            assert got.shape == (0, v)
        assert row.cache_len == len(p) + len(t) == row.cache.get_seq_length()
        nxt = [rng.randrange(v)]
        with torch.inference_mode():
            torch.testing.assert_close(
                forward_cached(target.model, nxt, row.cache),
                forward_cached(target.model, nxt, ref),
                atol=1e-4,
                rtol=1e-4,
            )


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_attention_row_by_row_or_by_mask_equals_single_forwards(target, impl, monkeypatch) -> None:
    """On an sdpa model a packed forward's attention runs row by row (grouped query heads against
    their own row's keys, read in place); on an eager one through the 4-D mask. Both give every
    row its single forward's logits, and the model's attention setting is restored after."""
    from cloud_worker import batching

    calls = []
    rowwise = batching._packed_attention
    monkeypatch.setattr(
        batching.AttentionInterface,
        "_global_mapping",
        {
            **batching.AttentionInterface._global_mapping,
            batching.PACKED_ATTENTION: lambda *a, **k: calls.append(1) or rowwise(*a, **k),
        },
    )
    before = target.model.config._attn_implementation
    target.model.config._attn_implementation = impl
    try:
        rng = random.Random(3)
        v = target.vocab_size
        specs = [([rng.randrange(v) for _ in range(n)], [rng.randrange(v) for _ in range(k)]) for n, k in ((17, 1), (0, 5), (9, 3), (30, 2))]  # fmt: skip
        rows = [Row(_cache(target.model, p), len(p), t) for p, t in specs]
        got = forward_packed(target.model, rows, v)
        assert target.model.config._attn_implementation == impl
        for (p, t), lg in zip(specs, got, strict=True):
            (want,) = forward_rows(target.model, [Row(_cache(target.model, p), len(p), t)], v)
            torch.testing.assert_close(lg, want, atol=1e-4, rtol=1e-4)
    finally:
        target.model.config._attn_implementation = before
    assert bool(calls) == (impl == "sdpa")


def test_packing_needs_one_full_mask_for_every_layer(target) -> None:
    import copy

    assert packing_supported(target.model) is None
    model = copy.copy(target.model)
    model.config = copy.deepcopy(target.model.config)
    model.config.layer_types = ["full_attention", "sliding_attention"]
    assert "sliding-window" in packing_supported(model)
    model.config = copy.deepcopy(target.model.config)
    model.config._attn_implementation = "flash_attention_2"
    assert "no 4-D mask" in packing_supported(model)
    # the worker refuses to start packed on such a model, naming the key and what to use
    with pytest.raises(ConfigError, match=r"batch_layout.*'padded' for this target"):
        Verifier(_with_model(target, model), batch_layout="packed")
    with pytest.raises(ValueError, match="batch_layout"):
        Verifier(target, batch_layout="ragged")


def _with_model(loaded, model):
    import dataclasses

    return dataclasses.replace(loaded, model=model)


@pytest.mark.parametrize("rows", [1, 3])
def test_prefill_rows_skip_the_vocabulary_projection_and_leave_the_same_cache(target, rows) -> None:
    """Prefill chunks want no logits: the forward computes the last position's only, and the
    caches continue exactly as after a full forward."""
    rng = random.Random(rows)
    v = target.vocab_size
    specs = [([rng.randrange(v) for _ in range(rng.randint(0, 9))], [rng.randrange(v) for _ in range(rng.randint(2, 12))]) for _ in range(rows)]  # fmt: skip
    full = [Row(_cache(target.model, past), len(past), new) for past, new in specs]
    skip = [Row(_cache(target.model, past), len(past), new, logits=False) for past, new in specs]
    forward_rows(target.model, full, v)
    out = forward_rows(target.model, skip, v)
    assert all(lg.shape[0] == 1 for lg in out)  # only the last position came out of the model
    for a, b in zip(full, skip, strict=True):
        assert a.cache_len == b.cache_len == b.cache.get_seq_length()
        nxt = [rng.randrange(v), rng.randrange(v)]
        with torch.inference_mode():
            want = forward_cached(target.model, nxt, a.cache)
            got = forward_cached(target.model, nxt, b.cache)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "params", [SamplingParams(), SamplingParams(temperature=0.8, seed=9)], ids=["greedy", "seeded"]
)
def test_run_over_many_sessions_equals_one_at_a_time(target, params) -> None:
    """Drafts of different γ, a decode and an open share one forward; every answer equals the
    answer of the unbatched path."""
    assert_one_forward_answers_as_alone(target, params)


def _job(device: str, sid: str, k: int = 3, prefill: bool = False) -> Job:
    key = f"{device}/{sid}"
    job = Job(key, device, sid, None, "", None, 0.0, prefill=prefill)
    job.step = Step(key, None, Row(None, 0, [1] * k), None)  # type: ignore[arg-type]
    return job


def _prepare(job: Job):
    return job.step


def test_scheduler_round_robin_by_device() -> None:
    sched = Scheduler(max_tokens=1000, max_sessions=4)
    for i in range(10):
        sched.push(_job("flood", f"s{i}"))
    sched.push(_job("calm", "c0"))
    first = sched.select(_prepare)
    assert len(first) == 4 and "calm/c0" in {j.key for j, _ in first}
    assert len({j.key for j, _ in first}) == 4  # one job per session per forward
    seen = {j.key for j, _ in first}
    while len(sched):
        batch = sched.select(_prepare)
        assert not seen & {j.key for j, _ in batch}  # every flood session served before a repeat
        seen |= {j.key for j, _ in batch}
    assert len(seen) == 11


def test_scheduler_one_job_per_session_and_bounds() -> None:
    sched = Scheduler(max_tokens=12, max_sessions=8)
    sched.push(_job("d", "a", k=3))
    sched.push(_job("d", "a", k=3))  # the same session's next request waits for the next forward
    sched.push(_job("e", "b", k=3))
    sched.push(_job("f", "c", k=5))
    sched.push(_job("g", "p", k=100, prefill=True))
    batch = sched.select(_prepare)
    keys = [j.key for j, _ in batch]
    assert keys.count("d/a") == 1
    width = max(len(s.row.tokens) for _, s in batch)
    assert len(batch) * width <= 12
    while len(sched):  # a long prefill alone is cut to the budget, never starved
        for _, step in sched.select(_prepare):
            assert len(step.row.tokens) <= 12


def test_open_rate_bucket() -> None:
    now = [0.0]
    rate = OpenRate(2.0, burst=3, clock=lambda: now[0])
    assert [rate.allow("x") for _ in range(4)] == [True, True, True, False]
    assert rate.allow("y")  # another device has its own bucket
    now[0] = 0.5  # one more open's worth
    assert rate.allow("x") and not rate.allow("x")
    assert OpenRate(0, burst=1).allow("x")  # 0 = off


def test_verify_cost_bench_runs(tmp_path) -> None:
    from bench import verify_cost

    folder = make_tiny_model_dir(tmp_path / "m", arch="qwen2", seed=1)
    out = tmp_path / "cost.json"
    assert verify_cost.main(["--model", str(folder), "--batches", "1,2", "--positions", "1", "--repeat", "1", "--cache-len", "8", "--cpu-linear", "onednn,torch", "--json", str(out)]) == 0  # fmt: skip
    kernels = json.loads(out.read_text())["kernels"]
    assert set(kernels) == {"onednn", "torch"}  # both kernel choices, side by side in one run
    for k in kernels.values():
        assert [(r["B"], r["k"]) for r in k["rows"]] == [(1, 1), (2, 1)]
        assert all(r["batched_ms"] > 0 and r["unbatched_ms"] > 0 for r in k["rows"]) and k["step_ms"] > 0
        # the batched forward split into its phases: a single row has no stacking, a batch has all four
        assert set(k["rows"][0]["phases_ms"]) == {"model", "logits"}
        assert set(k["rows"][1]["phases_ms"]) == {"stack", "model", "logits", "split"}


def test_verify_cost_bench_times_both_layouts_with_mixed_rows(tmp_path) -> None:
    from bench import verify_cost

    folder = make_tiny_model_dir(tmp_path / "m", arch="qwen2", seed=1)
    out = tmp_path / "cost.json"
    assert verify_cost.main(["--model", str(folder), "--batches", "3", "--positions", "1,4", "--mix", "--repeat", "1", "--cache-len", "8", "--cpu-linear", "torch", "--layout", "padded,packed", "--json", str(out)]) == 0  # fmt: skip
    rows = json.loads(out.read_text())["kernels"]["torch"]["rows"]
    assert [(r["layout"], r["B"], r["k"], r["positions"]) for r in rows] == [
        ("padded", 3, [1, 4], 6),  # rows of 1, 4 and 1 new tokens in one forward
        ("packed", 3, [1, 4], 6),
    ]
    with pytest.raises(SystemExit):
        verify_cost.main(["--model", str(folder), "--layout", "ragged"])


def test_verify_cost_on_random_weights_needs_only_the_config(tmp_path, capsys) -> None:
    from bench import verify_cost

    folder = make_tiny_model_dir(tmp_path / "m", arch="llama", seed=1)
    (folder / "model.safetensors").unlink()  # the shape alone: no weights
    out = tmp_path / "cost.json"
    assert verify_cost.main(["--model", str(folder), "--random", "--greedy", "--batches", "2", "--positions", "3", "--repeat", "1", "--cache-len", "8", "--cpu-linear", "torch", "--json", str(out)]) == 0  # fmt: skip
    report = json.loads(out.read_text())
    assert report["random_weights"] and report["greedy"] and report["device"] == "cpu"
    # a folder without a config.json: a clear error, not a traceback
    assert verify_cost.main(["--model", str(tmp_path), "--random"]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert [(r["B"], r["k"]) for r in report["kernels"]["torch"]["rows"]] == [(2, 3)]


def test_phases_split_the_forward_and_change_nothing(target) -> None:
    rng = random.Random(3)
    v = target.vocab_size
    specs = [
        ([rng.randrange(v) for _ in range(n)], [rng.randrange(v) for _ in range(k)])
        for n, k in ((5, 2), (9, 3))
    ]
    plain = forward_rows(target.model, [Row(_cache(target.model, p), len(p), t) for p, t in specs], v)
    phases: dict[str, float] = {}
    timed = forward_rows(
        target.model, [Row(_cache(target.model, p), len(p), t) for p, t in specs], v, phases_ms=phases
    )
    for a, b in zip(plain, timed, strict=True):
        assert torch.equal(a, b)
    assert set(phases) == {"stack", "model", "logits", "split"} and all(x >= 0 for x in phases.values())


def test_scheduler_caps_queued_jobs_per_session() -> None:
    from cloud_worker.scheduler import MAX_QUEUED_PER_SESSION

    sched = Scheduler()
    assert [sched.push(_job("d", "a")) for _ in range(MAX_QUEUED_PER_SESSION + 2)].count(False) == 2
    assert sched.push(_job("d", "b"))  # another session of the device is not affected
    assert sched.push(_job("d", "a"), front=True)  # a continuing step always goes back


def test_scheduler_rotates_who_comes_first() -> None:
    """With every device served each forward, the first place (the one that may take the whole
    budget) still goes round."""
    sched = Scheduler(max_tokens=1000, max_sessions=8)
    firsts = []
    for _ in range(6):
        for d in ("a", "b", "c"):
            if not sched.queues.get(f"{d}/s"):
                sched.push(_job(d, "s"))
        firsts.append(sched.select(_prepare)[0][0].device)
    assert firsts == ["a", "b", "c", "a", "b", "c"]


@pytest.mark.parametrize("shared_prefill", [None, 1_000_000], ids=["auto", "uncapped"])
def test_prefill_beside_others_takes_only_the_row_width(shared_prefill) -> None:
    sched = Scheduler(max_tokens=512, max_sessions=8, shared_prefill=shared_prefill)
    sched.push(_job("d", "draft", k=3))
    sched.push(_job("o", "open", k=300, prefill=True))
    batch = sched.select(_prepare)
    assert [len(s.row.tokens) for _, s in batch] == [3, 3]  # the draft is not padded to 300
    sched.push(
        _job("o", "open", k=297, prefill=True), front=True
    )  # its next chunk goes back (as the worker does)
    sched.push(_job("d", "draft", k=3))
    batch = sched.select(_prepare)  # the open comes first now: it leads, cut to its share
    assert [j.key for j, _ in batch] == ["o/open"]  # the draft is not padded to its chunk
    # ... which, with the draft left waiting, is 16 positions (auto), not the whole share of 256
    assert len(batch[0][1].row.tokens) == (16 if shared_prefill is None else 256)
    alone = Scheduler(max_tokens=512, max_sessions=8)
    alone.push(_job("o", "open", k=300, prefill=True))
    assert len(alone.select(_prepare)[0][1].row.tokens) == 300  # alone it may take the budget


def test_a_narrow_row_is_never_padded_to_a_wide_one() -> None:
    sched = Scheduler(max_tokens=512, max_sessions=8)
    sched.push(_job("calm", "c", k=3))
    sched.push(_job("flood", "f", k=65))
    assert [j.key for j, _ in sched.select(_prepare)] == ["calm/c"]
    assert [j.key for j, _ in sched.select(_prepare)] == ["flood/f"]
    # drafts of mixed small gamma still go together: no row padded past twice its length or
    # 3 positions past it (a 2-position block rides with a 5-position one, not with a 7)
    mixed = Scheduler(max_tokens=512, max_sessions=8)
    for device, k in (("a", 3), ("b", 5), ("c", 2), ("d", 7), ("e", 4), ("f", 1)):
        mixed.push(_job(device, "s", k=k))
    assert [len(s.row.tokens) for _, s in mixed.select(_prepare)] == [3, 5, 2, 4]
    assert [len(s.row.tokens) for _, s in mixed.select(_prepare)] == [7]  # 7 > 1 + 3: not together
    assert [len(s.row.tokens) for _, s in mixed.select(_prepare)] == [1]


def test_packed_forwards_take_rows_of_any_length_up_to_the_leaders_ratio() -> None:
    """batch_layout packed: no padding, so mixed lengths share a forward (ratio: three forwards for
    these six blocks, packed: two), every decode row rides beside a leading prefill, and the
    budget counts real positions."""
    packed = Scheduler(max_tokens=512, max_sessions=8, packed=True)
    for device, k in (("a", 3), ("b", 5), ("c", 2), ("d", 7), ("e", 4), ("f", 1)):
        packed.push(_job(device, "s", k=k))
    assert [len(s.row.tokens) for _, s in packed.select(_prepare)] == [3, 5, 2, 4, 1]  # 7 > 2 x 3
    assert [len(s.row.tokens) for _, s in packed.select(_prepare)] == [7]
    lead = Scheduler(max_tokens=512, max_sessions=8, packed=True)
    lead.push(_job("o", "open", k=300, prefill=True))
    for i in range(4):
        lead.push(_job(f"d{i}", "s", k=3))
    # its share would be 512 / 5 = 102; beside four 3-position drafts it holds at most 16 (auto's floor)
    assert [len(s.row.tokens) for _, s in lead.select(_prepare)] == [16, 3, 3, 3, 3]
    budget = Scheduler(max_tokens=20, max_sessions=16, packed=True)
    for i in range(8):
        budget.push(_job(f"d{i}", "s", k=3))
    assert [len(s.row.tokens) for _, s in budget.select(_prepare)] == [3] * 6  # 18 real positions <= 20


def _prefill_fleet(sched: Scheduler, *, drafts: int, prompt: int) -> list[list[tuple[str, int, bool]]]:
    """Run ``sched`` until one ``prompt``-token open beside ``drafts`` saturating sessions (each
    always has its next 3-position draft queued) is prefilled; the forwards, as (key, positions,
    prefill) rows."""
    for i in range(drafts):
        sched.push(_job(f"d{i}", "s"))
    sched.push(_job("o", "open", k=prompt, prefill=True))
    left, forwards = prompt, []
    while left:
        batch = sched.select(_prepare)
        forwards.append([(j.key, len(st.row.tokens), j.prefill) for j, st in batch])
        for job, step in batch:
            if job.prefill:
                left -= len(step.row.tokens)
                if left:  # its next chunk goes back first, as the worker does
                    sched.push(_job("o", "open", k=left, prefill=True), front=True)
            else:
                sched.push(_job(job.device, "s"))
        sched.charge(0.1 * sum(len(st.row.tokens) for _, st in batch))
    return forwards


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_a_prefill_beside_drafts_holds_at_most_their_positions(packed) -> None:
    """Chunked prefill beside running sessions (shared_prefill): a forward that carries drafts,
    or leaves some waiting, carries at most max(16, their positions) of an open's prefill
    ("auto") or the configured number, however long the prompt and whoever leads; alone, a
    prefill still takes its share, and the open is never starved."""
    forwards = _prefill_fleet(Scheduler(max_tokens=512, max_sessions=16, packed=packed), drafts=8, prompt=300)
    for rows in forwards:  # the eight drafts (24 positions) ride in each forward or wait for the next
        assert sum(k for _, k, prefill in rows if prefill) <= 24, rows
    assert any(p for rows in forwards for _, _, p in rows)
    fixed = _prefill_fleet(Scheduler(max_tokens=512, max_sessions=16, packed=packed, shared_prefill=5),
                           drafts=8, prompt=60)  # fmt: skip
    assert max(k for rows in fixed for _, k, p in rows if p and len(rows) > 1) <= 5
    if packed:  # packed, the drafts ride beside the leading prefill chunk: it is cut to their 24
        assert max(k for rows in forwards for _, k, p in rows if p) == 24
    alone = Scheduler(max_tokens=512, max_sessions=16, packed=packed)
    alone.push(_job("o", "open", k=300, prefill=True))
    assert len(alone.select(_prepare)[0][1].row.tokens) == 300
    two = Scheduler(max_tokens=512, max_sessions=16, packed=True)  # two opens beside one draft
    two.push(_job("a", "open", k=200, prefill=True))
    two.push(_job("b", "open", k=200, prefill=True))
    two.push(_job("d", "s", k=3))
    rows = [(j.prefill, len(st.row.tokens)) for j, st in two.select(_prepare)]
    # 16 for the first; nothing left for the second, which goes back to the front of its queue
    assert rows == [(True, 16), (False, 3)] and len(two) == 1, rows
    # and leads the next forward with its share (512 over 3 devices), not the width it was cut to
    assert [(j.key, len(st.row.tokens)) for j, st in two.select(_prepare)] == [("b/open", 170)]
    # padded, drafts cannot ride beside a prefill chunk: a forward of whole prompts that leaves
    # them waiting is what the cap prevents (four re-opening sessions of 40 tokens, four drafts)
    wait = Scheduler(max_tokens=512, max_sessions=16)
    for i in range(4):
        wait.push(_job(f"o{i}", "open", k=40, prefill=True))
    for i in range(4):
        wait.push(_job(f"d{i}", "s", k=3))
    rows = [(j.prefill, len(st.row.tokens)) for j, st in wait.select(_prepare)]
    assert rows == [(True, 16)] and len(wait) == 7, rows  # not 4 x 40 while the drafts wait
    # the drafts waited for that forward: they lead the next one, an open rides at their width
    nxt = [(j.key, len(st.row.tokens)) for j, st in wait.select(_prepare)]
    assert {key for key, _ in nxt} >= {f"d{i}/s" for i in range(4)} and max(k for _, k in nxt) == 3, nxt
    with pytest.raises(ValueError, match="shared_prefill"):
        Scheduler(shared_prefill=0)


def _simulate(
    sched: Scheduler, *, seconds: float, flood_k: int, flood_sessions: int, packed: bool = False
) -> dict:
    """A worker's model loop on a clock: each forward costs 0.45 s + 30 ms per padded position (the
    demo target on one CPU core, roughly); the calm device has one session whose next draft comes
    back as soon as it is answered (a replaying edge), the flood keeps every session busy."""
    now = [0.0]
    sched._clock = lambda: now[0]
    for i in range(flood_sessions):
        sched.push(_job("flood", f"f{i}", k=flood_k))
    sched.push(_job("calm", "c", k=3))
    served: dict[str, int] = {"calm": 0, "flood": 0}
    while now[0] < seconds:
        batch = sched.select(_prepare)
        ks = [len(s.row.tokens) for _, s in batch]
        cost = 0.45 + 0.03 * (sum(ks) if packed else len(ks) * max(ks))
        now[0] += cost
        sched.charge(cost)
        for job, _ in batch:
            served[job.device] += 1
            sched.push(_job(job.device, job.sid, k=flood_k if job.device == "flood" else 3))
    return served


def test_model_time_is_shared_fairly_with_a_flood_of_long_drafts() -> None:
    """Issue 10's noisy neighbour in the scheduler alone: a device sending 64-token drafts on 4
    sessions against one generating normally. Counted in rows, every forward held the calm row
    and the flood's (4 x 65 padded positions, ~8 s); in model time, the calm device gets about
    half of the worker."""
    solo = _simulate(Scheduler(), seconds=100, flood_k=65, flood_sessions=0)["calm"]
    shared = _simulate(Scheduler(), seconds=100, flood_k=65, flood_sessions=4)
    assert shared["calm"] >= 0.4 * solo, (shared, solo)
    assert shared["flood"] > 0  # and the flood is still served
    # packed forwards (cost per real position): the calm rows ride in the flood's forwards too
    packed = _simulate(Scheduler(packed=True), seconds=100, flood_k=65, flood_sessions=4, packed=True)
    assert packed["calm"] >= 0.4 * solo and packed["flood"] > 0, (packed, solo)


def test_riders_hold_no_more_than_the_leaders_device() -> None:
    sched = Scheduler()
    sched.vtime.update(good=0.0, flood=50.0)  # the flood is far ahead in model time
    sched.push(_job("good", "g", k=3))
    for i in range(10):
        sched.push(_job("flood", f"f{i}", k=3))
    assert [j.device for j, _ in sched.select(_prepare)] == ["good", "flood"]
    sched.push(_job("flood", "p", k=300, prefill=True))
    sched.vtime["flood"] = -1.0  # now the flood leads: its rows within its share, whoever waits
    assert len(sched.select(_prepare)) > 2


def test_an_idle_device_comes_back_with_bounded_credit() -> None:
    now = [0.0]
    sched = Scheduler(clock=lambda: now[0])
    sched.push(_job("busy", "b"))
    for _ in range(50):  # the busy device runs alone for a while: 50 forwards of 1 s
        sched.select(_prepare)
        sched.charge(1.0)
        sched.push(_job("busy", "b"))
    sched.push(_job("late", "l"))  # a device that was idle all along may lead, but not for 50 s
    assert sched.vtime["late"] == pytest.approx(sched.vtime["busy"] - sched.credit)
    assert sched.credit == pytest.approx(4.0)  # four mean forwards
    assert sched.select(_prepare)[0][0].device == "late"


def _warmed_scheduler() -> Scheduler:
    """A scheduler that served one device for 11 forwards of 1 s (credit 4 s); now idle."""
    sched = Scheduler()
    for _ in range(11):
        sched.push(_job("before", "b"))
        sched.select(_prepare)
        sched.charge(1.0)
    return sched


def test_devices_that_arrive_together_start_level() -> None:
    """A fleet of eight edges opening at once: each new device used to be placed ``credit``
    behind the least of the devices with work, the one placed just before it included, so the
    eighth started 7 credits (11 s on the demo pair) ahead of the first, and whenever their rows
    did not fit one forward the first waited seconds behind the others (a fleet-γ run at N = 8:
    8-position drafts queued 6.6 s behind 2-position ones)."""
    sched = _warmed_scheduler()
    for i in range(8):
        sched.push(_job(f"edge{i}", "s"))
    starts = [sched.vtime[f"edge{i}"] for i in range(8)]
    assert max(starts) - min(starts) < 1e-9, starts
    # once served, they are placed against their own model time again: a device back from idle
    # is at most ``credit`` behind those with work, not behind ones placed as it is
    for _ in range(3):
        batch = sched.select(_prepare)
        sched.charge(1.0)
        for job, _ in batch:
            sched.push(_job(job.device, job.sid))
    sched.push(_job("late", "l"))
    sched.push(_job("later", "l"))
    floor = min(sched.vtime[f"edge{i}"] for i in range(8) if sched.devices[f"edge{i}"])
    assert sched.vtime["late"] == pytest.approx(floor - sched.credit)
    assert sched.vtime["later"] == pytest.approx(floor - sched.credit)


def test_a_device_back_from_idle_carries_no_debt() -> None:
    """Four edges shared the worker for a while and went idle; later they come back together with
    four new ones. The old ones start level with each other and at most ``credit`` behind the
    newcomers (who get that credit as any new device does), not behind them by all the model
    time they used before."""
    now = [0.0]
    sched = Scheduler(clock=lambda: now[0])
    old = [f"old{i}" for i in range(4)]
    for _ in range(20):
        for device in old:
            if device not in sched.queues:
                sched.push(_job(device, "s"))
        sched.select(_prepare)
        sched.charge(1.0)
        now[0] += 1.0
    assert min(sched.vtime[d] for d in old) > 4.0  # five forwards' worth each
    now[0] += 60.0
    for i in range(4):
        sched.push(_job(old[i], "s2"))
        sched.push(_job(f"new{i}", "s"))
    olds, news = [sched.vtime[d] for d in old], [sched.vtime[f"new{i}"] for i in range(4)]
    assert max(olds) - min(olds) < 1e-9 and max(news) - min(news) < 1e-9, sched.vtime
    assert olds[0] - news[0] == pytest.approx(sched.credit), sched.vtime
    # between rounds a device keeps what its forwards cost it: a heavy one stays behind
    sched.vtime["old0"] += 3.0
    sched.select(_prepare)
    sched.charge(1.0)
    now[0] += 0.1  # back for its next round at once
    before = sched.vtime["old0"]
    sched.push(_job("old0", "s2"))
    assert sched.vtime["old0"] == before
    # nor is a forward longer than a device's time away: served by a 10 s prefill, it is back at once
    sched.push(_job("old1", "open", k=400, prefill=True))
    while "old1/open" in sched.queues:
        sched.select(_prepare)
        now[0] += 10.0
        sched.charge(10.0)
    before = sched.vtime["old1"]
    now[0] += 0.1
    sched.push(_job("old1", "open"))
    assert sched.vtime["old1"] == before


def test_a_device_ahead_gains_nothing_by_pausing() -> None:
    """A device ahead in model time (it flooded) that pauses until it counts as idle comes back
    level with the busy devices: its debt is forgiven, but the pause buys it no ``credit`` to
    lead with, so flooding, pausing and flooding again gains nothing over flooding on."""
    now = [0.0]
    sched = Scheduler(clock=lambda: now[0])
    for _ in range(10):  # both busy; the flood is charged its long rows
        for device, k in (("steady", 3), ("flood", 40)):
            if not sched.devices.get(device):
                sched.push(_job(device, "s", k=k))
        sched.select(_prepare)
        now[0] += 1.0
        sched.charge(1.0)
    sched.drop("flood/s")
    sched.vtime["flood"] = sched.vtime["steady"] + 20.0  # far ahead
    if not sched.devices.get("steady"):
        sched.push(_job("steady", "s", k=3))
    now[0] += 10.0  # the flood pauses until it counts as idle
    sched.push(_job("flood", "s2", k=40))
    assert sched.vtime["flood"] == pytest.approx(sched.vtime["steady"])  # level: no debt, no credit


def test_a_draft_too_long_to_ride_waits_at_most_a_forward_or_two() -> None:
    """Six edges that opened together: four send 2-position drafts every round, the first two
    one 8-position draft each, which does not fit beside them (width rule). Their devices are
    served no later than the second forward after the drafts arrived."""
    sched = _warmed_scheduler()
    for i in range(6):
        sched.push(_job(f"edge{i}", "s"))
    sched.select(_prepare)
    sched.charge(1.0)
    short = {f"edge{i}" for i in range(2, 6)}
    for device in sorted(short):
        sched.push(_job(device, "s", k=2))
    sched.push(_job("edge0", "s", k=8))
    sched.push(_job("edge1", "s", k=8))
    served_at: dict[str, int] = {}
    for n in range(1, 8):
        batch = sched.select(_prepare)
        sched.charge(1.0)
        for job, _ in batch:
            served_at.setdefault(job.device, n)
            if job.device in short:
                sched.push(_job(job.device, "s", k=2))
    assert served_at["edge0"] <= 2 and served_at["edge1"] <= 2, served_at


def test_a_device_that_had_the_worker_alone_does_not_pay_for_it_later() -> None:
    """The noisy-neighbour run: the good device generated alone for 30 s, went idle between two
    generations, and the flood arrived then. The flood must not start 30 s behind."""
    sched = Scheduler()
    for _ in range(30):  # 30 forwards of 1 s, alone
        sched.push(_job("good", "g"))
        sched.select(_prepare)
        sched.charge(1.0)
    sched.push(_job("flood", "f", k=65))  # arrives while good is idle
    sched.push(_job("good", "g2"))  # good's next generation
    leaders = []
    for _ in range(12):
        batch = sched.select(_prepare)
        leaders.append(batch[0][0].device)
        sched.charge(1.0)
        for job, _ in batch:
            sched.push(_job(job.device, job.sid, k=len(_.row.tokens)))
    assert leaders.count("good") >= 4, leaders  # the flood leads first for its credit only


def test_owed_names_answered_sessions_whose_device_is_behind() -> None:
    sched = Scheduler()
    sched.push(_job("calm", "c"))
    sched.push(_job("flood", "f", k=65))
    sched.select(_prepare)  # both in one forward? no: the flood's row is too wide to ride
    sched.charge(0.5)  # charged to the calm device alone
    assert sched.owed({"calm/c"}) == set()  # the flood (still queued, 0 s) is behind calm
    sched.select(_prepare)
    sched.charge(8.0)  # the flood's forward
    sched.push(_job("flood", "f", k=65))
    assert sched.owed({"calm/c"}) == {"calm/c"}  # calm is owed: worth a short wait
    assert sched.owed({"flood/f"}) == set()  # queued already


def test_a_device_keeps_to_its_share_while_another_has_work() -> None:
    sched = Scheduler(max_tokens=200, max_sessions=32)
    for i in range(10):
        sched.push(_job("flood", f"s{i}", k=65))  # max-length drafts
    sched.push(_job("calm", "c", k=3))
    batch = sched.select(_prepare)
    flood = sum(len(s.row.tokens) for j, s in batch if j.device == "flood")
    assert flood <= 100  # its share while calm has work (calm's row is too narrow to ride)
    assert "calm/c" in {j.key for j, _ in sched.select(_prepare)}  # and calm comes next
    alone = Scheduler(max_tokens=200, max_sessions=32)
    for i in range(10):
        alone.push(_job("flood", f"s{i}", k=65))
    assert len(alone.select(_prepare)) == 3  # alone, a device may fill the forward


def test_per_device_session_cap_evicts_the_devices_own(target) -> None:
    verifier = Verifier(target, max_sessions=8, max_sessions_per_device=2)

    def open_(device: str, sid: str) -> None:
        verifier.open(Open(sid=sid, epoch=0, ctx=(1, 2, 3), sampling=SamplingParams(), draft_model="", target_model="", max_new=4), device=device)  # fmt: skip

    open_("v", "live")
    for i in range(4):
        open_("x", f"s{i}")
    assert set(verifier.sessions) == {"v/live", "x/s2", "x/s3"}
    assert [key for key, _ in verifier.evicted] == ["x/s0", "x/s1"]  # for the worker to answer


def test_verdict_batch_fields_round_trip_and_are_optional() -> None:
    from shared.protocol import decode, encode

    full = Verdict(sid="s", epoch=0, seq=1, n_acc=2, next=7, eos=False, verify_ms=1.0, queue_ms=0.5, batch=4, batch_pos=13)  # fmt: skip
    assert decode(encode(full)) == full
    bare = Verdict(sid="s", epoch=0, seq=1, n_acc=2, next=7, eos=False, verify_ms=1.0, queue_ms=0.5)
    assert b"batch" not in encode(bare) and decode(encode(bare)).batch is None  # older peers' bytes
    part = Tokens(sid="s", epoch=0, seq=0, part=0, tok=(1,), done=True, eos=False, verify_ms=1.0, queue_ms=0.0, batch=2, batch_pos=2)  # fmt: skip
    assert decode(encode(part)) == part
    priced = dataclasses.replace(full, pos_ms=24)  # an int is taken, as a float
    assert priced.pos_ms == 24.0 and type(priced.pos_ms) is float and decode(encode(priced)) == priced
    assert b"pos_ms" not in encode(full) and decode(encode(full)).pos_ms is None
    assert decode(encode(dataclasses.replace(part, pos_ms=0.5))).pos_ms == 0.5
    for bad in (-1.0, math.nan, math.inf, True, "24"):
        with pytest.raises(ProtocolError, match="pos_ms"):
            dataclasses.replace(full, pos_ms=bad)
    wire = cbor2.loads(encode(priced))
    for bad in ("24", True, [24.0], None):  # on the wire: a number, or left off
        with pytest.raises(ProtocolError, match="pos_ms"):
            decode(cbor2.dumps({**wire, "pos_ms": bad}, canonical=True))


def test_verdict_row_med_round_trips_and_is_checked() -> None:
    from shared.protocol import MAX_GAMMA, decode, encode

    bare = Verdict(sid="s", epoch=0, seq=1, n_acc=2, next=7, eos=False, verify_ms=1.0, queue_ms=0.5, batch=4)
    said = dataclasses.replace(bare, row_med=4)
    assert decode(encode(said)) == said and decode(encode(said)).row_med == 4
    assert b"row_med" not in encode(bare) and decode(encode(bare)).row_med is None  # older workers' bytes
    for bad in (-1, MAX_GAMMA + 2, 3.0, True, "4"):
        with pytest.raises(ProtocolError, match="row_med"):
            dataclasses.replace(bare, row_med=bad)
    wire = cbor2.loads(encode(said))
    for bad in (-1, 4.5, "4", None, [4]):  # on the wire: an int, or left off
        with pytest.raises(ProtocolError, match="row_med"):
            decode(cbor2.dumps({**wire, "row_med": bad}, canonical=True))


def test_the_worker_says_the_median_draft_row_of_its_last_forwards() -> None:
    """``row_med``: the median positions of the last ``ROW_WINDOW`` draft rows, every session's;
    prefills and cloud-only decode rows are not blocks and do not count; a packed worker, whose
    rows cost their own positions, does not say it."""
    from cloud_worker.scheduler import ROW_WINDOW
    from shared.protocol import MAX_GAMMA

    def draft(device: str, sid: str, k: int, prefill: bool = False) -> Job:
        job = _job(device, sid, k, prefill=prefill)
        job.msg = Draft(sid=sid, epoch=0, seq=0, pos=5, tok=(1,) * (k - 1))
        return job

    sched = Scheduler(max_tokens=4096, max_sessions=64)
    assert sched.row_med is None
    for i, k in enumerate((3, 3, 3, 3, 3, 14, 14)):  # five sessions at γ 2, two at γ 13
        sched.push(draft(f"d{i}", "s", k))
    for i in range(8):  # cloud-only sessions' decode rows (counted, the median would be 1)
        cloud = _job(f"c{i}", "s", 1)
        cloud.msg = Decode(sid="s", epoch=0, seq=0, pos=5, n=16)
        sched.push(cloud)
    while len(sched):
        sched.select(_prepare)
    assert sched.row_med == 3  # not dragged up by the two long rows, nor down by the decode rows
    for i in range(8):  # opens' prefills (counted, the median would be 14)
        sched.push(_job(f"o{i}", "s", 64, prefill=True))
    while len(sched):
        sched.select(_prepare)
    assert sched.row_med == 3
    for r in range(ROW_WINDOW):  # the window moves: the fleet has gone to γ 4
        sched.push(draft(f"d{r % 7}", f"t{r}", 5))
        sched.select(_prepare)
    assert sched.row_med == 5
    sched.push(draft("d0", "u", 2))
    sched.push(draft("d1", "u", 8))
    sched.select(_prepare)
    assert sched.row_med == 5  # the lower median of the window: a row some session sent
    for i in range(20):  # one device floods blocks of 1: one vote, its latest row
        sched.push(draft("flood", f"f{i}", 2))
        sched.select(_prepare)
    assert sched.row_med == 5 and sum(1 for d, _ in sched._rows if d == "flood") == 20
    long = Scheduler(max_tokens=4096, max_sessions=64)  # uncached tokens + a block of MAX_GAMMA
    for i in range(3):
        job = _job(f"d{i}", "s", MAX_GAMMA + 9)
        job.msg = Draft(sid="s", epoch=0, seq=0, pos=5, tok=(1,) * MAX_GAMMA)
        long.push(job)
    long.select(_prepare)
    assert long.row_med == MAX_GAMMA + 1
    Verdict(
        sid="s", epoch=0, seq=1, n_acc=0, next=7, eos=False, verify_ms=1.0, queue_ms=0.5, row_med=long.row_med
    )
    packed = Scheduler(max_tokens=4096, max_sessions=64, packed=True)  # rows cost their own positions
    for i, k in enumerate((3, 3, 14)):
        packed.push(draft(f"d{i}", "s", k))
    packed.select(_prepare)
    assert packed.row_med is None


def test_the_worker_fits_what_one_more_position_costs_beside_the_rows() -> None:
    """Forwards of a busy worker: n rows of about k positions each, so positions grow with the
    rows. A line through (positions, time) alone charges the rows' cost to the positions (what an
    edge saw: 40-56 ms a position against 24, docs/BENCHMARKS.md §6.9); the worker's fit over
    rows and padded positions recovers the cost of a position."""
    rng = random.Random(7)
    sched = Scheduler()
    assert sched.pos_ms is None
    naive_x, naive_y = [], []
    for i in range(200):
        n = rng.randint(5, 8)
        k = rng.choice((2, 3, 3, 3, 3, 3, 3, 4))  # most sessions send about as many
        rows = [(f"d{j}", k) for j in range(n)]
        if i % 10 == 0:
            rows = [("opener", rng.randint(16, 64))]  # now and then one session's prefill
        seconds = 0.48 + 0.02 * len(rows) + 0.024 * sched.padded(rows) + rng.gauss(0.0, 0.05)
        sched.last_rows = rows
        sched.charge(seconds)
        if len(rows) > 1:
            naive_x.append(sum(k for _, k in rows))
            naive_y.append(seconds * 1e3)
    assert sched.pos_ms == pytest.approx(24.0, rel=0.1)
    naive = statistics.linear_regression(naive_x, naive_y).slope
    assert naive > sched.pos_ms + 2.0  # the positions alone also carry the rows' 20 ms each
    same = Scheduler()  # rows that never vary: the slope still comes from the positions
    for i in range(40):
        same.last_rows = [(f"d{j}", 2 + i % 3) for j in range(8)]
        same.charge(0.5 + 0.024 * same.padded(same.last_rows))
    assert same.pos_ms == pytest.approx(24.0, rel=1e-3)
    flat = Scheduler()  # one shape only: nothing to fit a slope on
    for _ in range(40):
        flat.last_rows = [("d", 3), ("e", 3)]
        flat.charge(0.7)
    assert flat.pos_ms is None


def _arriving(device: str, sid: str, at: float) -> Job:
    job = _job(device, sid)
    job.received_at = at
    return job


def test_rejoining_names_the_sessions_expected_back_within_half_a_forward() -> None:
    """The rejoin window "auto": each session's answer-to-request gap is learned from its own
    rounds; after a forward the worker waits for the answered sessions expected back within half
    a mean forward (a drafting edge), for as long as the slowest of them, and never for a far one
    or one it has not seen come back yet."""
    sched = Scheduler()
    sched.push(_job("x", "x"))
    sched.select(_prepare)
    sched.charge(1.0)  # a forward takes 1 s: sessions back within 0.5 s are waited for
    t = 100.0
    for _ in range(5):  # near: back 200 ms after each answer; far: 900 ms
        sched.answered({"near/n", "far/f", "gone/g"}, t)
        sched.push(_arriving("near", "n", t + 0.2))
        sched.push(_arriving("far", "f", t + 0.9))
        for key in ("near/n", "far/f"):
            sched.drop(key)
        t += 2.0
    assert sched.gap_s("near/n") == pytest.approx(0.2) and sched.gap_s("far/f") == pytest.approx(0.9)
    assert sched.gap_s("gone/g") is None
    back, wait = sched.rejoining({"near/n", "far/f", "gone/g", "new/x"})
    assert back == {"near/n"}
    assert wait == pytest.approx(0.2, abs=0.01)  # as long as expected, not the whole half forward
    sched.push(_job("near", "n"))
    assert sched.rejoining({"near/n"}) == (set(), 0.0)  # already queued: nothing to wait for

    sched.answered({"near/n"}, t)  # a session whose gaps vary is expected later (mean + 2 deviations)
    sched.drop("near/n")
    sched.push(_arriving("near", "n", t + 0.45))
    assert 0.25 < sched.gap_s("near/n") <= 0.5
    sched.drop("near/n")
    for _ in range(3):  # ... and waited for while it usually comes back in time, at most half a forward
        sched.answered({"near/n"}, t)
        sched.push(_arriving("near", "n", t + 0.7))
        sched.drop("near/n")
    assert sched.gap_s("near/n") > 0.5
    assert sched.rejoining({"near/n"}) == ({"near/n"}, pytest.approx(0.5))


def test_a_session_just_opened_is_expected_back_as_its_device_came_back() -> None:
    """An edge's next generation is a new session: the worker has never seen it come back, but
    its device's earlier sessions did. After the open's answer, its first draft is expected as
    the device's drafts were (the fleet's p99 round was a first draft that came in just after a
    forward began and waited it out); a new session of a device never seen back is not waited
    for, and a device's slow sessions make its new ones not waited for either."""
    sched = Scheduler()
    sched.push(_job("x", "x"))
    sched.select(_prepare)
    sched.charge(1.0)  # a forward takes 1 s: sessions back within 0.5 s are waited for
    t = 100.0
    for _ in range(4):  # device "quick": its session g1 back 50 ms after each answer; "slow": 900 ms
        sched.answered({"quick/g1", "slow/g1"}, t)
        sched.push(_arriving("quick", "g1", t + 0.05))
        sched.push(_arriving("slow", "g1", t + 0.9))
        sched.drop("quick/g1")
        sched.drop("slow/g1")
        t += 2.0
    assert sched.gap_s("quick/g2") is None  # g2: the next generation, just opened and answered
    back, wait = sched.rejoining({"quick/g2", "slow/g2", "fresh/g1"})
    assert back == {"quick/g2"}
    assert wait == pytest.approx(0.05, abs=0.01)
    # once g2 has come back itself, its own gaps decide (here: late, so no longer waited for)
    for _ in range(6):
        sched.answered({"quick/g2"}, t)
        sched.push(_arriving("quick", "g2", t + 0.8))
        sched.drop("quick/g2")
        t += 2.0
    assert sched.rejoining({"quick/g2"}) == (set(), 0.0)
    # ... and the device's expectation for its next new session moved with them
    assert sched.rejoining({"quick/g3"}) == (set(), 0.0)


def test_waits_in_vain_are_charged_and_bound_what_a_device_can_cost_others() -> None:
    """An untrusted device that comes back quickly for a while and then late, over and over,
    would make the worker wait up to half a forward per forward for nothing. Each wait that ends
    without the session is charged to its device's model time; once that device is more than
    ``credit`` (a few forwards) ahead of the devices with work, it is not waited for at all."""
    sched = Scheduler()
    sched.push(_job("x", "x"))
    sched.select(_prepare)
    sched.charge(1.0)  # a mean forward of 1 s: credit = 4 s
    t = 100.0
    for _ in range(3):  # both devices have come back 100 ms after each answer
        sched.answered({"liar/l", "honest/h"}, t)
        sched.push(_arriving("liar", "l", t + 0.1))
        sched.push(_arriving("honest", "h", t + 0.1))
        sched.drop("liar/l")
        sched.drop("honest/h")
        t += 2.0
    sched.push(_job("honest", "h2"))  # the honest device has work queued
    assert sched.rejoining({"liar/l", "honest/h"})[0] == {"liar/l", "honest/h"}
    before = sched.vtime.get("honest", 0.0)
    waits = 0
    while "liar/l" in sched.rejoining({"liar/l"})[0]:
        sched.charge_wait({"liar/l"}, 0.15)  # it did not come: the worker waited 150 ms for nothing
        waits += 1
        assert waits < 100
    # the liar stopped being waited for after about credit / wait ≈ 4 s / 0.15 s forwards' worth
    assert 20 <= waits <= 40, waits
    assert sched.vtime.get("honest", 0.0) == before  # nothing charged to the honest device
    assert sched.rejoining({"honest/h"})[0] == {"honest/h"}  # which is still waited for
    sched.charge_wait(set(), 1.0)  # nothing missing: nothing charged
    sched.charge_wait({"honest/h"}, 0.0)
    assert sched.vtime.get("honest", 0.0) == before


def test_a_continuing_step_is_not_a_return() -> None:
    """A decode's or prefill's next step goes back to the front of its queue at once: it is no
    request from the edge and must not teach the session a gap of zero."""
    sched = Scheduler()
    sched.answered({"a/s"}, 10.0)
    sched.push(_arriving("a", "s", 10.0), front=True)
    assert sched.gap_s("a/s") is None
    sched.push(_arriving("a", "s", 10.3))
    assert sched.gap_s("a/s") == pytest.approx(0.3)


# ---------------------------------------------------------------- the width rule "cost"
def _cpu_cost(positions: int) -> float:
    return 0.45 + 0.03 * positions  # the demo target on one CPU core, roughly (as _simulate)


def _cpu_batched_cost(positions: int) -> float:
    return 1.5 + 0.012 * positions  # a batched forward on a CPU core (8 x 1: 1.6 s, 8 x 3: 1.8 s; issue 9)


def _gpu_cost(positions: int) -> float:
    return 0.022 + 0.00001 * positions  # flat: launch-bound (docs/BENCHMARKS.md §4.8)


def _learned(cost, *, upto: int = 512, **kw) -> Scheduler:
    sched = Scheduler(width_rule="cost", **kw)
    p = 2
    while p <= upto:  # the forwards a worker has run, one per bucket
        sched.cost.add(p, cost(p))
        p = p * 5 // 4 + 1
    return sched


def test_forward_cost_reads_its_measurements_and_says_nothing_it_cannot_know() -> None:
    from cloud_worker.scheduler import ForwardCost

    fc = ForwardCost()
    assert fc.seconds(8) is None  # nothing measured
    fc.add(8, 1.0)
    assert fc.seconds(8) is None and fc.padding_pays(2, 4, 8) is None  # one bucket is no curve
    fc.add(16, 2.0)
    assert fc.seconds(8) == 1.0 and fc.seconds(16) == 2.0
    assert fc.seconds(12) == pytest.approx(1.5)  # between two buckets: along the line
    assert fc.seconds(24) == pytest.approx(3.0, rel=0.05)  # past the last: the last segment extended
    assert fc.seconds(4) == 1.0  # below the first: the first
    assert fc.seconds(40) is None  # more than twice past the widest measured: a guess, not said
    fc.add(12, 5.0)  # a noisy forward: the curve never falls with more positions
    assert fc.seconds(16) >= fc.seconds(12) >= fc.seconds(8) == 1.0
    assert fc.seconds(16) < 5.0  # and one slow forward does not set every wider bucket to it
    for _ in range(30):  # and a bucket's mean follows its newer forwards
        fc.add(12, 1.5)
    assert fc.seconds(12) == pytest.approx(1.5, abs=0.01)
    assert ForwardCost.bucket(16) == 16 and ForwardCost.bucket(1000) < 1000 < ForwardCost.bucket(1100) * 1.1


def test_cost_rule_on_a_flat_forward_lets_a_prefill_ride_whole_and_mixed_rows_ride_together() -> None:
    """On a GPU-shaped cost (flat in positions) the CPU's ratio rule would cut an open's prefill
    to the decode rows' width (several forwards before its first token) and keep a 2-position
    block out of a 7-position forward. The measured costs say the padding is free."""
    ratio = Scheduler(max_tokens=512, max_sessions=16, width_rule="ratio")
    learned = _learned(_gpu_cost, max_tokens=512, max_sessions=16)
    for sched in (ratio, learned):
        for i in range(8):
            sched.push(_job(f"d{i}", "s", k=1))  # cloud-only decode steps
        sched.push(_job("o", "open", k=45, prefill=True))
    assert [len(s.row.tokens) for _, s in ratio.select(_prepare)] == [1] * 8 + [1]
    assert [len(s.row.tokens) for _, s in learned.select(_prepare)] == [1] * 8 + [45]
    for sched in (ratio, learned):
        for device, k in (("a", 3), ("b", 5), ("c", 2), ("d", 7), ("e", 4), ("f", 1)):
            sched.push(_job(device, "m", k=k))
    assert [len(s.row.tokens) for _, s in ratio.select(_prepare)] == [3, 5, 2, 4]
    assert [len(s.row.tokens) for _, s in learned.select(_prepare)] == [3, 5, 2, 7, 4, 1]


def test_cost_rule_on_a_climbing_forward_keeps_padding_within_its_bound() -> None:
    """On a CPU-shaped cost (every padded position costs) the rule keeps a narrow row out of a
    wide forward, as the ratio rule does, and a prefill beside others takes the widest chunk
    whose padding costs at most PAD_WASTE, against its rows' real positions and against the
    forward before it widened it."""
    from cloud_worker.scheduler import PAD_WASTE

    sched = _learned(_cpu_batched_cost, max_tokens=512, max_sessions=8)
    sched.push(_job("calm", "c", k=3))
    sched.push(_job("flood", "f", k=65))
    assert [j.key for j, _ in sched.select(_prepare)] == ["calm/c"]
    assert [j.key for j, _ in sched.select(_prepare)] == ["flood/f"]
    for i in range(3):
        sched.push(_job(f"d{i}", "s", k=3))
    sched.push(_job("o", "open", k=300, prefill=True))
    batch = sched.select(_prepare)
    rows = [len(s.row.tokens) for _, s in batch]
    chunk = rows[-1]
    assert rows[:-1] == [3] * 3 and 3 < chunk < 300

    def bounded(c: int) -> bool:  # padding within PAD_WASTE of the real positions and of the forward before
        return _cpu_batched_cost(4 * c) <= (1 + PAD_WASTE) * min(
            _cpu_batched_cost(9 + c), _cpu_batched_cost(9)
        )

    assert bounded(chunk - 1) and not bounded(chunk + 2)  # the widest chunk within the bound (buckets aside)


def test_cost_rule_keeps_the_fair_share_and_the_noisy_neighbour_bound() -> None:
    """Free padding does not let a device ahead in model time lengthen another's forward, and
    the flood of long drafts still gets its share of model time only (issue 10)."""
    sched = _learned(_gpu_cost, max_tokens=200, max_sessions=32)
    for i in range(10):
        sched.push(_job("flood", f"s{i}", k=65))
    sched.push(_job("calm", "c", k=3))
    batch = sched.select(_prepare)
    assert sum(len(s.row.tokens) for j, s in batch if j.device == "flood") <= 100
    solo = _simulate(_learned(_cpu_cost), seconds=100, flood_k=65, flood_sessions=0)["calm"]
    shared = _simulate(_learned(_cpu_cost), seconds=100, flood_k=65, flood_sessions=4)
    assert shared["calm"] >= 0.4 * solo, (shared, solo)


def test_the_worker_learns_its_forward_cost_from_batched_forwards_only() -> None:
    sched = Scheduler()
    for device in ("a", "b"):
        sched.push(_job(device, "s", k=3))
    sched.select(_prepare)
    sched.charge(1.0)  # two rows of 3: 6 padded positions
    sched.push(_job("a", "s", k=4))
    sched.select(_prepare)
    sched.charge(9.0)  # one row runs unpadded, another path: not a batched forward's cost
    for device in ("a", "b"):
        sched.push(_job(device, "s", k=5))
    sched.select(_prepare)
    sched.charge(3.0, measured=False)  # a forward that failed measured nothing
    assert sched.cost._mean == {6: 1.0}
    with pytest.raises(ValueError, match="width_rule"):
        Scheduler(width_rule="wide")
