"""One target forward over the new tokens of many sessions, each with its own KV cache.

Two layouts (docs/ARCHITECTURE.md, "Worker: batched verification"; the worker's ``batch_layout``):

- ``padded`` (:func:`forward_rows`): pad and stack. Row ``i`` of the batch holds session ``i``'s
  cached keys/values left-padded to the longest cache ``P`` and its ``k_i`` new tokens
  right-padded to the longest ``K``; a 2-D attention mask hides the padding and per-row position
  ids continue each session's own positions. The forward computes B × K positions.
- ``packed`` (:func:`forward_packed`): one sequence. The rows' new tokens follow each other
  (Σ k_i positions, no padding), the rows' caches are laid end to end as one cache, and a 4-D
  mask lets each new token see its own session's cache and its own earlier new tokens only;
  position ids continue each session's own positions. The linear layers (most of a forward)
  compute exactly the real positions; on an sdpa model the attention runs row by row
  (:func:`_packed_attention`: Σ k_i × (L_i + k_i), as padded), on an eager one through the mask;
  and only rows that want logits get the vocabulary projection.

After the forward each session gets back its own cache (its part sliced out and copied), so
rollback (``crop``) stays per session. A single row runs unpadded on the session's own cache:
exactly the unbatched path, in either layout.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from cloud_worker.invariant import INVARIANT_ATTENTION
from shared.kvcache import forward_cached, forward_kwargs, last_logits_only, logits_kwarg


@dataclass
class Row:
    """One session's part of a forward: its cache (``cache_len`` positions) and new tokens."""

    cache: DynamicCache
    cache_len: int
    tokens: list[int]
    logits: bool = True  # False: the row's logits are not used (a prefill chunk)
    greedy: bool = False  # True: only each position's argmax is used (T = 0): it comes back, not [k, V]


