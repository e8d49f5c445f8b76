"""Shape-invariant forwards (cloud_worker/invariant.py): a position's logits are the same bits
whatever else its forward holds, so a bf16 worker's verdicts do not depend on its load."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from cloud_worker import invariant
from cloud_worker.batching import Row, _Segments, forward_packed, forward_rows
from cloud_worker.invariant import (
    RowChunkedLinear,
    RowRule,
    invariant_attention,
    make_invariant,
    probe_rows,
    self_check,
)
from shared.kvcache import forward_cached
from shared.models import LoadedModel
from shared.sampling import SamplingParams
from tests.tiny import make_tokenizer
from tests.verdicts import assert_one_forward_answers_as_alone


class _Counting(nn.Module):
    """A linear layer that records the row counts it is called with."""

    def __init__(self, rows_seen: list[int]) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 5)
        self.in_features, self.out_features = 8, 5
        self.rows_seen = rows_seen

    def forward(self, x):
        self.rows_seen.append(x.reshape(-1, 8).shape[0])
        return self.lin(x)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9, 13])
def test_chunked_linear_runs_only_row_counts_in_its_range_and_computes_the_same(m) -> None:
    seen: list[int] = []
    layer = RowChunkedLinear(_Counting(seen), RowRule(2, 4))
    x = torch.randn(1, m, 8)
    out = layer(x)
    assert out.shape == (1, m, 5)
    assert seen and all(2 <= n <= 4 for n in seen)
    torch.testing.assert_close(out, layer.inner.lin(x))


class _Quirky(nn.Module):
    """A linear layer whose rounding depends on the row count: one more ulp-sized term for a
    lone row (when ``lone``) and for products of more than ``wide`` rows."""

    def __init__(self, *, lone: bool, wide: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 8), requires_grad=False)
        self.in_features, self.out_features, self.lone, self.wide = 8, 6, lone, wide

    def forward(self, x):
        m = x.reshape(-1, 8).shape[0]
        y = F.linear(x.double(), self.weight.double()).to(x.dtype)  # exact at every row count
        return y + 1e-3 if (m == 1 and self.lone) or m > self.wide else y


def test_probe_finds_the_row_counts_where_every_row_keeps_its_bits() -> None:
    assert probe_rows(_Quirky(lone=True, wide=32)) == RowRule(2, 32)
    assert probe_rows(_Quirky(lone=False, wide=7)) == RowRule(1, 7)
    assert probe_rows(_Quirky(lone=False, wide=1000)) == RowRule(1, invariant.MAX_PROBED_ROWS)
    assert probe_rows(_Quirky(lone=False, wide=2)) is None  # 3 rows already differ: no range worth using


def _reference_attention(q, k, v, seen):
    """sdpa over repeated key heads with a boolean mask (True = seen), ``[B, q, H, D]``."""
    g = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    return F.scaled_dot_product_attention(q, kk, vv, attn_mask=seen).transpose(1, 2)


def test_invariant_attention_computes_attention() -> None:
    gen = torch.Generator().manual_seed(0)
    b, h, hkv, q, n, d = 3, 6, 2, 4, 11, 16
    qs, ks, vs = (torch.randn(b, hh, ln, d, generator=gen) for hh, ln in ((h, q), (hkv, n), (hkv, n)))
    seen = torch.rand(b, 1, q, n, generator=gen) > 0.3
    seen[..., -1] = True  # every query sees one key at least
    additive = torch.zeros(seen.shape).masked_fill(~seen, torch.finfo(torch.float32).min)
    want = _reference_attention(qs, ks, vs, seen)
    for mask in (seen, additive):
        got, _ = invariant_attention(None, qs, ks, vs, mask, scaling=d**-0.5)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # packed: rows' new tokens end to end after their caches; each row sees its own only
    rows = ((0, 3, 0, 2), (3, 5, 2, 1))  # (first cached, cached, first new, new)
    query = torch.randn(1, h, 3, d, generator=gen)
    key, value = torch.randn(1, hkv, 11, d, generator=gen), torch.randn(1, hkv, 11, d, generator=gen)
    got, _ = invariant_attention(
        None, query, key, value, None, scaling=d**-0.5, packed_rows=_Segments(rows, 8)
    )
    for at, n_, s, k in rows:
        kr = torch.cat([key[:, :, at : at + n_], key[:, :, 8 + s : 8 + s + k]], dim=2)
        vr = torch.cat([value[:, :, at : at + n_], value[:, :, 8 + s : 8 + s + k]], dim=2)
        t = torch.arange(k)
        causal = torch.cat([torch.ones(k, n_, dtype=torch.bool), t[None, :] <= t[:, None]], dim=1)[None, None]
        torch.testing.assert_close(
            got[:, s : s + k], _reference_attention(query[:, :, s : s + k], kr, vr, causal)
        )


def _wide_bf16_target() -> LoadedModel:
    """A 2-layer bf16 model with the demo target's widths (1536 hidden, 8960 MLP, 12 query and 2
    key heads of 128), random weights: wide enough that the CPU's kernels take shape-dependent
    paths, which tiny widths never reach."""
    tokenizer = make_tokenizer()
    torch.manual_seed(5)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=2,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(config).to(torch.bfloat16).eval()
    model.config._attn_implementation = "sdpa"
    return LoadedModel(
        model, tokenizer, name="wide", source="memory", device=torch.device("cpu"), dtype=torch.bfloat16
    )


@pytest.fixture(scope="module")
def wide():
    plain = _wide_bf16_target()
    before = self_check(plain.model, plain.vocab_size)
    fixed = _wide_bf16_target()
    rule = make_invariant(fixed.model)
    if rule is None:
        pytest.skip("this machine's bf16 linear kernels have no shape-invariant row range")
    return plain, fixed, before, rule


def test_plain_bf16_forwards_depend_on_their_shape_here(wide) -> None:
    """The other tests' teeth: without the change this machine's bf16 forwards differ by shape."""
    _, _, before, _ = wide
    if before == 0.0:
        pytest.skip("this machine's bf16 kernels give the same bits at every shape already")
    assert before > 0.0


def test_invariant_bf16_forwards_give_a_position_the_same_logits_at_every_shape(wide) -> None:
    _, fixed, _, rule = wide
    assert rule.hi >= 2
    assert all(
        isinstance(m, RowChunkedLinear)
        for m in (fixed.model.lm_head, fixed.model.model.layers[0].mlp.down_proj)
    )
    assert self_check(fixed.model, fixed.vocab_size, prefix=9, tokens=7, seed=3) == 0.0


def _cache(model, tokens):
    cache = DynamicCache()
    with torch.inference_mode():
        forward_cached(model, tokens, cache)
    return cache


@pytest.mark.parametrize("forward", [forward_rows, forward_packed], ids=["padded", "packed"])
def test_invariant_batched_rows_equal_single_forwards_bit_for_bit(wide, forward) -> None:
    """Rows of different caches and widths, and a prefill longer than a chunk, in one forward:
    each row's logits are the bits of its unbatched forward, and its cache continues the same."""
    _, fixed, _, rule = wide
    rng, v = random.Random(1), fixed.vocab_size
    specs = [(rng.sample(range(v), 12), rng.sample(range(v), 3)), (rng.sample(range(v), 5), [7]), (rng.sample(range(v), 2), rng.sample(range(v), rule.hi + 3))]  # fmt: skip
    rows = [Row(_cache(fixed.model, past), len(past), new) for past, new in specs]
    got = forward(fixed.model, rows, v)
    for (past, new), row, logits in zip(specs, rows, got, strict=True):
        alone = Row(_cache(fixed.model, past), len(past), new)
        (want,) = forward_rows(fixed.model, [alone], v)
        assert torch.equal(logits, want)
        with torch.inference_mode():  # the row's cache continues with the same bits as the lone one's
            assert torch.equal(
                forward_cached(fixed.model, [3], row.cache), forward_cached(fixed.model, [3], alone.cache)
            )
        one = [forward_rows(fixed.model, [Row(_cache(fixed.model, past + new[:j]), len(past) + j, [new[j]])], v)[0] for j in range(len(new))]  # fmt: skip
        assert torch.equal(torch.cat(one), want)  # a verify's positions = one step each (cloud-only)


