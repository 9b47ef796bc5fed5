"""Stage A / Stage B flow-matching training of JointDiT with Accelerate.

``train(cfg) -> metrics`` is the library entry; ``python -m jointdit.train`` is its thin Hydra main.

Determinism: the batch order of epoch ``e`` is a pure function of ``(seed, e)``, and every random draw
of a step (tasks, flow times, noise, condition dropout) comes from a generator seeded by
``(seed, step, rank)``. So a run resumed from a checkpoint replays exactly the loss sequence of an
uninterrupted run, without depending on how any library consumes the global RNG.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from jointdit import checkpoints as ckpt
from jointdit.config import model_fields
from jointdit.latents import EXPORT_FORMAT, LatentSpec, spec_for_config
from jointdit.diffusion.flow import flow_loss, make_flow_batch, sample_tasks
from jointdit.models import Condition
from jointdit.tracking import Tracker, flatten, job_run_name

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Data order
# ----------------------------------------------------------------------------------------------


class EpochBatchSampler(Sampler[list[int]]):
    """Shuffled batches for epoch ``e`` from ``(seed, e)``; each rank takes every ``world``-th batch.

    ``start(epoch, offset)`` makes the next iteration begin at batch ``offset`` of that epoch — how
    a resumed run picks up the data position.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        if size < batch_size * world:
            raise ValueError(f"the training split has {size} clips, fewer than one batch of {batch_size} per process "
                             f"x {world} processes; lower vram.micro_batch_size or add clips")
        self.size, self.batch_size, self.seed, self.rank, self.world = size, batch_size, seed, rank, world
        self.epoch, self.offset = 0, 0

    def __len__(self) -> int:
        return self.size // (self.batch_size * self.world)

    def start(self, epoch: int, offset: int = 0) -> None:
        self.epoch, self.offset = epoch, offset

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        """Batches of ``(clip index, epoch)``: the dataset draws each clip's crop from the epoch too."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        per_step = self.batch_size * self.world
        for index in range(self.offset, len(self)):
            chunk = order[index * per_step : (index + 1) * per_step]
            yield [(i, self.epoch) for i in chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]]


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) * 64 + rank)


# ----------------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------------


KNOBS = ("max_t", "q_chunk_v", "q_chunk_a", "kv_downsample", "gradient_checkpointing", "micro_batch_size")


def apply_memory_plan(cfg: DictConfig) -> dict[str, Any]:
    """Resolve the vram knobs (``vram=auto`` picks them for this device) and check the plan fits."""
    from omegaconf import open_dict

    from jointdit.memory import resolve_vram

    plan = resolve_vram(cfg)
    plan["micro_batch_size"] = min(int(plan["micro_batch_size"]), int(cfg.batch_size))  # auto: never above the batch
    with open_dict(cfg):
        for key in KNOBS:
            cfg.vram[key] = plan[key]
    log.info("memory plan: %s; estimated peak %.0f MiB of %.0f MiB", {k: plan[k] for k in KNOBS},
             plan["estimate_bytes"] / 2**20, plan["budget_bytes"] / 2**20)
    return plan


def make_accelerator(cfg: DictConfig):
    from accelerate import Accelerator, DistributedDataParallelKwargs, PartialState

    # cpu=True lets several CPU processes (`accelerate launch`, torchrun) form a gloo group.
    state = PartialState(cpu=not torch.cuda.is_available())
    on_cpu = state.device.type == "cpu"
    precision = "no" if on_cpu else str(cfg.vram.mixed_precision)
    micro = int(cfg.vram.micro_batch_size)
    accumulation = max(1, int(cfg.batch_size) // (micro * state.num_processes))
    # Without CLIP features the condition projections get no gradient; DDP must be told.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    return Accelerator(mixed_precision=precision, gradient_accumulation_steps=accumulation, cpu=on_cpu,
                       kwargs_handlers=[ddp])


def reset_accelerate() -> None:
    """Forget Accelerate's process-wide state, so the next job of a sweep starts clean."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def training_spec(cfg: DictConfig) -> LatentSpec:
    """The latent geometry this run trains on: the cache's spec, trimmed to the model's temporal patches,
    cropped to ``vram.max_t``; its per-channel statistics kept only with ``objective.normalize_latents``."""
    spec = spec_for_config(cfg)
    objective = cfg.get("objective") or {}
    return spec if objective.get("normalize_latents", False) else spec.with_stats(None, None)


