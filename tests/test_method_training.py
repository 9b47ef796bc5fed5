"""Training-side pieces of the method (issue 14), through the real CLI: the LR schedule steps once per
optimizer step whatever the process count, ``export/best`` is judged with the (EMA) weights it exports, and
the iso modes and timestep shift reach the export that guidance and the sampler read."""

import json
import os
import subprocess

import pytest
import torch

from helpers import PYTHON, REPO, run_module

SMALL = ["data.num_clips=8", "data.size=32", "data.seconds=1.0", "data.val_fraction=0.25", "model.hidden_size=64",
         "model.depth=2", "model.num_heads=2", "vram.micro_batch_size=2", "sample_every=-1", "logger=none",
         "optim.warmup_steps=2", "optim.schedule=cosine"]


def _history(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())["history"]


@pytest.mark.slow  # two real training runs, one of them two gloo processes
def test_two_process_lr_sequence_equals_one_process(tmp_path):
    """batch_size 4 = 1 process x micro 2 x accumulation 2 = 2 processes x micro 2: the same optimizer steps,
    so the same LR at every step (Accelerate used to step the scheduler once per process per step)."""
    one = tmp_path / "one"
    result = run_module("jointdit.train", *SMALL, "batch_size=4", "max_steps=8", "checkpoint.every=100",
                        f"hydra.run.dir={one}", env={"JOINTDIT_ROOT": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    two = tmp_path / "two"
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOINTDIT_")}
    env |= {"JOINTDIT_ROOT": str(tmp_path), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [PYTHON, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "jointdit.train", *SMALL, "batch_size=4",
         "max_steps=8", "checkpoint.every=100", f"hydra.run.dir={two}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    lr_one = [h["lr"] for h in _history(one)]
    lr_two = [h["lr"] for h in _history(two)]
    assert len(lr_one) == 8 and lr_two == pytest.approx(lr_one, rel=1e-12)
    # the cosine schedule sized for 8 steps: warm-up to the peak at step 2, then decaying, never back up
    assert max(lr_one) == pytest.approx(lr_one[1]) and all(a >= b for a, b in zip(lr_one[1:], lr_one[2:]))


@pytest.mark.slow  # a real 12-step training run
def test_best_export_is_judged_with_the_ema_weights_and_carries_the_objective(tmp_path):
    run_dir = tmp_path / "run"
    result = run_module("jointdit.train", *SMALL, "batch_size=2", "max_steps=12", "checkpoint.every=4", "ema.enabled=true",
                        "ema.decay=0.9", "objective.iso_prob=0.25", f"hydra.run.dir={run_dir}",
                        env={"JOINTDIT_ROOT": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    history = _history(run_dir)
    validated = [h for h in history if "val_loss" in h]
    assert [h["step"] for h in validated] == [4, 8, 12]
    assert all("val_loss_ema" in h for h in validated)
    assert any(abs(h["val_loss_ema"] - h["val_loss"]) > 1e-6 for h in validated)  # EMA weights really differ
    best = min(validated, key=lambda h: h["val_loss_ema"])
    meta = json.loads((run_dir / "export" / "best" / "jointdit.json").read_text())
    assert meta["step"] == best["step"]
    # what guidance and the sampler read: iso modes trained, and the timestep-shift rule with its shifts
    assert meta["iso_prob"] == 0.25
    entry = meta["timestep_shift"]
    assert entry["rule"]["method"] == "sd3" and entry["rule"]["reference_tokens"] == 256
    # 1 s at 8 fps, 32 px, space-to-depth 8, patch (1, 2, 2): 8 x 2 x 2 video tokens; 100 mel steps, patch (4, 16): 25 x 4
    assert (entry["video_tokens"], entry["audio_tokens"]) == (32, 100)
    assert entry["shift_video"] == pytest.approx((32 / 256) ** 0.5) and entry["shift_audio"] == pytest.approx((100 / 256) ** 0.5)
