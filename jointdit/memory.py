"""Memory planner: ONE estimate of a run's peak memory — training (every option live at once) or sampling —
the knob choice of ``vram=auto``, and a pre-flight check that fails BEFORE anything is built.

    python -m jointdit.memory model=small vram=48gb data.seconds=4           # plan table (Hydra overrides)
    python -m jointdit.memory model=tiny vram=auto --budget-gb 8             # what auto would pick
    python -m jointdit.memory model=tiny --sampling --branches 3             # sampling (guidance branches)

Training (:func:`estimate_peak`, terms in :mod:`jointdit.memory_terms`):

    resident    weights (P·4; int8 frozen linears with ``vram.quantize_frozen=int8``) + LoRA adapters
                + casts (P·2 under mixed precision on CUDA) + optimizer state(θ) + EMA(θ·4)
    backward    simulated block by block: the saved tensors of the earlier blocks (only the inputs of the
                ``vram.checkpoint_blocks`` checkpointed ones, nothing of offloaded ones), the current block's
                activations and their gradients, the weight gradients of the later blocks, io, runtime
    step        gradients(θ·4) + the optimizer's transient (foreach or not, 8-bit, Adafactor)
    peak        resident + max(backward, step); with previews (``sample_every``/``eval.every``) also
                resident + an exported model copy + the sampling terms below
Sampling (:func:`sampling_plan`): weights + adapters + codec + CLIP weights + max(batched forward of the
guidance rows, codec decode incl. ``vid_decode_chunk``) + decoded media.

Every check keeps a stated margin (``vram.margin``, :data:`DEFAULT_MARGIN` when absent): a plan fits iff
``estimate · (1 + margin) <= budget``; the margin is logged with the plan. ``kv_pool_space`` (over space)
and ``kv_downsample`` (over latent time) shrink the keys per modality; ``max_t`` clamps Tv and the audio
span to the same seconds (as
LatentDataset crops). The fitted constants and their calibration/held-out benchmarks:
experiments/bench_memory.py (calibration) and experiments/bench_memory_terms.py (held-out). On GPU
``measure_peak`` reports ``torch.cuda.max_memory_allocated`` (code path not measured here: no GPU).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from jointdit.config import resolve_device

GiB = 1024 ** 3
MiB = 1024 ** 2

SAMPLE_RUNTIME = 8 * MiB   # no-grad forward runtime overhead (CPU fit, experiments/bench_memory.py)
DEFAULT_MARGIN = 0.1       # headroom every plan keeps over its estimate: fits iff estimate · (1 + margin) <= budget

KNOB_FIELDS = ("max_t", "q_chunk_v", "q_chunk_a", "kv_pool_space", "kv_downsample", "gradient_checkpointing",
               "micro_batch_size", "checkpoint_blocks", "offload_activations")
ENV_FOR_KNOB = {"max_t": "JOINTDIT_MAX_T", "q_chunk_v": "JOINTDIT_Q_CHUNK_V", "q_chunk_a": "JOINTDIT_Q_CHUNK_A",
                "kv_pool_space": "JOINTDIT_KV_POOL_SPACE", "kv_downsample": "JOINTDIT_KV_DOWNSAMPLE",
                "vid_decode_chunk": "JOINTDIT_VID_DECODE_CHUNK"}


class MemoryPlanError(RuntimeError):
    """The estimated peak does not fit the budget; the message names the knob(s) to change."""


@dataclass(frozen=True)
class Knobs:
    max_t: int = 0                  # latent video frames (0 = no clamp)
    q_chunk_v: int = 0              # 0 = no query chunking
    q_chunk_a: int = 0
    kv_downsample: int = 1          # K/V averaged over this many latent time steps
    kv_pool_space: int = 1          # K/V averaged over s×s video positions / s mel bands (time kept)
    gradient_checkpointing: bool = False
    micro_batch_size: int = 1
    checkpoint_blocks: int | None = None   # blocks recomputed in backward (the first k); None: all or none
    offload_activations: bool = False      # CUDA: the other blocks' saved tensors go to pinned host memory

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> Knobs:
        kw = {k: m[k] for k in KNOB_FIELDS if k in m and m[k] is not None}
        kw = {k: (bool(v) if k in ("gradient_checkpointing", "offload_activations") else int(v)) for k, v in kw.items()}
        return cls(**kw)

    def checkpointed(self, depth: int) -> int:
        """How many of ``depth`` blocks recompute: ``checkpoint_blocks`` (clamped), else all or none."""
        if self.checkpoint_blocks is not None:
            return max(0, min(int(depth), int(self.checkpoint_blocks)))
        return int(depth) if self.gradient_checkpointing else 0


@dataclass
class Estimate:
    """One estimate's terms (bytes) and its ``total`` (the peak it predicts; see the module docstring)."""

    params: int = 0
    casts: int = 0
    grads: int = 0
    optimizer: int = 0
    ema: int = 0
    activations: int = 0   # saved for backward at the end of the forward (training); one block's live tensors (sampling)
    attention: int = 0     # math-kernel attention probabilities (within activations for training)
    overhead: int = 0      # batch, io tensors and runtime
    transient: int = 0     # inside optimizer.step()
    backward: int = 0      # peak of the backward pass above the resident terms
    preview: int = 0       # peak of a preview sample in the training process (0: no previews)
    peak: int = 0
    n_params: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    COMPONENTS = ("params", "casts", "grads", "optimizer", "ema", "activations", "attention", "overhead", "transient",
                  "backward", "preview")

    @property
    def total(self) -> int:
        return int(self.peak)

    def planned(self, margin: float) -> int:
        """What the budget must hold: ``total · (1 + margin)``."""
        return int(self.total * (1.0 + float(margin)))

    def as_dict(self) -> dict[str, Any]:
        d = {k: int(getattr(self, k)) for k in self.COMPONENTS}
        d.update(total=self.total, n_params=self.n_params, **self.info)
        return d


