"""A tiny trained checkpoint for the sampler tests: tiny JointDiT, pixel_mel codec, 32 px, 8 fps, 1 s.

Latents: video [8, 192, 4, 4] (space-to-depth 8 of [8, 3, 32, 32]), audio log-mel [1, 100, 64].
The model (tiny preset narrowed to width 64, depth 2, to keep the fixture fast) is trained for 30 optimizer steps on two fixed synthetic latent clips (flow loss, all four
tasks, random condition dropout) so its adaLN / output layers are no longer zero, then exported with
``checkpoints.export_model`` exactly as the trainer exports.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import jointdit  # noqa: F401  (torchvision fix)

FPS, SIZE, SECONDS, SR = 8, 32, 1.0, 16000
VIDEO_SHAPE, AUDIO_SHAPE = (8, 192, 4, 4), (1, 100, 64)
CLIP_DIM, TEXT_LEN = 16, 4
CODEC = {"name": "pixel_mel", "video": {"space_to_depth": 8},
         "audio": {"sample_rate": SR, "griffin_lim_iters": 8, "seed": 0}}


def tiny_model():
    from jointdit.models import build_model

    return build_model("tiny", hidden_size=64, depth=2, num_heads=4, video_in_channels=192, audio_in_channels=1, video_latent_fps=FPS,
                       audio_latent_fps=100, text_token_dim=CLIP_DIM, text_pooled_dim=CLIP_DIM,
                       image_embed_dim=CLIP_DIM, text_len=TEXT_LEN)


def random_condition(batch: int, seed: int = 0):
    """Random CLIP-like features (text tokens, pooled text, image) for ``batch`` samples."""
    from jointdit.models import Condition

    g = torch.Generator().manual_seed(seed)
    return Condition(text_tokens=torch.randn(batch, TEXT_LEN, CLIP_DIM, generator=g),
                     text_pooled=torch.randn(batch, CLIP_DIM, generator=g),
                     image=torch.randn(batch, CLIP_DIM, generator=g))


def _train(model, steps: int = 30) -> list[float]:
    from jointdit.diffusion.flow import flow_loss, make_flow_batch, sample_tasks

    g = torch.Generator().manual_seed(0)
    # two synthetic clips: a smooth video ramp and a banded "spectrogram"
    ramp = torch.linspace(-1, 1, VIDEO_SHAPE[0])[None, :, None, None, None]
    video = torch.cat([0.5 * ramp.expand(1, *VIDEO_SHAPE), -0.5 * ramp.expand(1, *VIDEO_SHAPE)])
    bands = torch.linspace(-1, 1, AUDIO_SHAPE[2]).expand(*AUDIO_SHAPE)
    audio = torch.stack([0.8 * bands, -0.8 * bands])
    cond = random_condition(2, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    model.train()
    for _ in range(steps):
        tasks = sample_tasks({"joint": 1, "a2v": 1, "v2a": 1, "i2sv": 1}, 2, generator=g)
        batch = make_flow_batch(video, audio, tasks, generator=g)
        cond.drop_text = torch.rand(2, generator=g) < 0.3
        cond.drop_image = torch.rand(2, generator=g) < 0.3
        pv, pa = model(batch.video, batch.audio, batch.t_video, batch.t_audio, cond, "full")
        loss = flow_loss(pv, pa, batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """An exported model folder (weights + config.json + jointdit.json) of a 30-step-trained tiny model."""
    from jointdit.checkpoints import export_model

    torch.manual_seed(0)
    model = tiny_model()
    losses = _train(model)
    assert all(torch.isfinite(torch.tensor(losses)))
    meta = {"step": len(losses), "stage": "a",
            "latent": {"video_shape": list(VIDEO_SHAPE), "audio_shape": list(AUDIO_SHAPE),
                       "video_latent_fps": FPS, "audio_latent_fps": 100},
            "codec": CODEC, "data": {"fps": FPS, "size": SIZE, "seconds": SECONDS, "sample_rate": SR}}
    return export_model(model.eval(), tmp_path_factory.mktemp("ckpt") / "tiny_model", meta)


@pytest.fixture(scope="session")
def tiny_loaded(tiny_checkpoint):
    from jointdit.checkpoints import load_model

    return load_model(tiny_checkpoint).eval()
