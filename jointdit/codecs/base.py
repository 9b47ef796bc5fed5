"""Codec protocols shared by every codec (see docs/contracts.md).

A *video codec* maps pixel frames ``[B, T, 3, H, W]`` in [-1, 1] to a scaled latent
``[B, Tv, Cv, hv, wv]`` (latent frames first) and back. An *audio codec* maps mono waves ``[B, N]``
in [-1, 1] to a scaled latent ``[B, Ca, La, Fa]`` (channels, TIME, frequency) and back.
"Scaled" means the latent is what the diffusion model sees (already multiplied by the codec's
``scaling_factor``); ``decode`` undoes the scaling itself.

Both directions are batched and chunked: codecs never push more than their ``encode_batch`` /
``decode_chunk`` items through a network at once (see :func:`apply_in_chunks`). Outputs come back on
the device of the input, as float32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

import torch
from torch import Tensor

from jointdit.config import resolve_device  # noqa: F401 (re-exported: codecs resolve "auto" the same way)


@runtime_checkable
class VideoCodec(Protocol):
    name: str
    scaling_factor: float

    def encode(self, frames: Tensor) -> Tensor:
        """``[B,T,3,H,W]`` in [-1,1] -> scaled latent ``[B,Tv,Cv,hv,wv]``."""

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latent -> ``[B,T,3,H,W]`` in [-1,1]; returns ALL frames."""

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """``(Tv, Cv, hv, wv)`` for a clip of that size (no batch axis)."""

    def latent_fps(self, fps: float) -> float:
        """Latent frames per second for a clip at ``fps`` frames per second."""


@runtime_checkable
class AudioCodec(Protocol):
    name: str
    sample_rate: int
    scaling_factor: float

    def encode(self, wave: Tensor) -> Tensor:
        """``[B,N]`` in [-1,1] at ``sample_rate`` -> scaled latent ``[B,Ca,La,Fa]``."""

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latent -> ``[B,N']`` with ``N' = samples_for_latent(La)``."""

    def latent_shape(self, num_samples: int) -> tuple[int, int, int]:
        """``(Ca, La, Fa)`` for a wave of ``num_samples`` samples (no batch axis)."""

    @property
    def latent_fps(self) -> float:
        """Latent time steps per second."""


def apply_in_chunks(fn: Callable[[Tensor], Tensor], x: Tensor, chunk: int | None, dim: int = 0) -> Tensor:
    """Apply ``fn`` to slices of ``x`` of at most ``chunk`` items along ``dim`` and concatenate.

    ``chunk`` of ``None`` or ``<= 0`` means one call on the whole tensor.
    """
    n = x.shape[dim]
    if not chunk or chunk <= 0 or n <= chunk:
        return fn(x)
    return torch.cat([fn(part) for part in torch.split(x, chunk, dim=dim)], dim=dim)


def balanced_chunks(n: int, chunk: int | None) -> list[tuple[int, int]]:
    """Split ``range(n)`` into ``ceil(n / chunk)`` contiguous, nearly equal ``(start, stop)`` spans.

    Every index is covered exactly once (a trailing partial chunk is never dropped); spans differ in
    length by at most one, so no chunk is a lonely one-frame tail.
    """
    if n <= 0:
        return []
    if not chunk or chunk <= 0 or n <= chunk:
        return [(0, n)]
    k = -(-n // chunk)
    base, extra = divmod(n, k)
    spans, start = [], 0
    for i in range(k):
        stop = start + base + (1 if i < extra else 0)
        spans.append((start, stop))
        start = stop
    return spans


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {
        "float32": torch.float32, "fp32": torch.float32,
        "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
        "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    }
    try:
        return table[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(table)}") from None


def find_model_folder(
    path: str | Path,
    subfolder: str,
    expected_files: tuple[str, ...],
    expected_class: str,
    component: str,
    weight_alternatives: tuple[str, ...] = (),
    expected_model_type: str | None = None,
) -> Path:
    """Locate a diffusers/transformers model folder and check it holds the expected model.

    ``path`` may be the model folder itself or a parent holding ``<subfolder>/``. The folder must hold
    every file of ``expected_files`` (the weights file may instead be any of ``weight_alternatives``)
    and its ``config.json`` must name ``expected_class`` (``_class_name`` for diffusers,
    ``architectures`` for transformers; a config with neither may match on ``expected_model_type``).

    Raises ``FileNotFoundError`` (nothing there / files missing) or ``ValueError`` (wrong model) with
    a message naming the expected files and class.
    """
    import json

    p = Path(path).expanduser()
    hint = (
        f"{component}: expected a folder in diffusers/transformers format holding "
        f"{', '.join(expected_files)} (config.json naming {expected_class}), given either as the "
        f"folder itself or as a parent folder with a '{subfolder}/' subfolder. "
        f"`python -m jointdit.assets fetch` mirrors the real weights when a hub can be reached."
    )
    candidates = [p, p / subfolder]
    folder = next((c for c in candidates if (c / "config.json").is_file()), None)
    if folder is None:
        where = "does not exist" if not p.exists() else "has no config.json (nor a '" + subfolder + "/config.json')"
        raise FileNotFoundError(f"{p} {where}. {hint}")
    missing = []
    for name in expected_files:
        if (folder / name).is_file():
            continue
        if name in ("diffusion_pytorch_model.safetensors", "model.safetensors") and any(
            (folder / alt).is_file() for alt in weight_alternatives
        ):
            continue
        missing.append(name)
    if missing:
        raise FileNotFoundError(f"{folder} is missing {', '.join(missing)}. {hint}")
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{folder / 'config.json'} is not valid JSON ({e}). {hint}") from e
    names = []
    if "_class_name" in cfg:
        names.append(str(cfg["_class_name"]))
    names += [str(a) for a in cfg.get("architectures") or []]
    type_ok = expected_model_type is not None and cfg.get("model_type") == expected_model_type and not names
    if expected_class not in names and not type_ok:
        found = ", ".join(names) if names else "no _class_name/architectures entry"
        raise ValueError(f"{folder} holds {found}, expected {expected_class}. {hint}")
    return folder
