"""The flow-ODE solver: integrate from t = 1 (noise) to t = 0 (data) for joint video+audio latents.

Pure tensors in, tensors out: no files, codecs, CLIP or MLflow here (those live in
:mod:`jointdit.sample` and :mod:`jointdit.io`).

ODE and solver. With ``x_t = (1 − t)·x0 + t·ε`` the model's velocity ``v = ε − x0 = dx_t/dt``; the
solver runs Euler steps ``x_{t_{i+1}} = x_{t_i} + (t_{i+1} − t_i)·v̂(x_{t_i}, t_i)`` through diffusers'
``FlowMatchEulerDiscreteScheduler`` (whose ``sigma`` is our ``t``; its ``step`` computes exactly that
update). ``v̂`` is the guided prediction (:mod:`jointdit.diffusion.guidance`).

Per-modality schedules. Video and audio each own a scheduler instance (``shift_video`` /
``shift_audio`` warp their sigmas, ``σ ← s·σ / (1 + (s − 1)·σ)``; 1 = uniform in t), so each modality's
adaLN gets its own timestep. Conditional tasks feed the conditioning part clean, at t = 0, and keep it
fixed (as in training, :mod:`jointdit.diffusion.flow`):

========  ========================================================  =================
task      clean and fixed                                           generated
========  ========================================================  =================
joint     nothing                                                   video, audio
i2sv      latent video frame 0 (the encoded image), t_video[:,0]=0  frames 1.., audio
a2v       the audio latent (encoded input audio), t_audio = 0       video
v2a       the video latent (encoded input video), t_video = 0       audio
========  ========================================================  =================

Determinism: the initial noise of a seed comes from ``torch.Generator('cpu').manual_seed(seed)``
(video noise drawn first, then audio, for every task; :func:`initial_noise`), and Euler needs no
further randomness. A batch of seeds stacks each seed's own noise, so sample ``k`` of a batch equals
the same seed sampled alone.

Cancellation. ``callback(step, total)`` is called after every Euler step (``step`` = 1..total). It may
return ``True`` (or raise :class:`SamplingCancelled` itself) to stop: the solver then raises
:class:`SamplingCancelled` and returns nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from jointdit.diffusion.flow import TASKS
from jointdit.diffusion.guidance import JointCFG
from jointdit.models.conditioning import Condition

__all__ = ["TASKS", "SamplingCancelled", "make_scheduler", "initial_noise", "sample_latents"]

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
    shift_video: float = 1.0,
    shift_audio: float = 1.0,
    video_times: Tensor | None = None,
    audio_times: Tensor | None = None,
    callback: StepCallback | None = None,
) -> tuple[Tensor, Tensor]:
    """Integrate the guided flow ODE; returns clean latents ``(z_video [B,Tv,Cv,hv,wv], z_audio [B,Ca,La,Fa])``.

    video_shape  (Tv, Cv, hv, wv), audio_shape (Ca, La, Fa): the model's latent geometry (no batch axis)
    seed         one seed (B = 1) or a list of seeds (B = len), drawn by :func:`initial_noise`
    noise        or the initial noise itself, ``([B, *video_shape], [B, *audio_shape])``
    first_frame  [1|B, Cv, hv, wv]       (i2sv) the encoded image, kept at latent frame 0
    audio_latent [1|B, Ca, La, Fa]       (a2v)  the encoded audio, kept fixed at t = 0
    video_latent [1|B, Tv, Cv, hv, wv]   (v2a)  the encoded video, kept fixed at t = 0
    cond, neg_cond                       CLIP conditions with 1 or B rows (None: the learned null ones)
    video_times [Tv], audio_times [La]   latent centre times in seconds for the model's RoPE
                                         (``LatentSpec.video_latent_times()``); None: the model's default i/rate
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
    guidance = guidance or JointCFG()
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    b, tv = noise_v.shape[0], video_shape[0]
    x_v, x_a = noise_v.to(device, dtype), noise_a.to(device, dtype)                     # [B, Tv, Cv, hv, wv], [B, Ca, La, Fa]

    fixed_v = fixed_a = False
    if task == "i2sv":
        if first_frame is None:
            raise ValueError("task=i2sv needs the encoded first frame (an image or a reference clip)")
        first_frame = _check(first_frame.reshape(-1, *video_shape[1:]), (b, *video_shape[1:]),
                             "first-frame latent").to(device, dtype)                    # [B, Cv, hv, wv]
        x_v[:, 0] = first_frame
    elif task == "a2v":
        if audio_latent is None:
            raise ValueError("task=a2v needs the encoded conditioning audio")
        x_a = _check(audio_latent, (b, *audio_shape), "audio latent").to(device, dtype).clone()
        fixed_a = True
    elif task == "v2a":
        if video_latent is None:
            raise ValueError("task=v2a needs the encoded conditioning video")
        x_v = _check(video_latent, (b, *video_shape), "video latent").to(device, dtype).clone()
        fixed_v = True
    cond = None if cond is None else _rows(cond.to(device=device), b)
    neg_cond = None if neg_cond is None else neg_cond.to(device=device)

    sched_v = make_scheduler(steps, shift_video, device)
    sched_a = make_scheduler(steps, shift_audio, device)
    zero = torch.zeros(b, device=device)
    times = {k: v for k, v in (("video_times", video_times), ("audio_times", audio_times)) if v is not None}
    total = int(steps)
    for i in range(total):
        sig_v, sig_a = float(sched_v.sigmas[i]), float(sched_a.sigmas[i])
        t_v = zero if fixed_v else torch.full((b, tv), sig_v, device=device)            # [B, Tv]
        if task == "i2sv":
            t_v[:, 0] = 0.0                                                             # clean first frame
        t_a = zero if fixed_a else torch.full((b,), sig_a, device=device)               # [B]
        pred_v, pred_a = guidance(model, x_v, x_a, t_v, t_a, cond, neg_cond, **times)
        if not fixed_v:
            x_v = sched_v.step(pred_v, sched_v.timesteps[i], x_v, return_dict=False)[0]
            if task == "i2sv":
                x_v[:, 0] = first_frame
        if not fixed_a:
            x_a = sched_a.step(pred_a, sched_a.timesteps[i], x_a, return_dict=False)[0]
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
