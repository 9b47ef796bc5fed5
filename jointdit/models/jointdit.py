"""JointDiT: a dual-stream diffusion transformer that denoises video and audio latents jointly.

    JointDiT(z_video, z_audio, t_video, t_audio, cond, mode) -> (v_video, v_audio)

z_video [B, Tv, Cv, hv, wv] and z_audio [B, Ca, La, Fa] are noisy latents x_t = (1−t)·x0 + t·ε; the
outputs are velocities ε − x0 of the same shapes. Each modality keeps its own weights ("experts") in
every block; the two streams meet in ONE attention over [video; audio; context] tokens, whose key sets
``mode`` restricts exactly (see attention.py). Structure follows facebookresearch/DiT ``models.py``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from jointdit.models.attention import (
    AttentionKnobs,
    pooled_grid,
    ModeArg,
    audio_sees_video,
    joint_attention,
    normalize_mode,
    video_sees_audio,
)
from jointdit.models.conditioning import Condition, ConditionEmbedder
from jointdit.models.embed import (
    FinalLayer,
    PatchEmbed,
    TimestepEmbedder,
    check_divisible,
    modulate,
    patchify_audio,
    patchify_video,
    unpatchify_audio,
    unpatchify_video,
)
from jointdit.models.rope import JointRope, apply_rope

SkipArg = Sequence[int] | Sequence[Sequence[int] | None] | None

#################################################################################
#                                  Size presets                                 #
#################################################################################
# The ONLY place model sizes are written down; conf/model/*.yaml name a preset.
PRESETS: dict[str, dict[str, int]] = {
    "tiny":  dict(hidden_size=128, depth=4,  num_heads=4),   # noqa: E241
    "small": dict(hidden_size=384, depth=8,  num_heads=6),   # noqa: E241
    "base":  dict(hidden_size=768, depth=12, num_heads=12),  # noqa: E241
}
DEFAULT_PRESET = "small"
_DEFAULT = PRESETS[DEFAULT_PRESET]
# Defaults for NEW models that differ from the constructor's, which stay what older exports were trained
# with (their config.json lacks the field, and loading it must rebuild the same function).
NEW_MODEL_DEFAULTS: dict[str, Any] = {"rope_space_theta": 32.0}
PREDICTIONS: tuple[str, ...] = ("velocity", "sample")
# x̂0 → v divides by t; below this t the division is clamped (JiT's 0.05), so given (t = 0) positions stay finite.
SAMPLE_PREDICTION_T_MIN = 0.05


#################################################################################
#                                 Block pieces                                  #
#################################################################################
def gated_residual(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    """``x + gate·y`` with ``gate [B, G, 1, D]`` applied per modulation group of ``x, y [B, N, D]``."""
    b, n, d = x.shape
    g = gate.shape[1]
    return torch.addcmul(x.view(b, g, n // g, d), gate, y.view(b, g, n // g, d)).view(b, n, d)


def qk_layer_norm(head_dim: int) -> nn.LayerNorm:
    """Per-head LayerNorm with a learned scale and no bias, for queries and keys."""
    return nn.LayerNorm(head_dim, eps=1e-6, bias=False)


class Mlp(nn.Module):
    """``fc2(GELU(fc1(x)))``."""

    def __init__(self, hidden_size: int, mlp_hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.act = nn.GELU()  # exact erf GELU: on CPU 2.4x faster (fwd+bwd) than the tanh approximation
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ModalityExpert(nn.Module):
    """One modality's weights in a joint block: adaLN-Zero, QKV and output projections, QK-norm, MLP.

    With c the modality's conditioning vector (its own timestep embedding + pooled condition):
        (shift1, scale1, gate1, shift2, scale2, gate2) = W_ada·SiLU(c) + b_ada      (W_ada = b_ada = 0 at init)
        q, k, v = W_qkv · (LN(x)·(1+scale1) + shift1)
        x ← x + gate1 · W_o · Attn(q, k, v)
        x ← x + gate2 · MLP(LN(x)·(1+scale2) + shift2)
    Zero-initialised adaLN makes every block the identity at init (DiT's adaLN-Zero).
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = hidden_size // num_heads
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        # QK-norm keeps attention logits bounded when one modality's activations grow faster. LayerNorm
        # (ViT-22B's choice) rather than RMSNorm: torch's CPU RMSNorm backward is unfused and ~1.6x slower.
        self.q_norm = qk_layer_norm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = qk_layer_norm(head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    def modulation(self, c: Tensor) -> tuple[Tensor, ...]:
        """``c [B, G, D]`` → six ``[B, G, 1, D]`` tensors (shift1, scale1, gate1, shift2, scale2, gate2)."""
        return self.adaLN_modulation(c).unsqueeze(2).chunk(6, dim=-1)

    def qkv_heads(self, x: Tensor, shift: Tensor, scale: Tensor, rope: Tensor) -> tuple[Tensor, ...]:
        """Modulated pre-norm → q, k, v ``[B, H, N, Dh]`` with QK-norm and RoPE applied to q and k."""
        b, n, d = x.shape
        h = modulate(self.norm1(x), shift, scale)                      # [B, N, D]
        q, k, v = self.qkv(h).view(b, n, 3, self.num_heads, -1).unbind(2)  # 3 × [B, N, H, Dh]
        q = apply_rope(self.q_norm(q), rope)                           # [B, N, H, Dh]
        k = apply_rope(self.k_norm(k), rope)                           # [B, N, H, Dh]
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # 3 × [B, H, N, Dh]

    def attn_out(self, o: Tensor) -> Tensor:
        b, _, n, _ = o.shape
        return self.proj(o.transpose(1, 2).reshape(b, n, -1))          # [B, N, D]

    def ff(self, x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
        return self.mlp(modulate(self.norm2(x), shift, scale))         # [B, N, D]


class ContextKV(nn.Module):
    """Keys/values of the (already normalised) context tokens for one block; context has no queries
    and no RoPE, so it stays a fixed set of "memory" tokens every block reads from."""

    def __init__(self, hidden_size: int, num_heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.kv = nn.Linear(hidden_size, 2 * hidden_size)
        self.k_norm = qk_layer_norm(hidden_size // num_heads) if qk_norm else nn.Identity()

    def forward(self, ctx: Tensor) -> tuple[Tensor, Tensor]:
        b, n, _ = ctx.shape
        k, v = self.kv(ctx).view(b, n, 2, self.num_heads, -1).unbind(2)  # 2 × [B, Lc, H, Dh]
        return self.k_norm(k).transpose(1, 2), v.transpose(1, 2)        # 2 × [B, H, Lc, Dh]


class JointBlock(nn.Module):
    """Dual-stream block: per-modality experts around ONE joint attention over [video; audio; context]."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: bool) -> None:
        super().__init__()
        self.video = ModalityExpert(hidden_size, num_heads, mlp_ratio, qk_norm)
        self.audio = ModalityExpert(hidden_size, num_heads, mlp_ratio, qk_norm)
        self.context = ContextKV(hidden_size, num_heads, qk_norm)

    def forward(
        self,
        x_v: Tensor, x_a: Tensor, ctx: Tensor,
        c_v: Tensor, c_a: Tensor,
        rope_v: Tensor, rope_a: Tensor,
        mode: str | list[str], video_grid: Sequence[int], audio_grid: Sequence[int], knobs: AttentionKnobs,
        skip_attention: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """One block; ``skip_attention [B]`` (bool) drops the attention residual of the marked samples
        (STG's perturbed branch: ``x ← x`` instead of ``x ← x + gate·W_o·Attn``, both modalities)."""
        # 1. adaLN-Zero parameters, each modality from its OWN timestep (+ pooled condition)
        sv1, cv1, gv1, sv2, cv2, gv2 = self.video.modulation(c_v)      # 6 × [B, Gv, 1, D]
        sa1, ca1, ga1, sa2, ca2, ga2 = self.audio.modulation(c_a)      # 6 × [B, 1, 1, D]
        if skip_attention is not None:
            keep = (~skip_attention).to(gv1.dtype)[:, None, None, None]  # [B, 1, 1, 1]
            gv1, ga1 = gv1 * keep, ga1 * keep

        # 2. per-modality QKV experts (QK-norm + RoPE); context gives keys/values only, no RoPE
        q_v, k_v, v_v = self.video.qkv_heads(x_v, sv1, cv1, rope_v)    # 3 × [B, H, Nv, Dh]
        q_a, k_a, v_a = self.audio.qkv_heads(x_a, sa1, ca1, rope_a)    # 3 × [B, H, Na, Dh]
        k_c, v_c = self.context(ctx)                                   # 2 × [B, H, Lc, Dh]

        # 3. ONE joint attention; `mode` decides which modalities each query may see
        o_v, o_a = joint_attention(q_v, k_v, v_v, q_a, k_a, v_a, k_c, v_c, mode,
                                   video_grid, audio_grid, knobs)             # [B,H,Nv,Dh], [B,H,Na,Dh]

        # 4. per-modality output projection, gated residual
        x_v = gated_residual(x_v, gv1, self.video.attn_out(o_v))       # [B, Nv, D]
        x_a = gated_residual(x_a, ga1, self.audio.attn_out(o_a))       # [B, Na, D]

        # 5. per-modality MLP expert, gated residual
        x_v = gated_residual(x_v, gv2, self.video.ff(x_v, sv2, cv2))   # [B, Nv, D]
        x_a = gated_residual(x_a, ga2, self.audio.ff(x_a, sa2, ca2))   # [B, Na, D]
        return x_v, x_a


#################################################################################
#                                    JointDiT                                   #
#################################################################################
class JointDiT(ModelMixin, ConfigMixin):
    """Joint video+audio diffusion transformer (see the module docstring for the contract).

    Config fields (saved in config.json by ``save_pretrained``):
        hidden_size, depth, num_heads, mlp_ratio   transformer size (presets: ``PRESETS``)
        video_in_channels, video_patch_size        Cv and (pt, ph, pw) of z_video [B, Tv, Cv, hv, wv]
        audio_in_channels, audio_patch_size        Ca and (pt, pf) of z_audio [B, Ca, La, Fa]
        video_latent_fps, audio_latent_fps         latent steps per second (RoPE time is in seconds)
        text_token_dim, text_pooled_dim,           CLIP feature widths (``ClipConditioner.model_kwargs()``)
        image_embed_dim, text_len
        qk_norm, rope_theta, rope_time_scale       attention details (rope_time_scale None → finer token rate)
        rope_space_theta                           band base of the height/width/mel RoPE planes (rope.py)
        prediction                                 what the network outputs (see below); forward always
                                                   returns velocities
    ``prediction``: ``"velocity"`` — the last layer is the velocity ε − x0; ``"sample"`` — it is the clean
    latent x̂0 and forward returns v = (z_t − x̂0) / max(t, t_min), so the flow loss becomes
    ‖x0 − x̂0‖²/t² (JiT, Li & He 2025). With tokens as wide as or wider than the model (large patches),
    a velocity or noise output must carry the token's full-rank noise through the network and fails;
    the clean latent lies on a low-dimensional manifold and does not.
    Runtime memory knobs are NOT config: see :meth:`set_memory_knobs`.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["JointBlock"]

    @register_to_config
    def __init__(
        self,
        hidden_size: int = _DEFAULT["hidden_size"],
        depth: int = _DEFAULT["depth"],
        num_heads: int = _DEFAULT["num_heads"],
        mlp_ratio: float = 4.0,
        video_in_channels: int = 192,
        video_patch_size: tuple[int, int, int] = (1, 2, 2),
        audio_in_channels: int = 1,
        audio_patch_size: tuple[int, int] = (4, 16),
        video_latent_fps: float = 8.0,
        audio_latent_fps: float = 100.0,
        text_token_dim: int = 512,
        text_pooled_dim: int = 512,
        image_embed_dim: int = 512,
        text_len: int = 77,
        qk_norm: bool = True,
        rope_theta: float = 10000.0,
        rope_time_scale: float | None = None,
        rope_space_theta: float = 10000.0,
        prediction: str = "velocity",
    ) -> None:
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}")
        self.video_patch = tuple(int(p) for p in video_patch_size)
        self.audio_patch = tuple(int(p) for p in audio_patch_size)
        if len(self.video_patch) != 3 or len(self.audio_patch) != 2:
            raise ValueError("video_patch_size must be (pt, ph, pw) and audio_patch_size (pt, pf)")
        pt, ph, pw = self.video_patch
        pa, pf = self.audio_patch
        self.video_patch_dim = pt * video_in_channels * ph * pw
        self.audio_patch_dim = audio_in_channels * pa * pf

        self.video_in = PatchEmbed(self.video_patch_dim, hidden_size)
        self.audio_in = PatchEmbed(self.audio_patch_dim, hidden_size)
        self.time_embed = TimestepEmbedder(hidden_size)
        self.cond_embed = ConditionEmbedder(hidden_size, text_token_dim, text_pooled_dim, image_embed_dim, text_len)
        self.blocks = nn.ModuleList([JointBlock(hidden_size, num_heads, mlp_ratio, qk_norm) for _ in range(depth)])
        self.video_out = FinalLayer(hidden_size, self.video_patch_dim)
        self.audio_out = FinalLayer(hidden_size, self.audio_patch_dim)

        self.rope = JointRope(hidden_size // num_heads, pt / video_latent_fps, pa / audio_latent_fps,
                              theta=rope_theta, time_scale=rope_time_scale,
                              video_steps_per_token=pt, audio_steps_per_token=pa, space_theta=rope_space_theta)
        self._rope_cache: dict[tuple, Tensor] = {}
        self.knobs = AttentionKnobs()
        self.gradient_checkpointing = False
        self._init_linears()

    def _init_linears(self) -> None:
        """Xavier for the expert projections; adaLN and outputs keep their zero init (adaLN-Zero)."""
        for block in self.blocks:
            for expert in (block.video, block.audio):
                for lin in (expert.qkv, expert.proj, expert.mlp.fc1, expert.mlp.fc2):
                    nn.init.xavier_uniform_(lin.weight)
                    nn.init.zeros_(lin.bias)
                nn.init.zeros_(expert.adaLN_modulation[-1].weight)
                nn.init.zeros_(expert.adaLN_modulation[-1].bias)
            nn.init.xavier_uniform_(block.context.kv.weight)
            nn.init.zeros_(block.context.kv.bias)

    # ------------------------------------------------------------------------------------------
    def set_memory_knobs(self, q_chunk_v: int = 0, q_chunk_a: int = 0, kv_downsample: int = 1,
                         gradient_checkpointing: bool = False, kv_pool_space: int = 1) -> None:
        """Runtime memory/compute trade-offs (the ``vram`` config group fills these).

        q_chunk_v / q_chunk_a: query tokens per attention chunk (0 = off); exact up to float rounding.
        kv_downsample: average K/V over this many latent time steps within each modality (1 = off);
            an approximation, never mixing modalities, that blurs timing (see attention.py).
        kv_pool_space: average K/V over s×s video positions and s mel-band tokens within each time step
            (1 = off); an approximation that keeps time exact.
        gradient_checkpointing: recompute each block in backward (torch.utils.checkpoint, non-reentrant).
        """
        self.knobs = AttentionKnobs(int(q_chunk_v), int(q_chunk_a), int(kv_downsample), int(kv_pool_space))
        self.gradient_checkpointing = bool(gradient_checkpointing)

    def grids(self, z_video: Tensor, z_audio: Tensor) -> tuple[tuple[int, int, int], tuple[int, int]]:
        """Token grids ((t, h, w), (t, f)); raises a ValueError naming any dim a patch does not divide."""
        cfg = self.config
        if z_video.ndim != 5 or z_audio.ndim != 4:
            raise ValueError(f"expected z_video [B,Tv,Cv,hv,wv] and z_audio [B,Ca,La,Fa], got "
                             f"{tuple(z_video.shape)} and {tuple(z_audio.shape)}")
        if z_video.shape[0] != z_audio.shape[0]:
            raise ValueError(f"batch sizes differ: z_video {z_video.shape[0]} vs z_audio {z_audio.shape[0]}")
        if z_video.shape[2] != cfg.video_in_channels:
            raise ValueError(f"z_video has {z_video.shape[2]} channels (dim 2), model.video_in_channels="
                             f"{cfg.video_in_channels}; set it to the video codec's latent channels")
        if z_audio.shape[1] != cfg.audio_in_channels:
            raise ValueError(f"z_audio has {z_audio.shape[1]} channels (dim 1), model.audio_in_channels="
                             f"{cfg.audio_in_channels}; set it to the audio codec's latent channels")
        _, tv, _, hv, wv = z_video.shape
        _, _, la, fa = z_audio.shape
        pt, ph, pw = self.video_patch
        pa, pf = self.audio_patch
        check_divisible("z_video", {"frames Tv": tv, "height hv": hv, "width wv": wv},
                        {"patch_t": pt, "patch_h": ph, "patch_w": pw}, "video_patch_size")
        check_divisible("z_audio", {"time La": la, "freq Fa": fa}, {"patch_t": pa, "patch_f": pf}, "audio_patch_size")
        return (tv // pt, hv // ph, wv // pw), (la // pa, fa // pf)

    def _rope(self, kind: str, grid: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (kind, grid, device, dtype)
        if key not in self._rope_cache:
            fn = self.rope.video if kind == "video" else self.rope.audio
            self._rope_cache[key] = fn(*grid, device=device, dtype=dtype)
        return self._rope_cache[key]

    def _video_time(self, t_video: Tensor, batch: int, frames: int, hw: tuple[int, int] = (1, 1)) -> Tensor:
        """``t_video [B]``, ``[B, Tv]`` or ``[B, Tv·hv·wv]`` → modulation groups ``[B, G]`` (G = 1, Tv/pt
        per-frame groups, or Nv per-token groups).

        Per-frame times are averaged within a temporal patch (use patch_t = 1 to keep a clean first
        frame exact); frames that all share one time collapse to G = 1, which is cheaper and identical.
        """
        t = t_video.reshape(batch, -1)
        if t.shape[1] == 1:
            return t
        if t.shape[1] > frames and t.shape[1] % frames == 0:  # [B, Tv·hv·wv] per position (masks.py)
            return self._position_time(t, batch, frames, hw)
        if t.shape[1] != frames:
            raise ValueError(f"t_video must be [B] or [B, Tv={frames}], got {tuple(t_video.shape)}")
        if bool((t == t[:, :1]).all()):
            return t[:, :1]
        return t.view(batch, frames // self.video_patch[0], self.video_patch[0]).mean(-1)

    def _position_time(self, t: Tensor, batch: int, frames: int, hw: tuple[int, int]) -> Tensor:
        """Per-position video times ``[B, Tv·hv·wv]`` ((t, h, w) row-major) → per-token groups ``[B, Nv]``
        (averaged within a patch), or per-frame groups when every frame is uniform."""
        pt, ph, pw = self.video_patch
        hv, wv = hw
        t = t.view(batch, frames, hv * wv)                                             # [B, Tv, hv·wv]
        if bool((t == t[:, :, :1]).all()):
            return self._video_time(t[:, :, 0], batch, frames)
        t = t.view(batch, frames // pt, pt, hv // ph, ph, wv // pw, pw).mean((2, 4, 6))
        return t.reshape(batch, -1)                                                    # [B, Nv]

    def _audio_time(self, t_audio: Tensor, batch: int, steps: int) -> Tensor:
        """``t_audio`` scalar, ``[B]`` or ``[B, La]`` (per latent step) → modulation groups ``[B, Ga]``
        (Ga = 1, or La/pa per-patch groups with times averaged within a patch)."""
        t = t_audio.reshape(-1).expand(batch)[:, None] if t_audio.ndim < 2 else t_audio.reshape(batch, -1)
        if t.shape[1] == 1 or bool((t == t[:, :1]).all()):
            return t[:, :1]
        if t.shape[1] != steps:
            raise ValueError(f"t_audio must be [B] or [B, La={steps}], got {tuple(t_audio.shape)}")
        return t.view(batch, steps // self.audio_patch[0], self.audio_patch[0]).mean(-1)

    # ------------------------------------------------------------------------------------------
    def _skip_masks(self, skip: SkipArg, batch: int, device: torch.device) -> dict[int, Tensor]:
        """``skip_attention_blocks`` → ``{block index: [B] bool}`` (only blocks some sample skips)."""
        if skip is None:
            return {}
        items = list(skip)
        per_sample = bool(items) and not all(isinstance(i, int) for i in items)
        rows = items if per_sample else [items] * batch
        if len(rows) != batch:
            raise ValueError(f"per-sample skip_attention_blocks has {len(rows)} entries for a batch of {batch}")
        depth = len(self.blocks)
        masks: dict[int, Tensor] = {}
        for i, row in enumerate(rows):
            for idx in row or ():
                idx = int(idx)
                if not -depth <= idx < depth:
                    raise ValueError(f"skip_attention_blocks names block {idx}; the model has {depth} blocks")
                masks.setdefault(idx % depth, torch.zeros(batch, dtype=torch.bool, device=device))[i] = True
        return masks

    def _rope_for(self, kind: str, grid: tuple[int, ...], times: Tensor | None, device: torch.device,
                  dtype: torch.dtype) -> Tensor:
        """Rotation table for a token grid; ``times`` are LATENT centre times ``[T]`` or ``[B, T]`` in seconds."""
        if times is None:
            return self._rope(kind, grid, device, dtype)
        patch_t = self.video_patch[0] if kind == "video" else self.audio_patch[0]
        t = torch.as_tensor(times).detach().to("cpu", torch.float64)
        if t.ndim == 2 and bool((t == t[:1]).all()):
            t = t[0]                                                   # one shared row: one cached table
        if t.shape[-1] != grid[0] * patch_t:
            raise ValueError(f"{kind}_times has {t.shape[-1]} latent times; the {kind} latent has "
                             f"{grid[0] * patch_t} time steps")
        token_t = JointRope.token_times(t, patch_t)                    # [Tt] or [B, Tt]
        if token_t.ndim == 2:
            fn = self.rope.video if kind == "video" else self.rope.audio
            return fn(*grid, device=device, dtype=dtype, times=token_t)  # [B, N, 1, P]
        key = (kind, grid, device, dtype, token_t.numpy().tobytes())
        if key not in self._rope_cache:
            if len(self._rope_cache) > 64:
                self._rope_cache.clear()
            fn = self.rope.video if kind == "video" else self.rope.audio
            self._rope_cache[key] = fn(*grid, device=device, dtype=dtype, times=token_t)
        return self._rope_cache[key]

    def forward(
        self,
        z_video: Tensor,
        z_audio: Tensor,
        t_video: Tensor,
        t_audio: Tensor,
        cond: Condition | None = None,
        mode: ModeArg = "full",
        *,
        video_times: Tensor | None = None,
        audio_times: Tensor | None = None,
        skip_attention_blocks: SkipArg = None,
    ) -> tuple[Tensor, Tensor]:
        """Velocities ``(v_video [B,Tv,Cv,hv,wv], v_audio [B,Ca,La,Fa])`` for noisy latents at times t.

        t_video: [B], [B, Tv] (per latent frame) or [B, Tv·hv·wv] (per position); t_audio: [B] or [B, La]
        (per latent step); all in [0, 1] (0 = clean). Per-frame/position/step times are averaged within a patch.
        cond: CLIP features with per-sample drop flags, or None (all conditions null).
        mode: "full" | "iso_v" | "iso_a" | "iso", or one such string per sample.
        video_times [Tv] or [B, Tv], audio_times [La] or [B, La]: the centre time in seconds of what each
            latent step covers (``LatentSpec.video_latent_times()`` / ``audio_latent_times()``). A token's
            RoPE time is the mean over its temporal patch, so tokens that cover the same instant share a
            phase. None: latent step ``i`` at ``i / latent_fps`` (a frame shown at ``i/fps``; a centred
            STFT frame on sample ``i·hop``).
        skip_attention_blocks: STG's perturbation. Block indices whose attention residual is dropped for
            every sample, or one list (or None) per sample.
        """
        b = z_video.shape[0]
        grid_v, grid_a = self.grids(z_video, z_audio)
        mode = normalize_mode(mode, b)
        skips = self._skip_masks(skip_attention_blocks, b, z_video.device)
        dtype, device = self.video_in.proj.weight.dtype, z_video.device

        x_v = self.video_in(patchify_video(z_video.to(dtype), self.video_patch))          # [B, Nv, D]
        x_a = self.audio_in(patchify_audio(z_audio.to(dtype), self.audio_patch))          # [B, Na, D]
        ctx, pooled = self.cond_embed(cond, b, device, dtype)                             # [B, Lc, D], [B, D]
        t_a = self._audio_time(torch.as_tensor(t_audio, device=device), b, z_audio.shape[2])  # [B, Ga]
        t_v = self._video_time(torch.as_tensor(t_video, device=device), b, z_video.shape[1],
                               tuple(z_video.shape[3:]))                                  # [B, Gv]
        c_v = self.time_embed(t_v) + pooled[:, None]                                      # [B, Gv, D]
        c_a = self.time_embed(t_a) + pooled[:, None]                                      # [B, Ga, D]
        rope_v = self._rope_for("video", grid_v, video_times, device, dtype)              # [(B,) Nv, 1, Dh/2] complex
        rope_a = self._rope_for("audio", grid_a, audio_times, device, dtype)              # [(B,) Na, 1, Dh/2] complex

        for index, block in enumerate(self.blocks):
            args = (x_v, x_a, ctx, c_v, c_a, rope_v, rope_a, mode, grid_v, grid_a, self.knobs,
                    skips.get(index))
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x_v, x_a = checkpoint(block, *args, use_reentrant=False)                  # [B, Nv, D], [B, Na, D]
            else:
                x_v, x_a = block(*args)                                                   # [B, Nv, D], [B, Na, D]

        out_v = unpatchify_video(self.video_out(x_v, c_v), self.video_patch, grid_v,
                                 self.config.video_in_channels)                           # [B, Tv, Cv, hv, wv]
        out_a = unpatchify_audio(self.audio_out(x_a, c_a), self.audio_patch, grid_a,
                                 self.config.audio_in_channels)                           # [B, Ca, La, Fa]
        if self.config.prediction == "velocity":
            return out_v, out_a
        tv = _video_t_like(torch.as_tensor(t_video, device=device), z_video).clamp(min=SAMPLE_PREDICTION_T_MIN)
        ta = _audio_t_like(torch.as_tensor(t_audio, device=device), z_audio).clamp(min=SAMPLE_PREDICTION_T_MIN)
        return (z_video.to(dtype) - out_v) / tv, (z_audio.to(dtype) - out_a) / ta               # x̂0 → velocity


def _video_t_like(t: Tensor, z_video: Tensor) -> Tensor:
    """``t_video`` [B], [B, Tv] or [B, Tv·hv·wv] → broadcastable to ``z_video [B, Tv, Cv, hv, wv]``."""
    b, tv, _, hv, wv = z_video.shape
    t = t.reshape(-1).expand(b) if t.ndim < 2 else t.reshape(b, -1)
    if t.ndim == 1 or t.shape[1] == 1:
        return t.reshape(b, 1, 1, 1, 1)
    if t.shape[1] == tv:
        return t.reshape(b, tv, 1, 1, 1)
    return t.reshape(b, tv, 1, hv, wv)


def _audio_t_like(t: Tensor, z_audio: Tensor) -> Tensor:
    """``t_audio`` [B] or [B, La] → broadcastable to ``z_audio [B, Ca, La, Fa]``."""
    b, _, la, _ = z_audio.shape
    t = t.reshape(-1).expand(b) if t.ndim < 2 else t.reshape(b, -1)
    return t.reshape(b, 1, 1, 1) if t.ndim == 1 or t.shape[1] == 1 else t.reshape(b, 1, la, 1)


#################################################################################
#                          Construction and FLOP counting                       #
#################################################################################
def model_config(preset: str = DEFAULT_PRESET, **overrides: Any) -> dict[str, Any]:
    """A preset's fields and :data:`NEW_MODEL_DEFAULTS` merged with ``overrides`` (None values mean "keep
    the preset/default")."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    cfg = {**NEW_MODEL_DEFAULTS, **PRESETS[preset]}
    cfg.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in overrides.items() if v is not None})
    return cfg


def build_model(preset: str = DEFAULT_PRESET, **overrides: Any) -> JointDiT:
    """``JointDiT`` from a preset name plus field overrides (the ``model`` config group's ``_target_``).

    Hydra passes list-valued fields as ListConfig; they are converted to tuples.
    """
    clean = {}
    for k, v in overrides.items():
        if k.startswith("_"):
            continue
        if hasattr(v, "__iter__") and not isinstance(v, (str, bytes, Mapping)):
            v = list(v)
        clean[k] = v
    return JointDiT(**model_config(preset, **clean))


def full_config(config: Mapping[str, Any] | JointDiT) -> dict[str, Any]:
    """Every JointDiT config field: the constructor defaults updated with ``config``."""
    if isinstance(config, JointDiT):
        return dict(config.config)
    params = inspect.signature(JointDiT.__init__).parameters
    cfg = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    cfg.update(config)
    return cfg


def count_flops(config: Mapping[str, Any] | JointDiT, n_video: int, n_audio: int, batch_size: int = 1,
                mode: str = "full", knobs: AttentionKnobs | None = None, video_grid: Sequence[int] | None = None,
                audio_grid: Sequence[int] | None = None, backward: bool = True) -> int:
    """Analytic FLOPs of one forward (×3 with ``backward``) on ``n_video`` + ``n_audio`` tokens.

    Counts matmuls (2·m·n·k) and attention (QKᵀ and AV: 4·Nq·Nk·D per block); norms, activations and
    elementwise ops are not counted. Backward = 2× forward (grads w.r.t. inputs and weights).
    K/V pooling knobs (``knobs``) need the modalities' token grids ``(t, h, w)`` / ``(t, f)`` to count keys.
    """
    cfg = full_config(config)
    d, depth = cfg["hidden_size"], cfg["depth"]
    mlp = int(d * cfg["mlp_ratio"])
    pv, pa = tuple(cfg["video_patch_size"]), tuple(cfg["audio_patch_size"])
    patch_v = pv[0] * pv[1] * pv[2] * cfg["video_in_channels"]
    patch_a = pa[0] * pa[1] * cfg["audio_in_channels"]
    n_ctx = cfg["text_len"] + 1
    text_dim, pool_dim, img_dim = cfg["text_token_dim"], cfg["text_pooled_dim"], cfg["image_embed_dim"]

    def keys(n: int, grid: Sequence[int] | None) -> int:
        if knobs is None or not knobs.pools or grid is None:
            return n
        return math.prod(pooled_grid(grid, knobs))

    kv_v, kv_a = keys(n_video, video_grid), keys(n_audio, audio_grid)
    nk_v = kv_v + n_ctx + (kv_a if video_sees_audio(mode) else 0)
    nk_a = kv_a + n_ctx + (kv_v if audio_sees_video(mode) else 0)

    per_token = 2 * d * (3 * d + d + 2 * mlp)                     # qkv, out proj, MLP
    block = (n_video + n_audio) * per_token
    block += n_ctx * 2 * d * 2 * d                                # context K/V
    block += 4 * d * (n_video * nk_v + n_audio * nk_a)            # QKᵀ and AV
    block += 2 * 2 * d * 6 * d                                    # adaLN (one group per modality)
    flops = depth * block
    flops += 2 * d * (n_video * patch_v + n_audio * patch_a)      # patch embeds
    flops += 2 * d * (n_video * patch_v + n_audio * patch_a)      # output projections
    flops += 2 * 2 * d * 2 * d                                    # final adaLN
    flops += 2 * (256 * d + d * d) * 2                            # timestep MLP (two modalities)
    flops += 2 * (text_dim * d + d * d) * (n_ctx - 1)             # text token MLP
    flops += 2 * (pool_dim * d + d * d + 2 * (img_dim * d + d * d))  # pooled + image MLPs
    flops *= batch_size
    return int(flops * (3 if backward else 1))
