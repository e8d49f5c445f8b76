"""Random-weight models of a real architecture, for timing where the real weights cannot go.

A forward's cost depends on the architecture (layers, widths, vocabulary), the dtype and the
device, not on the weights' values. So on a machine the weights cannot reach (a GPU box with no
network, say), the worker can be timed on the demo target's or the default 8B target's shape with
random weights built from the ``config.json`` alone.

What random weights cannot give is a real acceptance rate: a draft made from them (even the
target's own first layers) agrees with the target on almost no token. The fleet benchmark
therefore replays, on such a target, the per-round acceptance recorded with the real pair
elsewhere (``spececd-bench --fleet-acceptance``, ``bench.fleet_record.transplant``).

    python -m bench.random_models --config DIR --out OUT [--seed 0] [--dtype float32]

``DIR`` holds a ``config.json`` (and the tokenizer files, copied along when present); ``OUT``
becomes a model folder loadable like any other (``spececd-worker --target OUT``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

# Files a model folder may carry besides its weights; copied from --config when present.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "generation_config.json",
    "chat_template.jinja",
)


def config_of(config_dir: Path | str):
    """The ``transformers`` config of a folder (or of a ``config.json`` path)."""
    path = Path(config_dir)
    if path.is_file():
        path = path.parent
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json (pass a model folder or its config.json)")
    return AutoConfig.from_pretrained(path)


def random_model(
    config, *, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu", on_device: bool = False
):
    """A causal LM of ``config``'s shape with seeded random weights, in ``dtype`` on ``device``.

    By default the weights are drawn on the CPU in float32, so a seed gives the same weights on
    every machine. ``on_device`` draws them where they will live, in ``dtype``: much faster for
    an 8B model on a GPU, for timing, where which weights they are does not matter."""
    torch.manual_seed(seed)
    if on_device:
        with torch.device(device):
            return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.to(device=device, dtype=dtype).eval()


def write_random(
    config_dir: Path | str, out: Path | str, *, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Path:
    """Write a model folder ``out``: ``config_dir``'s shape, random weights, its tokenizer files."""
    src = Path(config_dir)
    src = src.parent if src.is_file() else src
    model = random_model(config_of(src), seed=seed, dtype=dtype)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for f in TOKENIZER_FILES:
        if (src / f).is_file():
            shutil.copy(src / f, out / f)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.random_models", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--config", required=True, help="a model folder (or its config.json); tokenizer files are copied"
    )
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args(argv)
    try:
        out = write_random(args.config, args.out, seed=args.seed, dtype=getattr(torch, args.dtype))
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"random-weight model: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
