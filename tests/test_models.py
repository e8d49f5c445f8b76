"""Model loading: tiny random Llama/Qwen2 folders, a tiny GGUF round trip, errors, tokenizer checks."""

from __future__ import annotations

import json
import logging
import sys

import pytest
import torch

from shared.errors import ModelLoadError, TokenizerMismatchError
from shared.models import (
    CONVERTED_MARKER,
    LoadedModel,
    check_tokenizers_compatible,
    load_model,
    resolve_device_dtype,
)
from tests.tiny import make_tiny_model_dir
from tests.tiny_gguf import write_tiny_gguf


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "llama": make_tiny_model_dir(root / "llama", arch="llama", seed=1),
        "qwen2": make_tiny_model_dir(root / "qwen2", arch="qwen2", seed=2),
        "other_vocab": make_tiny_model_dir(root / "other", arch="llama", tokenizer_variant=1),
    }


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_folder_loads_on_cpu_fp32_with_auto(tiny_dirs, arch):
    lm = load_model(tiny_dirs[arch])
    assert isinstance(lm, LoadedModel)
    assert lm.device == torch.device("cpu") and lm.dtype == torch.float32
    assert next(lm.model.parameters()).dtype == torch.float32
    assert not lm.model.training
    assert lm.name == arch and lm.source == str(tiny_dirs[arch])
    assert lm.vocab_size == 320 == len(lm.tokenizer)
    assert lm.eos_token_ids == frozenset({lm.tokenizer.eos_token_id})
    logits = lm.model(torch.tensor([[1, 2, 3]])).logits  # [1, 3, V]
    assert logits.shape == (1, 3, lm.vocab_size)


def test_explicit_dtype_and_device_override(tiny_dirs):
    lm = load_model(str(tiny_dirs["llama"]), device="cpu", dtype="bfloat16")
    assert lm.dtype == torch.bfloat16 and next(lm.model.parameters()).dtype == torch.bfloat16
    assert resolve_device_dtype("cpu", "fp16") == (torch.device("cpu"), torch.float16)


@pytest.mark.parametrize(
    ("device", "dtype", "needle"),
    [("tpu", "auto", "auto, cpu, cuda"), ("cpu", "int8", "float32"), ("cuda:x", "auto", "cuda:N")],
)
def test_bad_device_or_dtype_lists_allowed_values(tiny_dirs, device, dtype, needle):
    with pytest.raises(ValueError, match=needle):
        load_model(tiny_dirs["llama"], device=device, dtype=dtype)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu_says_use_cpu(tiny_dirs):
    with pytest.raises(ValueError, match="device='cpu'"):
        load_model(tiny_dirs["llama"], device="cuda")


def test_eos_ids_merge_generation_config_lists(tiny_dirs):
    lm = load_model(tiny_dirs["qwen2"])
    lm.model.generation_config.eos_token_id = [0, 7]
    assert lm.eos_token_ids == frozenset({0, 7})


@pytest.mark.parametrize("spec", ["/nonexistent/model-dir", "./missing.gguf", "no such thing"])
def test_missing_path_is_a_model_load_error_with_what_to_do(spec):
    with pytest.raises(ModelLoadError) as err:
        load_model(spec)
    assert "no such file or folder" in str(err.value) and "hub id" in str(err.value)
    assert err.value.spec == spec and err.value.tried


def test_folder_without_config_and_wrong_file_type(tmp_path):
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_model(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"\.gguf"):
        load_model(tmp_path / "weights.bin")


def test_broken_folder_wraps_the_library_error(tmp_path, tiny_dirs):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelLoadError, match="transformers failed") as err:
        load_model(tmp_path)
    assert err.value.__cause__ is not None


