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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from jointdit import checkpoints as ckpt
from jointdit import guards
from jointdit import lora
from jointdit.blockwise import apply_block_memory
from jointdit.memory import KNOB_FIELDS
from jointdit.latents import EXPORT_FORMAT, LatentSpec, spec_for_config
from jointdit.diffusion.flow import FlowObjective, flow_loss, make_flow_batch
from jointdit.models import Condition
from jointdit.tracking import Tracker, log_dataset, log_model, open_run, run_params
from jointdit.train_log import LossMeter, format_log_line

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


def apply_memory_plan(cfg: DictConfig) -> dict[str, Any]:
    """Resolve the vram knobs (``vram=auto`` picks them for this device) and check the plan fits."""
    from omegaconf import open_dict

    from jointdit.memory import resolve_vram

    from jointdit.schema import budget_bytes

    plan = resolve_vram(cfg, budget_bytes=budget_bytes(cfg))  # vram.budget_gb is honoured on vram=cpu/auto too
    plan["micro_batch_size"] = min(int(plan["micro_batch_size"]), int(cfg.batch_size))  # auto: never above the batch
    with open_dict(cfg):
        for key in KNOB_FIELDS:
            cfg.vram[key] = plan[key]
    log.info("memory plan: %s; estimated peak %.0f MiB (+%.0f%% margin: %.0f MiB) of %.0f MiB",
             {k: plan[k] for k in KNOB_FIELDS}, plan["estimate_bytes"] / 2**20, 100 * float(plan["margin"]),
             plan["planned_bytes"] / 2**20, plan["budget_bytes"] / 2**20)
    return plan


def kv_pool_space(cfg: DictConfig) -> int:
    """``vram.kv_pool_space`` (1 when a profile written before the knob lacks it)."""
    return int(cfg.vram.get("kv_pool_space") or 1)


def make_accelerator(cfg: DictConfig):
    from accelerate import Accelerator, DistributedDataParallelKwargs, PartialState

    from jointdit.launch import mixed_precision

    # cpu=True lets several CPU processes (`accelerate launch`, torchrun) form a gloo group.
    state = PartialState(cpu=not torch.cuda.is_available())
    on_cpu = state.device.type == "cpu"
    precision = "no" if on_cpu else mixed_precision(cfg.vram.mixed_precision)  # a YAML `no` (False) is "no"
    micro = int(cfg.vram.micro_batch_size)
    accumulation = max(1, int(cfg.batch_size) // (micro * state.num_processes))
    # Without CLIP features the condition projections get no gradient; DDP must be told.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    # An FSDP recipe on CPU processes: Accelerate would drop the plugin and silently run DDP (ckpt.fsdp_on_cpu).
    plugin = ckpt.cpu_fsdp_plugin() if on_cpu else None
    # The LR schedule is sized in optimizer steps and train_step steps it once per optimizer step; Accelerate's
    # default steps it num_processes times per step (its convention for per-process-sized schedules).
    accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_steps=accumulation, cpu=on_cpu,
                              kwargs_handlers=[ddp], step_scheduler_with_optimizer=False, fsdp_plugin=plugin)
    if plugin is not None:
        ckpt.fsdp_on_cpu(accelerator, plugin)
    return accelerator


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
    """``hydra.utils.instantiate(cfg.model)`` (its ``_target_`` builds the preset) with the input channels,
    latent rates and condition widths of the spec's latents."""
    from hydra.utils import instantiate

    return instantiate(model_cfg, **spec.model_kwargs(), _convert_="all")


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


def make_optimizer(model: torch.nn.Module, cfg: DictConfig, lora_base: Path | None = None,
                   ) -> tuple[torch.optim.Optimizer, dict[str, int]]:
    """Freeze everything, then unfreeze the stage's glob-selected groups, each with its own lr — or, with
    ``stage.lora.rank > 0``, add LoRA adapters (naming ``lora_base``) and train only them. ``vram.optimizer``."""
    from jointdit import lora, optimizers

    if lora.lora_enabled(cfg.stage.get("lora")):
        param_groups, counts = lora.training_groups(model, cfg.stage.lora, lora_base)
        return optimizers.from_config(cfg, param_groups), counts
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
    return optimizers.from_config(cfg, param_groups), counts


