"""Embedded video codec: space-to-depth, exactly invertible, no weights."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


class PixelVideoCodec:
    """``[B,T,3,H,W]`` -> ``[B,T,3·f²,H/f,W/f]`` by ``pixel_unshuffle`` (and back by ``pixel_shuffle``).

    Lossless: ``decode(encode(x))`` equals ``x`` bit for bit. Time is not compressed, so
    ``latent_fps(fps) == fps``. ``H`` and ``W`` must be divisible by ``factor``.
    """

    name = "pixel"
    scaling_factor = 1.0

    def __init__(self, factor: int = 8, channels: int = 3):
        if int(factor) < 1:
            raise ValueError(f"space_to_depth factor must be >= 1, got {factor}")
        self.factor = int(factor)
        self.channels = int(channels)

    @property
    def latent_channels(self) -> int:
        return self.channels * self.factor**2

    def _check_hw(self, height: int, width: int) -> None:
        f = self.factor
        if height % f or width % f:
            raise ValueError(
                f"PixelVideoCodec: frame size {height}x{width} (HxW) is not divisible by the space-to-depth "
                f"factor {f}; resize or crop frames to multiples of {f} (e.g. "
                f"{height - height % f}x{width - width % f})"
            )

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        self._check_hw(height, width)
        return (int(num_frames), self.latent_channels, height // self.factor, width // self.factor)

    def latent_fps(self, fps: float) -> float:
        return float(fps)

    frames_per_second = latent_fps

    def encode(self, frames: Tensor) -> Tensor:
        if frames.dim() != 5 or frames.shape[2] != self.channels:
            raise ValueError(f"PixelVideoCodec.encode expects [B,T,{self.channels},H,W], got {tuple(frames.shape)}")
        b, t, c, h, w = frames.shape
        self._check_hw(h, w)
        z = F.pixel_unshuffle(frames.reshape(b * t, c, h, w), self.factor)
        return z.reshape(b, t, *z.shape[1:])

    def decode(self, z: Tensor) -> Tensor:
        if z.dim() != 5 or z.shape[2] != self.latent_channels:
            raise ValueError(
                f"PixelVideoCodec.decode expects [B,T,{self.latent_channels},h,w], got {tuple(z.shape)}"
            )
        b, t = z.shape[:2]
        x = F.pixel_shuffle(z.reshape(b * t, *z.shape[2:]), self.factor)
        return x.reshape(b, t, *x.shape[1:])

    def to(self, *args, **kwargs) -> "PixelVideoCodec":  # nothing to move; kept for a uniform interface
        return self

    def __repr__(self) -> str:
        return f"PixelVideoCodec(factor={self.factor})"