# latent-sized fp32 tensors the solver holds during a step (diffusion/sampler.integrate, guidance.combine):
# per seed its noise, the held state, the scheduler's update and the guided sum; per guidance row the batched
# input and the prediction. Found by the t2v/t2a measured runs, where no decode hides them.
SOLVER_LATENTS_PER_SEED, SOLVER_LATENTS_PER_ROW = 4, 2


def solver_bytes(sampling: Estimate, seeds: int, rows: int) -> int:
    """The solver's fp32 latents next to the model's forward: ``4·latent·(4·seeds + 2·rows)`` bytes, with
    ``latent`` one sample's video + audio latent elements (``sampling.info["latent"]``, cropped)."""
    return 4 * int(sampling.info["latent"]) * (SOLVER_LATENTS_PER_SEED * int(seeds) + SOLVER_LATENTS_PER_ROW * int(rows))


@dataclass(frozen=True)
class PreviewTerms:
    """What a preview sample inside the training process adds besides the exported model copy: codec and
    CLIP weights, the codec decode and decoded media (bytes), and the guidance rows of its forward."""

    codec_weights: int = 0
    clip_weights: int = 0
    decode: int = 0
    media: int = 0
    branches: int = 3


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
                  device: str = "cpu", *, stage: Mapping[str, Any] | None = None, optimizer: str = "adamw",
                  foreach: bool | None = None, quantize_frozen: str | None = None, mixed_modes: bool = False,
                  time_groups: str = "sample", preview: PreviewTerms | None = None) -> Estimate:
    """THE estimate: peak bytes of one training step with every option live at once (module docstring), or of
    one sampling forward with ``training=False`` (then ``micro_batch`` is the number of batched rows).

    video_shape [Tv, Cv, hv, wv] and audio_shape [Ca, La, Fa] are UNcropped; ``knobs.max_t`` crops them.
    attention_kernel: "flash" (flash / mem-efficient / CPU flash SDPA) or "math" (materialises scores).
    stage: the ``stage`` config (what trains: all, glob groups, LoRA); optimizer / foreach: ``vram.optimizer``
    / ``vram.optimizer_foreach``; quantize_frozen: ``vram.quantize_frozen`` (None | "int8");
    mixed_modes: a batch can hold several attention modes (iso training with batch > 1);
    time_groups: modulation groups per sample — "sample" (one t), "frame" (per latent frame), "position"
    (per video position, the conditioning masks); preview: the preview sample's terms, or None.
    """
    from jointdit import memory_terms as T

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
    from jointdit.models.attention import AttentionKnobs, pooled_grid

    pooling = AttentionKnobs(kv_downsample=max(1, kn.kv_downsample), kv_pool_space=max(1, kn.kv_pool_space))
    kv_v, kv_a = math.prod(pooled_grid(gv, pooling)), math.prod(pooled_grid(ga, pooling))
    groups = {"sample": (1, 1), "frame": (gv[0], ga[0]), "position": (nv, ga[0])}[time_groups]
    tokens = T.Tokens(nv, na, kv_v, kv_a, n_ctx, *groups)
    mixed = str(precision) in ("bf16", "fp16") and device != "cpu"
    ab = _bytes_act(precision) if mixed else 4
    p = count_params(c)
    stage_layout = T.trainable_of(c, stage)
    frozen_linear = stage_layout.frozen_linear if (training and quantize_frozen) else []
    est = Estimate(n_params=p)
    frozen_elems = sum(T._numel(s) for s in frozen_linear)
    est.params = 4 * (p - frozen_elems) + T.quantized_weight_bytes(frozen_linear, quantize_frozen) \
        + 4 * stage_layout.added_params
    est.casts = 2 * p if mixed else 0
    patch_v = pv[0] * pv[1] * pv[2] * cv
    patch_a = pa[0] * pa[1] * ca
    latent = tv * cv * hv * wv + ca * la * fa
    qv = kn.q_chunk_v if 0 < kn.q_chunk_v < nv else nv
    qa = kn.q_chunk_a if 0 < kn.q_chunk_a < na else na
    q_live = n if kn.q_chunk_v == 0 and kn.q_chunk_a == 0 else max(qv, qa)
    est.info = {"tokens_video": nv, "tokens_audio": na, "keys": tokens.keys, "Tv": tv, "La": la, "latent": latent, "batch": b,
                "training": training, "precision": precision if mixed else "fp32", "attention_kernel": attention_kernel}
    if not training:
        # No autograd: a few [B, N, D]-sized tensors and one MLP hidden live at once (CPU fit).
        est.activations = int(b * n * (8 * d + 2 * mlp) * ab)
        est.attention = int(2 * b * heads * q_live * tokens.keys * ab) if attention_kernel == "math" else 0
        est.overhead = int(b * ab * (nv * (3 * d + 4 * patch_v) + na * (3 * d + 4 * patch_a) + 4 * n_ctx * d) // 2
                           + b * 8 * latent + SAMPLE_RUNTIME)
        est.peak = est.params + est.casts + est.activations + est.attention + est.overhead
        return est

    tr = stage_layout
    theta = tr.numel
    est.grads = 4 * theta
    est.optimizer = _optimizer_state(optimizer, tr.shapes)
    est.ema = 4 * theta if ema else 0
    est.transient = T.step_transient(optimizer, tr, foreach, device)
    # saved for backward, per block; the first k blocks are checkpointed (keep only their inputs x_v, x_a);
    # with offload (CUDA) the others keep nothing on the device until their backward brings them back
    saved_value = T.MIXED_SAVED_BYTES if mixed else 4
    k = kn.checkpointed(depth)
    offload = bool(kn.offload_activations) and device == "cuda"
    saved = [T.block_saved_bytes(blk, tokens, d, mlp, heads, b, saved_value, mixed_modes and b > 1, attention_kernel)
             for blk in tr.blocks]
    inputs = b * n * d * 4                                   # the residual stream stays fp32
    kept = [inputs if i < k else (0 if offload else saved[i]) for i in range(depth)]
    # outside the blocks: patch-embed / output-layer / loss tensors saved, and the batch (clean latents, noise,
    # noisy input, target) live through the step
    io = b * (saved_value * (nv * (3 * d + patch_v) + na * (3 * d + patch_a) + 2 * n_ctx * d) + 4 * 6 * latent)
    est.overhead = io + T.RUNTIME                            # runtime memory is held through the whole step
    est.activations = sum(kept)
    est.attention = sum(b * 2 * heads * tokens.queries * tokens.keys * ab for _ in range(depth - k)) \
        if attention_kernel == "math" else 0
    frozen_transient = 4 * max((T._numel(s) for s in frozen_linear), default=0)  # one weight dequantised at a time
    est.backward = T.backward_peak(saved, kept, [blk.grad_bytes for blk in tr.blocks], io, tr.grad_bytes_io) \
        + frozen_transient
    resident = est.params + est.casts + est.optimizer + est.ema + T.RUNTIME
    step = est.grads + est.transient
    train = resident + max(est.backward, step)
    if preview is not None:
        sample = estimate_peak(model_config, video_shape, audio_shape, kn, micro_batch=preview.branches,
                               precision=precision, training=False, attention_kernel=attention_kernel, device=device)
        forward = sample.activations + sample.attention + sample.overhead + solver_bytes(sample, 1, preview.branches)
        est.preview = int(resident + 4 * p + preview.codec_weights + preview.clip_weights
                          + max(forward, preview.decode) + preview.media)
    est.peak = int(max(train, est.preview))
    est.info.update(depth=depth, trainable=theta, optimizer_name=optimizer, foreach=foreach, checkpoint_blocks=k, offload=offload,
                    quantize_frozen=quantize_frozen, mixed_modes=mixed_modes, time_groups=time_groups,
                    train=int(train), step=int(step), resident=int(resident))
    return est


