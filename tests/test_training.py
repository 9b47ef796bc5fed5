"""The training loop in-process (Hydra compose(), paths at tmp_path): named steps, AfterStep hooks, data position."""

from __future__ import annotations

import json

import pytest
import torch

from jointdit.latents import LatentSpec

# 8 clips of 1 s at 32 px (6 train, 2 val), a 2-block model.
SMALL = ["data.num_clips=8", "data.size=32", "data.seconds=1.0", "data.val_fraction=0.25", "model.hidden_size=64",
         "model.depth=2", "model.num_heads=2", "vram.micro_batch_size=2", "batch_size=2", "optim.warmup_steps=2",
         "logger=none", "sample_every=-1", "checkpoint.export=true"]


@pytest.fixture
def train_cfg(compose_cfg, tmp_path):
    def make(*overrides: str):
        return compose_cfg("train", [*SMALL, f"paths.output_dir={tmp_path / 'run'}", *overrides])

    return make


def test_train_in_process_checkpoints_exports_and_returns_metrics(train_cfg, tmp_path):
    from jointdit.training import train

    metrics = train(train_cfg("max_steps=4", "checkpoint.every=2", "log_every=2"))
    run_dir = tmp_path / "run"
    assert metrics["step"] == 4.0 and metrics["ranks_in_sync"] == 1.0 and metrics["train/loss"] > 0
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000002", "step_000004"]
    state = json.loads((run_dir / "checkpoints" / "step_000004" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["history"]] == [1, 2, 3, 4] and "val_loss" in state["history"][-1]
    spec = LatentSpec.from_export_meta(json.loads((run_dir / "export" / "last" / "jointdit.json").read_text()))
    assert spec.video_shape == (8, 192, 4, 4) and spec.audio_shape == (1, 100, 64)
    assert (spec.video_patch_t, spec.audio_patch_t) == (1, 4)
    # the best validation figure is the one export/best is judged by: the EMA weights' loss when EMA is on
    assert metrics["val/loss"] == min(h.get("val_loss_ema", h["val_loss"]) for h in state["history"] if "val_loss" in h)


class RecordingLoader:
    """Wraps the run's DataLoader and records the clip indices of every micro-batch it hands out."""

    def __init__(self, loader):
        self.loader, self.seen = loader, []

    def __iter__(self):
        for batch in self.loader:
            self.seen.append(batch["index"].tolist())
            yield batch


def test_accumulation_windows_across_epochs_never_replay_a_micro_batch(train_cfg):
    """6 train clips in micro-batches of 2 = 3 per epoch; 2 micro-batches per step, so windows straddle epochs.
    The data position must count the micro-batches already drawn into the window (it used step x accumulation)."""
    from jointdit.training import AfterStep, build, finish, loop, make_accelerator, reset_accelerate
    from jointdit.tracking import Tracker

    cfg = train_cfg("batch_size=4", "max_steps=3", "checkpoint.every=100")
    plan = {"estimate_bytes": 0, "budget_bytes": 0}
    accelerator = make_accelerator(cfg)
    try:
        run = build(cfg, accelerator, Tracker(None), plan)
        recorder = RecordingLoader(run.loader)
        run.loader = recorder

        class CountingAfterStep(AfterStep):
            hooks = AfterStep.hooks + ("count",)
            calls: list[tuple[int, float]] = []

            def count(self, run, losses):
                self.calls.append((run.step, losses["loss"]))

        after = CountingAfterStep(cfg)
        loop(run, after)
        finish(run)
    finally:
        accelerator.free_memory()
        reset_accelerate()
    assert [step for step, _ in after.calls] == [1, 2, 3]  # the added hook ran once per optimizer step
    assert len(recorder.seen) == 6  # 3 steps x 2 micro-batches
    epochs = [sorted(sum(recorder.seen[i : i + 3], [])) for i in (0, 3)]
    assert epochs[0] == epochs[1] == list(range(6)), recorder.seen  # each epoch: every clip exactly once


def test_resume_continues_the_exact_loss_sequence_in_process(train_cfg, tmp_path):
    import shutil

    from safetensors.torch import load_file

    from jointdit.training import train

    common = ["max_steps=6", "checkpoint.every=3", "checkpoint.keep=5", "batch_size=2", "ema.enabled=true"]
    train(train_cfg(*common))
    straight = json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]
    # Another run starts from the first run's step-3 checkpoint and trains to step 6.
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "run" / "checkpoints" / "step_000003", other / "checkpoints" / "step_000003")
    train(train_cfg(*common, f"paths.output_dir={other}", "checkpoint.resume=auto"))
    resumed = json.loads((other / "metrics.json").read_text())["history"]
    assert [h["step"] for h in resumed] == list(range(1, 7))
    assert [h["loss"] for h in resumed] == pytest.approx([h["loss"] for h in straight], rel=1e-6, abs=1e-7)
    w1 = load_file(tmp_path / "run" / "export" / "last" / "diffusion_pytorch_model.safetensors")
    w2 = load_file(other / "export" / "last" / "diffusion_pytorch_model.safetensors")
    assert all(torch.allclose(w1[k], w2[k], atol=1e-6) for k in w1)  # EMA weights included