def build_model_for_spec(model_cfg: DictConfig, spec: LatentSpec) -> torch.nn.Module:
    """A JointDiT whose input channels, latent rates and condition widths match the spec's latents."""
    from jointdit.models import build_model

    fields = model_fields(model_cfg)
    return build_model(fields.pop("preset"), **{**fields, **spec.model_kwargs()})


def condition_from_batch(batch: dict[str, Any], drop_text: float, drop_image: float, generator: torch.Generator,
                         device: torch.device) -> Condition | None:
    """CLIP features stored in the cache, with per-sample dropout flags for classifier-free guidance."""
    text_tokens, text_pooled, image = (batch.get(k) for k in ("clip_text_tokens", "clip_text_pooled", "clip_image"))
    if text_tokens is None and text_pooled is None and image is None:
        return None  # no CLIP in this cache: the model uses its learned null condition
    size = next(t for t in (text_tokens, text_pooled, image) if t is not None).shape[0]
    rand = torch.rand(2, size, generator=generator, device=generator.device).to(device)
    return Condition(
        text_tokens=None if text_tokens is None else text_tokens.to(device),
        text_pooled=None if text_pooled is None else text_pooled.to(device),
        image=None if image is None else image.to(device),
        drop_text=rand[0] < drop_text,
        drop_image=rand[1] < drop_image,
    )


def make_optimizer(model: torch.nn.Module, cfg: DictConfig) -> tuple[torch.optim.Optimizer, dict[str, int]]:
    """Freeze everything, then unfreeze the stage's glob-selected groups, each with its own lr."""
    groups = {name: list(group.patterns) for name, group in cfg.stage.trainable.items()}
    selected = ckpt.select_parameters(model, groups)
    for param in model.parameters():
        param.requires_grad_(False)
    param_groups, counts = [], {}
    for name, params in selected.items():
        for _, param in params:
            param.requires_grad_(True)
        counts[name] = sum(p.numel() for _, p in params)
        param_groups.append({"params": [p for _, p in params], "lr": float(cfg.stage.trainable[name].lr), "name": name})
    counts["frozen"] = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    optimizer = torch.optim.AdamW(param_groups, betas=tuple(cfg.optim.betas), weight_decay=float(cfg.optim.weight_decay))
    return optimizer, counts


def make_scheduler(optimizer, cfg: DictConfig):
    from diffusers.optimization import get_scheduler

    name = "cosine" if cfg.optim.schedule == "cosine" else "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=int(cfg.optim.warmup_steps), num_training_steps=int(cfg.max_steps))