@pytest.mark.parametrize(
    "params", [SamplingParams(), SamplingParams(temperature=0.8, seed=4)], ids=["greedy", "seeded"]
)
def test_invariant_verifier_gives_batched_sessions_the_answers_they_get_alone(wide, params) -> None:
    assert_one_forward_answers_as_alone(wide[1], params)


def test_the_worker_turns_it_on_for_half_precision_on_a_cpu_only_by_default() -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert invariant.wanted("auto", cpu, torch.bfloat16) and invariant.wanted("auto", cpu, torch.float16)
    assert not invariant.wanted("auto", cpu, torch.float32) and not invariant.wanted(
        "auto", gpu, torch.bfloat16
    )
    assert invariant.wanted("on", cpu, torch.float32) and not invariant.wanted("off", cpu, torch.bfloat16)


def test_apply_says_what_it_measured(wide) -> None:
    line = invariant.apply(_wide_bf16_target().model, wide[1].vocab_size)
    assert "bit-identical" in line and "attention in float64" in line
    quirky = nn.Sequential(_Quirky(lone=False, wide=2))
    quirky.config = dataclasses.make_dataclass("C", [("_attn_implementation", str)])("sdpa")
    assert "kept as they are" in invariant.apply(quirky, 10)
    assert quirky.config._attn_implementation == "sdpa" and isinstance(quirky[0], _Quirky)


