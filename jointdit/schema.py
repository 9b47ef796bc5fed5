"""Config validation up front: every bad value is refused before any data, model or output work starts.

``validate(cfg, num_processes)`` checks a composed ``train``, ``cache`` or ``sample`` config (which one
is read from ``task_name``) against the rules below and raises ONE :class:`~jointdit.errors.ConfigError`
listing every problem, each naming its key, the bad value and a valid one. Types are checked the way
the code later converts them (``int(cfg.max_steps)``), so a value that would crash or be silently
coerced deep inside training is refused here instead:

- numbers: ``max_steps=abc``, ``batch_size=0``, a negative or zero learning rate, probabilities
  outside [0, 1], ``ema.decay`` outside [0, 1);
- choices: ``optim.schedule``, ``train.nonfinite``, ``vram.mixed_precision``, sample ``task``, ...;
- training tasks: unknown names, negative values, probabilities whose sum is not 1;
- ``batch_size`` must be a multiple of ``micro_batch × processes`` (the accumulation steps are
  ``batch_size / (micro_batch × processes)``; today's code would silently round) — the error gives the
  nearest valid batch sizes;
- ``vram.budget_gb`` on ``vram=cpu``/``vram=auto``: honoured (see :func:`budget_bytes`) unless it is
  more than this machine has, which is refused with the detected amount;
- folders: ``data.root`` of a real data set must exist (cache) or its latent cache must (train);
  ``checkpoint=`` of the sampler must be an existing folder.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from jointdit.errors import ConfigError, DataError, describe

def training_tasks() -> tuple[str, ...]:
    from jointdit.diffusion.flow import TASKS
    from jointdit.diffusion.masks import MASK_TASKS

    return tuple(TASKS) + MASK_TASKS
_MISSING = object()
_RUN_ID = re.compile(r"^(?:runs:/)?[0-9a-f]{32}/?$")  # an MLflow run id may name a model too


class _Problems:
    """Collects ``key=value: what is wrong (how to fix)`` lines; raises them together."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, key: str, value: Any, problem: str, fix: str) -> None:
        shown = "(not set)" if value is _MISSING else describe(value)
        self.lines.append(f"{key}={shown}: {problem}; {fix}")

    def raise_if_any(self, what: str) -> None:
        if self.lines:
            head = f"invalid {what} config" if len(self.lines) > 1 else f"invalid {what} config: {self.lines[0]}"
            body = "" if len(self.lines) == 1 else "\n" + "\n".join(f"  - {line}" for line in self.lines)
            raise ConfigError(head + body, hint="fix the value(s) on the command line (key=value) or in conf/; "
                                                "`--cfg job` prints the composed config")


def _get(cfg: DictConfig, key: str) -> Any:
    """The resolved value at ``key``, ``_MISSING`` for an absent key or a ``???``."""
    try:
        value = OmegaConf.select(cfg, key, default=_MISSING, throw_on_missing=True)
    except Exception:  # noqa: BLE001 - MissingMandatoryValue, interpolation failures
        return _MISSING
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _bounds(low: float | None, high: float | None, low_open: bool, high_open: bool) -> tuple[Callable[[float], bool], str]:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '≥'} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '≤'} {high:g}")

    def ok(x: float) -> bool:
        if low is not None and (x <= low if low_open else x < low):
            return False
        if high is not None and (x >= high if high_open else x > high):
            return False
        return True

    return ok, " and ".join(parts)


def _check_number(p: _Problems, cfg: DictConfig, key: str, parse: Callable[[Any], float | int | None], kind: str,
                  bounds: tuple[Callable[[float], bool], str], example: str, optional: bool) -> float | int | None:
    value = _get(cfg, key)
    if optional and value in (None, _MISSING):
        return None
    number = parse(value)
    ok, rule = bounds
    eg = f", e.g. {key}={example}" if example else ""
    if number is None:
        p.add(key, value, f"not a {kind}", f"set a {kind}{' ' + rule if rule else ''}{eg}")
    elif not ok(number):
        p.add(key, value, f"must be {rule}", f"set {key} {rule}{eg}")
    else:
        return number
    return None


