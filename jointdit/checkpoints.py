"""Checkpoints and exported model folders — every write goes to a temp name and is renamed into place.

- A *checkpoint* is an Accelerate ``save_state`` folder (model, optimizer, scheduler, EMA, RNG) plus
  ``trainer_state.json`` (step, loss history), named ``checkpoints/step_000100``.
- An *exported model folder* is ``save_pretrained`` output (``config.json`` +
  ``diffusion_pytorch_model.safetensors``) plus ``jointdit.json`` (codec and data settings the sampler
  needs). Nothing here unpickles arbitrary objects: weights are safetensors, metadata is JSON.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_PREFIX = "step_"
STATE_FILE = "trainer_state.json"
EXPORT_META = "jointdit.json"
EMA_FILE = "ema.safetensors"


def step_dir(root: Path, step: int) -> Path:
    return root / f"{CHECKPOINT_PREFIX}{step:06d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (temp folders are never listed)."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)))


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished temp folder into place, replacing an older one of the same name."""
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def prune(root: Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints (``keep <= 0`` keeps all), never the newest good one."""
    from jointdit.guards import checkpoint_is_good, checkpoints_to_prune

    for old in checkpoints_to_prune(list_checkpoints(root), keep, checkpoint_is_good):
        shutil.rmtree(old, ignore_errors=True)


def resolve_resume(resume: str | None, checkpoints_root: Path) -> Path | None:
    """``None`` → no resume; ``auto`` → the newest checkpoint in this run (or None); else a path."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(checkpoints_root)
        return found[-1] if found else None
    path = Path(resume).expanduser()
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"checkpoint.resume={resume}: no {STATE_FILE} there; point it at a "
                                f"checkpoints/{CHECKPOINT_PREFIX}NNNNNN folder of an earlier run, or use 'auto'")
    return path


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((path / STATE_FILE).read_text())


def save_training_state(accelerator, root: Path, step: int, history: list[dict], model, ema, keep: int) -> Path:
    """Checkpoint ``root/step_NNNNNN``: Accelerate state (model, optimizer, scheduler, RNG), the EMA weights as
    safetensors and ``trainer_state.json`` (step, loss history, model config, EMA counters) — written into a
    temp folder and renamed, so a crash never leaves a half-written checkpoint. Keeps the newest ``keep``."""
    from jointdit import safeio
    from jointdit.guards import require_finite

    final = step_dir(root, step)
    tmp = root / f".tmp_{final.name}"
    last_good = (list_checkpoints(root) or [None])[-1]
    require_finite(model, f"checkpoint {final}", step, last_good)  # never save NaN/Inf weights (or EMA weights)
    if ema is not None:
        require_finite([(f"ema.shadow.{i}", p) for i, p in enumerate(ema.shadow_params)], f"checkpoint {final}", step,
                       last_good)
    try:
        _write_training_state(accelerator, tmp, final, step, history, model, ema)
    except OSError as err:  # disk full: no temp left, the last good checkpoint untouched
        if accelerator.is_main_process:
            safeio.discard(tmp)
        raise safeio.write_error(err, final) from err
    if accelerator.is_main_process:
        replace_dir(tmp, final)
        prune(root, keep)
    accelerator.wait_for_everyone()
    return final


def _write_training_state(accelerator, tmp: Path, final: Path, step: int, history: list[dict], model, ema) -> None:
    from jointdit import safeio

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
        (tmp / STATE_FILE).write_text(json.dumps(state, default=str))
        safeio.apply_umask(tmp)  # safetensors writes 0600 files


def load_ema(ema, folder: Path, state: dict[str, Any]) -> None:
    """Restore the EMA shadow weights and counter that :func:`save_training_state` wrote."""
    from safetensors.torch import load_file

    shadow = load_file(str(Path(folder) / EMA_FILE))
    if len(shadow) != len(ema.shadow_params):
        raise ValueError(f"{Path(folder) / EMA_FILE} holds {len(shadow)} EMA tensors, this run has {len(ema.shadow_params)}")
    for i, param in enumerate(ema.shadow_params):
        param.data.copy_(shadow[f"shadow.{i}"])
    ema.optimization_step = int(state["ema"]["optimization_step"])


