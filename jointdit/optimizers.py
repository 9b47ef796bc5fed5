"""Optimizers chosen by config (``vram.optimizer``), and what each one keeps in memory.

==============  ==========================================  =============================================
name            update                                      state per trainable parameter tensor θ (n elems)
==============  ==========================================  =============================================
``adamw``       torch.optim.AdamW (decoupled weight decay)  m, v in fp32: 8·n bytes
``adamw8bit``   bitsandbytes.optim.AdamW8bit                m, v as uint8 blocks + fp32 absmax per block of
                (block-wise dynamic 8-bit quantised m, v)    256: 2·n + 8·⌈n/256⌉ bytes (tensors < 4096
                                                            elements keep fp32 state: 8·n)
``adafactor``   transformers.optimization.Adafactor with    θ [.., r, c]: row and column second-moment
                a fixed lr (relative_step=False) and no     factors, 4·(r + c) bytes per leading index;
                first moment (beta1=None)                   1-D θ: 4·n; no first moment
==============  ==========================================  =============================================

``foreach`` (AdamW only): torch's multi-tensor step (``foreach=True``; torch's default on CUDA) computes
``sqrt(v)`` for all tensors of a param group at once — one extra fp32 copy of the group's parameters
while gradients are held. ``foreach=False`` processes one tensor at a time. ``None`` = torch's default.
:mod:`jointdit.memory_terms` models both.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

OPTIMIZERS: tuple[str, ...] = ("adamw", "adamw8bit", "adafactor")
BNB_MIN_8BIT_SIZE = 4096   # bitsandbytes' default: smaller tensors keep 32-bit state
BNB_BLOCK = 256            # bitsandbytes' blockwise quantisation block


class OptimizerUnavailable(RuntimeError):
    """The chosen optimizer's library is missing or does not run on this device."""


def build_optimizer(name: str, param_groups: Sequence[Mapping[str, Any]] | Iterable[torch.nn.Parameter], *,
                    lr: float, betas: Sequence[float] = (0.9, 0.999), weight_decay: float = 0.0, eps: float = 1e-8,
                    foreach: bool | None = None) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``param_groups`` (each group may carry its own ``lr``).

    Raises :class:`OptimizerUnavailable` with the install command when a library is missing, and
    ValueError for an unknown name.
    """
    name = str(name).lower()
    beta1, beta2 = (float(b) for b in betas)
    if name == "adamw":
        return torch.optim.AdamW(param_groups, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay,
                                 foreach=foreach)
    if name == "adamw8bit":
        try:
            import logging

            logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
            import bitsandbytes as bnb
        except ImportError as exc:
            raise OptimizerUnavailable(
                "vram.optimizer=adamw8bit needs bitsandbytes, which is not installed: "
                "pip install 'jointdit[lowmem]' (or pip install bitsandbytes); or use vram.optimizer=adamw|adafactor"
            ) from exc
        return bnb.optim.AdamW8bit(param_groups, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay,
                                   min_8bit_size=BNB_MIN_8BIT_SIZE)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(param_groups, lr=lr, beta1=None, weight_decay=weight_decay, scale_parameter=False,
                         relative_step=False, warmup_init=False, decay_rate=-0.8, clip_threshold=1.0)
    raise ValueError(f"unknown optimizer {name!r}; vram.optimizer must be one of {', '.join(OPTIMIZERS)}")


def state_bytes(name: str, shapes: Iterable[Sequence[int]]) -> int:
    """Bytes of optimizer state for trainable tensors of ``shapes`` (see the module table)."""
    name = str(name).lower()
    total = 0
    for shape in shapes:
        n = 1
        for s in shape:
            n *= int(s)
        if name == "adamw":
            total += 8 * n
        elif name == "adamw8bit":
            total += 8 * n if n < BNB_MIN_8BIT_SIZE else 2 * n + 8 * -(-n // BNB_BLOCK)
        elif name == "adafactor":  # factored second moment over the last two dims
            lead = n // (int(shape[-1]) * int(shape[-2])) if len(shape) >= 2 else 0
            total += 4 * lead * (int(shape[-2]) + int(shape[-1])) if len(shape) >= 2 else 4 * n
        else:
            raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    return total


def from_config(cfg: Any, param_groups: Sequence[Mapping[str, Any]]) -> torch.optim.Optimizer:
    """``vram.optimizer`` / ``vram.optimizer_foreach`` and ``optim.*`` of a composed config → optimizer."""
    vram = cfg.get("vram", {}) if hasattr(cfg, "get") else {}
    name = str(vram.get("optimizer", "adamw") or "adamw")
    foreach = vram.get("optimizer_foreach", None)
    return build_optimizer(name, param_groups, lr=float(cfg.optim.lr), betas=tuple(cfg.optim.betas),
                           weight_decay=float(cfg.optim.weight_decay), foreach=None if foreach is None else bool(foreach))