def check_int(p: _Problems, cfg: DictConfig, key: str, low: int | None = None, high: int | None = None,
              example: int | None = None, optional: bool = False) -> int | None:
    return _check_number(p, cfg, key, _as_int, "whole number", _bounds(low, high, False, False),
                         "" if example is None else str(example), optional)


def check_float(p: _Problems, cfg: DictConfig, key: str, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False, example: float | None = None,
                optional: bool = False) -> float | None:
    return _check_number(p, cfg, key, _as_float, "finite number", _bounds(low, high, low_open, high_open),
                         "" if example is None else f"{example:g}", optional)


def check_choice(p: _Problems, cfg: DictConfig, key: str, choices: tuple[str, ...], optional: bool = False) -> str | None:
    value = _get(cfg, key)
    if optional and value in (None, _MISSING):
        return None
    if value is False and "no" in choices:  # YAML 1.1 reads a bare `no` as false
        return "no"
    if not isinstance(value, str) or value not in choices:
        p.add(key, value, "unknown choice", f"choose one of {', '.join(choices)}")
        return None
    return value


def check_bool(p: _Problems, cfg: DictConfig, key: str) -> None:
    value = _get(cfg, key)
    if not isinstance(value, bool):
        p.add(key, value, "not true/false", f"set {key}=true or {key}=false")


# ----------------------------------------------------------------------------------------------
# Pieces shared by the checks
# ----------------------------------------------------------------------------------------------