def export_model(model, folder: Path, meta: dict[str, Any]) -> Path:
    """``save_pretrained`` into a temp folder beside ``folder`` plus ``jointdit.json``, then rename."""
    from jointdit import safeio
    from jointdit.guards import require_finite

    require_finite(model, f"export {folder}", meta.get("step"))  # never export NaN/Inf weights
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / EXPORT_META).write_text(json.dumps(meta, indent=2, default=str))
        safeio.apply_umask(tmp)
        replace_dir(tmp, folder)
    except OSError as err:  # disk full: no temp left, the previous export untouched
        safeio.discard(tmp)
        raise safeio.write_error(err, folder) from err
    return folder


def load_export_meta(folder: Path) -> dict[str, Any]:
    meta = Path(folder) / EXPORT_META
    return json.loads(meta.read_text()) if meta.exists() else {}


def load_model(path: str | os.PathLike):
    """A JointDiT from an exported model folder, a LoRA adapter folder (its base, adapter merged), or a
    training checkpoint folder (``model.safetensors`` there, its config from the checkpoint's state file)."""
    from safetensors.torch import load_file

    from jointdit.models import JointDiT

    from jointdit.safeload import verify_checkpoint_folder, verify_model_folder

    path = Path(path).expanduser()
    if (path / "config.json").exists():
        return JointDiT.from_pretrained(verify_model_folder(path))  # complete, safetensors, no pickles
    from jointdit import lora

    if lora.is_adapter_folder(path):  # a LoRA export: its base model with the adapter merged in
        return lora.load_with_adapters(path, merge=True)
    weights = path / "model.safetensors"
    if weights.exists() and (path / STATE_FILE).exists():
        model = JointDiT.from_config(verify_checkpoint_folder(path)["model_config"])
        model.load_state_dict(load_file(str(weights)))
        return model
    raise FileNotFoundError(
        f"{path} is neither an exported model folder (config.json + diffusion_pytorch_model.safetensors) "
        f"nor a training checkpoint (model.safetensors + {STATE_FILE})")


def load_into(model: torch.nn.Module, source: str | os.PathLike) -> None:
    """Copy weights from a model folder or checkpoint into ``model``; refuse any shape mismatch."""
    source_model = load_model(source)
    ours, theirs = model.state_dict(), source_model.state_dict()
    missing = sorted(set(ours) - set(theirs))
    unexpected = sorted(set(theirs) - set(ours))
    mismatched = [f"{k}: checkpoint {tuple(theirs[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in ours.items() if k in theirs and theirs[k].shape != v.shape]
    if missing or unexpected or mismatched:
        lines = [f"the checkpoint {source} does not fit this model:"]
        lines += [f"  shape {m}" for m in mismatched[:10]]
        lines += [f"  missing in checkpoint: {', '.join(missing[:10])}"] if missing else []
        lines += [f"  not in model: {', '.join(unexpected[:10])}"] if unexpected else []
        lines.append("use the same model preset, codec and data shapes as the Stage A run")
        raise ValueError("\n".join(lines))
    model.load_state_dict(theirs)


def select_parameters(model: torch.nn.Module, groups: dict[str, list[str]]) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """Assign each parameter to the first group whose glob patterns match its name."""
    selected: dict[str, list[tuple[str, torch.nn.Parameter]]] = {name: [] for name in groups}
    for param_name, param in model.named_parameters():
        for group, patterns in groups.items():
            if any(fnmatch.fnmatchcase(param_name, pattern) for pattern in patterns):
                selected[group].append((param_name, param))
                break
    empty = [group for group, params in selected.items() if not params]
    if empty:
        raise ValueError(f"parameter group(s) {empty} match no parameter; check the glob patterns in stage.trainable "
                         f"(names look like {next(iter(dict(model.named_parameters())))!r})")
    return selected
