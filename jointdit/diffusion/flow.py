"""The rectified-flow training objective: ONE path for every task — conditioning masks, per-modality
logit-normal times with the resolution-aware shift, per-sample attention modes, one masked loss.

Path: ``x_t = (1 - t)·x0 + t·ε`` with ``t ∈ [0, 1]`` (t = 0 is data), so the velocity the model
learns is ``dx_t/dt = ε − x0``. Each modality draws its own ``t`` from a logit-normal density
(``sigmoid(N(μ, σ))``, as in SD3). A timestep shift ``s`` (:mod:`jointdit.diffusion.schedule`) maps
``t ↦ s·t / (1 + (s − 1)·t)``; since ``logit(s·t/(1+(s−1)t)) = logit(t) + ln s``, training with shift
``s`` is the logit-normal with mean ``μ + ln s`` — the same warp the sampler applies to its sigmas.

Tasks, one per training sample (``objective.tasks``), so that one model serves every use. Each task is a
conditioning mask (:mod:`jointdit.diffusion.masks`, the one definition training and sampling share):
``joint`` gives nothing, ``a2v`` the whole audio, ``v2a`` the whole video, ``i2sv`` the first latent
video frame (its temporal patch), ``extend_*`` a prefix, ``inpaint_*`` everything outside a region or
span, ``t2v`` / ``t2a`` leave the other stream absent. On a mask:

- given latents get ``t = 0`` (so ``x_t = x0``, the condition itself) and no loss;
- an absent stream gets ``t = 1`` (pure noise), no loss, and the present stream is blind to it;
- the rest get the sample's shifted logit-normal ``t`` of their modality and count in the loss.

Attention modes, one per training sample (``iso_prob``): besides ``full``, a sample may be drawn in
``iso_v`` / ``iso_a`` / ``iso`` mode (see :mod:`jointdit.models.attention`), with the same target; a
t2v / t2a sample further restricts it (``ConditionMask.attention_modes``). An isolated modality then
learns the velocity of its own marginal, which is the branch JointCFG subtracts (``pos − iso``); a model
never trained in ``iso`` mode has an unsupervised iso branch.

Draw order of one batch (all from one generator, so a step is a pure function of its seed):
tasks → mask parameters (``FlowObjective.batch``) → video t → audio t → video noise → audio noise →
attention modes (``make_flow_batch``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling

from jointdit.diffusion.masks import MODES, ConditionMask, Geometry, MaskParams, empty_mask, set_mode, training_mask
from jointdit.diffusion.schedule import EXPORT_KEY as SHIFT_EXPORT_KEY
from jointdit.diffusion.schedule import ShiftRule, export_entry, token_counts
from jointdit.models.attention import MODES as ATTENTION_MODES  # ("full", "iso_v", "iso_a", "iso")

TASKS: tuple[str, ...] = MODES[:4]  # joint a2v v2a i2sv; masks.MODES holds every task (these + MASK_TASKS)
IsoProb = float | Mapping[str, float] | None


@dataclass
class FlowBatch:
    """Noised inputs, model timesteps, velocity targets, the mask and the attention modes of one batch."""

    video: torch.Tensor         # [B, Tv, Cv, hv, wv] x_t of the video latent (given latents = x0 exactly)
    audio: torch.Tensor         # [B, Ca, La, Fa]     x_t of the audio latent
    t_video: torch.Tensor       # [B, Tv] per latent frame, or [B, Tv·hv·wv] per position (a partly given frame)
    t_audio: torch.Tensor       # [B], or [B, La] per step (a partly given clip)
    target_video: torch.Tensor  # ε − x0
    target_audio: torch.Tensor
    mask: ConditionMask         # what is given / absent; its ``modes`` are the tasks
    modes: list[str] = field(default_factory=list)  # [B] attention mode per sample: the model's `mode`

    @property
    def tasks(self) -> list[str]:
        """The task (a name of ``masks.MODES``) of each sample."""
        return self.mask.modes


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


def sample_tasks(probabilities: Mapping[str, float], batch_size: int,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw a task per sample from ``probabilities`` (``objective.tasks``): an index into ``masks.MODES``
    (whose first four are :data:`TASKS`, so a classic task keeps its index)."""
    return draw_names(probabilities, MODES, batch_size, generator)


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
    unknown = set(probs) - set(ATTENTION_MODES[1:])
    if unknown:
        raise ValueError(f"unknown attention mode(s) {sorted(unknown)} in iso_prob; "
                         f"choose from {list(ATTENTION_MODES[1:])}")
    if any(p < 0 for p in probs.values()) or sum(probs.values()) > 1 + 1e-9:
        raise ValueError(f"iso_prob must be non-negative and sum to at most 1, got {probs}")
    out = {m: probs.get(m, 0.0) for m in ATTENTION_MODES[1:]}
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
    weights = torch.tensor([probs[m] for m in ATTENTION_MODES], device=device)
    index = torch.multinomial(weights, batch_size, replacement=True, generator=generator)
    return [ATTENTION_MODES[i] for i in index.tolist()]