def nearest_multiples(value: int, unit: int) -> list[int]:
    """The multiples of ``unit`` nearest to ``value`` (one below, one above; never 0)."""
    below = (value // unit) * unit
    return [m for m in (below, below + unit) if m > 0]


def effective_micro_batch(cfg: DictConfig) -> int | None:
    """The micro-batch the trainer uses: ``vram.micro_batch_size``, never above ``batch_size``."""
    micro, batch = _as_int(_get(cfg, "vram.micro_batch_size")), _as_int(_get(cfg, "batch_size"))
    if micro is None or batch is None:
        return None
    return min(micro, batch)


def check_batch_divisible(cfg: DictConfig, num_processes: int, micro: int | None = None) -> None:
    """``batch_size`` must equal ``micro × processes × accumulation`` for a whole ``accumulation ≥ 1``.

    Call again after ``vram=auto`` has chosen ``micro_batch_size`` (pass it as ``micro``).
    """
    batch = _as_int(_get(cfg, "batch_size"))
    micro = micro if micro is not None else effective_micro_batch(cfg)
    if batch is None or micro is None or batch <= 0 or micro <= 0:
        return
    unit = micro * max(1, int(num_processes))
    if batch % unit:
        valid = " or ".join(f"batch_size={m}" for m in nearest_multiples(batch, unit))
        divisors = [d for d in range(1, batch + 1) if batch % (d * num_processes) == 0 and d <= micro]
        alt = (f", or vram.micro_batch_size={max(divisors)} to keep batch_size={batch}" if divisors else "")
        raise ConfigError(
            f"batch_size={batch} is not a multiple of vram.micro_batch_size ({micro}) x {num_processes} "
            f"process(es) = {unit}: each optimizer step takes batch_size / {unit} whole micro-batches",
            hint=f"use {valid}{alt}")


def detected_memory_bytes(device_type: str) -> int:
    from jointdit.memory import detect_budget

    return int(detect_budget(device_type))


def budget_bytes(cfg: DictConfig) -> int | None:
    """The user's ``vram.budget_gb`` in bytes, to honour on ``vram=cpu``/``vram=auto`` (None = detect)."""
    value = _as_float(_get(cfg, "vram.budget_gb"))
    name = _get(cfg, "vram.name")
    if value is None or name not in ("cpu", "auto"):
        return None  # fixed GPU profiles: memory.resolve_vram uses budget_gb on CUDA (the RAM on a CPU)
    return int(value * 1024**3)


def _device_type() -> str:
    from jointdit.config import resolve_device

    return resolve_device().type


def check_budget(p: _Problems, cfg: DictConfig) -> None:
    """``vram.budget_gb`` must be positive, and on cpu/auto no more than this machine has (10 % slack)."""
    value = _get(cfg, "vram.budget_gb")
    if value in (None, _MISSING):
        return
    number = check_float(p, cfg, "vram.budget_gb", low=0, low_open=True, example=24)
    if number is None:
        return
    device = _device_type()
    if _get(cfg, "vram.name") in ("cpu", "auto"):  # a GPU profile's budget is the card's, not this machine's
        have = detected_memory_bytes(device)
        if number * 1024**3 > have * 1.1:
            what = "GPU memory" if device == "cuda" else "available RAM"
            p.add("vram.budget_gb", value, f"more than this machine's {have / 1024**3:.1f} GiB of {what} "
                  f"({device}); the plan would not fit", "lower it, or set vram.budget_gb=null to detect it")


def check_tasks(p: _Problems, cfg: DictConfig) -> None:
    TASKS = training_tasks()
    tasks = _get(cfg, "objective.tasks")
    if not isinstance(tasks, dict) or not tasks:
        p.add("objective.tasks", tasks, "must map task names to probabilities",
              f"e.g. objective.tasks={{joint:1.0}}; tasks: {', '.join(TASKS)}")
        return
    unknown = sorted(set(map(str, tasks)) - set(TASKS))
    if unknown:
        p.add(f"objective.tasks.{unknown[0]}", tasks[unknown[0]], f"unknown training task(s) {unknown}",
              f"choose from {', '.join(TASKS)}")
    numbers = {}
    for name, value in tasks.items():
        number = _as_float(value)
        if number is None or number < 0 or number > 1:
            p.add(f"objective.tasks.{name}", value, "not a probability in [0, 1]", "set a number between 0 and 1")
        else:
            numbers[name] = number
    if len(numbers) == len(tasks) and not unknown:
        total = sum(numbers.values())
        if abs(total - 1.0) > 1e-3:
            shown = ", ".join(f"{k}={v:g}" for k, v in numbers.items())
            p.add("objective.tasks", shown, f"the probabilities sum to {total:g}, not 1",
                  "change them so they add up to 1 (set an unused task to 0)")


def check_data_config(p: _Problems, cfg: DictConfig) -> None:
    """The data source is known, and a real data set names its ``data.root``."""
    name = _get(cfg, "data.name")
    if name == "synthetic":
        check_int(p, cfg, "data.num_clips", low=1, example=64)
    elif name not in ("folder", "avsync15"):
        p.add("data", name, "unknown data source", "choose data=synthetic, data=folder or data=avsync15")
    elif _get(cfg, "data.root") in (None, _MISSING, ""):
        p.add("data.root", _MISSING, f"data={name} needs the folder that holds videos/<class>/<file>.mp4",
              "set data.root=/path/to/folder")


def check_data_folder(cfg: DictConfig, need_raw: bool) -> None:
    """A real data set's ``data.root`` exists — or, for training (``need_raw=False``), its latent cache does."""
    if _get(cfg, "data.name") not in ("folder", "avsync15"):
        return
    root = _get(cfg, "data.root")
    if root in (None, _MISSING, "") or Path(str(root)).expanduser().is_dir():
        return
    if not need_raw:
        from jointdit.data.cache import cache_dir_for

        try:
            cache = cache_dir_for(cfg.data, cfg.codec, cfg.paths.cache_dir)
        except Exception:  # noqa: BLE001 - a config too broken to name the cache: the folder check stands
            cache = None
        if cache is not None and cache.is_dir():
            return  # training reads only the latent cache; the raw clips are not needed
    videos = _get(cfg, "data.videos_dir") or "videos"
    raise DataError(f"data folder {root} (data.root) does not exist",
                    hint=f"point data.root at the folder holding {videos}/<class>/<file>.mp4 and its list files "
                         f"(for data=avsync15, unpack AVSync15 there)")


# ----------------------------------------------------------------------------------------------
# Per primary config
# ----------------------------------------------------------------------------------------------


def _validate_vram(p: _Problems, cfg: DictConfig) -> None:
    check_int(p, cfg, "vram.micro_batch_size", low=1, example=2)
    check_int(p, cfg, "vram.max_t", low=0, example=0)
    check_int(p, cfg, "vram.q_chunk_v", low=0, example=0)
    check_int(p, cfg, "vram.q_chunk_a", low=0, example=0)
    check_int(p, cfg, "vram.kv_downsample", low=1, example=1)
    check_int(p, cfg, "vram.kv_pool_space", low=1, example=1, optional=True)
    check_choice(p, cfg, "vram.mixed_precision", ("no", "fp16", "bf16"))
    check_float(p, cfg, "vram.margin", low=0, high=1, high_open=True, example=0.1, optional=True)
    check_int(p, cfg, "vram.checkpoint_blocks", low=0, example=4, optional=True)
    if _get(cfg, "vram.offload_activations") not in (None, _MISSING):
        check_bool(p, cfg, "vram.offload_activations")
    quantize = check_choice(p, cfg, "vram.quantize_frozen", ("int8",), optional=True)
    if quantize and not _lora_enabled(cfg):
        p.add("vram.quantize_frozen", quantize, "int8 frozen weights are supported with LoRA only (a Stage B export "
              "and resume of quantized weights are untested)", "add stage.lora.rank=16 (or stage=lora), or set "
              "vram.quantize_frozen=null")
    check_budget(p, cfg)


def _lora_enabled(cfg: DictConfig) -> bool:
    from jointdit.lora import lora_enabled

    return bool(lora_enabled(_get(cfg, "stage.lora") if _get(cfg, "stage.lora") is not _MISSING else None))


def validate_train(cfg: DictConfig, num_processes: int = 1) -> None:
    p = _Problems()
    check_int(p, cfg, "max_steps", low=1, example=300)
    check_int(p, cfg, "batch_size", low=1, example=8)
    check_int(p, cfg, "num_workers", low=0, example=0)
    check_int(p, cfg, "seed", example=0)
    check_float(p, cfg, "optim.lr", low=0, low_open=True, example=3e-4)
    check_float(p, cfg, "optim.weight_decay", low=0, example=0.0)
    check_int(p, cfg, "optim.warmup_steps", low=0, example=20)
    check_choice(p, cfg, "optim.schedule", ("cosine", "constant"))
    check_float(p, cfg, "optim.grad_clip", low=0, example=1.0)
    betas = _get(cfg, "optim.betas")
    if not (isinstance(betas, list) and len(betas) == 2 and all(_as_float(b) is not None and 0 <= float(b) < 1
                                                                for b in betas)):
        p.add("optim.betas", betas, "must be two numbers in [0, 1)", "e.g. optim.betas=[0.9,0.99]")
    check_float(p, cfg, "objective.logit_normal_mean", example=0.0)
    check_float(p, cfg, "objective.logit_normal_std", low=0, low_open=True, example=1.0)
    check_float(p, cfg, "objective.drop_text", low=0, high=1, example=0.1)
    check_float(p, cfg, "objective.drop_image", low=0, high=1, example=0.1)
    check_float(p, cfg, "objective.loss_weight_video", low=0, example=1.0)
    check_float(p, cfg, "objective.loss_weight_audio", low=0, example=1.0)
    check_tasks(p, cfg)
    if _get(cfg, "ema.enabled") is not False:
        check_float(p, cfg, "ema.decay", low=0, high=1, high_open=True, example=0.999)
    check_int(p, cfg, "checkpoint.every", low=1, example=100)
    check_int(p, cfg, "checkpoint.keep", low=0, example=3)
    check_int(p, cfg, "log_every", low=1, example=10)
    check_int(p, cfg, "sample_every", low=-1, example=0)
    check_int(p, cfg, "sample_steps", low=1, example=20)
    if _get(cfg, "train") is not _MISSING:
        check_choice(p, cfg, "train.nonfinite", ("skip", "stop"))
        check_int(p, cfg, "train.max_nonfinite", low=1, example=5)
    trainable = _get(cfg, "stage.trainable")
    if isinstance(trainable, dict):  # empty for stage=lora: the adapters train
        for group in trainable:
            check_float(p, cfg, f"stage.trainable.{group}.lr", low=0, low_open=True, example=3e-4)
    _validate_vram(p, cfg)
    check_data_config(p, cfg)
    p.raise_if_any("train")
    check_batch_divisible(cfg, num_processes)
    check_data_folder(cfg, need_raw=False)


def validate_cache(cfg: DictConfig) -> None:
    p = _Problems()
    check_choice(p, cfg, "split", ("train", "val", "all"))
    check_int(p, cfg, "shard_size", low=1, example=64)
    check_int(p, cfg, "batch_size", low=1, example=4)
    check_int(p, cfg, "read_workers", low=0, example=2)
    check_choice(p, cfg, "device", ("auto", "cpu", "cuda"))
    check_bool(p, cfg, "overwrite")
    if _get(cfg, "clip.enabled") is True:
        check_float(p, cfg, "clip.threshold", low=-1, high=1, example=0.2, optional=True)
    check_data_config(p, cfg)
    p.raise_if_any("cache")
    check_data_folder(cfg, need_raw=True)


def validate_sample(cfg: DictConfig) -> None:
    p = _Problems()
    checkpoint = _get(cfg, "checkpoint")
    if checkpoint in (_MISSING, None, ""):
        p.add("checkpoint", _MISSING, "the sampler needs a model", "set checkpoint=<run>/export/last (an exported "
              "model folder) or a checkpoints/step_NNNNNN folder")
    elif not Path(str(checkpoint)).expanduser().is_dir() and not _RUN_ID.match(str(checkpoint)):
        p.add("checkpoint", checkpoint, "no such folder", "point it at <run>/export/last or <run>/export/best")
    if not isinstance(_get(cfg, "task"), str):  # the sampler knows its task names; here only the type
        p.add("task", _get(cfg, "task"), "must be a task name", "e.g. task=joint")
    check_int(p, cfg, "steps", low=1, example=30)
    seeds = _get(cfg, "seeds")
    seed_list = seeds if isinstance(seeds, list) else [seeds]
    if not seed_list or any(_as_int(s) is None for s in seed_list):
        p.add("seeds", seeds, "must be whole numbers", "e.g. seeds=[0,1]")
    check_choice(p, cfg, "device", ("auto", "cpu", "cuda"), optional=True)
    for key in ("w_v", "w_a", "w_txt", "w_neg", "w_img"):
        if _get(cfg, f"guidance.{key}") is not _MISSING:
            check_float(p, cfg, f"guidance.{key}", example=1.0)
    for key in ("schedule.shift_video", "schedule.shift_audio"):
        if _get(cfg, key) is not _MISSING:
            check_float(p, cfg, key, low=0, low_open=True, example=1.0, optional=True)
    p.raise_if_any("sample")


def validate(cfg: DictConfig, num_processes: int | None = None) -> None:
    """Check the composed config of ``task_name`` (train, cache, sample); raise one ``ConfigError`` or
    ``DataError`` naming every bad key. Does no data, model or output work."""
    task = str(_get(cfg, "task_name"))
    processes = int(num_processes if num_processes is not None else world_size())
    if task == "cache":
        validate_cache(cfg)
    elif task == "sample":
        validate_sample(cfg)
    else:
        validate_train(cfg, processes)


def world_size() -> int:
    """Processes of this launch (``accelerate launch`` / ``torchrun`` set ``WORLD_SIZE``), before Accelerate starts."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1
