"""Joint attention over [video; audio; context] with exact, structural modality isolation.

For a query token of modality m the attention is ordinary softmax attention over its ALLOWED key set:

    o_q = Σ_{k ∈ K_m} softmax_k(q·k / √Dh) v_k

    mode    K_video                    K_audio
    full    video ∪ audio ∪ context    audio ∪ video ∪ context
    iso_v   video ∪ context            audio ∪ video ∪ context     (video blind to audio)
    iso_a   video ∪ audio ∪ context    audio ∪ context             (audio blind to video)
    iso     video ∪ context            audio ∪ context

An excluded modality is not in the key set at all (no additive −∞/−1e4 mask), so an isolated modality
computes bit-for-bit what it would compute with the other modality absent (for a single-mode batch;
grouping a mixed-mode batch may change float rounding only), and no gradient flows between them.
Context tokens are keys/values only.

Memory knobs (they never change which keys a query may see):
- ``q_chunk_v`` / ``q_chunk_a``: queries are processed in chunks against the full key set — rows of a
  softmax are independent, so the result equals the unchunked one up to float rounding.
- ``kv_pool_space = s``: keys/values are averaged over s×s neighbouring video positions and over s
  neighbouring mel-band tokens of the audio, within one time step of one modality — time stays exact,
  which is what audio-visual sync needs. The cheaper way to shrink the key set; use it first.
- ``kv_downsample = r``: keys/values of each modality are averaged over r consecutive latent TIME steps
  of that modality alone. It blurs the very timing sync depends on: at 8 fps, r = 8 averages a whole
  second of video keys into one.
Both pool each modality on its own, before concatenation, so pooling never mixes modalities or touches
context; a trailing group shorter than the window is averaged over its own members.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

MODES: tuple[str, ...] = ("full", "iso_v", "iso_a", "iso")
ModeArg = str | Sequence[str]


def video_sees_audio(mode: str) -> bool:
    return mode in ("full", "iso_a")


def audio_sees_video(mode: str) -> bool:
    return mode in ("full", "iso_v")


def normalize_mode(mode: ModeArg, batch_size: int) -> str | list[str]:
    """Validate; a per-sample list whose entries are all equal collapses to that single mode."""
    if isinstance(mode, str):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        return mode
    modes = list(mode)
    if len(modes) != batch_size:
        raise ValueError(f"per-sample mode list has {len(modes)} entries for a batch of {batch_size}")
    for m in modes:
        if m not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {m!r}")
    return modes[0] if len(set(modes)) == 1 else modes


@dataclass
class AttentionKnobs:
    """Runtime memory knobs (not part of the exported model config)."""

    q_chunk_v: int = 0  # video query tokens per chunk; 0 = all at once
    q_chunk_a: int = 0  # audio query tokens per chunk; 0 = all at once
    kv_downsample: int = 1  # average K/V over this many latent time steps, per modality
    kv_pool_space: int = 1  # average K/V over s×s video positions / s mel-band tokens, per time step

    def __post_init__(self) -> None:
        if self.q_chunk_v < 0 or self.q_chunk_a < 0:
            raise ValueError("q_chunk_v / q_chunk_a must be >= 0 (0 disables chunking)")
        if self.kv_downsample < 1:
            raise ValueError("kv_downsample must be >= 1 (1 disables pooling)")
        if self.kv_pool_space < 1:
            raise ValueError("kv_pool_space must be >= 1 (1 disables pooling)")

    @property
    def pools(self) -> bool:
        return self.kv_downsample > 1 or self.kv_pool_space > 1


def pooled_grid(grid: Sequence[int], knobs: AttentionKnobs) -> tuple[int, ...]:
    """The token grid ``(t, *space)`` of one modality's keys after :func:`pool_kv` (ceil division per axis)."""
    t, *space = (int(g) for g in grid)
    s, r = knobs.kv_pool_space, knobs.kv_downsample
    return (-(-t // r) if t > 1 else t, *(-(-n // min(s, n)) for n in space))


def pool_space(x: Tensor, grid: Sequence[int], window: int) -> Tensor:
    """Average ``x [B, H, N, Dh]`` over ``window``-wide blocks of each spatial axis, within each time step.

    Tokens are ordered row-major over ``grid = (t, *space)`` (one or two spatial axes: (t, h, w) video,
    (t, f) audio). An axis shorter than the window is averaged whole; a trailing block holds fewer
    members. Returns ``[B, H, N', Dh]``. Written as zero-pad + block sum / member count, so autograd
    saves nothing for it (an ``avg_pool`` would keep its full-size input for the backward).
    """
    t, *space = (int(g) for g in grid)
    if window == 1 or all(n == 1 for n in space):
        return x
    b, h, _, d = x.shape
    kernel = [min(window, n) for n in space]
    padded = [-(-n // k) * k for n, k in zip(space, kernel)]
    pad = [0, 0]                                                          # Dh, then the spatial axes last-first
    for n, m in reversed(list(zip(space, padded))):
        pad += [0, m - n]

    def block_sum(y: Tensor) -> Tensor:                                   # [..., *padded, Dh] → [..., *pooled, Dh]
        lead = y.shape[:-len(space) - 1]
        split = [v for m, k in zip(padded, kernel) for v in (m // k, k)]
        y = y.reshape(*lead, *split, y.shape[-1])
        return y.sum(dim=tuple(len(lead) + 2 * i + 1 for i in range(len(space))))

    summed = block_sum(F.pad(x.reshape(b, h, t, *space, d), pad))       # [B, H, t, *pooled, Dh]
    counts = block_sum(F.pad(x.new_ones(*space, 1), pad))                 # [*pooled, 1] members per block
    return (summed / counts).reshape(b, h, -1, d)


def pool_kv(k: Tensor, v: Tensor, grid: Sequence[int], knobs: AttentionKnobs) -> tuple[Tensor, Tensor]:
    """One modality's keys and values pooled over space (``kv_pool_space``) then time (``kv_downsample``)."""
    t = int(grid[0])
    k, v = (pool_space(x, grid, knobs.kv_pool_space) for x in (k, v))
    return pool_time(k, t, knobs.kv_downsample), pool_time(v, t, knobs.kv_downsample)


def pool_time(x: Tensor, time_steps: int, factor: int) -> Tensor:
    """Average ``x [B, H, N, Dh]`` over ``factor`` consecutive time steps of ONE modality's token grid.

    Tokens are ordered time-major (N = time_steps × tokens_per_step). A trailing group shorter than
    ``factor`` is averaged over its own members. Returns ``[B, H, ceil(T/factor)·tokens_per_step, Dh]``.
    """
    if factor == 1 or time_steps <= 1:
        return x
    b, h, n, d = x.shape
    per = n // time_steps
    x = x.view(b, h, time_steps, per, d)
    full = (time_steps // factor) * factor
    parts = []
    if full:
        parts.append(x[:, :, :full].reshape(b, h, full // factor, factor, per, d).mean(dim=3))
    if full < time_steps:
        parts.append(x[:, :, full:].mean(dim=2, keepdim=True))
    return torch.cat(parts, dim=2).reshape(b, h, -1, d)


def sdpa_chunked(q: Tensor, k: Tensor, v: Tensor, chunk: int) -> Tensor:
    """SDPA of ``q [B,H,Nq,Dh]`` against ``k, v [B,H,Nk,Dh]``, ``chunk`` query tokens at a time."""
    if chunk <= 0 or q.shape[2] <= chunk:
        return F.scaled_dot_product_attention(q, k, v)
    return torch.cat(
        [F.scaled_dot_product_attention(qc, k, v) for qc in q.split(chunk, dim=2)],
        dim=2,
    )


def _attend_one_mode(
    q_v: Tensor, k_v: Tensor, v_v: Tensor,
    q_a: Tensor, k_a: Tensor, v_a: Tensor,
    k_c: Tensor, v_c: Tensor,
    mode: str, knobs: AttentionKnobs,
) -> tuple[Tensor, Tensor]:
    n_v = q_v.shape[2]
    if mode == "full" and knobs.q_chunk_v == 0 and knobs.q_chunk_a == 0:
        # Both query sets share one key set: a single SDPA call over [video; audio] queries.
        q = torch.cat([q_v, q_a], dim=2)                           # [B, H, Nv+Na, Dh]
        k = torch.cat([k_v, k_a, k_c], dim=2)                      # [B, H, Nv'+Na'+Nc, Dh]
        v = torch.cat([v_v, v_a, v_c], dim=2)                      # [B, H, Nv'+Na'+Nc, Dh]
        o = F.scaled_dot_product_attention(q, k, v)                # [B, H, Nv+Na, Dh]
        return o[:, :, :n_v], o[:, :, n_v:]
    if mode == "full":
        k_all = torch.cat([k_v, k_a, k_c], dim=2)
        v_all = torch.cat([v_v, v_a, v_c], dim=2)
        return sdpa_chunked(q_v, k_all, v_all, knobs.q_chunk_v), sdpa_chunked(q_a, k_all, v_all, knobs.q_chunk_a)
    keys_v, vals_v = ([k_v, k_a, k_c], [v_v, v_a, v_c]) if video_sees_audio(mode) else ([k_v, k_c], [v_v, v_c])
    keys_a, vals_a = ([k_a, k_v, k_c], [v_a, v_v, v_c]) if audio_sees_video(mode) else ([k_a, k_c], [v_a, v_c])
    o_v = sdpa_chunked(q_v, torch.cat(keys_v, dim=2), torch.cat(vals_v, dim=2), knobs.q_chunk_v)
    o_a = sdpa_chunked(q_a, torch.cat(keys_a, dim=2), torch.cat(vals_a, dim=2), knobs.q_chunk_a)
    return o_v, o_a


def joint_attention(
    q_v: Tensor, k_v: Tensor, v_v: Tensor,
    q_a: Tensor, k_a: Tensor, v_a: Tensor,
    k_c: Tensor, v_c: Tensor,
    mode: str | list[str],
    video_grid: Sequence[int],
    audio_grid: Sequence[int],
    knobs: AttentionKnobs | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention of video and audio queries over their allowed [video; audio; context] keys.

    All tensors are ``[B, H, N, Dh]``. ``mode`` is one mode or a per-sample list (already normalised by
    :func:`normalize_mode`). With mixed modes only this op is split: samples are grouped by mode, each
    group attends over its own key sets, and outputs are put back in batch order.
    ``video_grid (t, h, w)`` / ``audio_grid (t, f)`` are the modalities' token grids (used only by the
    K/V pooling knobs). Returns ``(o_v [B,H,Nv,Dh], o_a [B,H,Na,Dh])``.
    """
    knobs = knobs or AttentionKnobs()
    if knobs.pools:  # pool each modality on its own, before any concatenation
        k_v, v_v = pool_kv(k_v, v_v, video_grid, knobs)
        k_a, v_a = pool_kv(k_a, v_a, audio_grid, knobs)
    if isinstance(mode, str):
        return _attend_one_mode(q_v, k_v, v_v, q_a, k_a, v_a, k_c, v_c, mode, knobs)

    outs_v, outs_a, order = [], [], []
    for m in dict.fromkeys(mode):  # modes in first-seen order
        idx = torch.tensor([i for i, mi in enumerate(mode) if mi == m], device=q_v.device)
        sel = [t.index_select(0, idx) for t in (q_v, k_v, v_v, q_a, k_a, v_a, k_c, v_c)]
        o_v, o_a = _attend_one_mode(*sel, mode=m, knobs=knobs)
        outs_v.append(o_v)
        outs_a.append(o_a)
        order.append(idx)
    inverse = torch.argsort(torch.cat(order))
    return torch.cat(outs_v).index_select(0, inverse), torch.cat(outs_a).index_select(0, inverse)
