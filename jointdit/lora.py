"""LoRA fine-tuning of JointDiT through PEFT: glob-chosen targets, per-group rank/alpha/dropout,
adapters saved in PEFT's on-disk format, loaded with a scale each, or merged.

A LoRA adapter replaces a frozen linear ``y = W·x + b`` by

    y = W·x + b + s · (α / r) · B·A·dropout(x)        A ∈ R^{r×d_in}, B ∈ R^{d_out×r}, B = 0 at init

so an untrained adapter leaves the model's function unchanged; ``s`` is the per-adapter scale chosen
at load time (1 = as trained). Merging adds ``s·(α/r)·B·A`` into ``W`` (the same function, no extra
cost at inference).

Targets are named by *groups* of glob patterns over JointDiT module names (``fnmatch``: ``*`` also
matches dots), each with its own rank, alpha and dropout (``null`` = the adapter's defaults):

================  =============================================  ======================
group             default patterns                               what it adapts
================  =============================================  ======================
``video_attn``    ``blocks.*.video.qkv``, ``blocks.*.video.proj``  video expert attention
``audio_attn``    ``blocks.*.audio.qkv``, ``blocks.*.audio.proj``  audio expert attention
``joint_attn``    ``blocks.*.context.kv``                         context keys/values of the joint attention
``video_ff``      ``blocks.*.video.mlp.fc*``                      video feed-forward
``audio_ff``      ``blocks.*.audio.mlp.fc*``                      audio feed-forward
================  =============================================  ======================

On disk an adapter folder holds exactly what ``peft.PeftModel.save_pretrained`` writes
(``adapter_config.json`` + ``adapter_model.safetensors``, keys ``base_model.model.<module>.lora_A.weight``),
so ``PeftModel.from_pretrained(base, folder)`` loads it, plus ``jointdit_adapter.json``: the base
model's reference (a model folder, relative paths resolved against the adapter folder) and the groups.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import logging
import os
import re
import shutil
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from jointdit.config import to_plain

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_META = "jointdit_adapter.json"
PEFT_PREFIX = "base_model.model."  # PeftModel's key prefix in adapter_model.safetensors
DEFAULT_ADAPTER = "default"

DEFAULT_GROUPS: dict[str, list[str]] = {
    "video_attn": ["blocks.*.video.qkv", "blocks.*.video.proj"],
    "audio_attn": ["blocks.*.audio.qkv", "blocks.*.audio.proj"],
    "joint_attn": ["blocks.*.context.kv"],
    "video_ff": ["blocks.*.video.mlp.fc1", "blocks.*.video.mlp.fc2"],
    "audio_ff": ["blocks.*.audio.mlp.fc1", "blocks.*.audio.mlp.fc2"],
}


def _peft():
    """Import peft quietly (bitsandbytes, when installed, warns about 4-bit CPU kernels we never use)."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import peft

    return peft


# --------------------------------------------------------------------------------------------------
# Groups and targets
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoraGroup:
    """One target group: module-name globs and the adapter hyper-parameters of its modules."""

    name: str
    patterns: tuple[str, ...]
    rank: int
    alpha: float
    dropout: float


def lora_enabled(lora_cfg: Mapping[str, Any] | None) -> bool:
    """LoRA is on when the stage has a ``lora`` block with ``rank > 0``."""
    lora_cfg = to_plain(lora_cfg)
    return bool(lora_cfg) and int(lora_cfg.get("rank") or 0) > 0


def groups_from_config(lora_cfg: Mapping[str, Any]) -> list[LoraGroup]:
    """``stage.lora`` → the enabled groups.

    ``targets`` lists the group names to adapt (default: every group in ``groups``); a group's
    ``patterns`` default to :data:`DEFAULT_GROUPS`; its ``rank``/``alpha``/``dropout`` default to the
    block's top-level values, and ``alpha`` to the rank (scale α/r = 1).
    """
    lora_cfg = dict(to_plain(lora_cfg) or {})
    rank = int(lora_cfg.get("rank") or 0)
    if rank <= 0:
        raise ValueError("stage.lora.rank must be > 0 to use LoRA (0 turns it off)")
    alpha = lora_cfg.get("alpha")
    dropout = float(lora_cfg.get("dropout") or 0.0)
    defined = {name: {"patterns": patterns} for name, patterns in DEFAULT_GROUPS.items()}
    for name, spec in (lora_cfg.get("groups") or {}).items():
        defined[name] = {**defined.get(name, {}), **{k: v for k, v in (spec or {}).items() if v is not None}}
    targets = lora_cfg.get("targets") or list(defined)
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in defined]
    if unknown:
        raise ValueError(f"stage.lora.targets names unknown group(s) {unknown}; defined groups: {sorted(defined)} "
                         f"(add one under stage.lora.groups.<name>.patterns)")
    groups = []
    for name in targets:
        spec = defined[name]
        if not spec.get("patterns"):
            raise ValueError(f"stage.lora.groups.{name} has no patterns")
        g_rank = int(spec.get("rank") or rank)
        g_alpha = spec.get("alpha", alpha)
        groups.append(LoraGroup(name, tuple(spec["patterns"]), g_rank,
                                float(g_rank if g_alpha is None else g_alpha), float(spec.get("dropout", dropout))))
    return groups