def make_lr_scheduler(optimizer, cfg: DictConfig):
    """diffusers' cosine (or constant) LR schedule with linear warm-up over ``cfg.max_steps`` optimizer steps."""
    from diffusers.optimization import get_scheduler

    name = "cosine" if cfg.optim.schedule == "cosine" else "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=int(cfg.optim.warmup_steps), num_training_steps=int(cfg.max_steps))


def parameter_checksum(model: torch.nn.Module) -> torch.Tensor:
    """A float64 fingerprint of all weights (position-weighted, so swapped tensors differ); FSDP shards are
    gathered (every rank calls this), quantized frozen weights (vram.quantize_frozen) count dequantized."""
    return sum((i + 1) * ckpt.full_tensor(p).dequantize().double().sum() for i, p in enumerate(model.parameters()))


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
def latent_times(spec: LatentSpec) -> dict[str, torch.Tensor]:
    """The model's RoPE times: the spec's latent centre times in seconds (every item starts at an aligned crop)."""
    return {"video_times": spec.video_latent_times().float(), "audio_times": spec.audio_latent_times().float()}


def ema_validation_loss(run: "Run") -> float | None:
    """:func:`validation_loss` of the EMA weights (what :func:`export` writes); the raw weights are restored."""
    trainable = run.trainable()
    run.ema.store(trainable)
    run.ema.copy_to(trainable)
    try:
        return validation_loss(run.raw_model, run.val_set, run.cfg, run.device)
    finally:
        run.ema.restore(trainable)


def validation_loss(model, dataset, cfg: DictConfig, device: torch.device, max_batches: int = 4) -> float | None:
    """Joint-task loss on the validation split with fixed noise and a fixed t distribution: no timestep shift,
    mode full (comparable across steps and across runs with other objective settings)."""
    if dataset is None or len(dataset) == 0:
        return None
    from jointdit.data.dataset import collate_latents

    loader = DataLoader(dataset, batch_size=int(cfg.vram.micro_batch_size), shuffle=False, collate_fn=collate_latents)
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
        pred_v, pred_a = model(flow.video, flow.audio, flow.t_video, flow.t_audio, None, "full",
                               **latent_times(dataset.spec))
        losses.append(flow_loss(pred_v, pred_a, flow)["loss"].item())
    model.train(was_training)
    return sum(losses) / len(losses) if losses else None


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


@dataclass
class Run:
    """Everything one training job holds. ``model`` is what Accelerate prepared (DDP-wrapped on several
    processes); :attr:`raw_model` is the module itself. ``step`` counts optimizer steps, ``micro`` the
    micro-batches into the current accumulation window."""

    cfg: DictConfig
    accelerator: Any
    tracker: Tracker
    plan: dict[str, Any]
    spec: LatentSpec
    model: torch.nn.Module
    ema: Any                                   # diffusers EMAModel or None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    sampler: EpochBatchSampler
    loader: DataLoader
    val_set: Any                               # LatentDataset or None
    counts: dict[str, int]                     # trainable parameters per group (+ "frozen")
    step: int = 0
    micro: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_val: float = math.inf
    flow_objective: Any = None                 # diffusion.flow.FlowObjective: iso modes, timestep shifts
    grad_norm: float | None = None             # of the last optimizer step, when clipping is on
    eval_summary: dict[str, float] = field(default_factory=dict)  # the last AfterStep.evaluate's figures
    guard: Any = None                          # jointdit.guards.NonFiniteGuard (train.nonfinite)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def raw_model(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.paths.output_dir)

    @property
    def checkpoints_root(self) -> Path:
        return self.output_dir / "checkpoints"

    @property
    def consumed(self) -> int:
        """Micro-batches this process has drawn since step 0 (the data position)."""
        return self.step * self.accelerator.gradient_accumulation_steps + self.micro

    def trainable(self) -> list[torch.nn.Parameter]:
        return ckpt.trainable_parameters(self.accelerator, self.model)  # FSDP: resharded after a validation pass