def _optimizer_state(name: str, shapes: Sequence[Sequence[int]]) -> int:
    from jointdit.optimizers import state_bytes

    return state_bytes(name, shapes)


# ----------------------------------------------------------------------------------------------
# Knob search
# ----------------------------------------------------------------------------------------------
def quality_key(k: Knobs, full_t: int, depth: int = 1) -> tuple:
    """Higher is better: data span first (max_t), then keys exact in time (kv_downsample 1: pooling time blurs
    the timing sync depends on), then exact in space (kv_pool_space), the batch, the fewest recomputed
    blocks, then the speed knobs (no offload, no query chunking)."""
    t = full_t if (k.max_t == 0 or k.max_t >= full_t) else k.max_t
    qc = lambda q: math.inf if q == 0 else q  # noqa: E731  (0 = no chunking = best)
    return (t, -k.kv_downsample, -k.kv_pool_space, k.micro_batch_size, -k.checkpointed(depth), not k.offload_activations,
            qc(k.q_chunk_v), qc(k.q_chunk_a))


def candidate_knobs(full_t: int, fixed: Mapping[str, Any] | None = None, depth: int = 1,
                    offload: bool = False, max_micro_batch: int | None = None, chunks: bool = True) -> list[Knobs]:
    """Quality-ordered (best first) knob sets; ``fixed`` pins knobs the user chose. Checkpointing is searched
    per block: ``checkpoint_blocks`` 0 … depth (``gradient_checkpointing`` follows it: true when any block
    recomputes). ``offload``: also try activation offload (CUDA only). ``chunks``: also try query chunking
    (it only saves memory with the math attention kernel)."""
    fixed = dict(fixed or {})
    ts = sorted({0} | {t for t in (48, 32, 24, 16, 12, 8, 6, 4, 2, 1) if t < full_t}, key=lambda t: -(full_t if t == 0 else t))
    batches = [m for m in (8, 4, 2, 1) if max_micro_batch is None or m <= max_micro_batch]
    grid: dict[str, list[Any]] = dict(max_t=ts, kv_downsample=[1, 2, 4, 8, 16], kv_pool_space=[1, 2, 4],
                                      micro_batch_size=batches,
                                      checkpoint_blocks=list(range(depth + 1)),
                                      offload_activations=[False, True] if offload else [False],
                                      q_chunk_v=[0, 1024, 256, 64] if chunks else [0],
                                      q_chunk_a=[0, 256, 64] if chunks else [0])
    if "gradient_checkpointing" in fixed and "checkpoint_blocks" not in fixed:
        fixed["checkpoint_blocks"] = depth if fixed["gradient_checkpointing"] else 0
    for k, v in fixed.items():
        if k in grid:
            grid[k] = [v]
    out = [Knobs(**dict(zip(grid, vals)), gradient_checkpointing=bool(dict(zip(grid, vals))["checkpoint_blocks"]))
           for vals in itertools.product(*grid.values())]
    out.sort(key=lambda k: quality_key(k, full_t, depth), reverse=True)
    return out


