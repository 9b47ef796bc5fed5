"""Checkpoints and exported model folders — every write goes to a temp name and is renamed into place.

- A *checkpoint* is an Accelerate ``save_state`` folder (model, optimizer, scheduler, EMA, RNG) plus
  ``trainer_state.json`` (step, loss history), named ``checkpoints/step_000100``.
- An *exported model folder* is what ``save_pretrained`` writes (``config.json`` +
  ``diffusion_pytorch_model.safetensors``) plus ``jointdit.json`` (codec and data settings the sampler
  needs). Nothing here unpickles arbitrary objects: weights are safetensors, metadata is JSON.

Sharded training (Accelerate FSDP, ``conf/accelerate/fsdp.yaml``; FSDP2: every parameter a ``DTensor``
split over the ranks). The weights that are written are always FULL tensors, so an FSDP export or
checkpoint loads exactly like a DDP one (:func:`load_model`, no FSDP needed). Gathering them is a
collective: :func:`export_state_dict`, :func:`save_training_state`, :func:`load_training_state` and
:func:`load_ema` must be called on EVERY rank; only rank 0 writes. The EMA shadow weights are sharded like
the parameters they follow (the EMA must be built from the prepared model's parameters) and are
gathered/split the same way.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from jointdit.safeload import CHECKPOINT_WEIGHTS, MODEL_WEIGHTS  # save_pretrained's and Accelerate's weight names

CHECKPOINT_PREFIX = "step_"
STATE_FILE = "trainer_state.json"
EXPORT_META = "jointdit.json"
EMA_FILE = "ema.safetensors"


# ----------------------------------------------------------------------------------------------
# Full tensors from sharded training (FSDP2)
# ----------------------------------------------------------------------------------------------


def sharded(accelerator) -> bool:
    """Whether the prepared model's parameters are split over the processes (Accelerate FSDP)."""
    from accelerate.utils import DistributedType

    return accelerator is not None and accelerator.distributed_type == DistributedType.FSDP


def cpu_fsdp_plugin():
    """The FSDP plugin of the ``accelerate launch`` recipe (its ``FSDP_*`` variables) when the recipe asks for
    FSDP, else None. For CPU processes only, with :func:`fsdp_on_cpu`: on GPUs Accelerate reads it itself."""
    import os

    from accelerate.utils import FullyShardedDataParallelPlugin

    wanted = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    return FullyShardedDataParallelPlugin() if wanted else None