def require_shardable(cfg: DictConfig, accelerator) -> None:
    """Under FSDP: version 2 only (the EMA needs per-parameter shards), and neither LoRA (its adapter export
    reads the live weights on one rank) nor int8 frozen weights (quanto tensors are not DTensors)."""
    from jointdit.errors import ConfigError

    ckpt.require_supported_sharding(accelerator)
    if not ckpt.sharded(accelerator):
        return
    if lora.lora_enabled(cfg.stage.get("lora")) or cfg.vram.get("quantize_frozen"):
        raise ConfigError("FSDP does not train LoRA adapters or int8 frozen weights (stage.lora / "
                          "vram.quantize_frozen)", hint="launch with conf/accelerate/ddp.yaml: the frozen base "
                          "is small enough to replicate, which is why those knobs exist")


def build(cfg: DictConfig, accelerator, tracker: Tracker, plan: dict[str, Any]) -> Run:
    """Data (the latent cache, built on first use for the synthetic set), the seeded model, what trains,
    optimizer, schedule and EMA, all prepared by Accelerate."""
    from accelerate.utils import set_seed
    from diffusers.training_utils import EMAModel

    from jointdit.data.dataset import CacheMissingError, LatentDataset, collate_latents, ensure_cache

    require_shardable(cfg, accelerator)
    with accelerator.main_process_first():
        cache_dir = ensure_cache(cfg)
    spec = training_spec(cfg)
    train_set = LatentDataset(cache_dir, "train", seed=int(cfg.seed), spec=spec)
    try:
        val_set = LatentDataset(cache_dir, "val", seed=int(cfg.seed), random_crop=False, spec=spec)
    except CacheMissingError:
        val_set = None  # no validation split: no val loss, no "best" export
    sampler = EpochBatchSampler(len(train_set), int(cfg.vram.micro_batch_size), int(cfg.seed),
                                accelerator.process_index, accelerator.num_processes)
    loader = DataLoader(train_set, batch_sampler=sampler, collate_fn=collate_latents, num_workers=int(cfg.num_workers),
                        generator=torch.Generator().manual_seed(int(cfg.seed)))
    set_seed(int(cfg.seed))
    model = build_model_for_spec(cfg.model, spec)
    if cfg.stage.get("init_from"):
        ckpt.load_into(model, cfg.stage.init_from)
    model.set_memory_knobs(q_chunk_v=int(cfg.vram.q_chunk_v), q_chunk_a=int(cfg.vram.q_chunk_a),
                           kv_downsample=int(cfg.vram.kv_downsample), kv_pool_space=kv_pool_space(cfg),
                           gradient_checkpointing=bool(cfg.vram.gradient_checkpointing))
    apply_block_memory(model, cfg.vram.get("checkpoint_blocks"), bool(cfg.vram.get("offload_activations", False)))
    lora_base = None
    if lora.lora_enabled(cfg.stage.get("lora")):  # the adapters' base: init_from's folder, else this model exported once
        lora_base = lora.prepare_base(model, cfg.stage.get("init_from"), Path(cfg.paths.output_dir) / "export" / "base",
                                      export_meta(cfg, spec, 0, model.config), accelerator.is_main_process)
    flow_objective = FlowObjective.from_config(cfg.objective, model.config, spec)  # iso modes, timestep shifts
    optimizer, counts = make_optimizer(model, cfg, lora_base)
    if cfg.vram.get("quantize_frozen"):  # after the stage chose what trains: only frozen Linear weights become int8
        from jointdit.quantize import quantize_frozen

        quantize_frozen(model, {n for n, p in model.named_parameters() if p.requires_grad}, str(cfg.vram.quantize_frozen))
    scheduler = make_lr_scheduler(optimizer, cfg)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    ema = None
    if cfg.ema.enabled:  # after prepare: under FSDP the shadow weights are sharded like the parameters they follow
        ema = EMAModel([p for p in accelerator.unwrap_model(model).parameters() if p.requires_grad],
                       decay=float(cfg.ema.decay))
        ema.to(accelerator.device)  # saved by ckpt.save_training_state as safetensors: Accelerate would pickle it
    log.info("trainable parameters per group: %s", counts)
    return Run(cfg=cfg, accelerator=accelerator, tracker=tracker, plan=plan, spec=spec, model=model, ema=ema,
               optimizer=optimizer, scheduler=scheduler, sampler=sampler, loader=loader, val_set=val_set, counts=counts,
               flow_objective=flow_objective)


