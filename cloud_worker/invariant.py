"""Shape-invariant target forwards: a position's logits do not depend on what else is in its forward.

A batched worker computes one session's position inside forwards of many shapes: alone as a
cloud-only step (1 position), inside a verify (γ + 1 positions), beside other sessions (padded or
packed rows), after a prefill of any length. The kernels torch calls pick their blocking, and so
their summation order, by shape. In fp32 that moves logits by ~1e-5 and no greedy token was ever
seen to flip (docs/BENCHMARKS.md §2, §4). In bf16 every intermediate is rounded to 8 bits of
mantissa and a one-ulp difference spreads: on a CPU with AMX the demo target's logits moved by up
to 0.4 between a 1-position and a 3-position forward, and greedy speculative output matched
cloud-only on only 6–9 of 10 prompts (§4.11). Two kinds of operation were the cause, measured on
the demo target in bf16 (oneDNN ``brg_matmul:avx10_1_512_amx``, one thread):

- **Linear layers.** Row r of ``x W^T`` is bit-identical for every row count M from 2 to 32, but
  a 1-row product of the 8960 → 1536 layer takes another path, and products of more than 32 rows
  another blocking, both with other roundings.
- **Attention.** sdpa's CPU kernels block the key axis by the query length and the key length.

What this module does (``invariant`` in the worker's config, docs/ARCHITECTURE.md "Shape-invariant
forwards"):

- :func:`probe_rows` finds, on this machine, with the model's own weights, the row counts
  ``lo..hi`` over which every distinct linear shape of the model gives each row bit-identical
  results; :class:`RowChunkedLinear` then runs each linear on row counts in that range only: a
  lone row is computed beside a copy of itself, more than ``hi`` rows in chunks of ``hi``. A
  chunk re-reads the weights, so a forward over more than ``hi`` positions (a prefill, 16 × 3
  rows) costs more than one unchunked forward.
- The attention runs in float64 (:func:`invariant_attention`): a product of two bf16 numbers is
  exact in float64 and so are their sums over a 128-wide head for all but extreme exponent
  spreads, so the scores do not depend on the order of summation; the softmax and the weighted
  sum of values differ between shapes by ~1e-16 relative at most, which rounds back to the same
  bf16 (or fp32) value except with a probability of order 1e-13 per element.
- :func:`self_check` runs the model over a short random sequence three ways (one position per
  forward, one forward over all, and 2 + 1 + 3) and compares the logits bit for bit: what the
  worker logs at start-up is a measurement on this machine, not an assumption.

Cost on the demo target in bf16: docs/BENCHMARKS.md §4.12.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from shared.kvcache import forward_cached

log = logging.getLogger(__name__)

INVARIANT_ATTENTION = "spececd_invariant"  # the attention implementation of an invariant model
MAX_PROBED_ROWS = 64  # the probe tries row counts up to this; more rows are always chunked


@dataclass(frozen=True)
class RowRule:
    """Row counts ``lo..hi`` over which this machine's linear kernels give each row the same bits."""

    lo: int  # 1, or 2 when a lone row takes another path (it is then computed beside a copy)
    hi: int  # the most rows one product may hold; more are computed in chunks

    def __str__(self) -> str:
        return f"rows {self.lo}..{self.hi}"