def sample_t(batch_size: int, mean: float = 0.0, std: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Logit-normal flow times in (0, 1)."""
    device = generator.device if generator is not None else "cpu"
    return compute_density_for_timestep_sampling("logit_normal", batch_size, logit_mean=mean, logit_std=std,
                                                 device=device, generator=generator)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - t)·x0 + t·ε``, with ``t`` broadcast from the leading dims of ``x0``."""
    t = t.reshape(*t.shape, *([1] * (x0.ndim - t.ndim))).to(x0.dtype)
    return (1 - t) * x0 + t * noise


def task_mask(tasks: torch.Tensor | Sequence[str], video_shape: Sequence[int],
              audio_shape: Sequence[int]) -> ConditionMask:
    """The mask of tasks that need no geometry (joint, a2v, v2a, i2sv with one-frame patches), for latents
    of these shapes; ``tasks``: indices into ``masks.MODES`` or names. Other modes need a
    :class:`~jointdit.diffusion.masks.Geometry` and drawn parameters: :func:`masks.training_mask`."""
    names = [MODES[int(i)] for i in tasks.tolist()] if isinstance(tasks, torch.Tensor) else list(tasks)
    needs_geometry = sorted(set(names) - set(TASKS))
    if needs_geometry:
        raise ValueError(f"tasks {needs_geometry} need the clip geometry and their drawn parameters: pass "
                         f"masks.training_mask(...) (FlowObjective.batch does) instead of task indices")
    geometry = Geometry.of(video_shape, audio_shape, 1.0, 1.0)  # rates unused by these four
    mask = empty_mask(len(names), geometry)
    for i, name in enumerate(names):
        set_mode(mask, i, name, geometry)
    return mask


def make_flow_batch(
    video: torch.Tensor,
    audio: torch.Tensor,
    tasks: ConditionMask | torch.Tensor | Sequence[str],
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    *,
    iso_prob: IsoProb = 0.0,
    shift_video: float = 1.0,
    shift_audio: float = 1.0,
) -> FlowBatch:
    """Noise a batch of clean latents under each sample's conditioning mask, and draw its attention mode.

    video [B, Tv, Cv, hv, wv], audio [B, Ca, La, Fa]: clean latents x0. ``tasks``: the batch's
    :class:`~jointdit.diffusion.masks.ConditionMask`, or task indices / names of :data:`TASKS` (their mask
    is built here, :func:`task_mask`).
    ``t_m = sigmoid(N(mean + ln shift_m, std))`` per sample and modality; then ``t = 0`` on given latents and
    ``t = 1`` on an absent stream; ``x_t = (1 − t)·x0 + t·ε`` per element; target ``ε − x0``.
    iso_prob: see :func:`mode_probabilities`; the modes are drawn after the noise, and not at all when no
    iso mode has mass (so ``iso_prob = 0`` reproduces the draws of a run without modes), then restricted
    by the mask (t2v's video never sees audio, t2a's audio never sees video).
    All randomness comes from ``generator`` (on the latents' device), so a step is reproducible.
    """
    b, device = video.shape[0], video.device
    if shift_video <= 0 or shift_audio <= 0:
        raise ValueError(f"timestep shifts must be > 0, got video {shift_video}, audio {shift_audio}")
    mask = tasks if isinstance(tasks, ConditionMask) else task_mask(tasks, video.shape, audio.shape)
    mask = mask.to(device)
    t_video = sample_t(b, mean + math.log(shift_video), std, generator)  # [B]
    t_audio = sample_t(b, mean + math.log(shift_audio), std, generator)  # [B]
    noise_video = torch.randn(video.shape, generator=generator, device=device, dtype=video.dtype)
    noise_audio = torch.randn(audio.shape, generator=generator, device=device, dtype=audio.dtype)
    modes = mask.attention_modes(sample_modes(iso_prob, b, generator))
    model_t_video, model_t_audio = mask.timesteps(t_video.to(device), t_audio.to(device))
    tv, hv, wv = mask.video.shape[1:]
    per_element_v = (model_t_video.reshape(b, tv, 1, hv, wv) if model_t_video.shape[1] != tv
                     else model_t_video[:, :, None, None, None])                      # [B, Tv, 1, hv|1, wv|1]
    per_element_a = (model_t_audio[:, None, :, None] if model_t_audio.ndim == 2
                     else model_t_audio[:, None, None, None])                         # [B, 1, La|1, 1]
    return FlowBatch(
        video=interpolate(video, noise_video, per_element_v),
        audio=interpolate(audio, noise_audio, per_element_a),
        t_video=model_t_video,
        t_audio=model_t_audio,
        target_video=noise_video - video,
        target_audio=noise_audio - audio,
        mask=mask,
        modes=modes,
    )


def flow_loss(
    pred_video: torch.Tensor,
    pred_audio: torch.Tensor,
    batch: FlowBatch,
    weight_video: float = 1.0,
    weight_audio: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Masked mean-squared velocity error over the generated latents of present streams.

    ``loss = w_v·Σ W_v|v̂ − v|² / Σ W_v + w_a·Σ W_a|â − a|² / Σ W_a`` with ``W = 1`` on generated elements
    (``ConditionMask.loss_weights``, broadcast over channels and bins) and 0 on given or absent ones; a
    modality with nothing generated in the batch contributes 0. Also returns each modality's loss and,
    detached, per-task losses ``loss_<task>`` (every name of ``masks.MODES``) and per-attention-mode
    losses ``loss_mode_<mode>`` — each the mean over its samples of the sample's
    ``w_v·(its video mean) + w_a·(its audio mean)``, NaN for a task or mode absent from the batch.
    """
    w_v, w_a = batch.mask.loss_weights()                                        # [B,Tv,1,hv,wv], [B,1,La,1]
    se_v = (pred_video.float() - batch.target_video.float()).pow(2) * w_v       # [B, Tv, Cv, hv, wv]
    se_a = (pred_audio.float() - batch.target_audio.float()).pow(2) * w_a       # [B, Ca, La, Fa]
    n_v, n_a = w_v.expand_as(se_v).sum((1, 2, 3, 4)), w_a.expand_as(se_a).sum((1, 2, 3))   # [B] counted elements
    s_v, s_a = se_v.sum((1, 2, 3, 4)), se_a.sum((1, 2, 3))                                 # [B]
    loss_video = s_v.sum() / n_v.sum().clamp_min(1)
    loss_audio = s_a.sum() / n_a.sum().clamp_min(1)
    out = {
        "loss": weight_video * loss_video + weight_audio * loss_audio,
        "loss_video": loss_video.detach(),
        "loss_audio": loss_audio.detach(),
    }
    per_sample = (weight_video * s_v / n_v.clamp_min(1) + weight_audio * s_a / n_a.clamp_min(1)).detach()  # [B]
    nan = torch.tensor(float("nan"), device=per_sample.device)
    for prefix, names, drawn in (("loss_", MODES, batch.tasks), ("loss_mode_", ATTENTION_MODES,
                                                                 batch.modes or ["full"] * len(per_sample))):
        for name in names:
            chosen = torch.tensor([d == name for d in drawn], device=per_sample.device)
            out[f"{prefix}{name}"] = per_sample[chosen].mean() if chosen.any() else nan
    return out


def plain_iso_prob(iso_prob: Any) -> IsoProb:
    """A config value (number, mapping, OmegaConf node or None) → a plain ``IsoProb``."""
    if iso_prob is None:
        return None
    if hasattr(iso_prob, "items"):
        return {str(k): float(v) for k, v in iso_prob.items()}
    return float(iso_prob)


def plain_tasks(tasks: Any) -> dict[str, float]:
    """``objective.tasks`` (a mapping or OmegaConf node) → ``{task: probability}``, checked: names of
    ``masks.MODES``, non-negative, not all zero."""
    plain = {str(k): float(v) for k, v in dict(tasks or {"joint": 1.0}).items()}
    draw_names(plain, MODES, 1)  # the checks the draws make, once, at configuration time
    return plain


@dataclass(frozen=True)
class FlowObjective:
    """The run-level objective: the task mix and how masks draw their spans, logit-normal ``(mean, std)``,
    attention modes, timestep shifts, loss weights, and the clip geometry (latent grid, rates, time
    origins, patches) the masks and the model's RoPE use.

    Built once per run by :meth:`from_config`; :meth:`batch` draws a training batch (every task through
    the one path above), :meth:`loss` its loss, :meth:`validation_batch` a validation batch with a FIXED
    distribution (joint, no shift, no iso modes) so validation losses of runs with different settings
    stay comparable; :meth:`model_kwargs` are the model's time arguments and :meth:`export_meta` what
    ``jointdit.json`` must carry for guidance and the sampler.
    """

    mean: float = 0.0
    std: float = 1.0
    iso_prob: IsoProb = 0.0
    shift_rule: ShiftRule = field(default_factory=lambda: ShiftRule(method="none"))
    video_tokens: int = 1
    audio_tokens: int = 1
    video_times: torch.Tensor | None = None  # [Tv] seconds
    audio_times: torch.Tensor | None = None  # [La] seconds
    tasks: Mapping[str, float] = field(default_factory=lambda: {"joint": 1.0})
    mask_params: MaskParams = field(default_factory=MaskParams)
    geometry: Geometry | None = None         # None: unit rates, one-latent patches (enough for joint/a2v/v2a/i2sv)
    weight_video: float = 1.0
    weight_audio: float = 1.0

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
                   video_times=spec.video_latent_times(), audio_times=spec.audio_latent_times(),
                   tasks=plain_tasks(get("tasks", None)), mask_params=MaskParams.from_config(get("masks", None)),
                   geometry=Geometry.from_spec(spec, model_config["video_patch_size"], model_config["audio_patch_size"]),
                   weight_video=float(get("loss_weight_video", 1.0)), weight_audio=float(get("loss_weight_audio", 1.0)))

    @property
    def shifts(self) -> tuple[float, float]:
        """``(shift_video, shift_audio)`` at this run's token counts."""
        return self.shift_rule(self.video_tokens), self.shift_rule(self.audio_tokens)

    def geometry_for(self, video: torch.Tensor, audio: torch.Tensor) -> Geometry:
        """The run's geometry on this batch's latent grid (rates, origins and patches kept)."""
        grid = Geometry.of(video.shape, audio.shape, 1.0, 1.0)
        if self.geometry is None:
            return grid
        return dataclasses.replace(self.geometry, video=grid.video, audio_steps=grid.audio_steps)

    def batch(self, video: torch.Tensor, audio: torch.Tensor, generator: torch.Generator | None,
              tasks: Sequence[str] | None = None) -> FlowBatch:
        """A training batch: a task per sample from :attr:`tasks` (or the given names), its mask with drawn
        spans (:func:`masks.training_mask`), then :func:`make_flow_batch` with the shifts and iso modes."""
        if tasks is None:
            tasks = [MODES[i] for i in sample_tasks(self.tasks, video.shape[0], generator).tolist()]
        mask = training_mask(tasks, self.geometry_for(video, audio), self.mask_params, generator)
        sv, sa = self.shifts
        return make_flow_batch(video, audio, mask, self.mean, self.std, generator, iso_prob=self.iso_prob,
                               shift_video=sv, shift_audio=sa)

    def loss(self, pred_video: torch.Tensor, pred_audio: torch.Tensor, batch: FlowBatch) -> dict[str, torch.Tensor]:
        """:func:`flow_loss` with this run's loss weights."""
        return flow_loss(pred_video, pred_audio, batch, self.weight_video, self.weight_audio)

    def validation_batch(self, video: torch.Tensor, audio: torch.Tensor,
                         generator: torch.Generator | None) -> FlowBatch:
        return make_flow_batch(video, audio, ["joint"] * video.shape[0], self.mean, self.std, generator)

    def model_kwargs(self) -> dict[str, torch.Tensor]:
        """``video_times`` / ``audio_times`` for the model call (empty when unknown)."""
        out = {}
        if self.video_times is not None:
            out["video_times"] = self.video_times
        if self.audio_times is not None:
            out["audio_times"] = self.audio_times
        return out

    def export_meta(self) -> dict[str, Any]:
        """``{"iso_prob": ..., "tasks": {task: p}, "timestep_shift": {rule, token counts, shifts}}`` for
        ``jointdit.json`` (guidance zeroes untrained iso branches; the sampler warns on an untrained task)."""
        return {"iso_prob": self.iso_prob, "tasks": dict(self.tasks),
                SHIFT_EXPORT_KEY: export_entry(self.shift_rule, self.video_tokens, self.audio_tokens)}