def log_setup(run: Run) -> None:
    """The flattened config, trainable counts, chosen memory knobs, the resolved config and ``.hydra/``."""
    tracker, cfg = run.tracker, run.cfg
    if not tracker.active:
        return
    tracker.log_params(run_params(cfg, dict(run.raw_model.config)))  # model.* as built, not the config's nulls
    train_set = run.loader.dataset
    log_dataset(tracker, cfg, train_set.cache_dir, {"train": len(train_set), "val": len(run.val_set or [])})
    tracker.log_params({f"trainable.{k}": v for k, v in run.counts.items()})
    tracker.log_params({f"memory.chosen.{k}": cfg.vram[k] for k in KNOB_FIELDS})
    tracker.log_metrics({"memory_estimated_peak_mb": run.plan["estimate_bytes"] / 2**20,
                         "memory_planned_peak_mb": run.plan["planned_bytes"] / 2**20,
                         "memory_margin": float(run.plan["margin"]),
                         "memory_budget_mb": run.plan["budget_bytes"] / 2**20,
                         "trainable_params": sum(v for k, v in run.counts.items() if k != "frozen")}, 0)
    run.output_dir.mkdir(parents=True, exist_ok=True)
    resolved = run.output_dir / "config_resolved.yaml"
    resolved.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    tracker.log_artifact(resolved)
    tracker.log_artifact(run.output_dir / ".hydra", "hydra")


def resume(run: Run) -> None:
    """``checkpoint.resume``: Accelerate restores model/optimizer/scheduler/RNG; step, history and EMA come
    from the checkpoint's own files. The data position follows from the step (:attr:`Run.consumed`)."""
    folder = ckpt.resolve_resume(run.cfg.checkpoint.get("resume"), run.checkpoints_root)
    if folder is None:
        return
    from jointdit.errors import CheckpointError
    from jointdit.resolve_init import config_differences
    from jointdit.safeload import verify_checkpoint_folder

    state = verify_checkpoint_folder(folder)  # complete, and no pickle that would import more than plain data
    ours = {k: v for k, v in dict(run.raw_model.config).items() if not k.startswith("_")}
    theirs = {k: v for k, v in state.get("model_config", {}).items() if not k.startswith("_")}
    if theirs and config_differences(theirs, ours):
        raise CheckpointError(f"checkpoint.resume: {folder} was trained with another model: "
                              + "; ".join(config_differences(theirs, ours, prefix="model.")),
                              hint="resume with the model settings of that run, or start a new run (another hydra.run.dir)")
    ckpt.load_training_state(run.accelerator, folder)
    run.step, run.history = int(state["step"]), list(state["history"])
    if run.ema is not None:
        ckpt.load_ema(run.ema, folder, state)
    best = ckpt.load_export_meta(run.output_dir / "export" / "best").get("val_loss", math.inf)  # (an older
    run.best_val = min([h.get("val_loss_ema", h["val_loss"]) for h in run.history if "val_loss" in h]  # checkpoint
                       + [best])                                                                      # forgets it)
    log.info("resumed from %s at step %d", folder, run.step)


