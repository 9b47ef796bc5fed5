"""Rotary position embeddings (RoPE) for joint video+audio tokens, with time measured in seconds.

A head vector ``x ∈ R^{Dh}`` is viewed as ``P = Dh/2`` planes; plane ``j`` holds ``(x_{2j}, x_{2j+1})``,
read as the complex number ``z_j = x_{2j} + i·x_{2j+1}``, and is rotated by the angle ``θ_j(pos)``:

    z'_j = z_j · e^{iθ_j(pos)}

Each rotation is orthogonal, so ``‖x'‖ = ‖x‖``; and because every ``θ_j`` is linear in the position,
``⟨R(p)q, R(p')k⟩ = Re Σ_j conj(q_j) k_j e^{i(θ_j(p')−θ_j(p))}`` depends only on the offset ``p' − p``.
(The complex form is one fused multiply; on CPU it is ~3× faster than the rotate-half form.)

The ``P`` planes are split between axes (see :func:`split_planes`):

    [ time | height | width | freq ]
      video tokens rotate time, height, width (freq planes keep angle 0);
      audio tokens rotate time and freq (height/width planes keep angle 0).

The time planes use the SAME frequencies for both modalities and the position is a token's centre in
seconds, so a video token and an audio token that cover the same instant get the same time phase, and
the time planes' share of a video↔audio score depends only on their offset in seconds. Spatial and mel
planes are disjoint, so no meaningless "row minus mel bin" offset arises between modalities (in those
planes a cross-modal pair sees each token's own position, like an absolute embedding). Context tokens
get no RoPE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class RopePlanes:
    """How many rotation planes (pairs of head channels) each axis gets."""

    time: int
    height: int
    width: int
    freq: int

    @property
    def total(self) -> int:
        return self.time + self.height + self.width + self.freq


def split_planes(head_dim: int) -> RopePlanes:
    """Half of the planes go to time (shared by both modalities); the rest are split h / w / freq.

    Time is the only axis the two modalities share, so it gets the most bands; the spatial axes and the
    mel axis each have only a handful of positions in a latent grid.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
    planes = head_dim // 2
    time = planes // 2
    rest = planes - time
    height = rest // 3 + (rest % 3 > 0)
    width = rest // 3 + (rest % 3 > 1)
    return RopePlanes(time=time, height=height, width=width, freq=rest - height - width)


def band_frequencies(n: int, theta: float, scale: float = 1.0) -> Tensor:
    """Geometric bands ``scale · θ^{-i/n}``, i = 0..n-1 (radians per position unit)."""
    if n == 0:
        return torch.zeros(0, dtype=torch.float64)
    return scale * theta ** (-torch.arange(n, dtype=torch.float64) / n)


