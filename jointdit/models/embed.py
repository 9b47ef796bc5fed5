"""Input/output embeddings: patchify, timestep embedding, and the zero-initialised output layer."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


# --------------------------------------------------------------------------------------------------
# Patchify / unpatchify (pure reshapes, so embed → unembed is an exact inverse)
# --------------------------------------------------------------------------------------------------
def check_divisible(name: str, dims: dict[str, int], patch: dict[str, int], field: str) -> None:
    """Raise a ValueError naming the latent dim that the patch size does not divide, and how to fix it."""
    for (dim_name, size), (patch_name, p) in zip(dims.items(), patch.items()):
        if size % p:
            raise ValueError(
                f"{name}: latent {dim_name}={size} is not divisible by {patch_name}={p} (model.{field}). "
                f"Either change the clip/latent size so {dim_name} is a multiple of {p} "
                f"(e.g. {size - size % p} or {size + p - size % p}), or choose a {patch_name} that divides {size}."
            )


def patchify_video(z: Tensor, patch: tuple[int, int, int]) -> Tensor:
    """``[B, T, C, H, W]`` → ``[B, (T/pt)(H/ph)(W/pw), pt·C·ph·pw]``, tokens in (t, h, w) row-major order."""
    pt, ph, pw = patch
    b, t, c, h, w = z.shape
    z = z.reshape(b, t // pt, pt, c, h // ph, ph, w // pw, pw)
    z = z.permute(0, 1, 4, 6, 2, 3, 5, 7)  # [B, t', h', w', pt, C, ph, pw]
    return z.reshape(b, (t // pt) * (h // ph) * (w // pw), pt * c * ph * pw)


def unpatchify_video(x: Tensor, patch: tuple[int, int, int], grid: tuple[int, int, int], channels: int) -> Tensor:
    """Exact inverse of :func:`patchify_video`."""
    pt, ph, pw = patch
    gt, gh, gw = grid
    b = x.shape[0]
    x = x.reshape(b, gt, gh, gw, pt, channels, ph, pw)
    x = x.permute(0, 1, 4, 5, 2, 6, 3, 7)  # [B, t', pt, C, h', ph, w', pw]
    return x.reshape(b, gt * pt, channels, gh * ph, gw * pw)


def patchify_audio(z: Tensor, patch: tuple[int, int]) -> Tensor:
    """``[B, C, L, F]`` → ``[B, (L/pt)(F/pf), C·pt·pf]``, tokens in (t, f) row-major order."""
    pt, pf = patch
    b, c, length, f = z.shape
    z = z.reshape(b, c, length // pt, pt, f // pf, pf)
    z = z.permute(0, 2, 4, 1, 3, 5)  # [B, t', f', C, pt, pf]
    return z.reshape(b, (length // pt) * (f // pf), c * pt * pf)


def unpatchify_audio(x: Tensor, patch: tuple[int, int], grid: tuple[int, int], channels: int) -> Tensor:
    """Exact inverse of :func:`patchify_audio`."""
    pt, pf = patch
    gt, gf = grid
    b = x.shape[0]
    x = x.reshape(b, gt, gf, channels, pt, pf)
    x = x.permute(0, 3, 1, 4, 2, 5)  # [B, C, t', pt, f', pf]
    return x.reshape(b, channels, gt * pt, gf * pf)


class PatchEmbed(nn.Module):
    """Linear embedding of flattened patches (equal to a Conv with kernel = stride = patch, but one GEMM)."""

    def __init__(self, patch_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Linear(patch_dim, hidden_size)
        nn.init.xavier_uniform_(self.proj.weight)  # as DiT does for its patch conv
        nn.init.zeros_(self.proj.bias)

    def forward(self, patches: Tensor) -> Tensor:
        return self.proj(patches)


# --------------------------------------------------------------------------------------------------
# Timestep embedding
# --------------------------------------------------------------------------------------------------
class TimestepEmbedder(nn.Module):
    """``t ∈ [0, 1]`` (any shape) → ``[..., D]``: sinusoid of ``1000·t`` followed by a 2-layer MLP (DiT).

    ``emb(t) = MLP([cos(1000 t ω_i), sin(1000 t ω_i)])`` with ``ω_i = 10000^{-i/(F/2)}``. The ×1000 puts
    flow time on the scale the sinusoid bands were designed for (integer diffusion steps).
    """

    def __init__(self, hidden_size: int, frequency_size: int = 256) -> None:
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        nn.init.normal_(self.mlp[0].weight, std=0.02)
        nn.init.normal_(self.mlp[2].weight, std=0.02)

    @staticmethod
    def sinusoid(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = 1000.0 * t.float()[..., None] * freqs
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: Tensor) -> Tensor:
        emb = self.sinusoid(t, self.frequency_size).to(self.mlp[0].weight.dtype)
        return self.mlp(emb)


# --------------------------------------------------------------------------------------------------
# Output layer
# --------------------------------------------------------------------------------------------------
def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """``x·(1 + scale) + shift`` per modulation group.

    ``x [B, N, D]`` is viewed as ``[B, G, N/G, D]`` so one modulation vector per group (G = 1 for a
    per-sample timestep, G = latent frames for per-frame video timesteps) applies to all of its tokens.
    ``shift``/``scale`` are ``[B, G, 1, D]``.
    """
    b, n, d = x.shape
    xg = x.view(b, shift.shape[1], n // shift.shape[1], d)
    return torch.addcmul(shift, xg, 1 + scale).view(b, n, d)


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm + linear back to patch values; both adaLN and linear start at zero.

    ``out = W · (LN(x)·(1 + scale(c)) + shift(c)) + b`` with W = b = 0 at init, so an untrained model
    predicts exactly zero velocity.
    """

    def __init__(self, hidden_size: int, patch_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.linear = nn.Linear(hidden_size, patch_dim)
        for lin in (self.adaLN_modulation[-1], self.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).unsqueeze(2).chunk(2, dim=-1)  # 2 × [B, G, 1, D]
        return self.linear(modulate(self.norm(x), shift, scale))