def train_step(run: Run, batch: dict[str, Any], micro: int) -> dict[str, torch.Tensor]:
    """One micro-batch: tasks (every one a conditioning mask), mask spans, flow times, noise, attention
    modes and condition dropout drawn from the generator of ``(seed, consumed micro-batches, rank)``
    (:meth:`FlowObjective.batch`); forward, flow loss, backward. On the last micro-batch of
    an accumulation window Accelerate lets the (clipped) optimizer and LR scheduler step. Returns the losses."""
    cfg, accelerator, device = run.cfg, run.accelerator, run.device
    objective = cfg.objective
    with accelerator.accumulate(run.model):
        generator = step_generator(int(cfg.seed), run.step * accelerator.gradient_accumulation_steps + micro, run.rank,
                                   device)
        video, audio = batch["video"].to(device), batch["audio"].to(device)  # [B,T,C,h,w], [B,C,L,F]
        flow = run.flow_objective.batch(video, audio, generator)  # task masks, shifted t, noise, attention modes
        cond = condition_from_batch(batch, float(objective.drop_text), float(objective.drop_image), generator, device)
        pred_v, pred_a = run.model(flow.video, flow.audio, flow.t_video, flow.t_audio, cond, flow.modes,
                                   **latent_times(run.spec))
        losses = run.flow_objective.loss(pred_v, pred_a, flow)
        accelerator.backward(losses["loss"])
        if accelerator.sync_gradients and float(cfg.optim.grad_clip) > 0:
            run.grad_norm = float(accelerator.clip_grad_norm_(run.model.parameters(), float(cfg.optim.grad_clip)))
        if accelerator.sync_gradients and not guards.update_allowed(run, losses["loss"]):
            guards.drop_update(accelerator, run.optimizer)  # train.nonfinite=skip: this step changes no weight
        else:
            run.optimizer.step()
        if accelerator.sync_gradients:  # once per optimizer step, whatever the process count
            run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return losses


