"""Tiny random-weight models and a tiny tokenizer, built from a config and saved to a folder.

Tests load these through the same loading code as real models (no hub). The tokenizer is a
byte-level BPE trained on a fixed text, so it is deterministic and needs no download.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

_CORPUS = [
    "Speculative decoding lets a small draft model propose tokens that a large target model verifies.",
    "The edge device runs the draft model; the cloud workers verify blocks in one forward pass.",
    "MQTT carries CBOR messages through a Mosquitto broker between devices and workers.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The capital of France is Paris. The capital of Italy is Rome.",
] * 4

EOS = "<|endoftext|>"


def make_tokenizer(vocab_size: int = 320, *, variant: int = 0) -> PreTrainedTokenizerFast:
    """A deterministic byte-level BPE tokenizer. ``variant`` != 0 gives a different vocabulary."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = _CORPUS if variant == 0 else [s[::-1] for s in _CORPUS]
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)


def make_tiny_model_dir(
    path: Path,
    *,
    arch: str = "llama",
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    tokenizer_variant: int = 0,
) -> Path:
    """Build a tiny random ``arch`` ("llama" or "qwen2") model with the tiny tokenizer in ``path``."""
    tokenizer = make_tokenizer(variant=tokenizer_variant)
    vocab = len(tokenizer)
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        pad_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        raise ValueError(f"unknown tiny arch {arch!r}")
    # Random init gives near-uniform logits; sharpen them so sampling has structure to test.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def load_tiny_pair(root: Path) -> dict:
    """The usual test pair under ``root``: a 1-layer qwen2 draft (seed 1) and a 2-layer qwen2
    target (seed 2) sharing the tiny tokenizer, loaded through ``shared.models.load_model``.
    Returns ``{"draft", "target", "target_dir"}``."""
    from shared.models import load_model

    draft_dir = make_tiny_model_dir(root / "draft", arch="qwen2", seed=1, layers=1)
    target_dir = make_tiny_model_dir(root / "target", arch="qwen2", seed=2)
    return {
        "draft": load_model(str(draft_dir)),
        "target": load_model(str(target_dir)),
        "target_dir": str(target_dir),
    }