def resolve_targets(model: nn.Module, groups: Sequence[LoraGroup]) -> dict[str, LoraGroup]:
    """Module name → group, for every ``nn.Linear`` whose name a group's glob matches (first group wins).

    A group that matches no linear layer is an error naming the module names it could have matched.
    """
    chosen: dict[str, LoraGroup] = {}
    hits = {g.name: 0 for g in groups}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        for group in groups:
            if any(fnmatch.fnmatchcase(name, p) for p in group.patterns):
                chosen[name] = group
                hits[group.name] += 1
                break
    empty = [g for g, n in hits.items() if n == 0]
    if empty:
        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:8]
        raise ValueError(f"LoRA group(s) {empty} match no linear layer; linear layers are named like {linear}")
    return chosen


def make_lora_config(model: nn.Module, groups: Sequence[LoraGroup], base_ref: str | None = None):
    """A ``peft.LoraConfig`` adapting exactly the resolved modules, with per-group rank/alpha patterns.

    The first group's rank/alpha/dropout are the config's defaults; other groups' modules that differ
    get ``rank_pattern``/``alpha_pattern`` entries (the escaped full module name). Per-group dropout is
    set on the injected layers by :func:`add_lora` (PEFT's config has one dropout).
    """
    peft = _peft()
    targets = resolve_targets(model, groups)
    first = groups[0]
    rank_pattern = {re.escape(n): g.rank for n, g in targets.items() if g.rank != first.rank}
    alpha_pattern = {re.escape(n): g.alpha for n, g in targets.items() if g.alpha != first.alpha}
    return peft.LoraConfig(r=first.rank, lora_alpha=first.alpha, lora_dropout=first.dropout,
                           target_modules=sorted(targets), rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                           base_model_name_or_path=base_ref, bias="none"), targets


# --------------------------------------------------------------------------------------------------
# Training side
# --------------------------------------------------------------------------------------------------
def add_lora(model: nn.Module, groups: Sequence[LoraGroup], adapter_name: str = DEFAULT_ADAPTER,
             base_ref: str | None = None) -> dict[str, int]:
    """Inject trainable LoRA layers into ``model`` in place and freeze every base weight.

    Returns the trainable parameter count per group plus ``frozen``. The model keeps its class (a
    ``JointDiT`` with ``peft`` LoRA layers inside); the config used is kept on ``model.jointdit_lora``.
    """
    peft = _peft()
    from peft.tuners.lora import LoraLayer

    config, targets = make_lora_config(model, groups, base_ref)
    peft.inject_adapter_in_model(config, model, adapter_name=adapter_name)
    counts = {g.name: 0 for g in groups}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and name in targets:
            group = targets[name]
            if group.dropout != config.lora_dropout:
                module.lora_dropout[adapter_name] = nn.Dropout(group.dropout) if group.dropout > 0 else nn.Identity()
    for name, param in model.named_parameters():
        is_lora = f".lora_A.{adapter_name}." in name or f".lora_B.{adapter_name}." in name
        param.requires_grad_(is_lora)
        if is_lora:
            module_name = name.split(".lora_")[0]
            counts[targets[module_name].name] += param.numel()
    counts["frozen"] = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    model.jointdit_lora = {"adapter_name": adapter_name, "config": config, "groups": [asdict(g) for g in groups],
                           "base_ref": base_ref}
    return counts