class AfterStep:
    """Everything that happens once per optimizer step, in the order of :attr:`hooks`.

    Each hook is a small method ``hook(run, losses)``; ``losses`` are the step's micro-batch means (floats).
    To add behaviour, write a method and name it in ``hooks`` (a subclass may extend the tuple).
    """

    hooks: tuple[str, ...] = ("update_ema", "record", "log", "validate", "checkpoint", "export_best", "preview",
                              "evaluate")

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.max_steps = int(cfg.max_steps)
        self.val: float | None = None  # this step's validation loss, when validated
        self.val_export: float | None = None  # ... of the weights an export writes (EMA when on)
        self.evaluator = None  # jointdit.evaluate.in_training.TrainingEvaluator, built at the first evaluation
        self._since = (time.perf_counter(), 0)  # (time, step) of the last log line, for samples/s
        self.meter = LossMeter()  # losses averaged over the steps since the last log line, and their EMA

    def start(self, run: Run) -> None:
        """Called once before the first step of this process (also after a resume)."""
        self._since = (time.perf_counter(), run.step)
        self.meter.reset()

    def __call__(self, run: Run, losses: dict[str, float]) -> None:
        self.val = None
        for name in self.hooks:
            getattr(self, name)(run, losses)

    def due(self, run: Run, every: int) -> bool:
        """Every ``every`` steps (``<= 0``: never) and at the last step."""
        return (every > 0 and run.step % every == 0) or run.step == self.max_steps

    def update_ema(self, run: Run, losses: dict[str, float]) -> None:
        if run.ema is not None:
            run.ema.step(run.trainable())

    def record(self, run: Run, losses: dict[str, float]) -> None:
        run.history.append({"step": run.step, **{k: losses.get(k, float("nan")) for k in ("loss", "loss_video", "loss_audio")},
                            "lr": run.scheduler.get_last_lr()[0]})

    def log(self, run: Run, losses: dict[str, float]) -> None:
        """Means since the last log line over every rank's steps (plus ``loss_ema``), to MLflow and one line
        to the console and ``train.log``."""
        self.meter.update(losses, samples=int(self.cfg.batch_size))
        if not self.due(run, int(self.cfg.log_every)):
            return
        if run.world > 1:
            from accelerate.utils import gather_object

            windows = gather_object([(self.meter.sums, self.meter.counts)])  # every rank, in rank order
            self.meter.sums, self.meter.counts = {}, {}
            for sums, counts in windows:
                self.meter.merge(sums, counts)
        metrics = {**self.meter.pop(), "lr": run.scheduler.get_last_lr()[0],
                   "peak_memory_mb": peak_memory_mb(run.device)}
        if run.grad_norm is not None:
            metrics["grad_norm"] = run.grad_norm
        run.tracker.log_metrics(metrics, run.step)
        if run.accelerator.is_main_process:
            log.info(format_log_line(run.step, self.max_steps, metrics))
        self._since = (time.perf_counter(), run.step)

    def validate(self, run: Run, losses: dict[str, float]) -> None:
        if not self.due(run, int(self.cfg.checkpoint.every)):
            return
        self.val = validation_loss(run.raw_model, run.val_set, run.cfg, run.device)
        if self.val is not None:
            run.tracker.log_metrics({"val_loss": self.val}, run.step)
            run.history[-1]["val_loss"] = self.val
        self.val_export = self.val  # export/best is judged with the weights it exports: the EMA's when EMA is on
        if self.val is not None and run.ema is not None:
            self.val_export = ema_validation_loss(run)
            run.tracker.log_metrics({"val_loss_ema": self.val_export}, run.step)
            run.history[-1]["val_loss_ema"] = self.val_export

    def checkpoint(self, run: Run, losses: dict[str, float]) -> None:
        if self.due(run, int(self.cfg.checkpoint.every)):
            ckpt.save_training_state(run.accelerator, run.checkpoints_root, run.step, run.history, run.raw_model, run.ema,
                                     int(self.cfg.checkpoint.keep))

    def export_best(self, run: Run, losses: dict[str, float]) -> None:
        # Every rank decides alike (the same validation loss of the same weights): FSDP gathers on all of them.
        if self.cfg.checkpoint.export and self.val is not None and self.val_export < run.best_val:
            run.best_val = self.val_export  # judged with the weights the export writes (EMA when on)
            export(run.raw_model, run.ema, run.output_dir / "export" / "best", run.cfg, run.spec, run.step,
                   extra={"val_loss": self.val_export},  # a resumed run reads it back: best is never overwritten by worse
                   accelerator=run.accelerator)

    def preview(self, run: Run, losses: dict[str, float]) -> None:
        every = int(self.cfg.sample_every)
        if every > 0 and run.step % every == 0 and run.step < self.max_steps:
            folder = export(run.raw_model, run.ema, run.output_dir / "export" / "preview", run.cfg, run.spec, run.step,
                            accelerator=run.accelerator)
            if folder is not None:  # the main process
                log_preview(run, folder)


    def evaluate(self, run: Run, losses: dict[str, float]) -> None:
        """``eval.every`` steps and at the last step: sync and event metrics of a few samples, an MP4 and
        the sync PNG logged to the run (:mod:`jointdit.evaluate.in_training`)."""
        every = int((self.cfg.get("eval") or {}).get("every", 0))
        if every > 0 and self.due(run, every):
            from jointdit.evaluate.in_training import TrainingEvaluator

            folder = export(run.raw_model, run.ema, run.output_dir / "export" / "eval", run.cfg, run.spec, run.step,
                            accelerator=run.accelerator)
            if folder is None:  # not the main process
                return
            self.evaluator = self.evaluator or TrainingEvaluator(self.cfg)
            run.eval_summary = self.evaluator(folder, run.output_dir / "eval" / f"step_{run.step:06d}", run.tracker,
                                              run.step, run.device)


def log_preview(run: Run, folder: Path) -> None:
    """A joint preview sample of an exported folder, logged under ``samples/step_NNNNNN``."""
    name = f"step_{run.step:06d}"
    for path in preview_sample(run.cfg, folder, run.output_dir / "samples" / name, run.device):
        run.tracker.log_artifact(path, f"samples/{name}")


