"""A 2-process training script for tests/test_fsdp.py, started by a real ``accelerate launch --config_file``.

It trains a tiny JointDiT the way the trainer does (Accelerate-prepared model, optimizer and LR schedule,
gradient clipping, diffusers EMA over the trainable parameters, part of the model frozen as in Stage B) and
writes through :mod:`jointdit.checkpoints`: a checkpoint after ``--steps`` steps, an export after twice as
many, then a resume from that checkpoint replaying the second half into a second export.

Under an FSDP recipe on a CPU-only machine it switches FSDP on as the trainer does
(:func:`jointdit.checkpoints.fsdp_on_cpu`: Accelerate alone would silently give DDP), after which
Accelerate's own FSDP2 code runs over gloo: ``fully_shard`` per JointBlock, ``get_state_dict``,
``save_state`` / ``load_state``, ``clip_grad_norm_``.

    accelerate launch --config_file <recipe> tests/fsdp_worker.py OUT_DIR [--steps N]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from jointdit import checkpoints as ckpt

GLOBAL_BATCH = 4
LR = 1e-2
CLIP = 1.0
EMA_DECAY = 0.9
FROZEN_PREFIXES = ("audio_in.", "blocks.0.audio.")  # a Stage B-like split: part of a block stays frozen
MODEL = dict(hidden_size=32, depth=2, num_heads=2, video_in_channels=4, video_patch_size=[1, 2, 2],
             audio_in_channels=1, audio_patch_size=[2, 4], text_token_dim=16, text_pooled_dim=16,
             image_embed_dim=16, text_len=4)


def build_model() -> torch.nn.Module:
    """The same seeded tiny JointDiT on every rank (and in the test's single-process oracle)."""
    from jointdit.models import build_model as build

    torch.manual_seed(0)
    model = build("tiny", **MODEL)
    for name, param in model.named_parameters():
        param.requires_grad_(not name.startswith(FROZEN_PREFIXES))
    return model


def batch(step: int, rows: slice = slice(None)) -> dict[str, torch.Tensor]:
    """Step ``step``'s global batch (a pure function of the step), or the rows of it one rank takes."""
    generator = torch.Generator().manual_seed(1000 + step)
    full = {"video": torch.randn(GLOBAL_BATCH, 2, 4, 4, 4, generator=generator),
            "audio": torch.randn(GLOBAL_BATCH, 1, 8, 8, generator=generator),
            "t_video": torch.rand(GLOBAL_BATCH, generator=generator),
            "t_audio": torch.rand(GLOBAL_BATCH, generator=generator),
            "target_video": torch.randn(GLOBAL_BATCH, 2, 4, 4, 4, generator=generator),
            "target_audio": torch.randn(GLOBAL_BATCH, 1, 8, 8, generator=generator)}
    return {k: v[rows] for k, v in full.items()}


def loss_of(model: torch.nn.Module, data: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean squared error of both velocities (a mean over rows, so the mean of two equal halves is the whole)."""
    pred_v, pred_a = model(data["video"], data["audio"], data["t_video"], data["t_audio"], None, "full")
    return torch.nn.functional.mse_loss(pred_v, data["target_video"]) + torch.nn.functional.mse_loss(
        pred_a, data["target_audio"])


def make_optimizer(model: torch.nn.Module, total_steps: int):
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    return optimizer, get_scheduler("cosine", optimizer, num_warmup_steps=1, num_training_steps=total_steps)


def make_ema(model: torch.nn.Module):
    """EMA over the trainable parameters of the model as it trains (the prepared one: sharded under FSDP)."""
    from diffusers.training_utils import EMAModel

    return EMAModel([p for p in model.parameters() if p.requires_grad], decay=EMA_DECAY)


def make_accelerator():
    """Accelerator as the trainer makes it on a CPU; under an FSDP recipe, with FSDP switched on (module docstring)."""
    from accelerate import Accelerator, DistributedDataParallelKwargs

    plugin = ckpt.cpu_fsdp_plugin()  # the recipe's fsdp_config, from FSDP_* variables
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin, step_scheduler_with_optimizer=False,
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    if plugin is not None:
        ckpt.fsdp_on_cpu(accelerator, plugin)
    return accelerator


def train_steps(accelerator, model, optimizer, scheduler, ema, steps: range) -> tuple[list[float], list[float]]:
    """One optimizer step per step number; each rank takes its rows of the global batch. Returns this rank's
    losses and the gradient norms before clipping, read as the trainer reads them (``float``)."""
    rank, world = accelerator.process_index, accelerator.num_processes
    per_rank = GLOBAL_BATCH // world
    losses, norms = [], []
    for step in steps:
        loss = loss_of(model, batch(step, slice(rank * per_rank, (rank + 1) * per_rank)))
        accelerator.backward(loss)
        norms.append(float(accelerator.clip_grad_norm_(model.parameters(), CLIP)))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(ckpt.trainable_parameters(accelerator, model))
        losses.append(float(loss.detach()))
    return losses, norms


def main() -> None:
    from accelerate.utils import gather_object

    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    half = args.steps

    accelerator = make_accelerator()
    ckpt.require_supported_sharding(accelerator)
    model = build_model()
    optimizer, scheduler = make_optimizer(model, 2 * half)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    raw = accelerator.unwrap_model(model)
    ema = make_ema(raw)  # after prepare: the shadow weights are sharded like the parameters they follow
    report = {"distributed_type": str(accelerator.distributed_type), "world": accelerator.num_processes,
              "model_class": type(model).__name__,
              "local_numel": sum(ckpt.local_tensor(p).numel() for p in raw.parameters()),
              "full_numel": sum(p.numel() for p in raw.parameters()),
              "dtensor_params": sum(ckpt.is_dtensor(p) for p in raw.parameters())}

    first = train_steps(accelerator, model, optimizer, scheduler, ema, range(half))
    folder = ckpt.save_training_state(accelerator, args.out / "checkpoints", half, [], raw, ema, keep=2)
    second = train_steps(accelerator, model, optimizer, scheduler, ema, range(half, 2 * half))
    report["losses"], report["grad_norms"] = first[0] + second[0], first[1] + second[1]
    with torch.no_grad():  # a validation pass, as the trainer makes before exporting: FSDP2 keeps the root
        loss_of(model, batch(0))  # module's parameters gathered after a forward without backward
    weights = ckpt.export_state_dict(accelerator, model, ema)  # every rank: gathers the shards
    if accelerator.is_main_process:
        ckpt.export_model(raw, args.out / "export", {"step": 2 * half}, weights)

    ckpt.load_training_state(accelerator, folder)  # model, optimizer, LR schedule, RNG of step `half`
    ckpt.load_ema(ema, folder, ckpt.read_state(folder))
    report["resumed_losses"] = train_steps(accelerator, model, optimizer, scheduler, ema, range(half, 2 * half))[0]
    weights = ckpt.export_state_dict(accelerator, model, ema)
    if accelerator.is_main_process:
        ckpt.export_model(raw, args.out / "export_resumed", {"step": 2 * half}, weights)
    reports = gather_object([report])
    if accelerator.is_main_process:
        (args.out / "report.json").write_text(json.dumps(reports, indent=1))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
