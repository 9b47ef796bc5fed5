"""The trainer itself (``python -m jointdit.train``, its data, objective, optimizer and schedule) lowers the
flow loss on a tiny synthetic set. Oracle: at step 1 the zero-initialised model predicts exactly 0, so its
loss is that of the zero predictor, E|ε − x0|² ≥ 1 (ε ~ N(0, 1) independent of the data)."""

import json

import pytest

from helpers import run_module

SMALL = ["data.num_clips=8", "data.size=32", "data.seconds=1.0", "data.val_fraction=0.25", "codec.video.space_to_depth=4",
         "model.hidden_size=64", "model.depth=2", "model.num_heads=2", "model.video_patch_size=[1,1,1]",
         "vram.micro_batch_size=4", "batch_size=4", "optim.lr=1e-3", "optim.warmup_steps=2", "log_every=5",
         "max_steps=40", "checkpoint.every=40", "sample_every=-1", "logger=none", "ema.enabled=false"]


@pytest.mark.slow  # a real 40-step training run in a subprocess: about a minute of CPU
def test_training_lowers_the_loss(tmp_path):
    run_dir = tmp_path / "run"
    result = run_module("jointdit.train", *SMALL, f"hydra.run.dir={run_dir}", env={"JOINTDIT_ROOT": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    history = json.loads((run_dir / "metrics.json").read_text())["history"]
    losses = [h["loss"] for h in history]
    assert len(losses) == 40
    assert losses[0] >= 1.0, losses[0]                        # the zero predictor's loss
    late = sum(losses[-5:]) / 5
    assert late < 0.75 * losses[0], (losses[0], late)          # measured: 2.74 -> 1.88
    assert history[-1]["val_loss"] < 0.75 * losses[0], history[-1]