def loop(run: Run, after_step: AfterStep | None = None) -> None:
    """Micro-batches until ``max_steps`` optimizer steps; ``after_step`` once per optimizer step.

    Each pass over the loader starts at the data position :attr:`Run.consumed` — including the
    micro-batches already drawn into an accumulation window that spans an epoch boundary.
    """
    after_step = after_step or AfterStep(run.cfg)
    after_step.start(run)
    max_steps, per_epoch = int(run.cfg.max_steps), len(run.sampler)
    window: dict[str, list[float]] = {}  # this optimizer step's micro-batch losses
    run.model.train()
    progress = tqdm(total=max_steps, initial=run.step, desc="train", disable=not run.accelerator.is_main_process)
    while run.step < max_steps:
        run.sampler.start(run.consumed // per_epoch, run.consumed % per_epoch)
        for batch in run.loader:
            for key, value in train_step(run, batch, run.micro).items():
                if torch.isfinite(value):
                    window.setdefault(key, []).append(float(value.detach()))
            run.micro += 1
            if not run.accelerator.sync_gradients:
                continue
            run.micro, run.step = 0, run.step + 1
            losses, window = {key: sum(v) / len(v) for key, v in window.items()}, {}
            after_step(run, losses)
            progress.update(1)
            progress.set_postfix(loss=f"{losses.get('loss', float('nan')):.4f}")
            if run.step >= max_steps:
                break
    progress.close()


def finish(run: Run) -> dict[str, float]:
    """Final metrics (every rank must hold the same weights), the last export and its preview sample,
    the loss curve and ``metrics.json``."""
    accelerator, cfg, history = run.accelerator, run.cfg, run.history
    final = {"train/loss": history[-1]["loss"] if history else float("nan"), "step": float(run.step)}
    checksums = accelerator.gather(parameter_checksum(run.raw_model).to(run.device)[None]).tolist()
    final["ranks_in_sync"] = float(len(set(checksums)) == 1)
    if len(set(checksums)) != 1:
        log.error("the %d processes ended with different weights (checksums %s)", run.world, checksums)
    if math.isfinite(run.best_val):
        final["val/loss"] = run.best_val
    final.update({f"eval/{k}": v for k, v in run.eval_summary.items()})  # optimized_metric may name one
    if run.guard is not None:
        final["nonfinite_skipped"] = float(run.guard.skipped)
    folder = None
    if cfg.checkpoint.export or int(cfg.sample_every) >= 0:  # every rank: FSDP gathers the weights
        folder = export(run.raw_model, run.ema, run.output_dir / "export" / "last", cfg, run.spec, run.step,
                        accelerator=accelerator)
    if accelerator.is_main_process:
        if folder is not None:
            run.tracker.log_metrics({"export_size_mb": lora.export_size_bytes(folder) / 2**20}, run.step)
            if cfg.logger.get("log_model"):
                log_model(run.tracker, folder, cfg.logger.get("register_model"))
            if int(cfg.sample_every) >= 0:
                log_preview(run, folder)
        if history:
            run.tracker.log_artifact(plot_losses(history, run.output_dir / "loss_curve.png"))
            (run.output_dir / "metrics.json").write_text(json.dumps(
                {"final": final, "history": history, "world_size": run.world,
                 "distributed_type": run.accelerator.distributed_type.value, "rank_checksums": checksums}, indent=1))
    accelerator.wait_for_everyone()
    return final


def train(cfg: DictConfig) -> dict[str, float]:
    """Train for ``cfg.max_steps`` optimizer steps: plan memory, build, resume, loop, finish. Returns the final metrics."""
    from jointdit.resolve_init import prepare_init_from
    from jointdit.safeio import OutputLock, sweep_stale_temps
    from jointdit.schema import validate

    validate(cfg)  # every bad value refused before any work
    init_source = prepare_init_from(cfg)  # stage.init_from=auto / run id -> a folder; none found: refused here
    plan = apply_memory_plan(cfg)  # before anything is built: a plan that cannot fit stops here
    accelerator = make_accelerator(cfg)
    tracker = open_run(cfg, accelerator.is_main_process)  # rank 0 only: named, tagged, system metrics
    if init_source is not None:
        tracker.set_tags(init_source.tags())
    lock = OutputLock(Path(cfg.paths.output_dir)) if accelerator.is_main_process else None
    status = "FAILED"
    try:
        if lock is not None:  # a second live run writing this folder is refused; then a killed writer's temps go
            lock.acquire()
            output_dir = Path(cfg.paths.output_dir)
            sweep_stale_temps(output_dir, output_dir / "checkpoints", output_dir / "export", own_folder=True, log=log.info)
        accelerator.wait_for_everyone()
        run = build(cfg, accelerator, tracker, plan)
        run.guard = guards.NonFiniteGuard(str(cfg.train.nonfinite), int(cfg.train.max_nonfinite),
                                          last_good=lambda: guards.newest_checkpoint(run.checkpoints_root))
        log_setup(run)
        resume(run)
        loop(run)
        metrics = finish(run)
        status = "FINISHED"
        return metrics
    finally:
        tracker.end(status)
        if lock is not None:
            lock.release()
        accelerator.free_memory()
        reset_accelerate()


def preview_sample(cfg: DictConfig, model_folder: Path, out_dir: Path, device: torch.device) -> list[Path]:
    """A joint sample from an exported model folder, through the same code as ``python -m jointdit.sample``."""
    from jointdit.config import CONFIG_DIR
    from jointdit.diffusion.sampler import sample_to_files

    sample_cfg = OmegaConf.load(CONFIG_DIR / "sample.yaml")
    for key in ("defaults", "hydra"):
        sample_cfg.pop(key)
    sample_cfg = OmegaConf.merge(sample_cfg, {
        "checkpoint": str(model_folder), "task": "joint", "steps": int(cfg.sample_steps), "seeds": [int(cfg.seed)],
        "check_memory": False,  # the training plan already holds the preview (memory_terms); RAM it uses is not free
        "out_dir": str(out_dir), "device": device.type, "progress": False,
        "guidance": OmegaConf.to_container(cfg.guidance, resolve=True),
        "vram": OmegaConf.to_container(cfg.vram, resolve=True), "logger": {"name": "none"},
    })
    return [path for result in sample_to_files(sample_cfg) for path in result.files.values()]


def cache_clip_settings(cfg: DictConfig) -> dict | None:
    """The CLIP encoder the latent cache was built with, so the sampler can encode prompts the same way."""
    from jointdit.data.dataset import _built_clip_settings, cache_dir_for

    settings = _built_clip_settings(cache_dir_for(cfg.data, cfg.codec, cfg.paths.cache_dir))
    return {k: settings.get(k) for k in ("model", "pretrained", "model_config")} if settings else None


def export_meta(cfg: DictConfig, spec: LatentSpec, step: int, model_config: Any) -> dict[str, Any]:
    """``jointdit.json`` — the ONE builder of export metadata (full exports, LoRA adapters and their base):
    the LatentSpec the model was trained on, every setting that changes the function the model computes
    (``attention.kv_downsample`` / ``kv_pool_space``, the objective's ``iso_prob`` / ``tasks`` / ``timestep_shift``:
    :meth:`FlowObjective.export_meta`), beside the codec/data/CLIP settings."""
    return {"format": EXPORT_FORMAT, "step": step, "stage": str(cfg.stage.name), "spec": spec.to_json(),
            "attention": {"kv_downsample": int(cfg.vram.kv_downsample), "kv_pool_space": kv_pool_space(cfg)},
            "clip": cache_clip_settings(cfg),
            "codec": OmegaConf.to_container(cfg.codec, resolve=True),
            "data": OmegaConf.to_container(cfg.data, resolve=True),
            **FlowObjective.from_config(cfg.objective, model_config, spec).export_meta()}


def export(model, ema, folder: Path, cfg: DictConfig, spec: LatentSpec, step: int, extra: dict | None = None,
           accelerator=None) -> Path | None:
    """The model folder for sampling (EMA weights when EMA is on) plus ``jointdit.json`` (:func:`export_meta`);
    a LoRA run exports its adapter in PEFT's format instead, naming its base model. With ``accelerator``, every
    rank calls this (FSDP gathers the full weights: :func:`jointdit.checkpoints.export_state_dict`) and only
    the main process writes; the others get None."""
    main = accelerator is None or accelerator.is_main_process
    meta = {**export_meta(cfg, spec, step, model.config), **(extra or {})}
    if lora.has_lora(model):
        return lora.export_adapter(model, ema, folder, None, meta) if main else None
    weights = ckpt.export_state_dict(accelerator, model, ema)
    return ckpt.export_model(model, folder, meta, weights) if main else None