def choose_knobs(model_config: Mapping[str, Any], shapes: tuple[Sequence[int], Sequence[int]], budget_bytes: int,
                 margin: float = DEFAULT_MARGIN, precision: str = "no", fixed: Mapping[str, Any] | None = None,
                 training: bool = True, ema: bool = True, attention_kernel: str = "flash",
                 device: str = "cpu", max_micro_batch: int | None = None, **plan: Any) -> Knobs:
    """The highest-quality knob set whose estimate fits: ``total · (1 + margin) <= budget_bytes``. ``plan``:
    the run's other :func:`estimate_peak` arguments (stage, optimizer, foreach, quantize_frozen, mixed_modes,
    time_groups, preview), so the search plans exactly what the run will hold."""
    video_shape, audio_shape = shapes
    depth = int(_full_config(model_config)["depth"])
    cands = candidate_knobs(int(video_shape[0]), fixed, depth, offload=device == "cuda", max_micro_batch=max_micro_batch,
                            chunks=attention_kernel == "math")

    def estimate(k: Knobs) -> Estimate:
        return estimate_peak(model_config, video_shape, audio_shape, k, precision=precision, training=training,
                             ema=ema, attention_kernel=attention_kernel, device=device, **plan)

    for k in cands:
        if estimate(k).planned(margin) <= budget_bytes:
            return k
    smallest = estimate(cands[-1])
    raise MemoryPlanError(f"no knob set fits: even {cands[-1]} needs an estimated {_fmt(smallest.total)} "
                          f"(+{margin:.0%} margin = {_fmt(smallest.planned(margin))}) > {_fmt(budget_bytes)} budget; "
                          f"use a smaller model (model=tiny / lower model.depth, model.hidden_size), "
                          f"vram.optimizer=adamw8bit|adafactor, stage=lora, or more memory")


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


def check_plan(est: Estimate, budget_bytes: int, knobs: Knobs | Mapping[str, Any], margin: float = DEFAULT_MARGIN) -> None:
    """Raise :class:`MemoryPlanError` naming the knob(s) to change when ``est.total · (1 + margin)`` exceeds
    the budget."""
    kn = knobs if isinstance(knobs, Knobs) else Knobs.from_mapping(knobs)
    if est.planned(margin) <= budget_bytes:
        return
    hints = []
    states = est.params + est.optimizer + est.ema + est.grads
    if est.backward > states:
        depth = int(est.info.get("depth", 0) or 0)
        k = int(est.info.get("checkpoint_blocks", 0) or 0)
        if not depth or k < depth:
            hints.append(f"recompute more blocks: vram.checkpoint_blocks (now {k}) or vram.gradient_checkpointing=true")
        hints.append(f"raise vram.kv_pool_space (now {kn.kv_pool_space}; keeps time exact) before "
                     f"vram.kv_downsample (now {kn.kv_downsample}; blurs timing)")
        hints.append(f"lower vram.max_t (now {kn.max_t}) / vram.micro_batch_size (now {kn.micro_batch_size})")
        if est.info.get("attention_kernel") == "math":
            hints.append(f"lower vram.q_chunk_v (now {kn.q_chunk_v}) / vram.q_chunk_a (now {kn.q_chunk_a})")
    else:
        hints.append("use a smaller model (model=tiny, or lower model.depth / model.hidden_size)")
        hints.append("vram.optimizer=adamw8bit|adafactor, vram.optimizer_foreach=false, stage=lora or "
                     "vram.quantize_frozen=int8 (Stage B / LoRA)")
    if est.preview and est.preview >= est.info.get("train", 0):
        hints.append("sample_every=-1 (the preview sample holds a second model copy)")
    raise MemoryPlanError(f"estimated {_fmt(est.total)} (+{margin:.0%} margin = {_fmt(est.planned(margin))}) > "
                          f"{_fmt(budget_bytes)} budget: " + "; or ".join(hints) + " — or vram=auto to pick knobs that fit")


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


def _time_groups(tasks: Mapping[str, Any]) -> str:
    """Modulation groups the objective's tasks give a batch: a spatial inpainting mask gives each video position
    its own timestep; a clean first frame, a given prefix or span one per frame / audio step; joint one."""
    drawn = {k for k, v in dict(tasks or {}).items() if float(v or 0) > 0}
    if "inpaint_v" in drawn:
        return "position"
    return "frame" if drawn - {"joint", "t2v", "t2a"} else "sample"


