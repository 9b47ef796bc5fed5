"""What autograd saves for backward, counted exactly on the ``meta`` device (no memory, no compute).

:func:`trace_saved` runs one JointDiT training forward on meta tensors under
``torch.autograd.graph.saved_tensors_hooks`` and records every saved tensor's STORAGE once (views share one),
leaving out parameter storages (the weights are counted as weights). Each storage is attributed to the
block whose forward first saved it (``"io"``: outside the blocks). The planner's analytic activation
model (:func:`jointdit.memory_terms.block_saved_bytes`) is checked against this count in tests and in
experiments/bench_memory_terms.py: it is an oracle of *what* is kept, independent of the formula.

Attention: on meta, ``scaled_dot_product_attention`` would fall back to the math kernel (which keeps the
[B, H, Nq, Nk] weights). ``kernel="flash"`` replaces it by a stand-in that saves what the fused kernels
(CPU flash, CUDA flash / memory-efficient) save for backward: q, k, v, the output and the fp32
log-sum-exp [B, H, Nq]. ``kernel="math"`` keeps torch's own meta path.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


class _FusedAttention(torch.autograd.Function):
    """Saves (q, k, v, out, lse) like the fused SDPA kernels; the values are meta, only shapes matter."""

    @staticmethod
    def forward(ctx, q, k, v):  # noqa: D401 - autograd signature
        out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.empty(*q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - never run on meta
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


class _FusedSDPA(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            return _FusedAttention.apply(q, k, v)
        return func(*args, **(kwargs or {}))


def trace_saved(model: torch.nn.Module, video_shape: Sequence[int], audio_shape: Sequence[int], batch: int,
                modes: str | list[str] = "full", kernel: str = "flash", cond: Any = None) -> dict[str, int]:
    """Bytes of unique saved storages per place (``"io"``, ``"b0"``, ``"b1"``, …) of one forward of ``model``
    (built on the meta device with ``requires_grad`` set as the stage trains: ``memory_terms.stage_model``) on batch ``batch`` of
    latents ``video_shape`` [T, C, h, w] / ``audio_shape`` [C, L, F], plus the loss."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: dict[int, tuple[int, str]] = {}
    where = ["io"]

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in params and key not in seen:
            seen[key] = (t.untyped_storage().nbytes(), where[0])
        return t

    handles = []
    for i, block in enumerate(model.blocks):
        handles.append(block.register_forward_pre_hook(lambda m, a, i=i: where.__setitem__(0, f"b{i}")))
        handles.append(block.register_forward_hook(lambda m, a, o: where.__setitem__(0, "io")))
    try:
        with torch.device("meta"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            zv = torch.empty(batch, *video_shape)
            za = torch.empty(batch, *audio_shape)
            t = torch.empty(batch)
            if kernel == "flash":
                with _FusedSDPA():
                    ov, oa = model(zv, za, t, t, cond, modes)
            else:
                ov, oa = model(zv, za, t, t, cond, modes)
            ((ov - zv) ** 2).mean() + ((oa - za) ** 2).mean()
    finally:
        for h in handles:
            h.remove()
    out: dict[str, int] = defaultdict(int)
    for nbytes, place in seen.values():
        out[place] += nbytes
    return dict(out)