def test_hub_id_not_in_cache_offline_says_how_to_get_it(tmp_path):
    with pytest.raises(ModelLoadError) as err:
        load_model("someorg/not-a-cached-model", cache_dir=tmp_path)
    msg = str(err.value)
    assert "local Hugging Face cache" in msg and "Hugging Face hub" not in err.value.tried
    # it says how to allow the download, rather than blaming the network (issue 11 item 6)
    assert "--allow-download" in msg and "SPECECD_ALLOW_DOWNLOAD=1" in msg and "unreachable" not in msg
    assert "spececd-models fetch-demo" in msg


def test_gguf_without_gguf_package_says_pip_install_gguf(tmp_path, monkeypatch):
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` raise ImportError
    with pytest.raises(ModelLoadError, match="pip install gguf") as err:
        load_model(gguf_file)
    assert isinstance(err.value.__cause__, ImportError)


def test_tiny_gguf_round_trip_converts_once(tmp_path, tiny_dirs, monkeypatch, caplog):
    monkeypatch.setenv("SPECECD_CACHE", str(tmp_path / "cache"))
    gguf_file = write_tiny_gguf(tiny_dirs["qwen2"], tmp_path / "tiny.gguf")
    with caplog.at_level(logging.INFO, logger="shared.models"):
        lm = load_model(gguf_file)
    folder = tmp_path / "cache" / "converted"
    (converted,) = folder.iterdir()
    assert lm.source == str(converted) and (converted / CONVERTED_MARKER).is_file()
    assert "config.json" in {p.name for p in converted.iterdir()}
    assert "quantization_config" not in json.loads((converted / "config.json").read_text())
    assert any("converting GGUF" in r.message for r in caplog.records)
    ref = load_model(tiny_dirs["qwen2"])
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    assert torch.equal(lm.model(ids).logits, ref.model(ids).logits)
    text = "def add(a, b):\n    return a + b"
    assert lm.tokenizer(text)["input_ids"] == ref.tokenizer(text)["input_ids"]
    assert check_tokenizers_compatible(lm, ref) == 320
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="shared.models"):
        load_model(gguf_file)
    assert any("already converted" in r.message for r in caplog.records)
    assert not any("converting GGUF" in r.message for r in caplog.records)


def test_truncated_gguf_is_a_model_load_error(tmp_path, tiny_dirs, monkeypatch):
    monkeypatch.setenv("SPECECD_CACHE", str(tmp_path / "cache"))
    good = write_tiny_gguf(tiny_dirs["qwen2"], tmp_path / "good.gguf").read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(ModelLoadError, match="conversion failed"):
        load_model(bad)
    assert not list((tmp_path / "cache").rglob(CONVERTED_MARKER))


def test_same_tokenizer_is_compatible_across_architectures(tiny_dirs):
    llama, qwen = load_model(tiny_dirs["llama"]), load_model(tiny_dirs["qwen2"])
    assert check_tokenizers_compatible(llama, qwen) == 320


def test_different_vocabulary_is_a_tokenizer_mismatch(tiny_dirs):
    a, b = load_model(tiny_dirs["llama"]), load_model(tiny_dirs["other_vocab"])
    with pytest.raises(TokenizerMismatchError, match="vocabularies differ") as err:
        check_tokenizers_compatible(a, b)
    assert isinstance(err.value, ModelLoadError) and "first differing id" in str(err.value)


def test_padded_logits_width_is_allowed_and_smaller_width_is_usable(tiny_dirs):
    draft, target = load_model(tiny_dirs["llama"]), load_model(tiny_dirs["qwen2"])
    target.model.resize_token_embeddings(384)  # padded like Qwen2.5's 151,936 logits
    target.__dict__.pop("vocab_size", None)
    assert target.vocab_size == 384
    assert check_tokenizers_compatible(draft, target) == 320


def test_different_eos_ids_are_a_mismatch(tiny_dirs):
    a, b = load_model(tiny_dirs["llama"]), load_model(tiny_dirs["qwen2"])
    b.model.generation_config.eos_token_id = [0, 5]
    with pytest.raises(TokenizerMismatchError, match="end-of-sequence"):
        check_tokenizers_compatible(a, b)