def test_train_step_sends_every_task_through_the_one_objective(train_cfg):
    """A micro-batch with mask modes, iso modes and the timestep shift: what the model receives is exactly the
    objective's batch for the step's generator (seed, step, rank) — one path for every task, and a step is a
    pure function of that generator — and the loss is that batch's masked loss."""
    from jointdit.diffusion.flow import FlowObjective, flow_loss
    from jointdit.training import build, make_accelerator, reset_accelerate, step_generator, train_step
    from jointdit.tracking import Tracker

    cfg = train_cfg("max_steps=1", "checkpoint.every=100", "objective.iso_prob=0.5",
                    "objective.timestep_shift.min_shift=0",  # this tiny clip's shifts are < 1: keep them
                    "~objective.tasks", "+objective.tasks={extend_a: 1, t2v: 1, i2sv: 1, inpaint_v: 1}")
    accelerator = make_accelerator(cfg)
    try:
        run = build(cfg, accelerator, Tracker(None), {"estimate_bytes": 0, "budget_bytes": 0})
        seen, outputs = [], []
        run.model.register_forward_pre_hook(lambda module, args: seen.append(args))
        run.model.register_forward_hook(lambda module, args, out: outputs.append([o.detach() for o in out]))
        run.sampler.start(0, 0)
        batch = next(iter(run.loader))
        losses = train_step(run, batch, 0)
        video, audio = batch["video"], batch["audio"]
        objective = FlowObjective.from_config(cfg.objective, dict(run.raw_model.config), run.spec)
        expected = objective.batch(video, audio, step_generator(int(cfg.seed), 0, 0, run.device))
    finally:
        accelerator.free_memory()
        reset_accelerate()
    assert objective.shifts != (1.0, 1.0) and objective.iso_prob == 0.5
    (z_v, z_a, t_v, t_a, _cond, modes), = seen
    assert torch.equal(z_v, expected.video) and torch.equal(z_a, expected.audio)
    assert torch.equal(t_v, expected.t_video) and torch.equal(t_a, expected.t_audio) and modes == expected.modes
    assert set(expected.tasks) <= {"extend_a", "t2v", "i2sv", "inpaint_v"}
    (pred_v, pred_a), = outputs
    want = flow_loss(pred_v, pred_a, expected, float(cfg.objective.loss_weight_video),
                     float(cfg.objective.loss_weight_audio))
    assert float(losses["loss"].detach()) == pytest.approx(float(want["loss"]), rel=1e-6)
    assert all(torch.isfinite(losses[f"loss_{t}"]) for t in set(expected.tasks))