def parameter_checksum(model: torch.nn.Module) -> torch.Tensor:
    """A float64 fingerprint of all weights (position-weighted, so swapped tensors differ)."""
    return sum((i + 1) * p.detach().double().sum() for i, p in enumerate(model.parameters()))


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def plot_losses(history: list[dict[str, float]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    for key, label in (("loss", "total"), ("loss_video", "video"), ("loss_audio", "audio")):
        ax.plot(steps, [h[key] for h in history], label=label)
    ax.set_xlabel("step"), ax.set_ylabel("flow-matching loss"), ax.set_yscale("log")
    ax.grid(alpha=0.3), ax.legend(), ax.set_title("training loss")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


@torch.no_grad()
def validation_loss(model, dataset, collate, cfg: DictConfig, device: torch.device, max_batches: int = 4) -> float | None:
    """Joint-task loss on the validation split with fixed noise (comparable across steps)."""
    if dataset is None or len(dataset) == 0:
        return None
    loader = DataLoader(dataset, batch_size=int(cfg.vram.micro_batch_size), shuffle=False, collate_fn=collate)
    was_training = model.training
    model.eval()
    losses = []
    for index, batch in enumerate(loader):
        if index >= max_batches:
            break
        generator = step_generator(int(cfg.seed) + 7, index, 0, device)
        video, audio = batch["video"].to(device), batch["audio"].to(device)
        tasks = torch.zeros(video.shape[0], dtype=torch.long, device=device)  # joint
        flow = make_flow_batch(video, audio, tasks, cfg.objective.logit_normal_mean, cfg.objective.logit_normal_std, generator)
        pred_v, pred_a = model(flow.video, flow.audio, flow.t_video, flow.t_audio, None, "full")
        losses.append(flow_loss(pred_v, pred_a, flow)["loss"].item())
    model.train(was_training)
    return sum(losses) / len(losses) if losses else None


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


def train(cfg: DictConfig) -> dict[str, float]:
    """Train for ``cfg.max_steps`` optimizer steps; returns the final metrics."""
    from diffusers.training_utils import EMAModel

    from jointdit.data.dataset import CacheMissingError, LatentDataset, collate_latents, ensure_cache

    output_dir = Path(cfg.paths.output_dir)
    checkpoints_root = output_dir / "checkpoints"
    plan = apply_memory_plan(cfg)  # before anything is built: a plan that cannot fit stops here
    accelerator = make_accelerator(cfg)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    tracker = Tracker(cfg.logger if accelerator.is_main_process else None, run_name=job_run_name(str(cfg.task_name)),
                      tags={"stage": str(cfg.stage.name), "model": str(cfg.model.preset), "data": str(cfg.data.name)})
    status = "FAILED"
    try:
        # 1. Data: the latent cache (built on first use for the synthetic set).
        with accelerator.main_process_first():
            cache_dir = ensure_cache(cfg)
        spec = training_spec(cfg)
        train_set = LatentDataset(cache_dir, "train", seed=int(cfg.seed), spec=spec)
        try:
            val_set = LatentDataset(cache_dir, "val", seed=int(cfg.seed), random_crop=False, spec=spec)
        except CacheMissingError:
            val_set = None  # no validation split: no val loss, no "best" export
        collate = collate_latents
        sampler = EpochBatchSampler(len(train_set), int(cfg.vram.micro_batch_size), int(cfg.seed), rank, world)
        loader = DataLoader(train_set, batch_sampler=sampler, collate_fn=collate,
                            num_workers=int(cfg.num_workers), generator=torch.Generator().manual_seed(int(cfg.seed)))

        # 2. Model (seeded initialisation), what trains, optimizer, schedule, EMA.
        from accelerate.utils import set_seed

        set_seed(int(cfg.seed))
        model = build_model_for_spec(cfg.model, spec)
        if cfg.stage.get("init_from"):
            ckpt.load_into(model, cfg.stage.init_from)
        model.set_memory_knobs(q_chunk_v=int(cfg.vram.q_chunk_v), q_chunk_a=int(cfg.vram.q_chunk_a),
                               kv_downsample=int(cfg.vram.kv_downsample),
                               gradient_checkpointing=bool(cfg.vram.gradient_checkpointing))
        optimizer, counts = make_optimizer(model, cfg)
        scheduler = make_scheduler(optimizer, cfg)
        ema = EMAModel([p for p in model.parameters() if p.requires_grad], decay=float(cfg.ema.decay)) if cfg.ema.enabled else None
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        if ema is not None:
            ema.to(device)  # saved by save_checkpoint as safetensors: Accelerate would pickle it
        log.info("trainable parameters per group: %s", counts)

        # 3. Tracking: the flattened config, the trainable counts, the resolved config and .hydra/.
        if tracker.active:
            tracker.log_params(flatten(cfg))
            tracker.log_params({f"trainable.{k}": v for k, v in counts.items()})
            tracker.log_params({f"memory.chosen.{k}": cfg.vram[k] for k in KNOBS})
            tracker.log_metrics({"memory_estimated_peak_mb": plan["estimate_bytes"] / 2**20,
                                 "memory_budget_mb": plan["budget_bytes"] / 2**20}, 0)
            resolved = output_dir / "config_resolved.yaml"
            output_dir.mkdir(parents=True, exist_ok=True)
            resolved.write_text(OmegaConf.to_yaml(cfg, resolve=True))
            tracker.log_artifact(resolved)
            tracker.log_artifact(output_dir / ".hydra", "hydra")

        # 4. Resume: Accelerate restores model/optimizer/scheduler/EMA; we restore step and data position.
        step, history = 0, []
        resume_from = ckpt.resolve_resume(cfg.checkpoint.get("resume"), checkpoints_root)
        if resume_from is not None:
            accelerator.load_state(str(resume_from))
            state = ckpt.read_state(resume_from)
            step, history = int(state["step"]), list(state["history"])
            if ema is not None:
                load_ema(ema, resume_from, state)
            log.info("resumed from %s at step %d", resume_from, step)

        # 5. Train.
        best_val = math.inf
        accumulation = accelerator.gradient_accumulation_steps
        micro_steps_per_epoch = len(sampler)
        task_probs = OmegaConf.to_container(cfg.objective.tasks)
        step_losses: dict[str, list[float]] = {}  # this optimizer step's micro-batch losses
        micro = 0  # micro-batches into this optimizer step (an accumulation window may span epochs)
        since_log = {"samples": 0, "start": time.perf_counter()}  # for samples/s between log lines
        model.train()
        progress = tqdm(total=int(cfg.max_steps), initial=step, desc="train", disable=not accelerator.is_main_process)
        while step < int(cfg.max_steps):
            consumed = step * accumulation
            sampler.start(consumed // micro_steps_per_epoch, consumed % micro_steps_per_epoch)
            for batch in loader:
                with accelerator.accumulate(model):
                    generator = step_generator(int(cfg.seed), step * accumulation + micro, rank, device)
                    video, audio = batch["video"].to(device), batch["audio"].to(device)
                    tasks = sample_tasks(task_probs, video.shape[0], generator).to(device)
                    flow = make_flow_batch(video, audio, tasks, cfg.objective.logit_normal_mean,
                                           cfg.objective.logit_normal_std, generator)
                    cond = condition_from_batch(batch, float(cfg.objective.drop_text), float(cfg.objective.drop_image),
                                                generator, device)
                    pred_v, pred_a = model(flow.video, flow.audio, flow.t_video, flow.t_audio, cond, "full")
                    losses = flow_loss(pred_v, pred_a, flow, float(cfg.objective.loss_weight_video),
                                       float(cfg.objective.loss_weight_audio))
                    accelerator.backward(losses["loss"])
                    grad_norm = None
                    if accelerator.sync_gradients and float(cfg.optim.grad_clip) > 0:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), float(cfg.optim.grad_clip))
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)

                for key, value in losses.items():
                    if torch.isfinite(value):
                        step_losses.setdefault(key, []).append(float(value.detach()))
                since_log["samples"] += video.shape[0] * world
                micro += 1
                if not accelerator.sync_gradients:
                    continue
                micro = 0

                # One optimizer step done.
                if ema is not None:
                    ema.step([p for p in accelerator.unwrap_model(model).parameters() if p.requires_grad])
                step += 1
                progress.update(1)
                metrics = {key: sum(values) / len(values) for key, values in step_losses.items()}
                step_losses = {}
                history.append({"step": step, **{k: metrics.get(k, float("nan")) for k in ("loss", "loss_video", "loss_audio")}})
                if step % int(cfg.log_every) == 0 or step == int(cfg.max_steps):
                    elapsed = time.perf_counter() - since_log["start"]
                    metrics.update(lr=scheduler.get_last_lr()[0], samples_per_s=since_log["samples"] / max(elapsed, 1e-9),
                                   peak_memory_mb=peak_memory_mb(device))
                    if grad_norm is not None:
                        metrics["grad_norm"] = float(grad_norm)
                    tracker.log_metrics(metrics, step)
                    progress.set_postfix(loss=f"{metrics['loss']:.4f}")
                    since_log = {"samples": 0, "start": time.perf_counter()}

                if step % int(cfg.checkpoint.every) == 0 or step == int(cfg.max_steps):
                    val = validation_loss(accelerator.unwrap_model(model), val_set, collate, cfg, device)
                    save_checkpoint(accelerator, checkpoints_root, step, history, accelerator.unwrap_model(model), ema,
                                    int(cfg.checkpoint.keep))
                    if val is not None:
                        tracker.log_metrics({"val_loss": val}, step)
                        history[-1]["val_loss"] = val
                    if accelerator.is_main_process and cfg.checkpoint.export and val is not None and val < best_val:
                        best_val = val
                        export(accelerator.unwrap_model(model), ema, output_dir / "export" / "best", cfg, spec, step)
                if (accelerator.is_main_process and int(cfg.sample_every) > 0 and step % int(cfg.sample_every) == 0
                        and step < int(cfg.max_steps)):
                    folder = export(accelerator.unwrap_model(model), ema, output_dir / "export" / "preview", cfg, spec, step)
                    for path in preview_sample(cfg, folder, output_dir / "samples" / f"step_{step:06d}", device):
                        tracker.log_artifact(path, f"samples/step_{step:06d}")
                if step >= int(cfg.max_steps):
                    break
        progress.close()

        # 6. Export, loss curve, final metrics; every rank must hold the same weights.
        final = {"train/loss": history[-1]["loss"] if history else float("nan"), "step": float(step)}
        checksums = accelerator.gather(parameter_checksum(accelerator.unwrap_model(model)).to(device)[None]).tolist()
        final["ranks_in_sync"] = float(len(set(checksums)) == 1)
        if len(set(checksums)) != 1:
            log.error("the %d processes ended with different weights (checksums %s)", world, checksums)
        if math.isfinite(best_val):
            final["val/loss"] = best_val
        if accelerator.is_main_process:
            if cfg.checkpoint.export or int(cfg.sample_every) >= 0:
                folder = export(accelerator.unwrap_model(model), ema, output_dir / "export" / "last", cfg, spec, step)
                if cfg.logger.get("log_model"):
                    tracker.log_artifact(folder, "model")
                if int(cfg.sample_every) >= 0:
                    for path in preview_sample(cfg, folder, output_dir / "samples" / f"step_{step:06d}", device):
                        tracker.log_artifact(path, f"samples/step_{step:06d}")
            if history:
                curve = plot_losses(history, output_dir / "loss_curve.png")
                tracker.log_artifact(curve)
                (output_dir / "metrics.json").write_text(json.dumps(
                    {"final": final, "history": history, "world_size": world, "rank_checksums": checksums}, indent=1))
        accelerator.wait_for_everyone()
        status = "FINISHED"
        return final
    finally:
        tracker.end(status)
        accelerator.free_memory()
        reset_accelerate()