def plan_arguments(cfg: Any, device: str = "cpu") -> dict[str, Any]:
    """The :func:`estimate_peak` arguments a composed ``train`` config implies besides shapes and knobs: its
    stage, ``vram.optimizer`` / ``optimizer_foreach`` / ``quantize_frozen``, EMA, precision, iso modes
    (mixed attention modes in a batch), the tasks' timestep groups, and the preview sample (``sample_every``
    ≥ 0 or ``eval.every`` > 0: the exported copy, the codec and CLIP, ``guidance``'s rows)."""
    from omegaconf import OmegaConf

    plain = lambda x: OmegaConf.to_container(x, resolve=True) if OmegaConf.is_config(x) else (x or {})  # noqa: E731
    v = plain(cfg.vram)
    objective = plain(cfg.get("objective") or {})
    iso = objective.get("iso_prob", 0) or 0
    iso_any = any(float(x or 0) > 0 for x in iso.values()) if isinstance(iso, Mapping) else float(iso) > 0
    tasks = objective.get("tasks") or {}
    out: dict[str, Any] = dict(
        stage=plain(cfg.get("stage") or {}), optimizer=str(v.get("optimizer", "adamw") or "adamw"),
        foreach=v.get("optimizer_foreach"), quantize_frozen=v.get("quantize_frozen") or None,
        ema=bool(plain(cfg.get("ema") or {}).get("enabled", True)),
        precision="no" if device == "cpu" else str(v.get("mixed_precision", "no")),
        mixed_modes=iso_any or any(t in tasks for t in ("t2v", "t2a")), time_groups=_time_groups(tasks))
    previews = int(cfg.get("sample_every", -1) if cfg.get("sample_every") is not None else -1) >= 0 \
        or int(plain(cfg.get("eval") or {}).get("every", 0) or 0) > 0
    out["preview"] = _preview_terms(cfg, v, device) if previews else None
    return out


def _preview_terms(cfg: Any, vram: Mapping[str, Any], device: str) -> PreviewTerms:
    from omegaconf import OmegaConf

    from jointdit.latents import spec_for_config
    from jointdit.memory_terms import clip_weights_bytes, codec_terms

    spec = spec_for_config(cfg, patches=False, crop=True)
    codec = OmegaConf.to_container(cfg.codec, resolve=True) if cfg.get("codec") is not None else {}
    frames = int(round(spec.video_shape[0] * spec.fps / spec.video_latent_fps))
    terms = codec_terms(codec, frames, spec.size, int(spec.audio_shape[1]), vram.get("vid_decode_chunk"), device)
    clip = OmegaConf.to_container(cfg.data.clip, resolve=True) if cfg.get("data") is not None and \
        cfg.data.get("clip") is not None else None
    clip_bytes, _ = clip_weights_bytes(clip if isinstance(clip, Mapping) and clip.get("enabled", True) else None)
    branches = 3
    if cfg.get("guidance") is not None:
        from jointdit.diffusion.guidance import build_guidance

        branches = guidance_branches(build_guidance(OmegaConf.to_container(cfg.guidance, resolve=True),
                                                    iso_prob=(cfg.get("objective") or {}).get("iso_prob")))
    h, w = spec.size
    samples = int(round(frames / spec.fps * spec.sample_rate))
    return PreviewTerms(terms.weights, clip_bytes, terms.decode, _media_bytes(frames, h, w, samples), branches)


def _media_bytes(frames: int, height: int, width: int, samples: int) -> int:
    """A decoded clip held while it is written: fp32 frames ×2 (decode output, clamped copy), uint8 frames, wave ×2."""
    return 2 * 4 * frames * 3 * height * width + frames * 3 * height * width + 2 * 4 * samples


def estimate_for_config(cfg: Any, video_shape: Sequence[int], audio_shape: Sequence[int],
                        model_config: Mapping[str, Any], device: str = "cpu", knobs: Knobs | None = None) -> Estimate:
    """:func:`estimate_peak` of a composed ``train`` config on latents the model trains on (already cropped:
    the knobs' ``max_t`` is not applied again)."""
    from omegaconf import OmegaConf

    kn = knobs or Knobs.from_mapping({**OmegaConf.to_container(cfg.vram, resolve=True), "max_t": 0})
    kn = replace(kn, max_t=0)
    return estimate_peak(dict(model_config), list(video_shape), list(audio_shape), kn, device=device,
                         **plan_arguments(cfg, device))


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
    """The vram settings the trainer should use, as a plain dict, plus the plan: ``estimate_bytes`` (the one
    estimate, :func:`estimate_peak` with everything the config runs), ``planned_bytes`` (with the margin),
    ``margin`` and ``budget_bytes``.

    ``vram.name == "auto"``: detect the budget and fill every knob the user did NOT set (command line
    via HydraConfig or ``overrides``, or a JOINTDIT_* variable) with the best set that fits.
    Fixed profiles: check the plan against ``budget_gb`` on a GPU (available RAM on CPU) and raise
    :class:`MemoryPlanError` if it does not fit. Every profile keeps ``vram.margin`` (:data:`DEFAULT_MARGIN`
    when absent). Call it before building the model / optimizer.
    """
    from omegaconf import OmegaConf

    v = OmegaConf.to_container(cfg.vram, resolve=True)
    dev = resolve_device(device)
    vs, as_, fv, fa = shapes_from_cfg(cfg)
    mcfg = _model_config_for(cfg, vs, as_, fv, fa)
    plan = plan_arguments(cfg, dev.type)
    margin = float(DEFAULT_MARGIN if v.get("margin") is None else v["margin"])
    if str(v.get("name")) == "auto":
        budget = int(budget_bytes if budget_bytes is not None else detect_budget(dev))
        fixed = {k: v[k] for k in user_overridden_knobs(overrides) if k in v}
        batch = int(cfg.batch_size) if cfg.get("batch_size") else None  # the trainer never runs more per micro-batch
        kn = choose_knobs(mcfg, (vs, as_), budget, margin, fixed=fixed, device=dev.type, max_micro_batch=batch, **plan)
        v.update(asdict(kn))
    else:
        kn = Knobs.from_mapping(v)
        if budget_bytes is not None:
            budget = int(budget_bytes)
        elif dev.type == "cuda" and v.get("budget_gb"):
            budget = int(float(v["budget_gb"]) * GiB)
        else:
            budget = detect_budget(dev)
    est = estimate_peak(mcfg, vs, as_, kn, device=dev.type, **plan)
    if str(v.get("name")) != "auto":
        check_plan(est, budget, kn, margin)
    depth = int(_full_config(mcfg)["depth"])
    v.update(checkpoint_blocks=kn.checkpointed(depth), gradient_checkpointing=kn.checkpointed(depth) > 0,
             offload_activations=bool(kn.offload_activations and dev.type == "cuda"),
             estimate_bytes=est.total, planned_bytes=est.planned(margin), margin=margin, budget_bytes=int(budget),
             estimate=est.as_dict())
    return v


