"""The flow-ODE solver: integrate from t = 1 (noise) to t = 0 (data) for joint video+audio latents.

Pure tensors in, tensors out: no files, codecs, CLIP or MLflow here (those live in
:mod:`jointdit.sample` and :mod:`jointdit.io`).

ODE and solver. With ``x_t = (1 − t)·x0 + t·ε`` the model's velocity ``v = ε − x0 = dx_t/dt``; the
solver runs Euler steps ``x_{t_{i+1}} = x_{t_i} + (t_{i+1} − t_i)·v̂(x_{t_i}, t_i)`` through diffusers'
``FlowMatchEulerDiscreteScheduler`` (whose ``sigma`` is our ``t``; its ``step`` computes exactly that
update). ``v̂`` is the guided prediction (:mod:`jointdit.diffusion.guidance`).

Per-modality schedules. Video and audio each own a scheduler instance (``shift_video`` /
``shift_audio`` warp their sigmas, ``σ ← s·σ / (1 + (s − 1)·σ)``; 1 = uniform in t), so each modality's
adaLN gets its own timestep.

Conditioning. What a task keeps clean and fixed is its :class:`~jointdit.diffusion.masks.ConditionMask`
(:mod:`jointdit.diffusion.masks`, the ONE definition training uses too): given latents get ``t = 0``
(per frame, per position or per audio step) and are put back after every step,
``x ← G·given + (1 − G)·x``; the rest is integrated:

=============  ========================================================  ==========================
task           given (clean, fixed)                                      generated
=============  ========================================================  ==========================
``joint``      nothing                                                   video, audio
``i2sv``       latent frame 0 (the encoded image; its whole temporal     frames 1.., audio
               patch, repeated)
``a2v``        the audio latent                                          video
``v2a``        the video latent                                          audio
``extend_v``   video of the first ``seconds_given`` (+ audio's: ``both``)  the rest
``extend_a``   audio of the first ``seconds_given`` (+ video's: ``both``)  the rest
``inpaint_v``  video outside ``region`` (top, left, bottom, right          the region / span; all audio
               fractions) or outside ``span`` (start_s, end_s)
``inpaint_a``  audio outside ``span``                                    the span; all video
``t2v``        nothing; the audio is absent (left at its noise, t = 1)    video
``t2a``        nothing; the video is absent                              audio
=============  ========================================================  ==========================

One solver for every task (:func:`integrate`): :func:`sample_latents` only turns inputs into a mask and
its given latents.

Attention in every guidance branch. Each branch's model call goes through
:class:`~jointdit.diffusion.masks.RestrictedModes`, so a t2v / t2a branch runs with the present stream
blind to the absent one — ``pos`` in ``iso_v`` (t2v) / ``iso_a`` (t2a), the modes those tasks train in.
Guidance there means: text, negative-prompt, image and STG terms as usual (each branch restricted the
same way); JointCFG's iso term is identically 0 (``pos`` is already isolated from the absent stream, so
``pos − iso`` vanishes for the present one and the absent one is not integrated), so its branch is not
computed.

Determinism: the initial noise of a seed comes from ``torch.Generator('cpu').manual_seed(seed)``
(video noise drawn first, then audio, for every task; :func:`initial_noise`), and Euler needs no
further randomness. A batch of seeds stacks each seed's own noise, so sample ``k`` of a batch equals
the same seed sampled alone.

Cancellation. ``callback(step, total)`` is called after every Euler step (``step`` = 1..total). It may
return ``True`` (or raise :class:`SamplingCancelled` itself) to stop: the solver then raises
:class:`SamplingCancelled` and returns nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from jointdit.diffusion import masks
from jointdit.diffusion.guidance import JointCFG
from jointdit.models.conditioning import Condition

TASKS: tuple[str, ...] = masks.MODES   # every conditioning mode is a sampling task
MASK_PARAMS: tuple[str, ...] = ("seconds_given", "both", "region", "span")

__all__ = ["TASKS", "MASK_PARAMS", "SamplingCancelled", "make_scheduler", "initial_noise", "integrate",
           "sample_latents"]

StepCallback = Callable[[int, int], "bool | None"]


class SamplingCancelled(RuntimeError):
    """Sampling stopped between two steps because the caller's callback asked for it."""

    def __init__(self, step: int, total: int):
        self.step, self.total = int(step), int(total)
        super().__init__(f"sampling cancelled after step {step} of {total}")


