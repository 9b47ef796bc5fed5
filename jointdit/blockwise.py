"""Per-block activation memory: recompute (gradient checkpointing) the first ``checkpoint_blocks`` joint blocks,
and optionally offload the other blocks' saved tensors to pinned host memory (CUDA), from outside the model.

    from jointdit.blockwise import apply_block_memory
    apply_block_memory(model, checkpoint_blocks=3, offload_activations=False)   # after model.set_memory_knobs

Why the first blocks: every block saves the same amount, and the earliest blocks' tensors live longest (their
backward runs last), so those are the ones recomputing pays most for. The planner (``jointdit.memory``)
models exactly this split and ``vram=auto`` picks the fewest checkpointed blocks that fit.

Each wrapped block gets an instance ``forward`` (a bound method, so ``copy.deepcopy`` re-binds it to the copy);
parameter names, ``state_dict`` and the class are untouched. Checkpointing uses
``torch.utils.checkpoint(use_reentrant=False)`` — the same call the model's own ``gradient_checkpointing``
makes — only when gradients are enabled; the model's all-blocks switch is turned off so no block is wrapped
twice. Offload uses ``torch.autograd.graph.save_on_cpu(pin_memory=True)``: on the CPU it would only copy
tensors within host memory, so it is skipped there (with a warning).
"""

from __future__ import annotations

import functools
import types
import warnings
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class BlockMemory:
    """What :func:`apply_block_memory` set: blocks recomputed, blocks offloaded, of ``depth``."""

    checkpointed: int
    offloaded: int
    depth: int


def _checkpointed_forward(self, *args, **kwargs):
    forward = functools.partial(type(self).forward, self)
    if torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def _offloaded_forward(self, *args, **kwargs):
    if torch.is_grad_enabled():
        with torch.autograd.graph.save_on_cpu(pin_memory=True):
            return type(self).forward(self, *args, **kwargs)
    return type(self).forward(self, *args, **kwargs)


def apply_block_memory(model: torch.nn.Module, checkpoint_blocks: int | None = None,
                       offload_activations: bool = False) -> BlockMemory:
    """Recompute ``model.blocks[:checkpoint_blocks]`` in backward and (CUDA only) offload the saved tensors of
    the remaining blocks. ``checkpoint_blocks=None`` keeps the model's own ``gradient_checkpointing`` (all or
    none). Calling it again replaces the previous setting. Raises ValueError for a negative count."""
    blocks = model.blocks
    depth = len(blocks)
    if checkpoint_blocks is None:
        k = depth if getattr(model, "gradient_checkpointing", False) else 0
    else:
        if int(checkpoint_blocks) < 0:
            raise ValueError(f"vram.checkpoint_blocks={checkpoint_blocks} must be >= 0 (0: none, {depth}: all blocks)")
        k = min(int(checkpoint_blocks), depth)
    model.gradient_checkpointing = False          # the wrappers below decide per block
    on_cuda = any(p.is_cuda for p in model.parameters())
    offload = bool(offload_activations)
    if offload and not on_cuda:
        warnings.warn("vram.offload_activations has no effect on the CPU (the saved tensors are already in host "
                      "memory); skipped", stacklevel=2)
        offload = False
    for i, block in enumerate(blocks):
        block.__dict__.pop("forward", None)       # back to the class's forward
        if i < k:
            block.forward = types.MethodType(_checkpointed_forward, block)
        elif offload:
            block.forward = types.MethodType(_offloaded_forward, block)
    return BlockMemory(checkpointed=k, offloaded=(depth - k) if offload else 0, depth=depth)
