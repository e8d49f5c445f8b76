"""The target's linear layers through oneDNN (shared/cpu_linear.py, the worker's ``cpu_linear``):
the same logits up to float rounding, the same greedy verdicts, the batched path, and the caches
after a verify, on real tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import DynamicCache

from cloud_worker.batching import Row, forward_rows
from shared.cpu_linear import (
    OneDnnLinear,
    cpu_computes_bf16,
    dtype_advice,
    onednn_available,
    use_onednn_linears,
)
from shared.kvcache import forward_cached
from shared.models import load_model
from tests.tiny import make_tiny_model_dir

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch is built without oneDNN")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("onednn") / "m", arch="qwen2", seed=4)


def test_layer_equals_nn_linear_for_every_row_count_and_layout() -> None:
    torch.manual_seed(0)
    for bias in (True, False):
        lin = nn.Linear(48, 40, bias=bias)
        packed = OneDnnLinear(lin)
        assert packed.weight.is_mkldnn and tuple(packed.weight.shape) == (40, 48)
        with torch.inference_mode():
            for shape in ((1, 48), (3, 48), (2, 5, 48), (1, 1, 48)):
                x = torch.randn(*shape)
                torch.testing.assert_close(packed(x), lin(x), rtol=1e-5, atol=1e-5)
            x = torch.randn(2, 6, 48)[:, 1::2, :]  # a strided slice, as logits_to_keep takes
            torch.testing.assert_close(packed(x), lin(x), rtol=1e-5, atol=1e-5)


def test_swaps_only_fp32_cpu_linears() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 4)), nn.Linear(4, 4).half())
    assert use_onednn_linears(model) == 2
    assert isinstance(model[0], OneDnnLinear) and isinstance(model[2][0], OneDnnLinear)
    assert type(model[3]) is nn.Linear  # half precision: left alone
    assert use_onednn_linears(model) == 0  # nothing left to swap


def test_model_logits_greedy_and_batched_rows_match(tiny_dir) -> None:
    """A real (tiny) target: logits within float rounding of torch's own kernels, the same greedy
    tokens over a long cached generation, and the worker's padded batched forward agreeing with
    single-session forwards on the swapped model."""
    ref, fast = load_model(str(tiny_dir)), load_model(str(tiny_dir))
    n = use_onednn_linears(fast.model)
    assert n == sum(isinstance(m, nn.Linear) for m in ref.model.modules()) and n > 0
    assert fast.vocab_size == ref.vocab_size
    ids = fast.tokenizer("The edge device runs the draft model")["input_ids"]
    with torch.inference_mode():
        a = ref.model(torch.tensor([ids])).logits
        b = fast.model(torch.tensor([ids])).logits
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        # greedy decoding with caches: the same tokens, position by position
        toks = {}
        for name, m in (("ref", ref.model), ("fast", fast.model)):
            cache, seq = DynamicCache(), list(ids)
            out = forward_cached(m, seq, cache)
            for _ in range(24):
                seq.append(int(out[-1].argmax()))
                out = forward_cached(m, seq[-1:], cache)
            toks[name] = seq
        assert toks["fast"] == toks["ref"]
        # the batched path: two sessions of different lengths, 3 new positions each
        caches, lens = [], [len(ids), len(ids) - 3]
        for n_ctx in lens:
            c = DynamicCache()
            forward_cached(fast.model, ids[:n_ctx], c)
            caches.append(c)
        news = [[5, 9, 11], [7, 2, 3]]
        batched = forward_rows(
            fast.model,
            [Row(c, n_, list(t)) for c, n_, t in zip(caches, lens, news, strict=True)],
            fast.vocab_size,
        )
        for i, n_ctx in enumerate(lens):
            single = fast.model(torch.tensor([ids[:n_ctx] + news[i]])).logits[0, -3:, : fast.vocab_size]
            torch.testing.assert_close(batched[i], single, rtol=1e-4, atol=1e-4)


def _mapped(folder: Path) -> list[str]:
    real = str(folder.resolve())
    with open("/proc/self/maps") as maps:
        return [line for line in maps if real in line and ".safetensors" in line]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc (Linux)")
def test_the_checkpoint_mapping_is_let_go(tiny_dir, tmp_path) -> None:
    """transformers keeps a safetensors checkpoint mapped, its tensors views of the mapping;
    after the swap nothing of the model may point into it, or every page read while packing
    stays resident beside the packed copy (the demo target's worker held 12.3 GB, not 7.2)."""
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny_dir, folder)  # a path no other test's model maps
    loaded = load_model(str(folder))
    if not _mapped(folder):
        pytest.skip("this transformers copies the checkpoint instead of mapping it")
    use_onednn_linears(loaded.model)
    assert _mapped(folder) == []
    with torch.inference_mode():  # and the model still runs
        assert loaded.model(torch.tensor([[1, 2, 3]])).logits.shape[-1] == loaded.vocab_size


def test_the_worker_says_when_its_dtype_does_not_suit_the_cpu() -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    hint = dtype_advice(cpu, torch.float32, native_bf16=True)
    assert hint is not None and "dtype = bfloat16" in hint
    slow = dtype_advice(cpu, torch.bfloat16, native_bf16=False)
    assert slow is not None and "emulated" in slow and "float32" in slow
    assert dtype_advice(cpu, torch.float32, native_bf16=False) is None  # fp32 is right there
    assert dtype_advice(cpu, torch.bfloat16, native_bf16=True) is None
    assert dtype_advice(gpu, torch.float32, native_bf16=True) is None  # a GPU's dtype is its own matter
    assert isinstance(cpu_computes_bf16(), bool)