def make_scheduler(steps: int, shift: float = 1.0, device: torch.device | str | None = None):
    """A ``FlowMatchEulerDiscreteScheduler`` with ``steps`` sigmas from 1 towards 0 (then 0 appended).

    Sigmas before the shift are ``1 − i/steps`` (i = 0..steps−1); ``shift`` s maps each to
    ``s·σ / (1 + (s − 1)·σ)``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=float(shift))
    sigmas = np.linspace(1.0, 0.0, int(steps) + 1)[:-1]
    sched.set_timesteps(sigmas=sigmas.tolist(), device=device)
    return sched


def initial_noise(video_shape: Sequence[int], audio_shape: Sequence[int], seed: int,
                  batch: int = 1) -> tuple[Tensor, Tensor]:
    """Seeded Gaussian noise ``([B, *video_shape], [B, *audio_shape])`` drawn on the CPU (device-independent)."""
    gen = torch.Generator("cpu").manual_seed(int(seed))
    noise_v = torch.randn((batch, *video_shape), generator=gen)
    noise_a = torch.randn((batch, *audio_shape), generator=gen)
    return noise_v, noise_a


def seeds_noise(video_shape: Sequence[int], audio_shape: Sequence[int],
                seeds: Sequence[int]) -> tuple[Tensor, Tensor]:
    """One seed's :func:`initial_noise` per batch row: ``([S, *video_shape], [S, *audio_shape])``."""
    pairs = [initial_noise(video_shape, audio_shape, s) for s in seeds]
    return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])


def _check(z: Tensor, shape: tuple[int, ...], what: str) -> Tensor:
    if tuple(z.shape[1:]) != tuple(shape[1:]) or z.shape[0] not in (1, shape[0]):
        raise ValueError(f"the {what} has shape {tuple(z.shape)} but the model samples {tuple(shape)}; "
                         f"the conditioning input must match the checkpoint's data settings (seconds, fps, size)")
    return z.expand(shape)


def condition_mask(model: torch.nn.Module, video_shape: Sequence[int], audio_shape: Sequence[int], task: str,
                   spec: Any = None, **params) -> masks.ConditionMask:
    """The task's batch-1 mask on this model's latent grid. Rates and time origins come from
    ``spec`` (a :class:`~jointdit.latents.LatentSpec`) when given, else from the model's config (origin 0);
    patch sizes always from the model."""
    cfg = model.config
    if spec is not None:
        geometry = masks.Geometry.from_spec(spec, cfg.video_patch_size, cfg.audio_patch_size)
    else:
        geometry = masks.Geometry.of(video_shape, audio_shape, cfg.video_latent_fps, cfg.audio_latent_fps,
                                     cfg.video_patch_size, cfg.audio_patch_size)
    return masks.sampling_mask(task, geometry, **params)