def lora_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The LoRA A/B matrices of every adapter in ``model``."""
    return [(n, p) for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def adapter_state_dict(model: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> dict[str, torch.Tensor]:
    """The adapter's weights under PEFT's on-disk keys (``base_model.model.<module>.lora_A.weight``)."""
    _peft()
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
    return {PEFT_PREFIX + k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_adapter(model: nn.Module, folder: str | os.PathLike, base_ref: str | os.PathLike | None,
                 meta: Mapping[str, Any] | None = None, adapter_name: str | None = None,
                 files: Mapping[str, str] | None = None) -> Path:
    """Write the adapter in PEFT's format + ``jointdit_adapter.json`` atomically (temp folder, rename).

    ``base_ref`` names the base model folder. ``jointdit_adapter.json`` stores it relative to the adapter
    folder (the pair can be moved together); ``adapter_config.json`` gets the absolute path, as PEFT's
    ``base_model_name_or_path``.
    """
    from safetensors.torch import save_file

    info = getattr(model, "jointdit_lora", None)
    if info is None:
        raise ValueError("this model has no LoRA adapter (add_lora was not called)")
    adapter_name = adapter_name or info["adapter_name"]
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    ref = None
    if base_ref is not None:
        base = Path(base_ref).resolve()
        try:
            ref = os.path.relpath(base, folder.resolve())
        except ValueError:
            ref = str(base)
    config = copy.deepcopy(info["config"])
    config.base_model_name_or_path = None if base_ref is None else str(Path(base_ref).resolve())
    config.inference_mode = True
    config.save_pretrained(str(tmp))
    save_file(adapter_state_dict(model, adapter_name), str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    body = {"base_model": ref, "groups": info["groups"], **dict(meta or {})}
    (tmp / ADAPTER_META).write_text(json.dumps(body, indent=2, default=str))
    for name, text in (files or {}).items():  # e.g. jointdit.json, written inside the same atomic rename
        (tmp / name).write_text(text)
    from jointdit.checkpoints import replace_dir

    replace_dir(tmp, folder)
    return folder


def adapter_size_bytes(folder: str | os.PathLike) -> int:
    """Bytes on disk of an adapter (its weights file)."""
    return (Path(folder) / ADAPTER_WEIGHTS).stat().st_size


def export_size_bytes(folder: str | os.PathLike) -> int:
    """Bytes of weights an export adds on disk: the adapter file of a LoRA export, else every safetensors file."""
    folder = Path(folder)
    if is_adapter_folder(folder):
        return adapter_size_bytes(folder)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


# --------------------------------------------------------------------------------------------------
# Inference side: base + adapters, scaled, optionally merged
# --------------------------------------------------------------------------------------------------
def is_adapter_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).exists() and (Path(path) / ADAPTER_WEIGHTS).exists()


def base_reference(adapter: str | os.PathLike) -> Path | None:
    """The base model folder an adapter names (resolved against the adapter folder), or None."""
    adapter = Path(adapter)
    meta = adapter / ADAPTER_META
    ref = json.loads(meta.read_text()).get("base_model") if meta.exists() else None
    if ref is None:
        ref = json.loads((adapter / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not ref:
        return None
    path = Path(ref).expanduser()
    return path if path.is_absolute() else (adapter / path).resolve()


@dataclass(frozen=True)
class AdapterSpec:
    """An adapter folder and the scale its update is multiplied by."""

    path: Path
    scale: float = 1.0
    name: str | None = None


def parse_adapters(value: Any) -> list[AdapterSpec]:
    """``adapters=`` as given on a command line or in a config.

    Accepts a list whose items are a path, ``"path:scale"`` or ``{path, scale, name}``; or one string
    of comma-separated such items.
    """
    value = to_plain(value)
    if not value:
        return []
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
    specs = []
    for item in items:
        if isinstance(item, Mapping):
            specs.append(AdapterSpec(Path(str(item["path"])).expanduser(), float(item.get("scale", 1.0)), item.get("name")))
            continue
        text = str(item)
        path, scale = text, 1.0
        head, sep, tail = text.rpartition(":")
        if sep and head:
            try:
                path, scale = head, float(tail)
            except ValueError:
                path = text
        specs.append(AdapterSpec(Path(path).expanduser(), scale))
    return specs


def apply_adapters(model: nn.Module, adapters: Sequence[AdapterSpec], merge: bool = False) -> nn.Module:
    """Load each adapter into ``model`` with its scale; all are active at once (their updates add).

    ``merge=True`` folds ``Σ_i s_i·(α_i/r_i)·B_i·A_i`` into the base weights and removes the LoRA
    layers, returning a plain model. Otherwise the model keeps LoRA layers (``peft`` forward).
    """
    if not adapters:
        return model
    _peft()
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file

    names = []
    for index, spec in enumerate(adapters):
        if not is_adapter_folder(spec.path):
            raise FileNotFoundError(f"{spec.path} is not a LoRA adapter folder (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
        name = spec.name or f"adapter_{index}"
        config = LoraConfig.from_pretrained(str(spec.path))
        with warnings.catch_warnings():  # a second adapter is what we want here
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            inject_adapter_in_model(config, model, adapter_name=name)
        state = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(spec.path / ADAPTER_WEIGHTS)).items()}
        result = set_peft_model_state_dict(model, state, adapter_name=name)
        missing = [k for k in getattr(result, "missing_keys", []) if f".{name}." in k and "lora_" in k]
        if missing:
            raise ValueError(f"{spec.path}: the adapter lacks weights for {missing[:4]}; was it trained for this model?")
        names.append(name)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.set_adapter([n for n in names if n in module.lora_A])
            for spec, name in zip(adapters, names):
                module.set_scale(name, spec.scale)
    for param in model.parameters():
        param.requires_grad_(False)
    if merge:
        return merge_adapters(model)
    return model


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every active, scaled adapter into its base linear and replace the LoRA layer by it."""
    from peft.tuners.lora import LoraLayer

    replacements = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            module.merge(adapter_names=list(module.active_adapters))
            replacements.append((name, module.get_base_layer()))
    for name, base in replacements:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, base)
    if hasattr(model, "jointdit_lora"):
        del model.jointdit_lora
    return model


