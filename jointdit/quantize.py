"""Quantized frozen weights for Stage B / LoRA (``vram.quantize_frozen: null | int8``), through optimum-quanto.

    from jointdit.quantize import quantize_frozen
    names = quantize_frozen(model, {n for n, p in model.named_parameters() if p.requires_grad}, "int8")

Every ``nn.Linear`` none of whose own parameters trains gets ``qint8`` weights (symmetric, one fp32 scale per
output row; its bias stays float), then ``optimum.quanto.freeze`` stores them as int8: 1 byte per weight instead
of 4. Trainable tensors — Stage B's groups, LoRA adapters — are never touched, and gradients still flow through
the quantized layers to them. Activations are not quantized. quanto's int8-weight matmul runs on the CPU and
on CUDA. The planner counts the frozen linears at ``memory_terms.quantized_weight_bytes``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

SCHEMES = ("int8",)


class QuantizeUnavailable(RuntimeError):
    """optimum-quanto is not installed (the message names the extra to install)."""


def require_quanto():
    """The ``optimum.quanto`` module, or :class:`QuantizeUnavailable` with the install command."""
    try:
        import optimum.quanto as quanto
    except ImportError as exc:
        raise QuantizeUnavailable(
            "vram.quantize_frozen=int8 needs optimum-quanto, which is not installed: pip install 'jointdit[quant]' "
            "(or 'jointdit[lowmem]'); or set vram.quantize_frozen=null") from exc
    return quanto


def frozen_linears(model: torch.nn.Module, trainable: Iterable[str]) -> list[str]:
    """Names of the ``nn.Linear`` modules none of whose own parameters is in ``trainable`` (parameter names)."""
    trainable = set(trainable)
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
            and not any(f"{name}.{p}" in trainable for p, _ in module.named_parameters(recurse=False))]


def quantize_frozen(model: torch.nn.Module, trainable: Iterable[str], scheme: str | None = "int8") -> list[str]:
    """Quantize the weights of the frozen linears of ``model`` in place (``scheme``: ``"int8"``; None: nothing);
    return their names. ``trainable``: the names of the parameters that train (they stay as they are)."""
    if not scheme:
        return []
    if scheme not in SCHEMES:
        raise ValueError(f"vram.quantize_frozen={scheme!r}: choose null or one of {', '.join(SCHEMES)}")
    trainable = set(trainable)
    missing = trainable - {n for n, _ in model.named_parameters()}
    if missing:
        raise ValueError(f"trainable names not in the model: {sorted(missing)[:5]}")
    quanto = require_quanto()
    names = frozen_linears(model, trainable)
    if names:
        quanto.quantize(model, weights=quanto.qint8, activations=None, include=names)
        quanto.freeze(model)
        # freeze() stores each quantized weight as a new Parameter that requires grad: frozen must stay frozen
        # (else backward would build an fp32 gradient for every quantized weight)
        for name, param in model.named_parameters():
            param.requires_grad_(name in trainable)
    return names