def layer_kv(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The per-layer (keys, values) of a cache, each ``[1, H, L, D]`` (empty list when empty)."""
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return [
            (lay.keys, lay.values)
            for lay in cache.layers
            if getattr(lay, "keys", None) is not None and lay.keys.numel()
        ]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))  # pragma: no cover - older releases


def cache_of(kv: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A fresh DynamicCache holding ``kv`` (per layer keys/values ``[B, H, L, D]``) as they are:
    the tensors are adopted, not copied (``DynamicCache.update`` would copy each one)."""
    cache = DynamicCache()
    for layer, (k, v) in enumerate(kv):
        cache.update(k[..., :0, :], v[..., :0, :], layer)  # makes the layer, empty
        if hasattr(cache, "layers"):  # transformers >= 4.56
            cache.layers[layer].keys, cache.layers[layer].values = k, v
        else:  # pragma: no cover - older releases
            cache.key_cache[layer], cache.value_cache[layer] = k, v
    return cache


def _one_shape(kv: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """Every layer's keys and values have one shape and dtype: they can be copied as one tensor."""
    k0 = kv[0][0]
    return all(t.shape == k0.shape and t.dtype == k0.dtype for pair in kv for t in pair)


def _launch_bound(t: torch.Tensor) -> bool:
    """Whether copies on ``t``'s device cost a launch each more than their bytes (not a CPU)."""
    return t.device.type != "cpu"


def _stack(rows: list[Row], kvs: list[list[tuple[torch.Tensor, torch.Tensor]]], p: int) -> DynamicCache:
    """The rows' caches left-padded to ``p`` positions and stacked: per layer ``[B, H, P, D]``,
    adopted by the batch's cache as they are (no second copy).

    On a GPU, where each copy is a kernel launch and per layer and row they cost as much as the
    model's forward at 8 rows (docs/BENCHMARKS.md §4.8), and where all layers share one shape
    (Llama, Qwen2, ...), the rows go into one ``[2L, B, H, P, D]`` buffer whose per-layer views
    the model reads, two operations a row (its 2·L tensors stacked, then written) instead of 2·L.
    On a CPU copies cost bytes, and one large buffer costs fresh pages every forward: there each
    layer has its own buffer and each tensor is copied once."""
    template = next(kv for kv in kvs if kv)
    b, k0 = len(rows), template[0][0]
    if _launch_bound(k0) and _one_shape(template):
        layers, (_, h, _, d) = len(template), k0.shape
        buf = k0.new_zeros((2 * layers, b, h, p, d))  # layer l: keys at 2l, values at 2l + 1
        for i, (r, kv) in enumerate(zip(rows, kvs, strict=True)):
            if r.cache_len:
                src = [t[0, :, : r.cache_len] for pair in kv for t in pair]  # 2L × [H, n, D]
                buf[:, i, :, p - r.cache_len :].copy_(torch.stack(src))
        return cache_of([(buf[2 * layer], buf[2 * layer + 1]) for layer in range(layers)])
    stacked = []
    for layer, (k0, v0) in enumerate(template):
        keys = k0.new_zeros((b, k0.shape[1], p, k0.shape[3]))  # [B, H, P, D]
        values = v0.new_zeros((b, v0.shape[1], p, v0.shape[3]))  # [B, H, P, D]
        for i, (r, kv) in enumerate(zip(rows, kvs, strict=True)):
            if r.cache_len:
                keys[i, :, p - r.cache_len :] = kv[layer][0][0, :, : r.cache_len]
                values[i, :, p - r.cache_len :] = kv[layer][1][0, :, : r.cache_len]
        stacked.append((keys, values))
    return cache_of(stacked)


def _split(grown: list[tuple[torch.Tensor, torch.Tensor]], i: int, start: int, end: int) -> DynamicCache:
    """Row ``i``'s positions ``start:end`` of the batch's grown cache, as its own DynamicCache
    (memory it owns alone). On a GPU with one layer shape, one copy for the row (its 2·L slices
    stacked into one tensor, the layers views of it); else one copy per layer."""
    if _launch_bound(grown[0][0]) and _one_shape(grown):
        mine = torch.stack([t[i : i + 1, :, start:end] for pair in grown for t in pair])  # [2L, 1, H, n, D]
        return cache_of([(mine[2 * layer], mine[2 * layer + 1]) for layer in range(len(grown))])
    return cache_of(
        [(kk[i : i + 1, :, start:end].clone(), vv[i : i + 1, :, start:end].clone()) for kk, vv in grown]
    )


class _Phases:
    """Optional wall-clock split of one ``forward_rows`` call (``bench.verify_cost``); off, it costs nothing.

    Each mark waits for the device first, so the split is honest on a GPU (where it also slows the
    forward a little: only the benchmark asks for it)."""

    def __init__(self, into: dict[str, float] | None, device) -> None:
        self.into, self.device = into, device
        self.t = self._now() if into is not None else 0.0

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def mark(self, name: str) -> None:
        if self.into is not None:
            now = self._now()
            self.into[name] = self.into.get(name, 0.0) + (now - self.t) * 1e3
            self.t = now


@torch.inference_mode()
def forward_rows(
    model, rows: list[Row], vocab_size: int, *, phases_ms: dict[str, float] | None = None
) -> list[torch.Tensor]:
    """Run ONE forward over every row's new tokens; return each row's logits ``[k_i, V]`` (float32, CPU).

    A ``greedy`` row gets its positions' argmax ids ``[k_i]`` (int64, CPU) instead, taken on the
    model's device (lowest id on ties, as ``logits_to_probs``): a T = 0 verdict needs nothing
    else, and on a GPU moving B·k·V floats to the host costs more than the rest of the verdict.
    Each row's cache is replaced by one holding its old positions plus its new tokens (its
    ``cache_len`` grows by ``k_i``), exactly as ``forward_cached`` would leave it. When no row
    wants logits (prefill chunks only), the model may compute the last position's only: what comes
    back for those rows is then ``[1, V]`` or ``[k_i, V]``, and unused. ``phases_ms``, when given,
    gets the ms spent stacking the caches (``stack``), in the model (``model``), moving the logits
    to the host (``logits``) and splitting the caches back (``split``).
    """
    skip = not any(r.logits for r in rows)
    dev = model.device
    phase = _Phases(phases_ms, dev)
    if len(rows) == 1:  # unpadded: the unbatched path, bit for bit
        row = rows[0]
        logits = forward_cached(model, row.tokens, row.cache, last_only=skip)[:, :vocab_size]  # [k, V]
        phase.mark("model")
        row.cache_len += len(row.tokens)
        logits = logits.argmax(dim=-1).cpu() if row.greedy else logits.float().cpu()  # [k] or [k, V]
        phase.mark("logits")
        return [logits]
    b = len(rows)
    p = max(r.cache_len for r in rows)  # padded cache length
    k = max(len(r.tokens) for r in rows)  # padded new tokens
    ids = torch.zeros((b, k), dtype=torch.long)  # [B, K]
    mask = torch.zeros((b, p + k), dtype=torch.long)  # [B, P+K]
    pos = torch.zeros((b, k), dtype=torch.long)  # [B, K]
    for i, r in enumerate(rows):
        n = len(r.tokens)
        ids[i, :n] = torch.tensor(r.tokens, dtype=torch.long)
        mask[i, p - r.cache_len : p + n] = 1
        # padding queries continue the row's positions: they attend to real keys only, so no row is all -inf
        pos[i] = torch.arange(r.cache_len, r.cache_len + k)
    kvs = [layer_kv(r.cache) for r in rows]
    past = _stack(rows, kvs, p) if p > 0 and any(kvs) else DynamicCache()
    phase.mark("stack")
    out = model(
        input_ids=ids.to(dev),
        attention_mask=mask.to(dev),
        position_ids=pos.to(dev),
        use_cache=True,
        **forward_kwargs(type(model), past),
        **(last_logits_only(type(model)) if skip else {}),
    )
    phase.mark("model")
    logits = _to_host(out.logits[:, :, :vocab_size], [r.greedy for r in rows])  # per row: [K, V] or [K]
    phase.mark("logits")
    grown = layer_kv(past)
    result = []
    for i, r in enumerate(rows):
        n = len(r.tokens)
        # this row's real positions: its own cache (left-padded) then its n new tokens
        r.cache = _split(grown, i, p - r.cache_len, p + n)
        r.cache_len += n
        result.append(logits[i][:n])  # [n, V] (when skipped: the padded last position, unused)
    phase.mark("split")
    return result


def _to_host(logits: torch.Tensor, greedy: list[bool]) -> list[torch.Tensor]:
    """Row i of ``logits`` [B, K, V] on the host: its argmax ids [K] when ``greedy[i]``, else its
    logits [K, V] as float32. One transfer per kind, only the rows that need it."""
    if not any(greedy):
        return list(logits.float().cpu())
    if all(greedy):
        return list(logits.argmax(dim=-1).cpu())
    pick = torch.tensor([i for i, g in enumerate(greedy) if g], device=logits.device)
    rest = torch.tensor([i for i, g in enumerate(greedy) if not g], device=logits.device)
    ids, full = iter(logits[pick].argmax(dim=-1).cpu()), iter(logits[rest].float().cpu())
    return [next(ids) if g else next(full) for g in greedy]


LAYOUTS = ("padded", "packed")
PACKED_ATTENTION = "spececd_packed"  # the attention of a packed forward on an sdpa model (_packed_attention)


@dataclass(frozen=True)
class _Segments:
    """Where each row of a packed forward lies: (its first cached position, its cache length, its
    first new token, its new tokens), the new tokens' positions counted from the end of the ΣL
    cached ones (``cached``)."""

    rows: tuple[tuple[int, int, int, int], ...]
    cached: int


def _packed_attention(
    module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    packed_rows: _Segments | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention of a packed forward, row by row: each row's queries against its own cached keys
    and its own new ones (causal among those), Σ k_i × (L_i + k_i) work, as padded, instead of the
    masked Σk × (ΣL + Σk) of one attention over everything (which also made transformers repeat
    the grouped keys: +30 % of a forward at 8 × 1 with caches of 384, docs/BENCHMARKS.md §4.10).
    Keys and values are read in place (views of the cache); query heads are grouped by their key
    head (the head order of ``repeat_kv``), so grouped-query models need no copies of the keys.
    Without ``packed_rows`` (any other forward), sdpa's own attention."""
    if packed_rows is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    _, h, _, d = query.shape  # [1, H, Σk, D]
    hkv = key.shape[1]  # key, value [1, Hkv, ΣL + Σk, D]
    g = h // hkv
    scale = scaling if scaling is not None else d**-0.5
    c = packed_rows.cached
    out = []
    for at, n, s, k in packed_rows.rows:
        q = query[0, :, s : s + k].reshape(hkv, g * k, d)  # [Hkv, g·k, D]: query head kv·g + j, position t
        kc, vc = key[0, :, at : at + n], value[0, :, at : at + n]  # [Hkv, n, D], views
        kn, vn = key[0, :, c + s : c + s + k], value[0, :, c + s : c + s + k]  # [Hkv, k, D]
        scores_new = torch.matmul(q, kn.transpose(-1, -2))  # [Hkv, g·k, k]
        if k > 1:  # new token t sees new tokens 0..t
            t = torch.arange(k, device=q.device)
            hidden = (t[None, :] > t[:, None]).repeat(g, 1)  # [g·k, k]
            scores_new = scores_new.masked_fill(hidden, float("-inf"))
        scores = (
            torch.cat([torch.matmul(q, kc.transpose(-1, -2)), scores_new], dim=-1) * scale
        )  # [Hkv, g·k, n + k]
        p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        o = torch.matmul(p[..., :n], vc) + torch.matmul(p[..., n:], vn)  # [Hkv, g·k, D]
        out.append(o.reshape(h, k, d))
    return torch.cat(out, dim=1).transpose(0, 1)[None].contiguous(), None  # [1, Σk, H, D]


AttentionInterface.register(PACKED_ATTENTION, _packed_attention)


def packing_supported(model) -> str | None:
    """Why ``model`` cannot run the packed layout (None: it can). The packed forward hands the
    model a ready 4-D mask, which every layer then uses as it is: a model with sliding-window
    layers (whose mask would differ per layer) or an attention kernel that takes no mask (flash
    attention) would compute something else."""
    config = model.config
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl not in ("sdpa", "eager", INVARIANT_ATTENTION):
        return f"attention implementation {impl!r} takes no 4-D mask (packing needs sdpa or eager)"
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        return "the model has sliding-window layers (packing gives every layer one full mask)"
    if getattr(config, "use_sliding_window", False) or (
        getattr(config, "sliding_window", None) and "use_sliding_window" not in config.to_dict()
    ):
        return "the model uses sliding-window attention (packing gives every layer one full mask)"
    return None


def _offsets(sizes: list[int]) -> list[int]:
    """Where each of consecutive parts of these ``sizes`` starts."""
    return [0, *itertools.accumulate(sizes)][:-1]


def _packed_mask(lens: list[int], ks: list[int], dtype: torch.dtype) -> torch.Tensor:
    """The additive mask ``[1, 1, Σk, ΣL + Σk]`` of a packed forward: new token t of row i sees
    row i's cached positions and row i's new tokens up to t; everything else is masked."""
    b = len(ks)
    rows = torch.arange(b)
    qseg = torch.repeat_interleave(rows, torch.tensor(ks))  # [Σk] row of each new token
    kseg = torch.cat([torch.repeat_interleave(rows, torch.tensor(lens)), qseg])  # [ΣL + Σk]
    q_at = torch.arange(len(qseg))  # [Σk]
    k_at = torch.cat([torch.full((sum(lens),), -1), q_at])  # cached keys: before every new token
    allowed = (qseg[:, None] == kseg[None, :]) & (k_at[None, :] <= q_at[:, None])  # [Σk, ΣL + Σk]
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


@torch.inference_mode()
def forward_packed(
    model, rows: list[Row], vocab_size: int, *, phases_ms: dict[str, float] | None = None
) -> list[torch.Tensor]:
    """:func:`forward_rows`'s contract, with the rows packed into one sequence (module docstring):
    each row's logits ``[k_i, V]`` (a ``greedy`` row: its argmax ids ``[k_i]``; a row that wants
    no logits: an empty ``[0, V]``, unused), each row's cache replaced by its old positions plus
    its new tokens. The model must allow it (:func:`packing_supported`)."""
    if len(rows) == 1:
        return forward_rows(model, rows, vocab_size, phases_ms=phases_ms)
    dev = model.device
    phase = _Phases(phases_ms, dev)
    lens = [r.cache_len for r in rows]
    ks = [len(r.tokens) for r in rows]
    ids = torch.tensor([[t for r in rows for t in r.tokens]], dtype=torch.long)  # [1, Σk]
    pos = torch.cat([torch.arange(n, n + k) for n, k in zip(lens, ks, strict=True)])[None]  # [1, Σk]
    kvs = [layer_kv(r.cache) for r in rows]
    template = next((kv for kv in kvs if kv), None)
    past = DynamicCache()
    if template is not None and sum(lens):
        past = cache_of(
            [
                tuple(
                    torch.cat([kv[layer][j][..., :n, :] for kv, n in zip(kvs, lens, strict=True) if n], dim=2)
                    for j in (0, 1)
                )
                for layer in range(len(template))
            ]
        )  # per layer [1, H, ΣL, D]: the caches end to end
    phase.mark("stack")
    # where each row lies: its cached positions in the joined cache, its new tokens in the sequence
    segments = _Segments(tuple(zip(_offsets(lens), lens, _offsets(ks), ks, strict=True)), sum(lens))
    # logits only where a row wants them (a prefill chunk needs none: no vocabulary projection)
    keep = torch.tensor(
        [s + j for r, (_, _, s, k) in zip(rows, segments.rows, strict=True) if r.logits for j in range(k)]
        or [0],
        device=dev,
    )
    kw = logits_kwarg(type(model))
    # The attention runs row by row on an sdpa model (_packed_attention, for this forward only) and
    # on an invariant one (invariant_attention); an eager one applies the 4-D mask (given either
    # way: transformers then builds no mask)
    config = model.config
    impl = config._attn_implementation
    rowwise = impl in ("sdpa", INVARIANT_ATTENTION)  # the invariant attention goes row by row itself
    if impl == "sdpa":
        config._attn_implementation = PACKED_ATTENTION
    try:
        out = model(
            input_ids=ids.to(dev),
            attention_mask=_packed_mask(lens, ks, model.dtype).to(dev),
            position_ids=pos.to(dev),
            use_cache=True,
            **forward_kwargs(type(model), past),
            **({kw: keep} if kw else {}),
            **({"packed_rows": segments} if rowwise else {}),
        )
    finally:
        config._attn_implementation = impl
    phase.mark("model")
    kept = out.logits[0, :, :vocab_size]  # [len(keep), V]
    if kw is None:  # a model without the keyword computed all Σk positions
        kept = kept[keep]
    # one transfer per kind: argmax ids of the greedy rows' positions, float logits of the others
    wanted = [r for r in rows if r.logits]
    if wanted:
        greedy = torch.tensor([r.greedy for r in wanted for _ in r.tokens], device=dev)  # per kept position
        ids_host = iter(kept[greedy].argmax(dim=-1).cpu().split([len(r.tokens) for r in wanted if r.greedy]))
        full_host = iter(kept[~greedy].float().cpu().split([len(r.tokens) for r in wanted if not r.greedy]))
    phase.mark("logits")
    grown = layer_kv(past)
    result = []
    for r, (at, n, s, k) in zip(rows, segments.rows, strict=True):
        c = segments.cached + s  # this row's new tokens in the grown cache
        # its cached positions, then its new tokens, copied out: memory it owns alone
        r.cache = cache_of(
            [
                tuple(torch.cat([t[..., at : at + n, :], t[..., c : c + k, :]], dim=2) for t in pair)
                for pair in grown
            ]
        )
        r.cache_len += k
        if not r.logits:
            result.append(torch.zeros((0, kept.shape[-1])))
        else:
            result.append(next(ids_host) if r.greedy else next(full_host))
    phase.mark("split")
    return result
