"""Real synthetic clips for the evaluation tests: written as MP4 (H.264 + AAC) by the shared fixture,
read back through PyAV once per session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def real_clips(synthetic_root):
    """(clips, {id: event times}) for the 8 clips of the shared synthetic set, read from their MP4s."""
    from jointdit.evaluate.folder import read_video_file

    rows = [json.loads(line) for line in (synthetic_root / "metadata.jsonl").read_text().splitlines()]
    clips = []
    for row in rows:
        clip = read_video_file(synthetic_root / "videos" / row["path"], sample_rate=16000)
        clip.meta["id"] = row["id"]
        clips.append(clip)
    return clips, {row["id"]: row["events"] for row in rows}


@pytest.fixture(scope="session")
def model_folder(tmp_path_factory) -> Path:
    """A tiny exported model (pixel_mel codec, 32 px, 8 fps, 1 s), trained 10 steps as the sampler tests do
    (tests/diffusion/conftest.py's model and training)."""
    import importlib.util

    from jointdit.checkpoints import export_model

    spec = importlib.util.spec_from_file_location("diffusion_fixtures", Path(__file__).parents[1] / "diffusion" / "conftest.py")
    fx = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fx)

    torch.manual_seed(0)
    model = fx.tiny_model()
    fx._train(model, steps=10)
    meta = {"step": 10, "stage": "a", "codec": fx.CODEC,
            "latent": {"video_shape": list(fx.VIDEO_SHAPE), "audio_shape": list(fx.AUDIO_SHAPE),
                       "video_latent_fps": fx.FPS, "audio_latent_fps": 100},
            "data": {"fps": fx.FPS, "size": fx.SIZE, "seconds": fx.SECONDS, "sample_rate": fx.SR}}
    return export_model(model.eval(), tmp_path_factory.mktemp("ckpt") / "tiny", meta)
