"""Rectified-flow training objective with per-modality timesteps and a mix of tasks.

Path: ``x_t = (1 - t)·x0 + t·ε`` with ``t ∈ [0, 1]`` (t = 0 is data), so the velocity the model
learns is ``dx_t/dt = ε − x0``. Each modality draws its own ``t`` from a logit-normal density
(``sigmoid(N(μ, σ))``, as in SD3). A timestep shift ``s`` (:mod:`jointdit.diffusion.schedule`) maps
``t ↦ s·t / (1 + (s − 1)·t)``; since ``logit(s·t/(1+(s−1)t)) = logit(t) + ln s``, training with shift
``s`` is the logit-normal with mean ``μ + ln s`` — the same warp the sampler applies to its sigmas.

Tasks, one per training sample, so that one model serves four uses:

============  =====================================  ==========================
task          what is clean (t = 0, no loss)          what is generated
============  =====================================  ==========================
``joint``     nothing                                 video and audio
``a2v``       the audio                               video from audio
``v2a``       the video                               audio from video
``i2sv``      the first latent video frame            the rest of the video, and audio
============  =====================================  ==========================

Attention modes, one per training sample (``iso_prob``): besides ``full``, a sample may be drawn in
``iso_v`` / ``iso_a`` / ``iso`` mode (see :mod:`jointdit.models.attention`), with the same target. An
isolated modality then learns the velocity of its own marginal, which is the branch JointCFG subtracts
(``pos − iso``); a model never trained in ``iso`` mode has an unsupervised iso branch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling

from jointdit.diffusion.schedule import EXPORT_KEY as SHIFT_EXPORT_KEY
from jointdit.diffusion.schedule import ShiftRule, export_entry, token_counts
from jointdit.models.attention import MODES  # ("full", "iso_v", "iso_a", "iso")

TASKS: tuple[str, ...] = ("joint", "a2v", "v2a", "i2sv")
IsoProb = float | Mapping[str, float] | None


@dataclass
class FlowBatch:
    """Noised inputs, per-token timesteps, velocity targets and loss masks for one batch."""

    video: torch.Tensor  # [B, Tv, Cv, h, w]  x_t of the video latent
    audio: torch.Tensor  # [B, Ca, La, Fa]    x_t of the audio latent
    t_video: torch.Tensor  # [B, Tv]  per latent frame (frame 0 is clean in i2sv)
    t_audio: torch.Tensor  # [B]
    target_video: torch.Tensor  # ε − x0
    target_audio: torch.Tensor
    mask_video: torch.Tensor  # [B, Tv]  1 where the video loss counts
    mask_audio: torch.Tensor  # [B]      1 where the audio loss counts
    tasks: torch.Tensor  # [B] index into TASKS
    modes: list[str] = field(default_factory=list)  # [B] attention mode per sample (MODES); the model's `mode`


def draw_names(probabilities: Mapping[str, float], names: tuple[str, ...], batch: int,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """An index into ``names`` per sample, drawn with ``probabilities`` (normalised; unknown names refused)."""
    unknown = set(probabilities) - set(names)
    if unknown:
        raise ValueError(f"unknown training task(s) {sorted(unknown)}; choose from {list(names)}")
    weights = torch.tensor([float(probabilities.get(name, 0.0)) for name in names])
    if (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"task probabilities must be non-negative and not all zero, got {dict(probabilities)}")
    device = generator.device if generator is not None else "cpu"
    return torch.multinomial((weights / weights.sum()).to(device), batch, replacement=True, generator=generator)


def sample_tasks(probabilities: dict[str, float], batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw a task index per sample from ``probabilities`` (an index into TASKS)."""
    return draw_names(probabilities, TASKS, batch_size, generator)


def mode_probabilities(iso_prob: IsoProb) -> dict[str, float]:
    """``iso_prob`` → probability of each attention mode (``full`` takes the rest).

    A number ``p`` means ``{"iso": p}`` (both modalities blind to each other; its video output is the
    ``iso_v`` branch and its audio output the ``iso_a`` branch of JointCFG). A mapping names modes
    among ``iso_v``, ``iso_a``, ``iso``.
    """
    if iso_prob is None:
        probs = {}
    elif isinstance(iso_prob, Mapping):
        probs = {str(k): float(v) for k, v in iso_prob.items()}
    else:
        probs = {"iso": float(iso_prob)}
    unknown = set(probs) - set(MODES[1:])
    if unknown:
        raise ValueError(f"unknown attention mode(s) {sorted(unknown)} in iso_prob; choose from {list(MODES[1:])}")
    if any(p < 0 for p in probs.values()) or sum(probs.values()) > 1 + 1e-9:
        raise ValueError(f"iso_prob must be non-negative and sum to at most 1, got {probs}")
    out = {m: probs.get(m, 0.0) for m in MODES[1:]}
    return {"full": max(0.0, 1.0 - sum(out.values())), **out}