def invariant_attention(
    module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    packed_rows=None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention in float64, returned in the query's dtype ``[B, q, H, D]`` (module docstring).

    ``query`` ``[B, H, q, D]``, ``key``/``value`` ``[B, Hkv, n, D]``; query heads are grouped by
    their key head (the head order of ``repeat_kv``), so grouped-query keys are not copied per head.
    ``attention_mask``: additive ``[B, 1, q, n]`` (or boolean, True = seen), or None (all seen).
    With ``packed_rows`` (a packed forward, cloud_worker/batching.py) each row's queries see its
    own cached keys and its own new ones, causally, and nothing else."""
    d = query.shape[-1]
    scale = scaling if scaling is not None else d**-0.5
    if packed_rows is None:
        return _attend(query, key, value, attention_mask, scale).transpose(1, 2).contiguous(), None
    c = packed_rows.cached
    out = []
    for at, n, s, k in packed_rows.rows:
        keys = torch.cat([key[:, :, at : at + n], key[:, :, c + s : c + s + k]], dim=2)  # [1, Hkv, n + k, D]
        values = torch.cat([value[:, :, at : at + n], value[:, :, c + s : c + s + k]], dim=2)
        t = torch.arange(k, device=query.device)
        seen = torch.cat(
            [torch.ones((k, n), dtype=torch.bool, device=query.device), t[None, :] <= t[:, None]], dim=1
        )  # [k, n + k]: new token t sees the cache and new tokens 0..t
        out.append(_attend(query[:, :, s : s + k], keys, values, seen[None, None], scale))  # [1, H, k, D]
    return torch.cat(out, dim=2).transpose(1, 2).contiguous(), None


def _attend(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """softmax(q kᵀ · scale + mask) v in float64, ``[B, H, q, D]`` in the query's dtype."""
    b, h, q, d = query.shape
    hkv, n = key.shape[1], key.shape[2]
    g = h // hkv
    qq = query.to(torch.float64).reshape(b, hkv, g * q, d)  # query head kv·g + j at [kv, j·q + t]
    scores = torch.matmul(qq, key.to(torch.float64).transpose(-1, -2)).view(b, hkv, g, q, n) * scale
    if mask is not None:
        m = mask[..., :n][:, :, None]  # [B, 1, 1, q, n]
        if m.dtype == torch.bool:
            scores = scores.masked_fill(~m, float("-inf"))
        else:
            scores = scores + m.to(torch.float64)
    probs = torch.softmax(scores, dim=-1).view(b, hkv, g * q, n)
    out = torch.matmul(probs, value.to(torch.float64))  # [B, Hkv, g·q, D]
    return out.view(b, h, q, d).to(query.dtype)


AttentionInterface.register(INVARIANT_ATTENTION, invariant_attention)
AttentionMaskInterface.register(INVARIANT_ATTENTION, eager_mask)  # an additive mask, as eager attention takes


class RowChunkedLinear(nn.Module):
    """A linear layer (``inner``: an ``nn.Linear`` or the worker's oneDNN one) run only on row
    counts its kernels compute row-invariantly (:class:`RowRule`)."""

    def __init__(self, inner: nn.Module, rule: RowRule) -> None:
        super().__init__()
        self.inner, self.rule = inner, rule
        self.in_features, self.out_features = inner.in_features, inner.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)
        m = flat.shape[0]
        if self.rule.lo <= m <= self.rule.hi:
            return self.inner(x)
        out = [self._rows(flat[s : s + self.rule.hi]) for s in range(0, m, self.rule.hi)]
        return torch.cat(out).reshape(*lead, self.out_features)

    def _rows(self, chunk: torch.Tensor) -> torch.Tensor:
        if chunk.shape[0] >= self.rule.lo:
            return self.inner(chunk)
        return self.inner(chunk.repeat(self.rule.lo, 1))[: chunk.shape[0]]  # a lone row beside a copy

    def extra_repr(self) -> str:
        return str(self.rule)


def _linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, name, layer) of every linear layer of ``model`` (anything with in/out_features
    and a weight that is not already chunked)."""
    return [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if hasattr(child, "in_features")
        and hasattr(child, "out_features")
        and not isinstance(child, RowChunkedLinear)
        and len(list(child.children())) == 0
    ]


@torch.inference_mode()
def probe_rows(layer: nn.Module, *, max_rows: int = MAX_PROBED_ROWS, seed: int = 0) -> RowRule | None:
    """The row counts over which ``layer`` gives every row the same bits, on this machine.

    Reference: each row computed inside a 2-row product. ``lo`` is 1 when 16 lone rows match it,
    else 2; ``hi`` is the last M before the first product of the first M rows that differs
    (``max_rows`` when none up to it does). None when a 3-row product already differs (no range
    worth using). Random rows of unit scale, in the layer's dtype, on its device."""
    weight = next(t for t in (*layer.parameters(), *layer.buffers()) if t.dim() == 2)
    dtype = weight.dtype if not weight.is_mkldnn else torch.float32
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(max_rows, layer.in_features, generator=gen).to(device=weight.device, dtype=dtype)
    ref = torch.cat([layer(x[r : r + 2]) for r in range(0, max_rows, 2)])  # [max_rows, out]
    lo = 1 if all(torch.equal(layer(x[r : r + 1]), ref[r : r + 1]) for r in range(16)) else 2
    for m in range(3, max_rows + 1):
        if not torch.equal(layer(x[:m]), ref[:m]):
            return RowRule(lo, m - 1) if m > 3 else None
    return RowRule(lo, max_rows)


