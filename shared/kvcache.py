"""KV-cache helpers shared by the drafter and the verifier, across transformers releases.

transformers renamed ``past_key_values`` to ``cache`` (5.x, with a deprecation period) and only
accepts a negative "tokens to remove" in ``DynamicCache.crop``; negative crops work on 4.x too.
"""

from __future__ import annotations

import inspect
from functools import cache

import torch
from transformers import DynamicCache


@cache
def _cache_kwarg(model_cls: type) -> str:
    params = inspect.signature(model_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def forward_kwargs(model_cls: type, kv: DynamicCache) -> dict:
    """The keyword that passes ``kv`` to ``model_cls.forward`` in this transformers release."""
    return {_cache_kwarg(model_cls): kv}


@cache
def logits_kwarg(model_cls: type) -> str | None:
    """The keyword of ``model_cls.forward`` that says which positions get logits (an int: the
    last n; a 1-D tensor: those indices), or None when this release or model has none."""
    params = inspect.signature(model_cls.forward).parameters
    return next((name for name in ("logits_to_keep", "num_logits_to_keep") if name in params), None)


def last_logits_only(model_cls: type) -> dict:
    """Keyword arguments that make ``model_cls.forward`` compute the logits of the last position
    only (a prefill needs none: this skips the vocabulary projection of every other position);
    empty when this release or model has no such argument."""
    name = logits_kwarg(model_cls)
    return {name: 1} if name else {}


def forward_cached(model, tokens: list[int], kv: DynamicCache, *, last_only: bool = False) -> torch.Tensor:
    """Feed ``tokens`` after what ``kv`` holds (the cache grows in place); return logits [k, V]
    (``last_only``: at least the last position's, where the model can skip the others)."""
    ids = torch.tensor([tokens], dtype=torch.long, device=model.device)  # [1, k]
    extra = last_logits_only(type(model)) if last_only else {}
    out = model(input_ids=ids, use_cache=True, **{_cache_kwarg(type(model)): kv}, **extra)
    return out.logits[0]  # [k, V]


def crop(kv: DynamicCache, current_len: int, keep: int) -> int:
    """Drop cached positions past ``keep``; returns the new length."""
    if keep < current_len:
        kv.crop(-(current_len - keep))
        return keep
    return current_len