@torch.inference_mode()
def sample_latents(
    model: torch.nn.Module,
    video_shape: Sequence[int],
    audio_shape: Sequence[int],
    *,
    steps: int,
    seed: int | Sequence[int] | None = None,
    noise: tuple[Tensor, Tensor] | None = None,
    task: str = "joint",
    guidance: JointCFG | None = None,
    cond: Condition | None = None,
    neg_cond: Condition | None = None,
    first_frame: Tensor | None = None,
    video_latent: Tensor | None = None,
    audio_latent: Tensor | None = None,
    mask_params: Mapping[str, Any] | None = None,
    shift_video: float = 1.0,
    shift_audio: float = 1.0,
    spec: Any = None,
    callback: StepCallback | None = None,
) -> tuple[Tensor, Tensor]:
    """Integrate the guided flow ODE; returns clean latents ``(z_video [B,Tv,Cv,hv,wv], z_audio [B,Ca,La,Fa])``.

    video_shape  (Tv, Cv, hv, wv), audio_shape (Ca, La, Fa): the model's latent geometry (no batch axis)
    seed         one seed (B = 1) or a list of seeds (B = len), drawn by :func:`initial_noise`
    noise        or the initial noise itself, ``([B, *video_shape], [B, *audio_shape])``
    first_frame  [1|B, Cv, hv, wv]       (i2sv) the encoded image, kept at latent frame 0
    video_latent [1|B, Tv, Cv, hv, wv]   the encoded video whose given part is kept (v2a, extend_v, inpaint_v, both)
    audio_latent [1|B, Ca, La, Fa]       the encoded audio whose given part is kept (a2v, extend_a, inpaint_a, both)
    mask_params  the mode's parameters: ``seconds_given``, ``both``, ``region``, ``span`` (see the module doc)
    cond, neg_cond                       CLIP conditions with 1 or B rows (None: the learned null ones)
    spec         the clip's :class:`~jointdit.latents.LatentSpec`: its latent centre times (time origins)
                 place the RoPE phases (``video_times``/``audio_times`` of the model) and the mask's
                 seconds; None: latent i at i / rate (the model's default)
    callback     ``callback(step, total)`` after every step; returning True cancels (see module doc)
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if (seed is None) == (noise is None):
        raise ValueError("give exactly one of seed= (or a list of seeds) and noise=")
    video_shape, audio_shape = tuple(int(s) for s in video_shape), tuple(int(s) for s in audio_shape)
    if noise is None:
        seeds = [int(seed)] if isinstance(seed, (int, np.integer)) else [int(s) for s in seed]
        noise = seeds_noise(video_shape, audio_shape, seeds)
    noise_v, noise_a = noise
    if tuple(noise_v.shape[1:]) != video_shape or tuple(noise_a.shape[1:]) != audio_shape \
            or noise_v.shape[0] != noise_a.shape[0]:
        raise ValueError(f"noise shapes {tuple(noise_v.shape)} / {tuple(noise_a.shape)} do not match "
                         f"[B, {video_shape}] / [B, {audio_shape}]")
    unknown = set(mask_params or {}) - set(MASK_PARAMS)
    if unknown:
        raise ValueError(f"unknown mask parameter(s) {sorted(unknown)}; known: {list(MASK_PARAMS)}")
    b = noise_v.shape[0]
    if spec is not None and (tuple(spec.video_shape) != video_shape or tuple(spec.audio_shape) != audio_shape):
        raise ValueError(f"spec shapes {spec.video_shape} / {spec.audio_shape} differ from the sampled "
                         f"{video_shape} / {audio_shape}")
    mask = condition_mask(model, video_shape, audio_shape, task, spec, **dict(mask_params or {}))
    given_v = given_a = None
    if task == "i2sv":
        if first_frame is None:
            raise ValueError("task=i2sv needs the encoded first frame (an image or a reference clip)")
        first_frame = _check(first_frame.reshape(-1, *video_shape[1:]), (b, *video_shape[1:]), "first-frame latent")
        given_v = first_frame[:, None].expand(b, *video_shape)                          # the image, in every frame
    elif bool(mask.video.any()):
        if video_latent is None:
            raise ValueError(f"task={task} needs the encoded conditioning video")
        given_v = _check(video_latent, (b, *video_shape), "video latent")
    if bool(mask.audio.any()):
        if audio_latent is None:
            raise ValueError(f"task={task} needs the encoded conditioning audio")
        given_a = _check(audio_latent, (b, *audio_shape), "audio latent")
    times = {} if spec is None else {"video_times": spec.video_latent_times().float(),
                                     "audio_times": spec.audio_latent_times().float()}
    return integrate(model, noise_v, noise_a, mask, steps=steps, given_video=given_v, given_audio=given_a,
                     guidance=guidance, cond=cond, neg_cond=neg_cond, shift_video=shift_video,
                     shift_audio=shift_audio, callback=callback, **times)


@torch.inference_mode()
def integrate(model: torch.nn.Module, noise_video: Tensor, noise_audio: Tensor, mask: masks.ConditionMask, *,
              steps: int, given_video: Tensor | None = None, given_audio: Tensor | None = None,
              guidance: JointCFG | None = None, cond: Condition | None = None, neg_cond: Condition | None = None,
              shift_video: float = 1.0, shift_audio: float = 1.0, video_times: Tensor | None = None,
              audio_times: Tensor | None = None, callback: StepCallback | None = None) -> tuple[Tensor, Tensor]:
    """The ONE solver: Euler integration of the guided flow ODE from t = 1 to 0 with the mask's given
    latents held, for every task.

    Each step: ``t`` per latent from :meth:`~jointdit.diffusion.masks.ConditionMask.timesteps` (0 on given
    latents, 1 on an absent stream), the guided velocity ``v̂`` (every branch through
    :class:`~jointdit.diffusion.masks.RestrictedModes`), the scheduler's Euler update
    ``x ← x + (σ_{i+1} − σ_i)·v̂`` on present streams, then :meth:`~jointdit.diffusion.masks.ConditionMask.hold`
    puts the condition back — so given latents equal the condition exactly at every step and at the end,
    and an absent stream stays at its noise.

    noise [B, ...]; mask: 1 or B rows; given_video [1|B, Tv, Cv, hv, wv], given_audio [1|B, Ca, La, Fa]
    (needed where the mask gives latents of that stream); cond: 1 or B rows; video_times [Tv] / audio_times
    [La]: latent centre times for the model's RoPE. Returns fp32 ``(z_video, z_audio)``.
    """
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    b = noise_video.shape[0]
    mask = masks.expand_mask(mask.to(device), b)
    for given, flags, what in ((given_video, mask.video, "video"), (given_audio, mask.audio, "audio")):
        if given is None and bool(flags.any()):
            raise ValueError(f"task={'/'.join(sorted(set(mask.modes)))} needs the encoded conditioning {what} "
                             f"(given_{what}=)")
    gv = None if given_video is None else given_video.to(device, dtype).expand(b, *noise_video.shape[1:])
    ga = None if given_audio is None else given_audio.to(device, dtype).expand(b, *noise_audio.shape[1:])
    x_v, x_a = mask.hold(noise_video.to(device, dtype), noise_audio.to(device, dtype), gv, ga)
    video_on, audio_on = bool(mask.video_present.any()), bool(mask.audio_present.any())
    guidance = guidance or JointCFG()
    if not (video_on and audio_on):  # t2v / t2a: pos is already isolated, the iso term is 0 (module doc)
        guidance = guidance.without("iso")
    cond = None if cond is None else _rows(cond.to(device=device), b)
    neg_cond = None if neg_cond is None else neg_cond.to(device=device)
    net = masks.RestrictedModes(model, mask)
    sched_v, sched_a = make_scheduler(steps, shift_video, device), make_scheduler(steps, shift_audio, device)
    times = {k: v.to(device) for k, v in (("video_times", video_times), ("audio_times", audio_times)) if v is not None}
    # a stream given entirely needs no update (hold would undo it)
    step_v, step_a = video_on and not bool(mask.video.all()), audio_on and not bool(mask.audio.all())
    total = int(steps)
    for i in range(total):
        t_v, t_a = mask.timesteps(torch.full((b,), float(sched_v.sigmas[i]), device=device),
                                  torch.full((b,), float(sched_a.sigmas[i]), device=device))  # [B, Tv|Nv], [B|B, La]
        pred_v, pred_a = guidance(net, x_v, x_a, t_v, t_a, cond, neg_cond, **times)
        if step_v:
            x_v = sched_v.step(pred_v, sched_v.timesteps[i], x_v, return_dict=False)[0]
        if step_a:
            x_a = sched_a.step(pred_a, sched_a.timesteps[i], x_a, return_dict=False)[0]
        x_v, x_a = mask.hold(x_v, x_a, gv, ga)
        if callback is not None and callback(i + 1, total) is True:
            raise SamplingCancelled(i + 1, total)
    return x_v.float(), x_a.float()


def _rows(cond: Condition, batch: int) -> Condition:
    """Broadcast a 1-row condition to ``batch`` rows (a B-row condition passes unchanged)."""
    n = cond.batch_size
    if n is None or n == batch:
        return cond
    if n != 1:
        raise ValueError(f"the condition has {n} rows for a batch of {batch}")
    fields = ("text_tokens", "text_pooled", "image", "drop_text", "drop_image")
    return Condition(**{k: None if getattr(cond, k) is None else getattr(cond, k).expand(batch, *getattr(cond, k).shape[1:])
                        for k in fields})


def __getattr__(name: str):
    # Kept for the trainer's preview (written before the split): files go straight into ``cfg.out_dir``
    # (a per-step folder such as samples/step_000100, claimed as this call's named folder and replaced
    # when a resumed run previews the same step again). New code calls jointdit.sample directly.
    # Returns one entry per seed with ``.files`` {mp4, video_mp4, wav, png}.
    if name == "sample_to_files":
        def sample_to_files(cfg):
            from pathlib import Path

            from omegaconf import OmegaConf

            from jointdit.sample import sample_to_files as run

            out = Path(str(cfg.out_dir)).expanduser()
            return run(OmegaConf.merge(cfg, {"out_dir": str(out.parent), "name": out.name, "overwrite": True})).samples

        return sample_to_files
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