def make_invariant(model: nn.Module) -> RowRule | None:
    """Make ``model``'s forwards shape-invariant in place (module docstring): probe each distinct
    linear shape, chunk every linear layer to the rows all of them keep invariant, and switch the
    attention to :func:`invariant_attention`. Returns the rule applied, or None (nothing changed)
    when this machine's linear kernels have no usable invariant range."""
    layers = _linears(model)
    shapes: dict[tuple, nn.Module] = {}
    for _, _, layer in layers:
        has_bias = getattr(layer, "bias", None) is not None
        shapes.setdefault((layer.in_features, layer.out_features, has_bias, type(layer)), layer)
    rules = [probe_rows(layer) for layer in shapes.values()]
    if not rules or any(r is None for r in rules):
        return None
    rule = RowRule(max(r.lo for r in rules), min(r.hi for r in rules))
    for parent, name, layer in layers:
        setattr(parent, name, RowChunkedLinear(layer, rule))
    model.config._attn_implementation = INVARIANT_ATTENTION
    return rule


@torch.inference_mode()
def self_check(
    model: nn.Module, vocab_size: int, *, prefix: int = 6, tokens: int = 6, seed: int = 0
) -> float:
    """The largest difference between a position's logits computed in forwards of different
    shapes: ``tokens`` positions after a ``prefix``-token prefill, once one position per forward,
    once in one forward, once as 2 + 1 + 3 (0.0: bit-identical, what an invariant model gives)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (prefix + tokens,), generator=gen).tolist()

    def run(split: list[int]) -> torch.Tensor:
        cache = DynamicCache()
        forward_cached(model, ids[:prefix], cache)
        out, at = [], prefix
        for k in split:
            out.append(forward_cached(model, ids[at : at + k], cache).float())
            at += k
        return torch.cat(out)[:, :vocab_size]

    ones = run([1] * tokens)
    parts = [2, 1, tokens - 3] if tokens > 3 else [tokens]
    return max(float((run([tokens]) - ones).abs().max()), float((run(parts) - ones).abs().max()))


def wanted(setting: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the worker's ``invariant`` setting asks for invariant forwards for this target:
    'auto' on a CPU in half precision, where shape-dependent rounding flipped greedy tokens
    (docs/BENCHMARKS.md §4.11); fp32 differs by ~1e-5 and never flipped one in any measured run."""
    if setting == "auto":
        return device.type == "cpu" and dtype in (torch.bfloat16, torch.float16)
    return setting == "on"


def apply(model: nn.Module, vocab_size: int) -> str:
    """:func:`make_invariant` then :func:`self_check`; a line for the worker's log that says what
    was measured. Raises nothing: a machine without an invariant range keeps its kernels."""
    rule = make_invariant(model)
    if rule is None:
        return (
            "invariant forwards: this machine's linear kernels round rows differently from 3 rows on; "
            "kept as they are (a position's logits may depend on the forward's shape)"
        )
    diff = self_check(model, vocab_size)
    if diff == 0.0:
        return (
            f"invariant forwards: linear layers on {rule}, attention in float64; self-check: "
            "a position's logits are bit-identical in forwards of 1, 3 and 6 positions"
        )
    return (
        f"invariant forwards: linear layers on {rule}, attention in float64; self-check FAILED: "
        f"a position's logits differ by up to {diff:.3g} between forwards of different shapes "
        "(outputs may differ at near ties; set invariant = off to save the cost)"
    )
