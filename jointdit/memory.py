"""Memory planner: analytic peak-memory estimates for JointDiT training / sampling, knob selection for
``vram=auto``, and a pre-flight check that fails BEFORE training when a plan does not fit.

    python -m jointdit.memory model=small vram=48gb data.seconds=4           # plan table (Hydra overrides)
    python -m jointdit.memory model=tiny vram=auto --budget-gb 8             # what auto would pick
    python -m jointdit.memory model=tiny --sampling --branches 3             # sampling (guidance branches)

Model of the peak (bytes):
    params      P · 4                          fp32 master weights (Accelerate keeps fp32 under bf16/fp16)
    casts       P · 2                          autocast's low-precision weight copies (mixed precision only)
    grads       P · 4                          (training)
    optimizer   P · 8                          AdamW exp_avg + exp_avg_sq (training)
    ema         P · 4                          diffusers EMAModel shadow copy (training, ema=True)
    activations saved-for-backward tensors:    depth · B · Σ_tokens · ACT_ELEMS(D, mlp) · bytes
                with checkpointing:             depth · B · N · D · bytes (block inputs) + one block
                sampling:                       one block's live tensors (nothing is saved)
    attention   flash/CPU-flash SDPA never materialises scores; the math kernel holds [B,H,q,Nk]
                (q = q_chunk or all queries; training saves softmax for every chunk of every kept block)
    overhead    patch-embed / output-layer / loss tensors + a calibrated constant (autograd runtime)
    total       params + casts + optimizer + ema + overhead + max(grads, activations + attention)
``kv_downsample`` shrinks Nk (per modality, over latent time); ``max_t`` clamps Tv and the audio span
to the same seconds (as LatentDataset crops). ACT_ELEMS' scale and the constant are calibrated against
peak RSS of a subprocess on CPU (``measure_peak``; experiments/bench_memory.py); on GPU
``measure_peak`` reports ``torch.cuda.max_memory_allocated`` instead (code path untested here).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from jointdit.config import resolve_device

GiB = 1024 ** 3
MiB = 1024 ** 2

# ---- calibration (fit on CPU fp32 peak-RSS measurements; see experiments/results/bench_memory.md) ----
ACT_SCALE = 1.0            # multiplies the structural count of saved activation elements per token per block
CONST_OVERHEAD_TRAIN = 104 * MiB  # autograd/backward runtime workspace seen on top of the tensors (CPU fit)
CONST_OVERHEAD_SAMPLE = 8 * MiB   # no-grad forward runtime overhead (CPU fit)

KNOB_FIELDS = ("max_t", "q_chunk_v", "q_chunk_a", "kv_downsample", "gradient_checkpointing", "micro_batch_size")
ENV_FOR_KNOB = {"max_t": "JOINTDIT_MAX_T", "q_chunk_v": "JOINTDIT_Q_CHUNK_V", "q_chunk_a": "JOINTDIT_Q_CHUNK_A",
                "kv_downsample": "JOINTDIT_KV_DOWNSAMPLE", "vid_decode_chunk": "JOINTDIT_VID_DECODE_CHUNK"}


class MemoryPlanError(RuntimeError):
    """The estimated peak does not fit the budget; the message names the knob(s) to change."""


@dataclass(frozen=True)
class Knobs:
    max_t: int = 0                  # latent video frames (0 = no clamp)
    q_chunk_v: int = 0              # 0 = no query chunking
    q_chunk_a: int = 0
    kv_downsample: int = 1
    gradient_checkpointing: bool = False
    micro_batch_size: int = 1

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> Knobs:
        kw = {k: m[k] for k in KNOB_FIELDS if k in m and m[k] is not None}
        kw = {k: (bool(v) if k == "gradient_checkpointing" else int(v)) for k, v in kw.items()}
        return cls(**kw)


@dataclass
class Estimate:
    params: int = 0
    casts: int = 0
    grads: int = 0
    optimizer: int = 0
    ema: int = 0
    activations: int = 0
    attention: int = 0
    overhead: int = 0
    n_params: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    COMPONENTS = ("params", "casts", "grads", "optimizer", "ema", "activations", "attention", "overhead")

    @property
    def total(self) -> int:
        """Gradients are allocated during backward while the saved activations are freed, so the peak holds
        ``max(grads, activations + attention)`` on top of the rest (measured: adding both overshoots)."""
        rest = sum(int(getattr(self, k)) for k in ("params", "casts", "optimizer", "ema", "overhead"))
        return rest + max(int(self.grads), int(self.activations) + int(self.attention))

    def as_dict(self) -> dict[str, Any]:
        d = {k: int(getattr(self, k)) for k in self.COMPONENTS}
        d.update(total=self.total, n_params=self.n_params, **self.info)
        return d


# ----------------------------------------------------------------------------------------------
# Parameter count
# ----------------------------------------------------------------------------------------------
def _full_config(model_config: Mapping[str, Any]) -> dict[str, Any]:
    from jointdit.models.jointdit import full_config, model_config as preset_config

    from jointdit.config import model_fields

    cfg = model_fields(model_config)
    preset = cfg.pop("preset", None)
    if preset is not None:
        cfg = preset_config(preset, **cfg)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    return full_config(cfg)


def count_params(model_config: Mapping[str, Any]) -> int:
    """Exact parameter count of ``JointDiT(**model_config)`` from the config alone (no model built)."""
    c = _full_config(model_config)
    d, depth, heads = int(c["hidden_size"]), int(c["depth"]), int(c["num_heads"])
    mlp = int(d * float(c["mlp_ratio"]))
    dh = d // heads
    pv, pa = tuple(c["video_patch_size"]), tuple(c["audio_patch_size"])
    patch_v = pv[0] * pv[1] * pv[2] * int(c["video_in_channels"])
    patch_a = pa[0] * pa[1] * int(c["audio_in_channels"])
    lin = lambda i, o: i * o + o  # noqa: E731
    qkn = 2 * dh if c["qk_norm"] else 0
    expert = lin(d, 6 * d) + lin(d, 3 * d) + qkn + lin(d, d) + lin(d, mlp) + lin(mlp, d)
    context = lin(d, 2 * d) + (dh if c["qk_norm"] else 0)
    block = 2 * expert + context
    n = depth * block
    n += lin(patch_v, d) + lin(patch_a, d)                          # video_in, audio_in
    n += lin(256, d) + lin(d, d)                                    # time_embed
    t, pool, img, L = (int(c[k]) for k in ("text_token_dim", "text_pooled_dim", "image_embed_dim", "text_len"))
    n += _cond_embed_params(d, t, pool, img, L)
    n += 2 * (lin(d, 2 * d)) + lin(d, patch_v) + lin(d, patch_a)    # video_out, audio_out
    return int(n)


def _cond_embed_params(d: int, t: int, pool: int, img: int, text_len: int) -> int:
    """ConditionEmbedder parameters, counted from a built (cheap, small) module once per signature."""
    key = (d, t, pool, img, text_len)
    if key not in _COND_CACHE:
        from jointdit.models.conditioning import ConditionEmbedder

        _COND_CACHE[key] = sum(p.numel() for p in ConditionEmbedder(d, t, pool, img, text_len).parameters())
    return _COND_CACHE[key]


_COND_CACHE: dict[tuple, int] = {}


# ----------------------------------------------------------------------------------------------
# Estimator
# ----------------------------------------------------------------------------------------------
def crop_shapes(video_shape: Sequence[int], audio_shape: Sequence[int], max_t: int,
                video_fps: float, audio_fps: float) -> tuple[list[int], list[int]]:
    """Shapes after the ``max_t`` crop: ``latents.crop_lengths``, the rule ``LatentSpec.crop`` applies."""
    from jointdit.latents import crop_lengths

    v, a = list(map(int, video_shape)), list(map(int, audio_shape))
    v[0], a[1] = crop_lengths(v[0], a[1], float(video_fps), float(audio_fps), int(max_t or 0))
    return v, a


def _bytes_act(precision: str) -> int:
    return 2 if str(precision) in ("bf16", "fp16") else 4


def estimate_peak(model_config: Mapping[str, Any], video_shape: Sequence[int], audio_shape: Sequence[int],
                  knobs: Knobs | Mapping[str, Any], micro_batch: int | None = None, precision: str = "no",
                  training: bool = True, ema: bool = True, attention_kernel: str = "flash",
                  device: str = "cpu") -> Estimate:
    """Peak bytes of one training step (or one sampling forward with ``training=False``; then
    ``micro_batch`` is the number of guidance branches in the batched forward).

    video_shape [Tv, Cv, hv, wv] and audio_shape [Ca, La, Fa] are UNcropped; ``knobs.max_t`` crops them.
    attention_kernel: "flash" (flash / mem-efficient / CPU flash SDPA) or "math" (materialises scores).
    """
    kn = knobs if isinstance(knobs, Knobs) else Knobs.from_mapping(knobs)
    b = int(micro_batch if micro_batch is not None else kn.micro_batch_size)
    c = _full_config(model_config)
    d, depth, heads = int(c["hidden_size"]), int(c["depth"]), int(c["num_heads"])
    mlp = int(d * float(c["mlp_ratio"]))
    pv, pa = tuple(c["video_patch_size"]), tuple(c["audio_patch_size"])
    vs, as_ = crop_shapes(video_shape, audio_shape, kn.max_t, float(c["video_latent_fps"]), float(c["audio_latent_fps"]))
    tv, cv, hv, wv = vs
    ca, la, fa = as_
    gv, ga = (tv // pv[0], hv // pv[1], wv // pv[2]), (la // pa[0], fa // pa[1])
    nv, na = gv[0] * gv[1] * gv[2], ga[0] * ga[1]
    n, n_ctx = nv + na, int(c["text_len"]) + 1
    r = max(1, kn.kv_downsample)
    kv_v = -(-gv[0] // r) * (gv[1] * gv[2]) if r > 1 and gv[0] > 1 else nv
    kv_a = -(-ga[0] // r) * ga[1] if r > 1 and ga[0] > 1 else na
    nk = kv_v + kv_a + n_ctx
    mixed = str(precision) in ("bf16", "fp16") and device != "cpu"
    ab = _bytes_act(precision) if mixed else 4
    p = count_params(c)
    est = Estimate(n_params=p)
    est.params = 4 * p
    est.casts = 2 * p if mixed else 0
    if training:
        est.grads = 4 * p
        est.optimizer = 8 * p
        est.ema = 4 * p if ema else 0

    # Saved-for-backward elements per token per block (one expert: its modality's tokens):
    #   attention half: x, LN(x), modulated h, qkv (3D), QK-norm in/out (q,k), RoPE'd q,k, v (contig.),
    #                   joint K/V concat (2D, scaled by pooled/total keys), SDPA out, reshaped out, proj out
    #   MLP half:       x', LN(x'), modulated, fc1 out (mlp), GELU out (mlp), fc2 out
    kv_frac = (kv_v + kv_a) / max(1, n)
    per_tok = (14 + 2 * kv_frac) * d + 4 * d + 2 * mlp
    per_block_tokens = per_tok * n + 4 * d * n_ctx                  # + context K/V path
    block_act = ACT_SCALE * per_block_tokens * b * ab
    patch_v = pv[0] * pv[1] * pv[2] * cv
    patch_a = pa[0] * pa[1] * ca
    io = b * ab * (nv * (3 * d + 4 * patch_v) + na * (3 * d + 4 * patch_a) + 4 * n_ctx * d) \
        + b * 4 * (tv * cv * hv * wv + ca * la * fa) * 4            # inputs, noise, targets, outputs

    qv = kn.q_chunk_v if 0 < kn.q_chunk_v < nv else nv
    qa = kn.q_chunk_a if 0 < kn.q_chunk_a < na else na
    if kn.q_chunk_v == 0 and kn.q_chunk_a == 0:
        q_live = n                                                   # one SDPA over all queries
    else:
        q_live = max(qv, qa)
    if training:
        if kn.gradient_checkpointing:
            est.activations = int(depth * b * n * d * ab + block_act)
        else:
            est.activations = int(depth * block_act)
        if attention_kernel == "math":
            kept = 1 if kn.gradient_checkpointing else depth
            est.attention = int(kept * b * heads * n * nk * ab + 2 * b * heads * q_live * nk * ab)
        else:
            est.attention = int(3 * b * n * d * ab)                  # SDPA backward dq/dk/dv buffers
    else:
        # No autograd: a few [B, N, D]-sized tensors and one MLP hidden live at once.
        est.activations = int(b * n * (8 * d + 2 * mlp) * ab)
        est.attention = int(2 * b * heads * q_live * nk * ab) if attention_kernel == "math" else 0
        io = io // 2
    est.overhead = int(io + (CONST_OVERHEAD_TRAIN if training else CONST_OVERHEAD_SAMPLE))
    est.info = {"tokens_video": nv, "tokens_audio": na, "keys": nk, "Tv": tv, "La": la, "batch": b,
                "training": training, "precision": precision if mixed else "fp32", "attention_kernel": attention_kernel}
    return est


# ----------------------------------------------------------------------------------------------
# Knob search
# ----------------------------------------------------------------------------------------------
def quality_key(k: Knobs, full_t: int) -> tuple:
    """Higher is better: data span first (max_t), then exact keys (kv_downsample), then speed knobs."""
    t = full_t if (k.max_t == 0 or k.max_t >= full_t) else k.max_t
    qc = lambda q: math.inf if q == 0 else q  # noqa: E731  (0 = no chunking = best)
    return (t, -k.kv_downsample, k.micro_batch_size, not k.gradient_checkpointing, qc(k.q_chunk_v), qc(k.q_chunk_a))


def candidate_knobs(full_t: int, fixed: Mapping[str, Any] | None = None) -> list[Knobs]:
    """Quality-ordered (best first) knob sets; ``fixed`` pins knobs the user chose."""
    fixed = dict(fixed or {})
    ts = sorted({0} | {t for t in (48, 32, 24, 16, 12, 8, 6, 4, 2, 1) if t < full_t}, key=lambda t: -(full_t if t == 0 else t))
    grid = dict(max_t=ts, kv_downsample=[1, 2, 4, 8, 16], micro_batch_size=[8, 4, 2, 1],
                gradient_checkpointing=[False, True], q_chunk_v=[0, 1024, 256, 64], q_chunk_a=[0, 256, 64])
    for k, v in fixed.items():
        if k in grid:
            grid[k] = [v]
    import itertools

    out = [Knobs(**dict(zip(grid, vals))) for vals in itertools.product(*grid.values())]
    out.sort(key=lambda k: quality_key(k, full_t), reverse=True)
    return out


def choose_knobs(model_config: Mapping[str, Any], shapes: tuple[Sequence[int], Sequence[int]], budget_bytes: int,
                 margin: float = 0.1, precision: str = "no", fixed: Mapping[str, Any] | None = None,
                 training: bool = True, ema: bool = True, attention_kernel: str = "flash",
                 device: str = "cpu") -> Knobs:
    """The highest-quality knob set whose estimated peak fits ``budget_bytes · (1 - margin)``."""
    video_shape, audio_shape = shapes
    limit = budget_bytes * (1.0 - margin)
    cands = candidate_knobs(int(video_shape[0]), fixed)
    for k in cands:
        if estimate_peak(model_config, video_shape, audio_shape, k, precision=precision, training=training,
                         ema=ema, attention_kernel=attention_kernel, device=device).total <= limit:
            return k
    smallest = estimate_peak(model_config, video_shape, audio_shape, cands[-1], precision=precision,
                             training=training, ema=ema, attention_kernel=attention_kernel, device=device)
    raise MemoryPlanError(f"no knob set fits: even {cands[-1]} needs an estimated {smallest.total / GiB:.2f} GiB > "
                          f"{limit / GiB:.2f} GiB usable ({budget_bytes / GiB:.2f} GiB budget, margin {margin}); "
                          f"use a smaller model (model=tiny / lower model.depth, model.hidden_size) or more memory")


def detect_budget(device: Any = None) -> int:
    """Total memory of a CUDA device (torch.cuda.mem_get_info), else available system RAM."""
    import torch

    dev = resolve_device(device)
    if dev.type == "cuda":
        return int(torch.cuda.mem_get_info(dev)[1])
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    raise RuntimeError("cannot detect available memory")


def check_plan(est: Estimate, budget_bytes: int, knobs: Knobs | Mapping[str, Any], margin: float = 0.0) -> None:
    """Raise :class:`MemoryPlanError` naming the knob(s) to change when ``est`` exceeds the budget."""
    kn = knobs if isinstance(knobs, Knobs) else Knobs.from_mapping(knobs)
    limit = budget_bytes * (1.0 - margin)
    if est.total <= limit:
        return
    hints = []
    if est.activations + est.attention > est.params + est.grads + est.optimizer + est.ema:
        if not kn.gradient_checkpointing:
            hints.append("set vram.gradient_checkpointing=true (now false)")
        hints.append(f"raise vram.kv_downsample (now {kn.kv_downsample})")
        hints.append(f"lower vram.max_t (now {kn.max_t}) / vram.micro_batch_size (now {kn.micro_batch_size})")
        if est.info.get("attention_kernel") == "math":
            hints.append(f"lower vram.q_chunk_v (now {kn.q_chunk_v}) / vram.q_chunk_a (now {kn.q_chunk_a})")
    else:
        hints.append("use a smaller model (model=tiny, or lower model.depth / model.hidden_size)")
        hints.append(f"lower vram.micro_batch_size (now {kn.micro_batch_size})")
    m = f" (margin {margin})" if margin else ""
    raise MemoryPlanError(f"estimated {est.total / GiB:.2f} GiB > {limit / GiB:.2f} GiB budget{m}: " + "; or ".join(hints)
                          + " — or vram=auto to pick knobs that fit")


# ----------------------------------------------------------------------------------------------
# From a composed config
# ----------------------------------------------------------------------------------------------
def shapes_from_cfg(cfg: Any) -> tuple[list[int], list[int], float, float]:
    """(video_shape, audio_shape, video_latent_fps, audio_latent_fps) of one clip before the max_t crop,
    from the run's LatentSpec (``latents.spec_for_config``: the cache's when it exists)."""
    from jointdit.latents import spec_for_config

    spec = spec_for_config(cfg, patches=False, crop=False)
    return list(spec.video_shape), list(spec.audio_shape), spec.video_latent_fps, spec.audio_latent_fps


def _model_config_for(cfg: Any, vs: Sequence[int], as_: Sequence[int], fv: float, fa: float) -> dict[str, Any]:
    from jointdit.config import model_fields

    m = model_fields(cfg.model)
    m.update(video_in_channels=vs[1], audio_in_channels=as_[0], video_latent_fps=fv, audio_latent_fps=fa)
    return m


def user_overridden_knobs(extra_overrides: Sequence[str] | None = None) -> set[str]:
    """Knobs set on the command line (HydraConfig task overrides, or ``extra_overrides``) or by JOINTDIT_* env."""
    overrides = list(extra_overrides or [])
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            overrides += list(HydraConfig.get().overrides.task)
    except Exception:  # noqa: BLE001 - outside a Hydra app
        pass
    out = set()
    for o in overrides:
        key = o.lstrip("+~").split("=", 1)[0]
        if key.startswith("vram.") and key[5:] in KNOB_FIELDS:
            out.add(key[5:])
    out |= {k for k, env in ENV_FOR_KNOB.items() if k in KNOB_FIELDS and os.environ.get(env) not in (None, "")}
    return out


def resolve_vram(cfg: Any, overrides: Sequence[str] | None = None, device: Any = None,
                 budget_bytes: int | None = None) -> dict[str, Any]:
    """The vram settings the trainer should use, as a plain dict (+ ``estimate_bytes``, ``budget_bytes``).

    ``vram.name == "auto"``: detect the budget and fill every knob the user did NOT set (command line
    via HydraConfig or ``overrides``, or a JOINTDIT_* variable) with the best set that fits.
    Fixed profiles: check the plan against ``budget_gb`` on a GPU (available RAM on CPU) and raise
    :class:`MemoryPlanError` if it does not fit. Call it before building the optimizer / first step.
    """
    from omegaconf import OmegaConf

    v = OmegaConf.to_container(cfg.vram, resolve=True)
    dev = resolve_device(device)
    precision = "no" if dev.type == "cpu" else str(v.get("mixed_precision", "no"))
    vs, as_, fv, fa = shapes_from_cfg(cfg)
    mcfg = _model_config_for(cfg, vs, as_, fv, fa)
    ema = bool(cfg.get("ema", {}).get("enabled", True)) if hasattr(cfg, "get") else True
    margin = float(v.get("margin", 0.1) or 0.0)
    if str(v.get("name")) == "auto":
        budget = int(budget_bytes if budget_bytes is not None else detect_budget(dev))
        fixed = {k: v[k] for k in user_overridden_knobs(overrides) if k in v}
        kn = choose_knobs(mcfg, (vs, as_), budget, margin, precision, fixed=fixed, ema=ema, device=dev.type)
        v.update(asdict(kn))
    else:
        kn = Knobs.from_mapping(v)
        if budget_bytes is not None:
            budget = int(budget_bytes)
        elif dev.type == "cuda" and v.get("budget_gb"):
            budget = int(float(v["budget_gb"]) * GiB)
        else:
            budget = detect_budget(dev)
    est = estimate_peak(mcfg, vs, as_, kn, precision=precision, ema=ema, device=dev.type)
    if str(v.get("name")) != "auto":
        check_plan(est, budget, kn)
    v.update(estimate_bytes=est.total, budget_bytes=int(budget))
    return v


# ----------------------------------------------------------------------------------------------
# Sampling plan: checked before the sampler loads anything
# ----------------------------------------------------------------------------------------------
DEFAULT_MARGIN = 0.1  # headroom every plan keeps over its estimate: fits iff estimate · (1 + margin) <= budget


@dataclass
class SamplingPlan:
    """What one ``jointdit.sample`` session holds at its peak (bytes) and whether it fits the budget.

    resident  = weights (model fp32 + unmerged adapters) + codec weights + CLIP weights
    working   = max(forward, decode)    the batched forward (``branches × batch_size`` rows, no autograd)
                                       finishes before the codecs decode one clip
    total     = resident + working + media   (media: the decoded clip fp32 ×2 + its uint8 frames, the wave)
    planned   = total · (1 + margin);  fits = planned <= budget
    """

    weights: int
    codec_weights: int
    clip_weights: int
    forward: int
    decode: int
    media: int
    budget: int
    margin: float
    branches: int
    batch_size: int
    knobs: Knobs
    vid_decode_chunk: int | None
    notes: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.weights + self.codec_weights + self.clip_weights + max(self.forward, self.decode) + self.media

    @property
    def planned(self) -> int:
        return int(self.total * (1.0 + self.margin))

    @property
    def fits(self) -> bool:
        return self.planned <= self.budget

    def as_dict(self) -> dict[str, Any]:
        keys = ("weights", "codec_weights", "clip_weights", "forward", "decode", "media", "budget")
        return {**{k: int(getattr(self, k)) for k in keys}, "total": self.total, "planned": self.planned,
                "fits": self.fits, "margin": self.margin, "branches": self.branches, "batch_size": self.batch_size,
                "vid_decode_chunk": self.vid_decode_chunk, **asdict(self.knobs), "notes": list(self.notes), **self.info}

    def advice(self) -> str:
        """The knob(s) that shrink the largest term, for the error message."""
        hints = []
        if self.forward >= self.decode:
            hints.append(f"fewer guidance branches in one batch (now {self.branches}: guidance=cfg or none, or set "
                         f"unused w_* to 0)")
            if self.batch_size > 1:
                hints.append(f"batch_size=1 (now {self.batch_size})")
            hints.append(f"max_t=<latent frames> to sample a shorter clip (now {self.knobs.max_t or 'the whole clip'})")
        else:
            now = "the codec's decode_chunk" if self.vid_decode_chunk is None else self.vid_decode_chunk
            hints.append(f"lower vram.vid_decode_chunk (now {now})")
        if self.weights + self.codec_weights + self.clip_weights > max(self.forward, self.decode):
            hints.append("a smaller model, codec.dtype=float16, or clip=false (prompts then ignored)")
        return "; or ".join(hints)


def _sampling_model_config(folder: Path) -> tuple[dict[str, Any], Path]:
    """The model config of an export / adapter / training-checkpoint folder (no weights read), and the folder
    whose ``jointdit.json`` describes it."""
    import json

    from jointdit import checkpoints, lora

    if (folder / "config.json").exists():
        return json.loads((folder / "config.json").read_text()), folder
    if lora.is_adapter_folder(folder):
        base = lora.base_reference(folder)
        if base is None or not (base / "config.json").exists():
            raise FileNotFoundError(f"the adapter {folder} names no readable base model ({base}); pass "
                                    f"checkpoint=<base model folder> adapters=[{folder}]")
        return json.loads((base / "config.json").read_text()), folder
    if (folder / checkpoints.STATE_FILE).exists():
        return dict(checkpoints.read_state(folder)["model_config"]), folder
    raise FileNotFoundError(f"{folder} is neither an exported model folder (config.json), a LoRA adapter folder nor a "
                            f"training checkpoint ({checkpoints.STATE_FILE})")


def guidance_branches(guidance: Any, *, prompt: bool = True, negative: bool = True, image: bool = True) -> int:
    """Rows per sample in the guided forward: ``pos`` + each active branch of a
    :class:`~jointdit.diffusion.guidance.JointCFG` (or an int, returned as is). ``prompt``/``negative``/
    ``image``: whether the request has text, a negative prompt, a first frame (a branch that would repeat
    ``pos`` is skipped, :meth:`JointCFG.branches`)."""
    if isinstance(guidance, int):
        return max(1, guidance)
    active = guidance.active
    return (1 + active("iso") + (active("no_text") and prompt) + (active("neg_text") and negative)
            + (active("no_image") and image) + (active("stg") and bool(guidance.stg_blocks)))


def sampling_plan(checkpoint: str | os.PathLike, *, device: Any = None, vram: Mapping[str, Any] | None = None,
                  codec: Mapping[str, Any] | None = None, clip: Any = None, spec: Any = None, adapters: Any = None,
                  branches: Any = 3, batch_size: int = 1, max_t: int | None = None, budget_bytes: int | None = None,
                  margin: float | None = None) -> SamplingPlan:
    """The memory plan of sampling ``checkpoint`` — from its ``config.json`` / ``jointdit.json`` and the
    codec/CLIP folders' files only: nothing is loaded. Arguments as :func:`jointdit.sample.load_session`:

    vram        knobs ``{max_t, q_chunk_v, q_chunk_a, kv_downsample, vid_decode_chunk, budget_gb, margin}``;
                kv_downsample: the export's (``attention.kv_downsample``) unless given here
    codec       codec config (None: the export's); a ready ``(video, audio)`` codec tuple counts its modules
    clip        CLIP settings ``{model, pretrained, model_config}``; None: the export's; False: none
    spec        a :class:`~jointdit.latents.LatentSpec` or ``{seconds, fps, size}``; None: the export's
    adapters    LoRA adapter folders (``path``, ``path:scale`` or ``{path, scale}``), counted unmerged
    branches    guidance rows per sample: an int, or a JointCFG (:func:`guidance_branches`, upper bound)
    batch_size  seeds integrated together (``SampleRequest.batch_size``)
    max_t       latent frames sampled (``SampleRequest.max_t``; None: ``vram.max_t``; 0: the whole clip)
    budget      ``budget_bytes`` > ``vram.budget_gb`` > :func:`detect_budget` (CUDA memory, else available RAM)
    margin      > ``vram.margin`` > :data:`DEFAULT_MARGIN`
    """
    from jointdit import checkpoints, lora
    from jointdit.latents import LatentSpec, spec_for_data
    from jointdit.memory_terms import clip_weights_bytes, codec_terms, weights_bytes

    folder = Path(checkpoint).expanduser()
    model_config, meta_folder = _sampling_model_config(folder)
    meta = checkpoints.load_export_meta(meta_folder)
    vram = dict(vram or {})
    dev = resolve_device(device)
    notes: list[str] = []
    codec_cfg = codec if isinstance(codec, Mapping) else (meta.get("codec") or {})
    if isinstance(spec, LatentSpec):
        geometry = spec
    elif spec:
        geometry = spec_for_data(dict(spec), codec_cfg or {"name": "pixel_mel"})
    elif meta:
        geometry = LatentSpec.from_export_meta(meta, model_config)
    else:
        raise ValueError(f"{folder} has no jointdit.json to read the clip geometry from; give spec={{seconds, fps, size}}")
    crop = int(vram.get("max_t") or 0) if max_t is None else int(max_t)
    exported_kv = (meta.get("attention") or {}).get("kv_downsample")
    knobs = Knobs(max_t=crop, q_chunk_v=int(vram.get("q_chunk_v") or 0), q_chunk_a=int(vram.get("q_chunk_a") or 0),
                  kv_downsample=int(vram.get("kv_downsample") or exported_kv or 1), micro_batch_size=int(batch_size))
    rows = guidance_branches(branches) * int(batch_size)
    precision = str(vram.get("mixed_precision", "no")) if dev.type == "cuda" else "no"
    model_config = {**model_config, "video_in_channels": geometry.video_shape[1],
                    "audio_in_channels": geometry.audio_shape[0], "video_latent_fps": geometry.video_latent_fps,
                    "audio_latent_fps": geometry.audio_latent_fps}
    est = estimate_peak(model_config, geometry.video_shape, geometry.audio_shape, knobs, micro_batch=rows,
                        precision=precision, training=False, device=dev.type)
    adapter_bytes = 0
    if adapters:
        adapter_bytes = sum(weights_bytes(a.path) for a in lora.parse_adapters(adapters))
    if lora.is_adapter_folder(folder):  # an adapter export: its base plus the adapter itself
        adapter_bytes += weights_bytes(folder / lora.ADAPTER_WEIGHTS)
    chunk = vram.get("vid_decode_chunk")
    chunk = None if chunk is None else int(chunk)
    frames = int(est.info["Tv"] * geometry.fps / geometry.video_latent_fps)
    terms = codec_terms(codec_cfg, frames, geometry.size, est.info["La"], chunk)
    if isinstance(codec, tuple):  # ready codec objects: count the weights of their modules
        terms.weights = sum(p.numel() * p.element_size() for c in codec for m in vars(c).values()
                            if hasattr(m, "parameters") for p in m.parameters())
    notes += terms.notes
    clip_settings = meta.get("clip") if clip is None else (None if clip is False else clip)
    clip_bytes, note = clip_weights_bytes(dict(clip_settings) if isinstance(clip_settings, Mapping) else None)
    notes += [note] if note else []
    h, w = geometry.size
    samples = int(round(frames / geometry.fps * geometry.sample_rate))
    media = 2 * 4 * frames * 3 * h * w + frames * 3 * h * w + 2 * 4 * samples
    if budget_bytes is not None:
        budget = int(budget_bytes)
    elif vram.get("budget_gb"):
        budget = int(float(vram["budget_gb"]) * GiB)
    else:
        budget = detect_budget(dev)
    m = float(margin if margin is not None else vram.get("margin", DEFAULT_MARGIN) or 0.0)
    return SamplingPlan(weights=est.params + adapter_bytes, codec_weights=terms.weights, clip_weights=clip_bytes,
                        forward=est.activations + est.attention + est.overhead, decode=terms.decode, media=media,
                        budget=budget, margin=m, branches=guidance_branches(branches), batch_size=int(batch_size),
                        knobs=knobs, vid_decode_chunk=chunk, notes=notes,
                        info={"device": dev.type, "frames": frames, "tokens_video": est.info["tokens_video"],
                              "tokens_audio": est.info["tokens_audio"], "n_params": est.n_params})


def check_sampling_plan(checkpoint: str | os.PathLike, **kwargs: Any) -> SamplingPlan:
    """:func:`sampling_plan` (same arguments), raising :class:`MemoryPlanError` naming the knob to change
    when ``total · (1 + margin)`` exceeds the budget. Call it before loading the model."""
    plan = sampling_plan(checkpoint, **kwargs)
    if not plan.fits:
        raise MemoryPlanError(
            f"sampling {checkpoint} needs an estimated {_fmt(plan.total)} (+{plan.margin:.0%} margin = "
            f"{_fmt(plan.planned)}) but {_fmt(plan.budget)} is available on {plan.info['device']}: model "
            f"{_fmt(plan.weights)}, codecs {_fmt(plan.codec_weights)}, CLIP {_fmt(plan.clip_weights)}, forward of "
            f"{plan.branches * plan.batch_size} rows {_fmt(plan.forward)}, decode {_fmt(plan.decode)}. Use "
            + plan.advice() + "; or vram.budget_gb=<GiB> if the detected budget is wrong")
    return plan


# ----------------------------------------------------------------------------------------------
# Measurement (calibration): peak RSS of a child process on CPU, max_memory_allocated on GPU
# ----------------------------------------------------------------------------------------------
# Shared by every measuring child (also experiments/bench_memory_terms.py): an RSS reader and a warm-up, so
# the baseline includes the runtime's thread pools and kernels.
MEASURE_PRELUDE = r"""
def rss(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
# warm the runtime (thread pools, kernels) on tiny tensors so the baseline includes it
w = torch.randn(2, 2, 16, 8, requires_grad=True)
torch.nn.functional.scaled_dot_product_attention(w, w, w).sum().backward()
torch.nn.functional.layer_norm(torch.randn(4, 8, requires_grad=True), (8,)).sum().backward()
del w
"""

_CHILD = r"""
import json, sys, os
spec = json.loads(sys.argv[1])
import torch, jointdit
from jointdit.models import build_model
from jointdit.models.jointdit import full_config
torch.manual_seed(0)
dev = torch.device(spec["device"])
""" + MEASURE_PRELUDE + r"""if dev.type == "cuda":
    torch.cuda.reset_peak_memory_stats(dev); base = torch.cuda.memory_allocated(dev)
else:
    base = rss("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
cfg = dict(spec["model"]); preset = cfg.pop("preset", "tiny")
model = build_model(preset, **cfg).to(dev)
k = spec["knobs"]
model.set_memory_knobs(q_chunk_v=k["q_chunk_v"], q_chunk_a=k["q_chunk_a"], kv_downsample=k["kv_downsample"],
                       gradient_checkpointing=k["gradient_checkpointing"])
b = spec["batch"]
zv = torch.randn(b, *spec["video_shape"], device=dev); za = torch.randn(b, *spec["audio_shape"], device=dev)
if spec["training"]:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ema = None
    if spec["ema"]:
        from diffusers.training_utils import EMAModel
        ema = EMAModel([p for p in model.parameters()], decay=0.999)
    for _ in range(spec["steps"]):
        nv, na = torch.randn_like(zv), torch.randn_like(za)
        t = torch.rand(b, device=dev)
        xv = (1 - t.view(-1, 1, 1, 1, 1)) * zv + t.view(-1, 1, 1, 1, 1) * nv
        xa = (1 - t.view(-1, 1, 1, 1)) * za + t.view(-1, 1, 1, 1) * na
        ov, oa = model(xv, xa, t, t, None, "full")
        loss = ((ov - (nv - zv)) ** 2).mean() + ((oa - (na - za)) ** 2).mean()
        loss.backward()
        opt.step(); opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(model.parameters())
        del ov, oa, loss, xv, xa
else:
    model.eval()
    with torch.no_grad():
        for _ in range(spec["steps"]):
            t = torch.rand(b, device=dev)
            ov, oa = model(zv, za, t, t, None, "full"); del ov, oa
if dev.type == "cuda":
    peak = torch.cuda.max_memory_allocated(dev)
else:
    peak = rss("VmHWM")
print("MEASURE " + json.dumps({"peak_delta": peak - base, "baseline": base}))
"""


def measure_peak(model_config: Mapping[str, Any], video_shape: Sequence[int], audio_shape: Sequence[int],
                 knobs: Knobs | Mapping[str, Any], micro_batch: int | None = None, training: bool = True,
                 ema: bool = True, steps: int = 2, device: str = "cpu", timeout: float = 600) -> int:
    """Measured peak bytes above the post-import baseline, in a fresh subprocess.

    CPU: VmHWM − VmRSS(baseline), with VmHWM reset via /proc/self/clear_refs after imports and a warm-up,
    and MALLOC_MMAP_THRESHOLD_=65536 so freed tensors go back to the OS (RSS tracks live tensors).
    GPU: torch.cuda.max_memory_allocated − memory_allocated(baseline). ``video_shape``/``audio_shape`` are
    used as given (apply ``crop_shapes`` first for max_t).
    """
    kn = knobs if isinstance(knobs, Knobs) else Knobs.from_mapping(knobs)
    spec = {"model": dict(model_config), "video_shape": list(video_shape), "audio_shape": list(audio_shape),
            "knobs": asdict(kn), "batch": int(micro_batch if micro_batch is not None else kn.micro_batch_size),
            "training": training, "ema": ema, "steps": steps, "device": device}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONWARNINGS="ignore")
    res = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(spec)], capture_output=True, text=True,
                         env=env, timeout=timeout)
    for line in res.stdout.splitlines():
        if line.startswith("MEASURE "):
            return int(json.loads(line[8:])["peak_delta"])
    raise RuntimeError(f"measurement child failed (rc={res.returncode}):\n{res.stderr[-3000:]}")


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def _fmt(b: int) -> str:
    return f"{b / GiB:.2f} GiB" if b >= GiB else f"{b / MiB:.1f} MiB"


def plan_table(cfg: Any, overrides: Sequence[str] = (), training: bool = True, branches: int = 3,
               budget_bytes: int | None = None, attention_kernel: str = "flash", device: str | None = None) -> list[tuple[str, str]]:
    from omegaconf import OmegaConf

    dev = resolve_device(device).type
    v = OmegaConf.to_container(cfg.vram, resolve=True)
    # The plan is for the target device class: a GPU profile is planned in its precision even from a CPU host.
    gpu_profile = str(v.get("name")) != "cpu"
    precision = str(v.get("mixed_precision", "no")) if gpu_profile else "no"
    plan_dev = "cuda" if gpu_profile else dev
    if budget_bytes is None:
        budget_bytes = int(float(v["budget_gb"]) * GiB) if v.get("budget_gb") and str(v.get("name")) != "auto" \
            else detect_budget(dev)
    vs, as_, fv, fa = shapes_from_cfg(cfg)
    mcfg = _model_config_for(cfg, vs, as_, fv, fa)
    margin = float(v.get("margin", 0.1) or 0.0) if str(v.get("name")) == "auto" else 0.0
    if str(v.get("name")) == "auto":
        fixed = {k: v[k] for k in user_overridden_knobs(overrides) if k in v}
        kn = choose_knobs(mcfg, (vs, as_), budget_bytes, margin, precision, fixed=fixed, training=training,
                          attention_kernel=attention_kernel, device=plan_dev)
    else:
        kn = Knobs.from_mapping(v)
    ema = bool(cfg.ema.enabled) if "ema" in cfg else True
    est = estimate_peak(mcfg, vs, as_, kn, micro_batch=None if training else branches, precision=precision,
                        training=training, ema=ema, attention_kernel=attention_kernel, device=plan_dev)
    limit = budget_bytes * (1 - margin)
    rows = [("profile", str(v.get("name"))), ("model", f"{cfg.model.preset} ({est.n_params / 1e6:.2f} M params)"),
            ("mode", "training" if training else f"sampling ({branches} branches)"),
            ("latents", f"video {vs} audio {as_} (after max_t: Tv={est.info['Tv']}, La={est.info['La']})"),
            ("tokens", f"video {est.info['tokens_video']} + audio {est.info['tokens_audio']}, keys {est.info['keys']}")]
    rows += [(f"vram.{k}", str(getattr(kn, k))) for k in KNOB_FIELDS]
    rows += [("precision", est.info["precision"]), ("attention kernel", attention_kernel)]
    rows += [(k, _fmt(getattr(est, k))) for k in Estimate.COMPONENTS]
    rows += [("estimated peak", _fmt(est.total)), ("budget", _fmt(budget_bytes) + (f" (margin {margin})" if margin else "")),
             ("fits", "yes" if est.total <= limit else "NO")]
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jointdit.memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for the train config, e.g. model=small vram=48gb")
    ap.add_argument("--sampling", action="store_true", help="plan a sampling forward instead of a training step")
    ap.add_argument("--branches", type=int, default=3, help="guidance branches batched in one sampling forward")
    ap.add_argument("--budget-gb", type=float, default=None, help="budget (default: profile budget_gb or detected)")
    ap.add_argument("--attention-kernel", choices=("flash", "math"), default="flash")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    from jointdit.config import compose

    cfg = compose("train", a.overrides)
    budget = int(a.budget_gb * GiB) if a.budget_gb else None
    rows = plan_table(cfg, a.overrides, training=not a.sampling, branches=a.branches, budget_bytes=budget,
                      attention_kernel=a.attention_kernel)
    if a.json:
        print(json.dumps(dict(rows), indent=1))
        return 0
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title="jointdit memory plan")
        t.add_column("item")
        t.add_column("value")
        for k, v in rows:
            t.add_row(k, v)
        Console().print(t)
    except ImportError:
        w = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"{k:<{w}}  {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
