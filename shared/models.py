"""Loading draft and target models: a local folder, a GGUF file, or a Hugging Face hub id.

``load_model(spec)`` resolves ``spec`` in this order:

1. an existing folder with ``config.json`` (weights + tokenizer saved by ``save_pretrained``);
2. an existing ``*.gguf`` file: converted ONCE (de-quantized by transformers through the ``gguf``
   package) into a safetensors folder under ``$SPECECD_CACHE/converted/<stem>-<sha16>/``
   (default cache ``~/.cache/spececd``); later loads use that folder;
3. a hub id (``org/name``), offline first: ``local_files_only=True`` against the local Hugging
   Face cache; only when ``offline=False`` (config ``allow_download``) and ``HF_HUB_OFFLINE`` is
   not set, a download from the hub (weights, config and tokenizer files only; a progress bar
   unless JSON logs turned bars off), then a load from the cache.

Every failure raises :class:`shared.errors.ModelLoadError` naming what was tried and what to do.
The caller puts the model under ``torch.inference_mode``; ``load_model`` only calls ``eval()``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from shared.errors import ModelLoadError, TokenizerMismatchError

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda", "cuda:N")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
CONVERTED_MARKER = ".spececd-converted.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_MISSING_HINT = "no such file or folder; pass a hub id, a folder with config.json, or a .gguf file"
_NOT_CACHED_HINT = (
    "it is not in the local Hugging Face cache, and downloads are off: allow the download with "
    "--allow-download (config allow_download = true, or SPECECD_ALLOW_DOWNLOAD=1; gated models also "
    "need hf_token), or pass a local folder or GGUF, or run `spececd-models fetch-demo` for the demo pair"
)
# what a download fetches: weights, config and tokenizer; never the duplicate original/ checkpoints
_DOWNLOAD_ALLOW = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
_DOWNLOAD_IGNORE = ["original/*", "*.pth", "*.gguf", "*.onnx", "*.msgpack", "*.h5"]
_TRUE = {"1", "true", "yes", "on"}


def cache_root() -> Path:
    """The SpecECD cache folder: ``$SPECECD_CACHE`` or ``~/.cache/spececd``."""
    env = os.environ.get("SPECECD_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "spececd"


@dataclass
class LoadedModel:
    """A causal LM ready for inference, with its tokenizer and where it came from."""

    model: Any  # transformers PreTrainedModel, in eval mode
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    name: str
    source: str  # the folder loaded, or the hub id
    device: torch.device
    dtype: torch.dtype
    extra: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def vocab_size(self) -> int:
        """Width of the model's logits (may exceed the tokenizer's size: padded embeddings)."""
        head = self.model.get_output_embeddings()
        if head is not None and getattr(head, "weight", None) is not None:
            return int(head.weight.shape[0])
        return int(self.model.config.vocab_size)

    @cached_property
    def eos_token_ids(self) -> frozenset[int]:
        """Every id that ends generation: generation_config, config and tokenizer, lists flattened."""
        ids: set[int] = set()
        sources = [
            getattr(getattr(self.model, "generation_config", None), "eos_token_id", None),
            getattr(self.model.config, "eos_token_id", None),
            getattr(self.tokenizer, "eos_token_id", None),
        ]
        for value in sources:
            if value is None:
                continue
            ids.update(int(v) for v in (value if isinstance(value, list | tuple | set) else [value]))
        return frozenset(ids)

    @cached_property
    def tokenizer_fingerprint(self) -> str:
        """sha256 of the tokenizer's sorted vocabulary and special tokens (cheap equality check)."""
        return tokenizer_fingerprint(self.tokenizer)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash the sorted ``token -> id`` mapping plus the eos token of ``tokenizer``."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    # Only eos: bos/unk defaults differ between tokenizer classes sharing one vocabulary.
    special = {"eos": getattr(tokenizer, "eos_token", None)}
    digest = hashlib.sha256()
    digest.update(json.dumps(vocab, ensure_ascii=False).encode())
    digest.update(json.dumps(special, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def resolve_device_dtype(
    device: str | torch.device, dtype: str | torch.dtype
) -> tuple[torch.device, torch.dtype]:
    """Turn ``device``/``dtype`` strings into torch objects ("auto": CUDA+bf16 if present, else CPU+fp32)."""
    if isinstance(device, torch.device):
        dev = device
    elif device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif isinstance(device, str) and re.fullmatch(r"cpu|cuda(:\d+)?", device):
        dev = torch.device(device)
    else:
        raise ValueError(f"device {device!r} is not allowed: use one of {', '.join(DEVICES)}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for CUDA, but torch sees no GPU: use device='cpu'")
    if isinstance(dtype, torch.dtype):
        dt = dtype
    elif dtype == "auto":
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elif isinstance(dtype, str) and dtype in DTYPES:
        dt = DTYPES[dtype]
    else:
        raise ValueError(f"dtype {dtype!r} is not allowed: use one of auto, {', '.join(DTYPES)}")
    return dev, dt


def load_model(
    spec: str | os.PathLike[str],
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    cache_dir: str | os.PathLike[str] | None = None,
    offline: bool = True,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from a folder, a ``.gguf`` file or a hub id.

    ``cache_dir`` is the Hugging Face cache for hub ids. Raises ``ModelLoadError`` (with what was
    tried and a hint) on any failure, ``ValueError`` for a bad ``device``/``dtype``.
    """
    spec = os.fspath(spec)
    dev, dt = resolve_device_dtype(device, dtype)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                spec, [f"folder {path}"], "the folder has no config.json; save the model with save_pretrained"
            )
        return _load_folder(spec, path, dev, dt, tried=[f"folder {path}"])
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(spec, [f"file {path}"], "a model file must be a .gguf; else pass its folder")
        folder = convert_gguf(path)
        return _load_folder(spec, folder, dev, dt, tried=[f"GGUF {path} -> {folder}"])
    if spec.lower().endswith(".gguf") or not _HUB_ID.match(spec):
        raise ModelLoadError(spec, [f"path {path}"], _MISSING_HINT)
    return _load_hub(spec, dev, dt, cache_dir=cache_dir, offline=offline)


def _load_folder(
    spec: str, folder: Path, dev: torch.device, dt: torch.dtype, *, tried: list[str]
) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dt)
    except Exception as exc:
        raise ModelLoadError(
            spec, tried, f"transformers failed to load it ({type(exc).__name__}: {exc}); check the files"
        ) from exc
    model.to(dev).eval()
    return LoadedModel(model, tokenizer, name=_name_of(spec), source=str(folder), device=dev, dtype=dt)


def hub_offline_env() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids the hub (it wins over ``allow_download``)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def _from_cache(spec: str, dt: torch.dtype, cache_dir: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(cache_dir=cache_dir, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(spec, **kwargs)
    return tokenizer, AutoModelForCausalLM.from_pretrained(spec, dtype=dt, **kwargs)


def download_model(spec: str, *, cache_dir: Any = None) -> str:
    """Download hub model ``spec`` into the Hugging Face cache (weights, config, tokenizer) with
    a progress bar; returns the snapshot folder. Raises ``ModelLoadError`` saying what to do."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    tried = [f"download from the Hugging Face hub ({os.environ.get('HF_ENDPOINT', 'huggingface.co')})"]
    if hub_offline_env():
        raise ModelLoadError(
            spec,
            tried,
            "HF_HUB_OFFLINE is set, which forbids downloads: unset it to let allow_download fetch the model",
        )
    log.info("downloading %s from the Hugging Face hub (weights, config, tokenizer)", spec)
    try:
        folder = snapshot_download(
            spec,
            cache_dir=cache_dir,
            allow_patterns=_DOWNLOAD_ALLOW,
            ignore_patterns=_DOWNLOAD_IGNORE,
            endpoint=os.environ.get("HF_ENDPOINT") or None,  # read now, not when the hub library loaded
        )
    except (GatedRepoError, RepositoryNotFoundError) as exc:
        raise ModelLoadError(
            spec,
            tried,
            "the hub refused it: check the id; a gated model needs a token (hf_token, SPECECD_HF_TOKEN or "
            f"hf_token_file) of an account that accepted its licence ({type(exc).__name__})",
        ) from exc
    except Exception as exc:
        raise ModelLoadError(
            spec, tried, f"the download failed ({type(exc).__name__}: {exc}); check the network or the proxy"
        ) from exc
    log.info("downloaded %s into %s", spec, folder)
    return folder


def _load_hub(spec: str, dev: torch.device, dt: torch.dtype, *, cache_dir: Any, offline: bool) -> LoadedModel:
    tried = ["local Hugging Face cache"]
    try:
        tokenizer, model = _from_cache(spec, dt, cache_dir)
    except Exception as exc:
        if offline:
            raise ModelLoadError(spec, tried, f"{_NOT_CACHED_HINT}. ({type(exc).__name__}: {exc})") from exc
        download_model(spec, cache_dir=cache_dir)
        tried.append("download from the Hugging Face hub")
        try:
            tokenizer, model = _from_cache(spec, dt, cache_dir)
        except Exception as exc2:
            raise ModelLoadError(
                spec,
                tried,
                f"downloaded, but transformers cannot load it ({type(exc2).__name__}: {exc2}); "
                "the repository needs safetensors weights, config.json and a tokenizer",
            ) from exc2
    model.to(dev).eval()
    return LoadedModel(model, tokenizer, name=_name_of(spec), source=spec, device=dev, dtype=dt)


def _name_of(spec: str) -> str:
    path = Path(spec)
    return path.stem if path.suffix.lower() == ".gguf" else path.name or spec


def _require_gguf(spec: str) -> None:
    try:
        importlib.import_module("gguf")
    except ImportError as exc:
        raise ModelLoadError(
            spec, [f"GGUF file {spec}"], "loading GGUF needs the gguf package: pip install gguf"
        ) from exc


def file_sha256(path: Path, *, chunk: int = 1 << 22) -> str:
    """sha256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def converted_folder_ok(folder: Path, sha256: str | None = None) -> bool:
    """True when ``folder`` holds a finished conversion (marker present, sha256 matching if given)."""
    marker = folder / CONVERTED_MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return sha256 is None or info.get("sha256") == sha256


def convert_gguf(
    gguf_path: Path,
    out_dir: Path | None = None,
    *,
    sha256: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """De-quantize ``gguf_path`` once into a safetensors folder (+ tokenizer) and return the folder.

    Default ``out_dir`` is ``<cache>/converted/<stem>-<sha16>``. Written to a temporary sibling,
    marked complete (with the GGUF's sha256), then renamed, so an interrupted run leaves nothing
    that looks finished. An existing finished folder is reused.
    """
    spec = str(gguf_path)
    _require_gguf(spec)
    sha256 = sha256 or file_sha256(gguf_path)
    if out_dir is None:
        out_dir = cache_root() / "converted" / f"{gguf_path.stem}-{sha256[:16]}"
    if converted_folder_ok(out_dir, sha256):
        log.info("GGUF %s already converted: loading %s", gguf_path, out_dir)
        return out_dir
    log.info("converting GGUF %s once to %s (later loads use the folder)", gguf_path, out_dir)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tried = [f"GGUF {gguf_path} via transformers (gguf_file=)"]
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=dtype, **_dequantize_kwargs()
        )
        _detach_gguf_quantizer(model)
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelLoadError(
            spec, tried, f"conversion failed ({type(exc).__name__}: {exc}); is the file a complete GGUF?"
        ) from exc
    (tmp / CONVERTED_MARKER).write_text(json.dumps({"gguf": str(gguf_path), "sha256": sha256}))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out_dir)
    return out_dir


def _dequantize_kwargs() -> dict[str, Any]:
    # Recent transformers may keep GGUF blocks quantized when a kernel exists; we want dense weights.
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _detach_gguf_quantizer(model: Any) -> None:
    """Turn a de-quantized GGUF model into a plain dense one so ``save_pretrained`` accepts it."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and not getattr(quantizer.quantization_config, "dequantize", True):
        raise RuntimeError("the GGUF weights were kept quantized; cannot save them as dense safetensors")
    model.hf_quantizer = None
    for cfg in (model.config, getattr(model.config, "text_config", None)):
        if cfg is not None and hasattr(cfg, "quantization_config"):
            del cfg.quantization_config


def check_tokenizers_compatible(draft: LoadedModel, target: LoadedModel) -> int:
    """Check that draft token ids mean the same to the target; return the usable vocab width.

    Compares a hash of each sorted vocabulary (plus special tokens) and the eos sets. Logits
    widths may differ (padded embeddings, e.g. Qwen2.5 0.5B vs 1.5B) as long as the tokenizers
    are identical; the usable width is the smaller one. Raises ``TokenizerMismatchError``.
    """
    specs = f"{draft.name} / {target.name}"
    if draft.tokenizer_fingerprint != target.tokenizer_fingerprint:
        dv, tv = draft.tokenizer.get_vocab(), target.tokenizer.get_vocab()
        d_inv = {i: t for t, i in dv.items()}
        t_inv = {i: t for t, i in tv.items()}
        diff = next((i for i in sorted(set(d_inv) | set(t_inv)) if d_inv.get(i) != t_inv.get(i)), None)
        detail = (
            f"vocabularies differ ({len(dv)} vs {len(tv)} entries"
            + (
                f"; first differing id {diff}: {d_inv.get(diff)!r} vs {t_inv.get(diff)!r}"
                if diff is not None
                else ""
            )
            + f"; special tokens {draft.tokenizer.eos_token!r} vs {target.tokenizer.eos_token!r})"
        )
        raise TokenizerMismatchError(
            specs,
            ["compare tokenizer vocabularies"],
            f"{detail}. Pick a draft from the target's model family.",
        )
    if draft.eos_token_ids != target.eos_token_ids:
        raise TokenizerMismatchError(
            specs,
            ["compare eos ids"],
            f"end-of-sequence ids differ ({sorted(draft.eos_token_ids)} vs {sorted(target.eos_token_ids)}); "
            "fix generation_config.json of one model",
        )
    usable = min(draft.vocab_size, target.vocab_size)
    n_tok = len(draft.tokenizer)
    if n_tok > usable:
        raise TokenizerMismatchError(
            specs,
            ["compare logits widths"],
            f"the tokenizer has {n_tok} entries but a model only {usable} logits",
        )
    return usable


def encode_prompt(tokenizer: Any, prompt: str, *, chat: bool = True) -> list[int]:
    """Token ids of ``prompt``: through the tokenizer's chat template as one user turn when
    ``chat`` and the tokenizer has one, else the plain text (never empty: EOS stands in)."""
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        return list(ids)
    ids = tokenizer(prompt).input_ids
    return list(ids) if ids else [tokenizer.eos_token_id]