# ----------------------------------------------------------------------------------------------
# Sampling plan: checked before the sampler loads anything
# ----------------------------------------------------------------------------------------------

@dataclass
class SamplingPlan:
    """What one ``jointdit.sample`` session holds at its peak (bytes) and whether it fits the budget.

    resident  = weights (model fp32 + unmerged adapters) + codec weights + CLIP weights
    working   = max(forward, decode)    the batched forward (``branches × batch_size`` rows, no autograd,
                                       plus the solver's fp32 latents: noise, state and its update, the
                                       guided sum per seed, input and prediction per row) finishes before
                                       the codecs decode one clip; decode = the larger of the video and the
                                       audio decode (one after the other; none for the stream a task leaves absent)
    total     = resident + working + media   (media: the decoded clip fp32 ×2 + its uint8 frames, the wave)
    planned   = total · (1 + margin);  fits = planned <= budget
    """

    weights: int
    codec_weights: int
    clip_weights: int
    forward: int
    decode_video: int
    decode_audio: int
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
    def decode(self) -> int:
        return max(self.decode_video, self.decode_audio)

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
        keys = ("weights", "codec_weights", "clip_weights", "forward", "decode_video", "decode_audio", "decode", "media",
                "budget")
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
        elif self.decode_video >= self.decode_audio:
            now = "the codec's decode_chunk" if self.vid_decode_chunk is None else self.vid_decode_chunk
            hints.append(f"lower vram.vid_decode_chunk (now {now})")
        else:
            hints.append("codec.audio.decode_batch=1, or max_t=<latent frames> to decode a shorter clip")
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
                  margin: float | None = None, task: str | None = None) -> SamplingPlan:
    """The memory plan of sampling ``checkpoint`` — from its ``config.json`` / ``jointdit.json`` and the
    codec/CLIP folders' files only: nothing is loaded. Arguments as :func:`jointdit.sample.load_session`:

    vram        knobs ``{max_t, q_chunk_v, q_chunk_a, kv_pool_space, kv_downsample, vid_decode_chunk, budget_gb,
                margin}``; the K/V pooling knobs: the export's (``attention.*``) unless given here
    codec       codec config (None: the export's); a ready ``(video, audio)`` codec tuple counts its modules
    clip        CLIP settings ``{model, pretrained, model_config}``; None: the export's; False: none
    spec        a :class:`~jointdit.latents.LatentSpec` or ``{seconds, fps, size}``; None: the export's
    adapters    LoRA adapter folders (``path``, ``path:scale`` or ``{path, scale}``), counted unmerged
    branches    guidance rows per sample: an int, or a JointCFG (:func:`guidance_branches`, upper bound)
    batch_size  seeds integrated together (``SampleRequest.batch_size``)
    max_t       latent frames sampled (``SampleRequest.max_t``; None: ``vram.max_t``; 0: the whole clip)
    task        the sampler task; the stream it leaves absent (t2v's audio, t2a's video) is neither decoded
                nor held, so it costs nothing here; None: both streams counted
    budget      ``budget_bytes`` > ``vram.budget_gb`` > :func:`detect_budget` (CUDA memory, else available RAM)
    margin      > ``vram.margin`` > :data:`DEFAULT_MARGIN`
    """
    from jointdit import checkpoints, lora
    from jointdit.diffusion import masks
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
    exported = meta.get("attention") or {}
    knobs = Knobs(max_t=crop, q_chunk_v=int(vram.get("q_chunk_v") or 0), q_chunk_a=int(vram.get("q_chunk_a") or 0),
                  kv_downsample=int(vram.get("kv_downsample") or exported.get("kv_downsample") or 1),
                  kv_pool_space=int(vram.get("kv_pool_space") or exported.get("kv_pool_space") or 1),
                  micro_batch_size=int(batch_size))
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
    terms = codec_terms(codec_cfg, frames, geometry.size, est.info["La"], chunk, dev.type)
    if isinstance(codec, tuple):  # ready codec objects: count the weights of their modules
        terms.weights = sum(p.numel() * p.element_size() for c in codec for m in vars(c).values()
                            if hasattr(m, "parameters") for p in m.parameters())
    notes += terms.notes
    clip_settings = meta.get("clip") if clip is None else (None if clip is False else clip)
    clip_bytes, note = clip_weights_bytes(dict(clip_settings) if isinstance(clip_settings, Mapping) else None)
    notes += [note] if note else []
    present = {"video", "audio"} if task is None else set(masks.present_streams(task))
    if "video" not in present:
        terms.decode_video = 0
    if "audio" not in present:
        terms.decode_audio = 0
    h, w = geometry.size
    media = _media_bytes(frames if "video" in present else 0, h, w,
                         int(round(frames / geometry.fps * geometry.sample_rate)) if "audio" in present else 0)
    if budget_bytes is not None:
        budget = int(budget_bytes)
    elif vram.get("budget_gb"):
        budget = int(float(vram["budget_gb"]) * GiB)
    else:
        budget = detect_budget(dev)
    m = float(margin if margin is not None else vram.get("margin", DEFAULT_MARGIN) or 0.0)
    return SamplingPlan(weights=est.params + adapter_bytes, codec_weights=terms.weights, clip_weights=clip_bytes,
                        forward=est.activations + est.attention + est.overhead + solver_bytes(est, int(batch_size), rows),
                        decode_video=terms.decode_video,
                        decode_audio=terms.decode_audio, media=media,
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
            f"{plan.branches * plan.batch_size} rows {_fmt(plan.forward)}, decode video {_fmt(plan.decode_video)} / audio "
            f"{_fmt(plan.decode_audio)}. Use "
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
import copy, json, sys
spec = json.loads(sys.argv[1])
import torch, jointdit
from jointdit import blockwise, checkpoints, lora, optimizers
from jointdit.models import build_model
from diffusers.training_utils import EMAModel   # imported before the baseline, as the trainer has it
stage = spec.get("stage") or {}
if spec["optimizer"] == "adafactor":
    import transformers.optimization
if spec["optimizer"] == "adamw8bit":
    import bitsandbytes
if lora.lora_enabled(stage.get("lora")):
    lora._peft()
if spec.get("quantize_frozen"):
    from jointdit import quantize
    quantize.require_quanto()
torch.manual_seed(0)
dev = torch.device(spec["device"])
""" + MEASURE_PRELUDE + r"""if dev.type == "cuda":
    torch.cuda.reset_peak_memory_stats(dev); base = torch.cuda.memory_allocated(dev)
else:
    base = rss("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
def peak():
    return (torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else rss("VmHWM")) - base
cfg = dict(spec["model"]); preset = cfg.pop("preset", "tiny")
model = build_model(preset, **cfg)
k = spec["knobs"]
model.set_memory_knobs(q_chunk_v=k["q_chunk_v"], q_chunk_a=k["q_chunk_a"], kv_downsample=k["kv_downsample"],
                       gradient_checkpointing=k["gradient_checkpointing"], kv_pool_space=k.get("kv_pool_space", 1))
blockwise.apply_block_memory(model, k.get("checkpoint_blocks"), k.get("offload_activations", False))
b = spec["batch"]
if spec["training"]:
    if lora.lora_enabled(stage.get("lora")):
        lora.add_lora(model, lora.groups_from_config(stage["lora"]))
        groups = [{"params": [p for _, p in lora.lora_parameters(model)]}]
    else:
        trainable = stage.get("trainable") or {"all": {"patterns": ["*"]}}
        sel = checkpoints.select_parameters(model, {n: g["patterns"] for n, g in trainable.items()})
        model.requires_grad_(False)
        groups = []
        for params in sel.values():
            for _, p in params:
                p.requires_grad_(True)
            groups.append({"params": [p for _, p in params]})
    if spec.get("quantize_frozen"):
        quantize.quantize_frozen(model, {n for n, p in model.named_parameters() if p.requires_grad},
                                 spec["quantize_frozen"])
    model.to(dev).train()
    opt = optimizers.build_optimizer(spec["optimizer"], groups, lr=1e-4, foreach=spec.get("foreach"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    ema = EMAModel(trainable, decay=0.999) if spec["ema"] else None
    zv = torch.randn(b, *spec["video_shape"], device=dev); za = torch.randn(b, *spec["audio_shape"], device=dev)
    modes = spec.get("modes") or "full"
    for _ in range(spec["steps"]):
        nv, na = torch.randn_like(zv), torch.randn_like(za)
        t = torch.rand(b, device=dev)
        xv = (1 - t.view(-1, 1, 1, 1, 1)) * zv + t.view(-1, 1, 1, 1, 1) * nv
        xa = (1 - t.view(-1, 1, 1, 1)) * za + t.view(-1, 1, 1, 1) * na
        ov, oa = model(xv, xa, t, t, None, modes)
        loss = ((ov - (nv - zv)) ** 2).mean() + ((oa - (na - za)) ** 2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)   # as the trainer (optim.grad_clip)
        opt.step(); opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(trainable)
        del ov, oa, loss, xv, xa
    train_peak = peak()
    if spec.get("preview"):
        exported = copy.deepcopy(model).eval()     # the exported copy the sampler loads
        n = spec["preview"]
        with torch.no_grad():
            t = torch.rand(n, device=dev)
            ov, oa = exported(zv[:1].repeat(n, 1, 1, 1, 1), za[:1].repeat(n, 1, 1, 1), t, t, None, "full")
        del ov, oa, exported
else:
    model.to(dev).eval()
    zv = torch.randn(b, *spec["video_shape"], device=dev); za = torch.randn(b, *spec["audio_shape"], device=dev)
    with torch.no_grad():
        for _ in range(spec["steps"]):
            t = torch.rand(b, device=dev)
            ov, oa = model(zv, za, t, t, None, "full"); del ov, oa
    train_peak = peak()
print("MEASURE " + json.dumps({"peak_delta": peak(), "train_peak": train_peak, "baseline": base}))
"""


def measure_peak(model_config: Mapping[str, Any], video_shape: Sequence[int], audio_shape: Sequence[int],
                 knobs: Knobs | Mapping[str, Any], micro_batch: int | None = None, training: bool = True,
                 ema: bool = True, steps: int = 2, device: str = "cpu", timeout: float = 1800, *,
                 stage: Mapping[str, Any] | None = None, optimizer: str = "adamw", foreach: bool | None = None,
                 quantize_frozen: str | None = None, modes: str | Sequence[str] = "full",
                 preview_branches: int = 0) -> int:
    """Measured peak bytes above the baseline, in a fresh subprocess that imports what the trainer has
    imported (diffusers' EMAModel, the optimizer's and PEFT's / quanto's libraries) BEFORE the baseline, then
    builds the model with the stage's trainable set (``lora.add_lora`` / ``checkpoints.select_parameters``),
    the knobs (incl. ``blockwise.apply_block_memory``), ``optimizers.build_optimizer``, EMAModel over the
    trainable tensors, and runs ``steps`` flow-matching steps with gradient clipping; ``preview_branches`` > 0
    then samples an exported copy over that many batched rows with everything still held.

    CPU: VmHWM − VmRSS(baseline), with VmHWM reset via /proc/self/clear_refs after imports and a warm-up,
    and MALLOC_MMAP_THRESHOLD_=65536 so freed tensors go back to the OS (RSS tracks live tensors).
    GPU: torch.cuda.max_memory_allocated − memory_allocated(baseline). ``video_shape``/``audio_shape`` are
    used as given (apply ``crop_shapes`` first for max_t).
    """
    kn = knobs if isinstance(knobs, Knobs) else Knobs.from_mapping(knobs)
    spec = {"model": dict(model_config), "video_shape": list(video_shape), "audio_shape": list(audio_shape),
            "knobs": asdict(kn), "batch": int(micro_batch if micro_batch is not None else kn.micro_batch_size),
            "training": training, "ema": ema, "steps": steps, "device": device, "stage": dict(stage or {}),
            "optimizer": optimizer, "foreach": foreach, "quantize_frozen": quantize_frozen,
            "modes": modes if isinstance(modes, str) else list(modes), "preview": int(preview_branches)}
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
    plan_dev = "cuda" if gpu_profile else dev
    if budget_bytes is None:
        budget_bytes = int(float(v["budget_gb"]) * GiB) if v.get("budget_gb") and str(v.get("name")) != "auto" \
            else detect_budget(dev)
    vs, as_, fv, fa = shapes_from_cfg(cfg)
    mcfg = _model_config_for(cfg, vs, as_, fv, fa)
    margin = float(DEFAULT_MARGIN if v.get("margin") is None else v["margin"])
    plan = plan_arguments(cfg, plan_dev) if training else {"precision": plan_arguments(cfg, plan_dev)["precision"]}
    if str(v.get("name")) == "auto":
        fixed = {k: v[k] for k in user_overridden_knobs(overrides) if k in v}
        kn = choose_knobs(mcfg, (vs, as_), budget_bytes, margin, fixed=fixed, training=training,
                          attention_kernel=attention_kernel, device=plan_dev, **plan)
    else:
        kn = Knobs.from_mapping(v)
    est = estimate_peak(mcfg, vs, as_, kn, micro_batch=None if training else branches, training=training,
                        attention_kernel=attention_kernel, device=plan_dev, **plan)
    rows = [("profile", str(v.get("name"))), ("model", f"{cfg.model.preset} ({est.n_params / 1e6:.2f} M params)"),
            ("mode", "training" if training else f"sampling ({branches} branches)"),
            ("latents", f"video {vs} audio {as_} (after max_t: Tv={est.info['Tv']}, La={est.info['La']})"),
            ("tokens", f"video {est.info['tokens_video']} + audio {est.info['tokens_audio']}, keys {est.info['keys']}")]
    rows += [(f"vram.{k}", str(getattr(kn, k))) for k in KNOB_FIELDS]
    rows += [("precision", est.info["precision"]), ("attention kernel", attention_kernel)]
    rows += [(k, _fmt(getattr(est, k))) for k in Estimate.COMPONENTS]
    rows += [("estimated peak", _fmt(est.total)), ("planned (+margin)", f"{_fmt(est.planned(margin))} (margin {margin})"),
             ("budget", _fmt(budget_bytes)), ("fits", "yes" if est.planned(margin) <= budget_bytes else "NO")]
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