class JointRope:
    """Computes the (cos, sin) tables for video and audio token grids.

    Args:
        head_dim: attention head width ``Dh``.
        video_seconds_per_token: ``patch_t / video_latent_fps``.
        audio_seconds_per_token: ``audio_patch_t / audio_latent_fps``.
        theta: base of the geometric frequency bands of the time planes.
        space_theta: base of the bands of the height, width and mel planes. These axes have tens of
            positions, not thousands: with θ = 10000 and three planes the bands are 1, 0.046 and 0.002
            rad/position, so only the 1 rad band tells positions apart and it aliases at 2π (an offset of 6
            scores like an offset of 0) — a model cannot place an object. θ = 32 gives 1, 0.31, 0.10.
        time_scale: radians per second of the fastest time band; by default the finer of the two token
            rates (tokens/s), so adjacent tokens of the faster modality are one radian apart.
        video_steps_per_token / audio_steps_per_token: latent time steps per token (the temporal patch),
            used only for the default token times when none are given.
    """

    def __init__(
        self,
        head_dim: int,
        video_seconds_per_token: float,
        audio_seconds_per_token: float,
        theta: float = 10000.0,
        time_scale: float | None = None,
        video_steps_per_token: int = 1,
        audio_steps_per_token: int = 1,
        space_theta: float = 10000.0,
    ) -> None:
        self.planes = split_planes(head_dim)
        self.video_dt = float(video_seconds_per_token)
        self.audio_dt = float(audio_seconds_per_token)
        self.video_steps, self.audio_steps = int(video_steps_per_token), int(audio_steps_per_token)
        if time_scale is None:
            time_scale = 1.0 / min(self.video_dt, self.audio_dt)
        p = self.planes
        self.time_freqs = band_frequencies(p.time, theta, time_scale)
        self.height_freqs = band_frequencies(p.height, space_theta)
        self.width_freqs = band_frequencies(p.width, space_theta)
        self.freq_freqs = band_frequencies(p.freq, space_theta)

    # -- positions -------------------------------------------------------------------------------
    @staticmethod
    def token_times(latent_times: Tensor, patch_t: int) -> Tensor:
        """Latent centre times ``[..., T]`` (seconds) → token times ``[..., T // patch_t]``.

        A token covers ``patch_t`` consecutive latent steps; its time is their mean, i.e. the centre of
        what it covers. ``T`` must be a multiple of ``patch_t``.
        """
        t = torch.as_tensor(latent_times, dtype=torch.float64)
        if t.shape[-1] % patch_t:
            raise ValueError(f"{t.shape[-1]} latent times are not a whole number of temporal patches of {patch_t}")
        return t.unflatten(-1, (-1, patch_t)).mean(-1)

    def video_positions(self, grid_t: int, grid_h: int, grid_w: int,
                        times: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Token (time seconds, row, column) in the (t, h, w) row-major order of the patch embedding.

        ``times [grid_t]`` are the tokens' centre times in seconds; by default token ``k`` is at
        ``(k + (1 − 1/p)/2)·dt`` with ``dt`` the token span and ``p`` latent steps per token, i.e. latent
        step ``i`` is an instant at ``i·dt/p`` (a video frame shown at ``i/fps``) and a token is the mean
        of its steps.
        """
        t = self._default_times(grid_t, self.video_dt, self.video_steps) if times is None else _times(times, grid_t)
        t, h, w = torch.meshgrid(
            t, torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64), indexing="ij"
        )
        return t.flatten(), h.flatten(), w.flatten()

    def audio_positions(self, grid_t: int, grid_f: int, times: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Token (time seconds, mel bin) in the (t, f) row-major order of the patch embedding.

        ``times [grid_t]``: token centre times in seconds; by default latent step ``j`` is centred at
        ``j·dt/p`` (a centred STFT frame ``j`` sits on sample ``j·hop``) and a token is the mean of its steps.
        """
        t = self._default_times(grid_t, self.audio_dt, self.audio_steps) if times is None else _times(times, grid_t)
        t, f = torch.meshgrid(t, torch.arange(grid_f, dtype=torch.float64), indexing="ij")
        return t.flatten(), f.flatten()

    @staticmethod
    def _default_times(grid_t: int, token_dt: float, steps: int) -> Tensor:
        step_dt = token_dt / steps
        return JointRope.token_times(torch.arange(grid_t * steps, dtype=torch.float64) * step_dt, steps)

    # -- angles ------------------------------------------------------------------------------------
    def angles(
        self,
        seconds: Tensor,
        height: Tensor | None = None,
        width: Tensor | None = None,
        freq: Tensor | None = None,
    ) -> Tensor:
        """Per-plane angles ``[N, P]``; an axis given as None contributes angle 0 (identity rotation)."""
        n = seconds.shape[0]

        def axis(pos: Tensor | None, freqs: Tensor) -> Tensor:
            if pos is None:
                return torch.zeros(n, freqs.numel(), dtype=torch.float64)
            return pos.to(torch.float64)[:, None] * freqs[None, :]

        return torch.cat(
            [
                axis(seconds, self.time_freqs),
                axis(height, self.height_freqs),
                axis(width, self.width_freqs),
                axis(freq, self.freq_freqs),
            ],
            dim=1,
        )

    def video(self, grid_t: int, grid_h: int, grid_w: int, device=None, dtype=torch.float32,
              times: Tensor | None = None) -> Tensor:
        """Rotation table ``[N, 1, P]`` (or ``[B, N, 1, P]`` for per-sample ``times [B, grid_t]``)."""
        if times is not None and torch.as_tensor(times).ndim == 2:
            return torch.stack([self.video(grid_t, grid_h, grid_w, device, dtype, row) for row in times])
        t, h, w = self.video_positions(grid_t, grid_h, grid_w, times)
        return rotation_table(self.angles(t, height=h, width=w), device, dtype)

    def audio(self, grid_t: int, grid_f: int, device=None, dtype=torch.float32, times: Tensor | None = None) -> Tensor:
        """Rotation table ``[N, 1, P]`` (or ``[B, N, 1, P]`` for per-sample ``times [B, grid_t]``)."""
        if times is not None and torch.as_tensor(times).ndim == 2:
            return torch.stack([self.audio(grid_t, grid_f, device, dtype, row) for row in times])
        t, f = self.audio_positions(grid_t, grid_f, times)
        return rotation_table(self.angles(t, freq=f), device, dtype)


def _times(times: Tensor, grid_t: int) -> Tensor:
    t = torch.as_tensor(times).detach().to("cpu", torch.float64).reshape(-1)
    if t.numel() != grid_t:
        raise ValueError(f"got {t.numel()} token times for a time grid of {grid_t} tokens")
    return t


def rotation_table(angles: Tensor, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """``[N, P]`` angles → unit complex numbers ``e^{iθ}`` as ``[N, 1, P]`` (broadcast over heads).

    complex128 for a float64 ``dtype``, else complex64. Angles are built in float64 so long clips do not
    lose phase precision before the cast.
    """
    table = torch.polar(torch.ones_like(angles), angles)[:, None]
    return table.to(device=device, dtype=torch.complex128 if dtype == torch.float64 else torch.complex64)


def apply_rope(x: Tensor, table: Tensor) -> Tensor:
    """Rotate ``x [B, N, H, Dh]`` by ``table [N, 1, Dh/2]`` or ``[B, N, 1, Dh/2]`` (complex): ``z_j ← z_j · e^{iθ_j}``."""
    # Complex views need float32/64; half-precision inputs (autocast) rotate in float32 and cast back.
    xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
    out = torch.view_as_real(torch.view_as_complex(xf.unflatten(-1, (-1, 2))) * table).flatten(-2)
    return out.to(x.dtype)
