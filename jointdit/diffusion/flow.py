"""Rectified-flow training objective with per-modality timesteps and a mix of tasks.

Path: ``x_t = (1 - t)·x0 + t·ε`` with ``t ∈ [0, 1]`` (t = 0 is data), so the velocity the model
learns is ``dx_t/dt = ε − x0``. Each modality draws its own ``t`` from a logit-normal density
(``sigmoid(N(μ, σ))``, as in SD3).

Tasks, one per training sample, so that one model serves four uses:

============  =====================================  ==========================
task          what is clean (t = 0, no loss)          what is generated
============  =====================================  ==========================
``joint``     nothing                                 video and audio
``a2v``       the audio                               video from audio
``v2a``       the video                               audio from video
``i2sv``      the first latent video frame            the rest of the video, and audio
============  =====================================  ==========================
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling

TASKS: tuple[str, ...] = ("joint", "a2v", "v2a", "i2sv")


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


def sample_tasks(probabilities: dict[str, float], batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw a task index per sample from ``probabilities`` (normalised; unknown names are refused)."""
    unknown = set(probabilities) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown training task(s) {sorted(unknown)}; choose from {list(TASKS)}")
    weights = torch.tensor([float(probabilities.get(name, 0.0)) for name in TASKS])
    if (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"task probabilities must be non-negative and not all zero, got {dict(probabilities)}")
    device = generator.device if generator is not None else "cpu"
    return torch.multinomial((weights / weights.sum()).to(device), batch_size, replacement=True, generator=generator)


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
) -> FlowBatch:
    """Noise a batch of clean latents according to each sample's task.

    All randomness comes from ``generator`` (on the latents' device), so a step is reproducible.
    """
    batch, frames = video.shape[:2]
    device = video.device
    t_video = sample_t(batch, mean, std, generator)[:, None].expand(batch, frames).clone()  # [B, Tv]
    t_audio = sample_t(batch, mean, std, generator)  # [B]
    mask_video = torch.ones(batch, frames, device=device)
    mask_audio = torch.ones(batch, device=device)

    a2v, v2a, i2sv = (tasks == TASKS.index(name) for name in ("a2v", "v2a", "i2sv"))
    t_audio[a2v], mask_audio[a2v] = 0.0, 0.0
    t_video[v2a], mask_video[v2a] = 0.0, 0.0
    t_video[i2sv, 0], mask_video[i2sv, 0] = 0.0, 0.0

    noise_video = torch.randn(video.shape, generator=generator, device=device, dtype=video.dtype)
    noise_audio = torch.randn(audio.shape, generator=generator, device=device, dtype=audio.dtype)
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
    returns each modality's loss and the per-task losses (detached; NaN for a task absent from the batch).
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
    return out