def load_with_adapters(path: str | os.PathLike, adapters: Sequence[AdapterSpec] = (), merge: bool = False) -> nn.Module:
    """A JointDiT from a model folder/checkpoint or an adapter folder (its base + it), plus ``adapters``."""
    from jointdit import checkpoints

    path = Path(path).expanduser()
    adapters = list(adapters)
    if is_adapter_folder(path):
        base = base_reference(path)
        if base is None:
            raise ValueError(f"the adapter {path} names no base model; pass checkpoint=<base model folder> "
                             f"adapters=[{path}]")
        adapters.insert(0, AdapterSpec(path, 1.0))
        path = base
    return apply_adapters(checkpoints.load_model(path), adapters, merge=merge)


# --------------------------------------------------------------------------------------------------
# Trainer side: what the training loop calls
# --------------------------------------------------------------------------------------------------
def training_groups(model: nn.Module, lora_cfg: Mapping[str, Any], base_ref: str | os.PathLike | None = None,
                    ) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Add the configured adapters to ``model`` and return ``(optimizer param groups, counts)``.

    One param group per LoRA group (its own ``lr``: ``stage.lora.groups.<g>.lr`` or ``stage.lora.lr``);
    counts are the trainable elements per group plus ``frozen`` (every base weight).
    """
    lora_cfg = dict(to_plain(lora_cfg))
    groups = groups_from_config(lora_cfg)
    targets = resolve_targets(model, groups)
    counts = add_lora(model, groups, base_ref=None if base_ref is None else str(base_ref))
    by_group: dict[str, list[nn.Parameter]] = {g.name: [] for g in groups}
    for name, param in lora_parameters(model):
        by_group[targets[name.split(".lora_")[0]].name].append(param)
    specs = dict(lora_cfg.get("groups") or {})
    default_lr = float(lora_cfg.get("lr") or 1e-4)
    param_groups = [{"params": params, "name": f"lora_{g}",
                     "lr": float((specs.get(g) or {}).get("lr") or default_lr)} for g, params in by_group.items()]
    return param_groups, counts


def base_reference_for(init_from: str | os.PathLike | None) -> Path | None:
    """The base model an adapter may reference directly: ``stage.init_from`` when it is an exported model
    folder (config.json); None when the base must be exported beside the adapter (a checkpoint, or none)."""
    if not init_from:
        return None
    path = Path(init_from).expanduser()
    return path.resolve() if (path / "config.json").exists() else None


def prepare_base(model: nn.Module, init_from: str | os.PathLike | None, folder: str | os.PathLike,
                 meta: Mapping[str, Any], is_main_process: bool = True) -> Path:
    """The base model folder a run's adapters will name: ``stage.init_from`` when it is an exported model
    folder, else ``model`` (still without adapters) exported once to ``folder`` by the main process."""
    ref = base_reference_for(init_from)
    if ref is not None:
        return ref
    folder = Path(folder)
    if is_main_process:
        from jointdit.checkpoints import export_model

        export_model(model, folder, dict(meta))
    return folder.resolve()


def has_lora(model: nn.Module) -> bool:
    return getattr(model, "jointdit_lora", None) is not None


def export_adapter(model: nn.Module, ema, folder: str | os.PathLike, base_ref: str | os.PathLike | None,
                   meta: Mapping[str, Any]) -> Path:
    """Save the adapter (EMA weights when EMA is on) in PEFT's format, with ``jointdit.json`` = ``meta``
    (the sampler's settings) and ``jointdit_adapter.json`` naming ``base_ref`` (default: the one given
    to :func:`training_groups`)."""
    from jointdit.checkpoints import EXPORT_META

    if base_ref is None:
        base_ref = model.jointdit_lora.get("base_ref")

    trainable = [p for p in model.parameters() if p.requires_grad]
    if ema is not None:
        ema.store(trainable)
        ema.copy_to(trainable)
    try:
        return save_adapter(model, folder, base_ref, meta={"step": meta.get("step")},
                            files={EXPORT_META: json.dumps(dict(meta), indent=2, default=str)})
    finally:
        if ema is not None:
            ema.restore(trainable)