EMA_FILE = "ema.safetensors"


def preview_sample(cfg: DictConfig, model_folder: Path, out_dir: Path, device: torch.device) -> list[Path]:
    """A joint sample from an exported model folder, through the same code as ``python -m jointdit.sample``."""
    from jointdit.config import CONFIG_DIR
    from jointdit.diffusion.sampler import sample_to_files

    sample_cfg = OmegaConf.load(CONFIG_DIR / "sample.yaml")
    for key in ("defaults", "hydra"):
        sample_cfg.pop(key)
    sample_cfg = OmegaConf.merge(sample_cfg, {
        "checkpoint": str(model_folder), "task": "joint", "steps": int(cfg.sample_steps), "seeds": [int(cfg.seed)],
        "out_dir": str(out_dir), "device": device.type, "progress": False,
        "guidance": OmegaConf.to_container(cfg.guidance, resolve=True),
        "vram": OmegaConf.to_container(cfg.vram, resolve=True), "logger": {"name": "none"},
    })
    return [path for result in sample_to_files(sample_cfg) for path in result.files.values()]


def save_checkpoint(accelerator, root: Path, step: int, history: list[dict], model, ema, keep: int) -> Path:
    """Accelerate state (+ EMA weights as safetensors) into a temp folder, then renamed: a crash
    never leaves a half-written checkpoint."""
    final = ckpt.step_dir(root, step)
    tmp = root / f".tmp_{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        state = {"step": step, "history": history, "model_config": dict(model.config)}
        if ema is not None:
            from safetensors.torch import save_file

            save_file({f"shadow.{i}": p.detach().contiguous().cpu() for i, p in enumerate(ema.shadow_params)},
                      str(tmp / EMA_FILE))
            state["ema"] = {"optimization_step": int(ema.optimization_step), "decay": float(ema.decay)}
        (tmp / ckpt.STATE_FILE).write_text(json.dumps(state, default=str))
        ckpt.replace_dir(tmp, final)
        ckpt.prune(root, keep)
    accelerator.wait_for_everyone()
    return final


