"""The target's linear layers through oneDNN on the CPU.

Verification runs the target over a few positions at a time: γ + 1 for one session, a few
sessions × that in a batched forward. torch's CPU build computes an fp32 ``nn.Linear`` with MKL,
whose small-row kernels are slow on some x86 CPUs. Measured on an AMD EPYC (AVX-512), one
thread, a 1536 → 8960 layer of the demo target (ms; ``bench/verify_cost.py --cpu-linear``
measures the whole forward):

    rows M                 1     2     3     4     8
    nn.Linear (MKL)       4.4  11.0  15.6  11.2  12.5
    oneDNN, packed        4.1   5.4   5.8   5.9   6.7

so a 3-position verify cost three single-token steps there, and padding it to four positions was
faster than not. oneDNN (shipped inside torch, ``torch.backends.mkldnn``) picks its kernels by
instruction set; with the weight reordered once into its own layout its cost grows smoothly with M.
:func:`use_onednn_linears` swaps every fp32 ``nn.Linear`` of a CPU model for
:class:`OneDnnLinear`, the same ``aten::mkldnn_linear`` call as ``torch.utils.mkldnn.MkldnnLinear``
(which is a TorchScript module, a deprecated API).

Outputs differ from MKL's in float rounding only (another summation order), as a batched forward's
already do from an unbatched one. Memory: the packed weights replace the dense ones (the
checkpoint's mapping is let go, see :func:`_own_memory`), except that a head tied to the input
embeddings keeps the embedding's dense copy beside the packed one: the demo target's worker holds
7.2 GB, against 6.4 GB with torch's kernels. Packing takes ~13 s for it on one core.
"""

from __future__ import annotations

import torch
from torch import nn

from shared.memory import trim_heap


def onednn_available() -> bool:
    return bool(torch.backends.mkldnn.is_available())


def cpu_computes_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX): there a bf16 target's
    forward over a few positions costs about one step (docs/BENCHMARKS.md §4.11). Elsewhere
    torch emulates bf16 and a bf16 target is slower than fp32. False when torch cannot tell."""
    probe = (
        getattr(torch.cpu, "_is_avx512_bf16_supported", None),
        getattr(torch.cpu, "_is_amx_tile_supported", None),
    )
    try:
        return any(bool(f()) for f in probe if f is not None)
    except Exception:  # a private probe of torch's: unknown means no
        return False


def dtype_advice(device: torch.device, dtype: torch.dtype, *, native_bf16: bool) -> str | None:
    """A line for the worker's log when the target's dtype does not suit this CPU, else None."""
    if device.type != "cpu":
        return None
    if dtype == torch.float32 and native_bf16:
        return (
            "this CPU multiplies bf16 natively (AVX512-BF16/AMX): dtype = bfloat16 made the target's "
            "forwards 1.3-1.4x (one position) to 1.8-3x (a verify, a batch) faster on such CPUs; the "
            "worker's invariant forwards (invariant = auto) keep its outputs independent of the "
            "forward's shape (docs/BENCHMARKS.md §4.11, §4.12)"
        )
    if dtype == torch.bfloat16 and not native_bf16:
        return (
            "dtype bfloat16 on a CPU without native bf16 (AVX512-BF16/AMX) is emulated and slower "
            "than float32: use dtype = float32 (or auto) here"
        )
    return None


class OneDnnLinear(nn.Module):
    """``y = x Wᵀ + b`` with W held in oneDNN's layout (inference only, fp32, CPU)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            weight = linear.weight.detach().float().contiguous().to_mkldnn()
            bias = None if linear.bias is None else linear.bias.detach().float().contiguous().to_mkldnn()
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features).contiguous()
        y = torch.ops.aten.mkldnn_linear(flat.to_mkldnn(), self.weight, self.bias)
        return y.to_dense().reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )


def use_onednn_linears(model: nn.Module) -> int:
    """Replace every fp32 CPU ``nn.Linear`` in ``model`` by a :class:`OneDnnLinear`; returns how
    many. A no-op (0) where oneDNN is not built in, or on other devices and dtypes."""
    if not onednn_available():
        return 0
    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
        and child.weight.device.type == "cpu"
        and child.weight.dtype == torch.float32
    ]
    n = len(swaps)
    while swaps:
        parent, name, child = swaps.pop()
        setattr(parent, name, OneDnnLinear(child))
        del parent, child
    if n:
        _own_memory(model)
    return n


def _own_memory(model: nn.Module) -> None:
    """Let go of the loaded checkpoint's memory once the packed weights are made.

    transformers maps a safetensors checkpoint into memory and its tensors stay views of that
    mapping: every page read while packing stayed resident, so the worker held the weights
    twice (12.3 GB against 6.4 GB for the demo target, measured). The few tensors left dense
    (embeddings, norms, rotary buffers) are copied out of the mapping, which can then go, and the
    heap hands back what it freed."""
    with torch.no_grad():
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None:
                    module._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=False)
            for name, b in list(module._buffers.items()):
                if b is not None and not b.is_mkldnn:
                    module._buffers[name] = b.clone()
    trim_heap()