def trained_iso(iso_prob: IsoProb) -> tuple[bool, bool]:
    """Whether a model trained with ``iso_prob`` learned JointCFG's video iso branch (``iso_v`` or ``iso``
    mode drawn) and its audio iso branch (``iso_a`` or ``iso``)."""
    p = mode_probabilities(iso_prob)
    return p["iso_v"] + p["iso"] > 0, p["iso_a"] + p["iso"] > 0


def sample_modes(iso_prob: IsoProb, batch_size: int, generator: torch.Generator | None = None) -> list[str]:
    """Draw an attention mode per sample (all ``full`` without drawing when no iso mode has mass)."""
    probs = mode_probabilities(iso_prob)
    if probs["full"] >= 1.0:
        return ["full"] * batch_size
    device = generator.device if generator is not None else "cpu"
    weights = torch.tensor([probs[m] for m in MODES], device=device)
    index = torch.multinomial(weights, batch_size, replacement=True, generator=generator)
    return [MODES[i] for i in index.tolist()]


def sample_t(batch_size: int, mean: float = 0.0, std: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Logit-normal flow times in (0, 1)."""
    device = generator.device if generator is not None else "cpu"
    return compute_density_for_timestep_sampling("logit_normal", batch_size, logit_mean=mean, logit_std=std,
                                                 device=device, generator=generator)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - t)·x0 + t·ε``, with ``t`` broadcast from the leading dims of ``x0``."""
    t = t.reshape(*t.shape, *([1] * (x0.ndim - t.ndim))).to(x0.dtype)
    return (1 - t) * x0 + t * noise


def make_flow_batch(
    video: torch.Tensor,
    audio: torch.Tensor,
    tasks: torch.Tensor,
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    *,
    iso_prob: IsoProb = 0.0,
    shift_video: float = 1.0,
    shift_audio: float = 1.0,
) -> FlowBatch:
    """Noise a batch of clean latents according to each sample's task, and draw its attention mode.

    video [B, Tv, Cv, h, w], audio [B, Ca, La, Fa]: clean latents x0; tasks [B]: indices into TASKS.
    t_m = sigmoid(N(mean + ln shift_m, std)) per sample and modality; x_t = (1 − t)·x0 + t·ε; target ε − x0.
    iso_prob: see :func:`mode_probabilities`; the modes are drawn after the noise, and not at all when
    no iso mode has mass (so ``iso_prob = 0`` reproduces the draws of a run without modes).
    All randomness comes from ``generator`` (on the latents' device), so a step is reproducible.
    """
    batch, frames = video.shape[:2]
    device = video.device
    if shift_video <= 0 or shift_audio <= 0:
        raise ValueError(f"timestep shifts must be > 0, got video {shift_video}, audio {shift_audio}")
    t_video = sample_t(batch, mean + math.log(shift_video), std, generator)[:, None].expand(batch, frames).clone()  # [B, Tv]
    t_audio = sample_t(batch, mean + math.log(shift_audio), std, generator)  # [B]
    mask_video = torch.ones(batch, frames, device=device)
    mask_audio = torch.ones(batch, device=device)

    a2v, v2a, i2sv = (tasks == TASKS.index(name) for name in ("a2v", "v2a", "i2sv"))
    t_audio[a2v], mask_audio[a2v] = 0.0, 0.0
    t_video[v2a], mask_video[v2a] = 0.0, 0.0
    t_video[i2sv, 0], mask_video[i2sv, 0] = 0.0, 0.0

    noise_video = torch.randn(video.shape, generator=generator, device=device, dtype=video.dtype)
    noise_audio = torch.randn(audio.shape, generator=generator, device=device, dtype=audio.dtype)
    modes = sample_modes(iso_prob, batch, generator)
    return FlowBatch(
        video=interpolate(video, noise_video, t_video),
        audio=interpolate(audio, noise_audio, t_audio),
        t_video=t_video,
        t_audio=t_audio,
        target_video=noise_video - video,
        target_audio=noise_audio - audio,
        mask_video=mask_video,
        mask_audio=mask_audio,
        tasks=tasks,
        modes=modes,
    )


def flow_loss(
    pred_video: torch.Tensor,
    pred_audio: torch.Tensor,
    batch: FlowBatch,
    weight_video: float = 1.0,
    weight_audio: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Masked mean-squared velocity error.

    ``loss = w_v·mean_{counted video frames} |v̂ − v|² + w_a·mean_{counted clips} |â − a|²``. Also
    returns each modality's loss, the per-task losses and the per-mode losses ``loss_mode_<mode>``
    (detached; NaN for a task or mode absent from the batch).
    """
    se_video = (pred_video.float() - batch.target_video.float()).pow(2).mean(dim=(2, 3, 4))  # [B, Tv]
    se_audio = (pred_audio.float() - batch.target_audio.float()).pow(2).mean(dim=(1, 2, 3))  # [B]
    loss_video = (se_video * batch.mask_video).sum() / batch.mask_video.sum().clamp_min(1)
    loss_audio = (se_audio * batch.mask_audio).sum() / batch.mask_audio.sum().clamp_min(1)
    out = {
        "loss": weight_video * loss_video + weight_audio * loss_audio,
        "loss_video": loss_video.detach(),
        "loss_audio": loss_audio.detach(),
    }
    per_sample = (weight_video * (se_video * batch.mask_video).sum(1) / batch.mask_video.sum(1).clamp_min(1)
                  + weight_audio * se_audio * batch.mask_audio).detach()  # [B]
    for index, name in enumerate(TASKS):
        chosen = batch.tasks == index
        out[f"loss_{name}"] = per_sample[chosen].mean() if chosen.any() else torch.tensor(float("nan"))
    modes = batch.modes or ["full"] * per_sample.shape[0]
    for name in MODES:
        chosen = torch.tensor([m == name for m in modes], device=per_sample.device)
        out[f"loss_mode_{name}"] = per_sample[chosen].mean() if chosen.any() else torch.tensor(float("nan"))
    return out


def plain_iso_prob(iso_prob: Any) -> IsoProb:
    """A config value (number, mapping, OmegaConf node or None) → a plain ``IsoProb``."""
    if iso_prob is None:
        return None
    if hasattr(iso_prob, "items"):
        return {str(k): float(v) for k, v in iso_prob.items()}
    return float(iso_prob)


@dataclass(frozen=True)
class FlowObjective:
    """The run-level settings of the objective: logit-normal ``(mean, std)``, attention modes, timestep
    shifts, and the latents' centre times the model's RoPE uses.

    Built once per run by :meth:`from_config`; :meth:`batch` noises a training batch, :meth:`validation_batch`
    a validation batch with a FIXED distribution (no shift, no iso modes) so validation losses of runs
    with different settings stay comparable; :meth:`model_kwargs` are the model's time arguments and
    :meth:`export_meta` what ``jointdit.json`` must carry for guidance and the sampler.
    """

    mean: float = 0.0
    std: float = 1.0
    iso_prob: IsoProb = 0.0
    shift_rule: ShiftRule = field(default_factory=lambda: ShiftRule(method="none"))
    video_tokens: int = 1
    audio_tokens: int = 1
    video_times: torch.Tensor | None = None  # [Tv] seconds
    audio_times: torch.Tensor | None = None  # [La] seconds

    @classmethod
    def from_config(cls, objective: Any, model_config: Mapping[str, Any], spec: Any) -> FlowObjective:
        """``cfg.objective`` + the model's config + the training :class:`~jointdit.latents.LatentSpec`."""
        get = objective.get if hasattr(objective, "get") else (lambda k, d=None: getattr(objective, k, d))
        n_video, n_audio = token_counts(model_config, spec.video_shape, spec.audio_shape)
        rule = get("timestep_shift", None)
        return cls(mean=float(get("logit_normal_mean", 0.0)), std=float(get("logit_normal_std", 1.0)),
                   iso_prob=plain_iso_prob(get("iso_prob", 0.0)),
                   shift_rule=ShiftRule(method="none") if rule is None else ShiftRule.from_config(rule),
                   video_tokens=n_video, audio_tokens=n_audio,
                   video_times=spec.video_latent_times(), audio_times=spec.audio_latent_times())

    @property
    def shifts(self) -> tuple[float, float]:
        """``(shift_video, shift_audio)`` at this run's token counts."""
        return self.shift_rule(self.video_tokens), self.shift_rule(self.audio_tokens)

    def batch(self, video: torch.Tensor, audio: torch.Tensor, tasks: torch.Tensor,
              generator: torch.Generator | None) -> FlowBatch:
        sv, sa = self.shifts
        return make_flow_batch(video, audio, tasks, self.mean, self.std, generator, iso_prob=self.iso_prob,
                               shift_video=sv, shift_audio=sa)

    def validation_batch(self, video: torch.Tensor, audio: torch.Tensor, tasks: torch.Tensor,
                         generator: torch.Generator | None) -> FlowBatch:
        return make_flow_batch(video, audio, tasks, self.mean, self.std, generator)

    def model_kwargs(self) -> dict[str, torch.Tensor]:
        """``video_times`` / ``audio_times`` for the model call (empty when unknown)."""
        out = {}
        if self.video_times is not None:
            out["video_times"] = self.video_times
        if self.audio_times is not None:
            out["audio_times"] = self.audio_times
        return out

    def export_meta(self) -> dict[str, Any]:
        """``{"iso_prob": ..., "timestep_shift": {rule, token counts, shifts}}`` for ``jointdit.json``."""
        return {"iso_prob": self.iso_prob, SHIFT_EXPORT_KEY: export_entry(self.shift_rule, self.video_tokens,
                                                                           self.audio_tokens)}