def load_ema(ema, folder: Path, state: dict[str, Any]) -> None:
    from safetensors.torch import load_file

    shadow = load_file(str(folder / EMA_FILE))
    if len(shadow) != len(ema.shadow_params):
        raise ValueError(f"{folder / EMA_FILE} holds {len(shadow)} EMA tensors, this run has {len(ema.shadow_params)}")
    for i, param in enumerate(ema.shadow_params):
        param.data.copy_(shadow[f"shadow.{i}"])
    ema.optimization_step = int(state["ema"]["optimization_step"])


def cache_clip_settings(cfg: DictConfig) -> dict | None:
    """The CLIP encoder the latent cache was built with, so the sampler can encode prompts the same way."""
    from jointdit.data.dataset import _built_clip_settings, cache_dir_for

    settings = _built_clip_settings(cache_dir_for(cfg.data, cfg.codec, cfg.paths.cache_dir))
    return {k: settings.get(k) for k in ("model", "pretrained", "model_config")} if settings else None


def export_meta(cfg: DictConfig, spec: LatentSpec, step: int) -> dict[str, Any]:
    """``jointdit.json``: the LatentSpec the model was trained on, and every setting that changes the
    function the model computes (``attention.kv_downsample``), beside the codec/data/CLIP settings."""
    return {"format": EXPORT_FORMAT, "step": step, "stage": str(cfg.stage.name), "spec": spec.to_json(),
            "attention": {"kv_downsample": int(cfg.vram.kv_downsample)}, "clip": cache_clip_settings(cfg),
            "codec": OmegaConf.to_container(cfg.codec, resolve=True),
            "data": OmegaConf.to_container(cfg.data, resolve=True)}


def export(model, ema, folder: Path, cfg: DictConfig, spec: LatentSpec, step: int) -> Path:
    """The model folder for sampling (EMA weights when EMA is on) plus ``jointdit.json`` (:func:`export_meta`)."""
    meta = export_meta(cfg, spec, step)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if ema is not None:
        ema.store(trainable)
        ema.copy_to(trainable)
    try:
        return ckpt.export_model(model, folder, meta)
    finally:
        if ema is not None:
            ema.restore(trainable)