def fsdp_on_cpu(accelerator, plugin) -> None:
    """Switch FSDP on for a CPU (gloo) process group.

    Accelerate 1.16 enables FSDP only for GPU/XPU/NPU/... groups (``AcceleratorState.__init__`` lists
    ``MULTI_GPU`` ... but not ``MULTI_CPU``): with ``cpu=True`` the recipe's plugin is dropped and the model
    silently gets DDP. After this, Accelerate's own FSDP2 code runs over gloo (``fully_shard`` per block,
    ``get_state_dict``, ``save_state``/``load_state``, ``clip_grad_norm_``), so FSDP is testable on CPUs."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    # Both shared states: AcceleratorState re-reads PartialState's distributed type whenever it is built again.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin


def require_supported_sharding(accelerator) -> None:
    """Refuse FSDP1: its flattened parameter shards cannot carry the EMA shadow weights; FSDP2 keeps one
    sharded tensor per parameter (and lets Stage B freeze part of a block)."""
    if sharded(accelerator) and not accelerator.is_fsdp2:
        raise ValueError("FSDP version 1 is not supported (the EMA weights and exports need per-parameter shards); "
                         "set fsdp_config.fsdp_version: 2 in the accelerate config, as conf/accelerate/fsdp.yaml does")


def is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on CPU: a DTensor shard is all-gathered (a collective: every rank calls it)."""
    return (tensor.full_tensor() if is_dtensor(tensor) else tensor).detach().cpu()


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor (a DTensor's local shard; a plain tensor itself)."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def load_full_into(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full tensor into ``target``; a DTensor target takes its own shard of it (every rank calls this)."""
    from torch.distributed.tensor import distribute_tensor

    with torch.no_grad():
        if is_dtensor(target):
            target.copy_(distribute_tensor(full.to(target.device, target.dtype), target.device_mesh, target.placements))
        else:
            target.copy_(full)


def full_state_dict(accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights as full CPU tensors, keyed like the bare module's ``state_dict``.

    Sharded: ``accelerator.get_state_dict`` (FSDP2: ``get_model_state_dict(full_state_dict=True)``), a
    collective that every rank must enter; rank 0 gets the weights. Unsharded: the main process clones its
    copy (a clone, so a later in-place change such as an EMA restore cannot alter it); other ranks get ``{}``.
    """
    if sharded(accelerator):
        return {k: v.detach().cpu().contiguous() for k, v in accelerator.get_state_dict(model).items()}
    if accelerator is not None and not accelerator.is_main_process:
        return {}
    bare = accelerator.unwrap_model(model) if accelerator is not None else model
    return {k: v.detach().cpu().clone().contiguous() for k, v in bare.state_dict().items()}


def trainable_parameters(accelerator, model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters that train, as the EMA follows them: sharded ones as their DTensor shards.

    FSDP2 leaves the root module's parameters gathered (plain tensors) after a forward that no backward
    follows — a validation pass — so they are resharded first; otherwise an EMA swap would mix the two."""
    bare = accelerator.unwrap_model(model) if accelerator is not None else model
    if sharded(accelerator):
        from torch.distributed.fsdp import FSDPModule

        for module in bare.modules():
            if isinstance(module, FSDPModule):
                module.reshard()
    return [p for p in bare.parameters() if p.requires_grad]


def export_state_dict(accelerator, model: torch.nn.Module, ema=None) -> dict[str, torch.Tensor]:
    """The weights an export writes: for each trainable parameter its EMA weight when ``ema`` is given
    (diffusers ``EMAModel`` over :func:`trainable_parameters`, in order), every other tensor as it is; full
    size (:func:`full_state_dict`). The live weights are restored afterwards. Every rank must call it."""
    trainable = trainable_parameters(accelerator, model)
    if ema is not None:
        ema.store(trainable)
        ema.copy_to(trainable)
    try:
        return full_state_dict(accelerator, model)
    finally:
        if ema is not None:
            ema.restore(trainable)


def require_finite_everywhere(accelerator, tensors: list[tuple[str, torch.Tensor]], what: str, step: int | None,
                              last_good: Path | None) -> None:
    """:func:`jointdit.guards.require_finite` over every rank's shards: when one rank's shard holds NaN/Inf,
    every rank raises (one rank stopping alone would leave the others waiting in the next collective)."""
    from jointdit.guards import nonfinite_tensors, require_finite

    local = [(name, local_tensor(t)) for name, t in tensors]
    if not sharded(accelerator):
        return require_finite(local, what, step, last_good)
    from accelerate.utils import gather_object

    bad = sorted({name for names in gather_object([nonfinite_tensors(local)]) for name in names})
    require_finite([(name, torch.full((), float("nan"))) for name in bad], what, step, last_good)  # names any rank found


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
    temp folder and renamed, so a crash never leaves a half-written checkpoint. Keeps the newest ``keep``.
    Sharded (FSDP): Accelerate writes its own full-state files, and ``model.safetensors`` is written from the
    gathered weights so the checkpoint verifies and loads like an unsharded one. Every rank calls this."""
    from jointdit import safeio

    final = step_dir(root, step)
    tmp = root / f".tmp_{final.name}"
    last_good = (list_checkpoints(root) or [None])[-1]
    tensors = list(model.state_dict().items())  # never save NaN/Inf weights (or EMA weights)
    if ema is not None:
        tensors += [(f"ema.shadow.{i}", p) for i, p in enumerate(ema.shadow_params)]
    require_finite_everywhere(accelerator, tensors, f"checkpoint {final}", step, last_good)
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
    from safetensors.torch import save_file

    accelerator.save_state(str(tmp), safe_serialization=True)
    weights = full_state_dict(accelerator, model) if sharded(accelerator) else None  # collectives: every rank
    shadow = [full_tensor(p).contiguous() for p in ema.shadow_params] if ema is not None else []
    if accelerator.is_main_process:
        state = {"step": step, "history": history, "model_config": dict(model.config)}
        if weights is not None:
            save_file(weights, str(tmp / CHECKPOINT_WEIGHTS), metadata={"format": "pt"})
        if ema is not None:
            save_file({f"shadow.{i}": p for i, p in enumerate(shadow)}, str(tmp / EMA_FILE))
            state["ema"] = {"optimization_step": int(ema.optimization_step), "decay": float(ema.decay)}
        (tmp / STATE_FILE).write_text(json.dumps(state, default=str))
        safeio.apply_umask(tmp)  # safetensors writes 0600 files


def load_training_state(accelerator, folder: Path) -> None:
    """``accelerator.load_state(folder)`` (model, optimizer, LR schedule, RNG); every rank calls it.

    Sharded (FSDP2), Accelerate loads the optimizer with torch's strict ``set_optimizer_state_dict``, which
    refuses a checkpoint lacking state for a parameter that requires grad — and a parameter that never got a
    gradient has none (the condition projections of a run without CLIP features). So there the optimizers are
    loaded here, non-strictly, from the same full-state files Accelerate wrote (weights-only loads), and
    Accelerate loads everything else."""
    if not sharded(accelerator):
        accelerator.load_state(str(folder))
        return
    from accelerate.utils.constants import OPTIMIZER_NAME
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    from jointdit.safeload import safe_torch_load

    optimizers, accelerator._optimizers = accelerator._optimizers, []  # what load_state iterates over
    try:
        accelerator.load_state(str(folder))
    finally:
        accelerator._optimizers = optimizers
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    for index, (optimizer, model) in enumerate(zip(optimizers, accelerator._models)):
        name = f"{OPTIMIZER_NAME}.bin" if index == 0 else f"{OPTIMIZER_NAME}_{index}.bin"
        state = safe_torch_load(Path(folder) / name) if accelerator.is_main_process else None  # rank 0 broadcasts
        set_optimizer_state_dict(model, optimizer.optimizer, state, options=options)
    accelerator.wait_for_everyone()


def load_ema(ema, folder: Path, state: dict[str, Any]) -> None:
    """Restore the EMA shadow weights and counter that :func:`save_training_state` wrote (full tensors; a
    sharded shadow takes its own shard, so every rank calls this)."""
    from safetensors.torch import load_file

    shadow = load_file(str(Path(folder) / EMA_FILE))
    if len(shadow) != len(ema.shadow_params):
        raise ValueError(f"{Path(folder) / EMA_FILE} holds {len(shadow)} EMA tensors, this run has {len(ema.shadow_params)}")
    for i, param in enumerate(ema.shadow_params):
        load_full_into(param, shadow[f"shadow.{i}"])
    ema.optimization_step = int(state["ema"]["optimization_step"])


def _save_config(model, folder: Path) -> None:
    """``model.save_config(folder)``, naming the model's own class: FSDP2 turns ``JointDiT`` into a subclass
    ``FSDPJointDiT``, whose name diffusers would otherwise write as ``_class_name``."""
    from torch.distributed.fsdp import FSDPModule

    config = json.loads(model.to_json_string())
    config["_class_name"] = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule)).__name__
    (folder / model.config_name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def export_model(model, folder: Path, meta: dict[str, Any], state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """The model folder ``save_pretrained`` would write — ``config.json`` (``model.save_config``) and
    ``diffusion_pytorch_model.safetensors`` — plus ``jointdit.json``, in a temp folder beside ``folder``, then
    renamed. ``state_dict``: the full weights to write (:func:`export_state_dict`: EMA weights, gathered from
    FSDP shards); default: the model's own. One writer for every launch, so all exports load alike."""
    from safetensors.torch import save_file

    from jointdit import safeio
    from jointdit.guards import require_finite

    if state_dict is None:
        state_dict = full_state_dict(None, model)
    require_finite(state_dict, f"export {folder}", meta.get("step"))  # never export NaN/Inf weights
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        _save_config(model, tmp)
        save_file(state_dict, str(tmp / MODEL_WEIGHTS), metadata={"format": "pt"})  # save_pretrained's metadata
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
    weights = path / CHECKPOINT_WEIGHTS
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