def test_verify_cost_measures_invariant_forwards_beside_the_plain_ones(tmp_path, capsys) -> None:
    import json

    from bench import verify_cost
    from tests.tiny import make_tiny_model_dir

    folder = make_tiny_model_dir(tmp_path / "t", arch="qwen2")
    out = tmp_path / "cost.json"
    assert verify_cost.main(["--model", str(folder), "--batches", "1,2", "--positions", "1,3", "--repeat", "1", "--cache-len", "8", "--cpu-linear", "torch,invariant", "--dtype", "bfloat16", "--json", str(out)]) == 0  # fmt: skip
    assert "invariant: invariant forwards: linear layers on rows" in capsys.readouterr().out
    kernels = json.loads(out.read_text())["kernels"]
    assert set(kernels) == {"torch", "invariant"} and all(len(k["rows"]) == 4 for k in kernels.values())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_invariant_attention_inside_a_model_computes_what_sdpa_does(tmp_path, arch) -> None:
    """The float64 attention gets the model's causal and padding masks right: a prefill, steps and
    a padded batch give sdpa's logits (fp32, to rounding)."""
    from shared.models import load_model
    from tests.tiny import make_tiny_model_dir

    folder = make_tiny_model_dir(tmp_path / "t", arch=arch, seed=3)
    plain, inv = load_model(str(folder)), load_model(str(folder))
    inv.model.config._attn_implementation = invariant.INVARIANT_ATTENTION
    rng, v = random.Random(2), plain.vocab_size
    specs = [(rng.sample(range(v), 9), rng.sample(range(v), 4)), (rng.sample(range(v), 3), [5])]
    for forward in (forward_rows, forward_packed):
        want = forward(plain.model, [Row(_cache(plain.model, p), len(p), n) for p, n in specs], v)
        got = forward(inv.model, [Row(_cache(inv.model, p), len(p), n) for p, n in specs], v)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("extra, said", [(["--dtype", "bfloat16"], True), (["--dtype", "bfloat16", "--invariant", "off"], False), (["--dtype", "float32"], False)])  # fmt: skip
def test_the_worker_makes_a_bf16_target_invariant_and_logs_its_self_check(own_dev_broker, uid, tmp_path, extra, said) -> None:  # fmt: skip
    """A real ``spececd-worker``: `invariant = auto` turns it on for bf16 on a CPU and logs what
    the self-check measured; `off` and fp32 leave the kernels alone."""
    from tests.tiny import make_tiny_model_dir
    from tests.workers import start_worker_process

    target = make_tiny_model_dir(tmp_path / "t", arch="qwen2", seed=2)
    wp = start_worker_process(own_dev_broker.config(), worker_id=f"w-{uid}", target=str(target), workdir=tmp_path, extra=extra)  # fmt: skip
    try:
        line = [x for x in wp.output().splitlines() if "target: invariant forwards:" in x]
        assert bool(line) == said, wp.output()
        if said:
            assert "self-check: a position's logits are bit-identical" in line[0]
    finally:
        wp.kill()
