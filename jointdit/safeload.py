"""Check a model or checkpoint folder BEFORE anything in it is loaded; never unpickle arbitrary objects.

- :func:`verify_model_folder` — an exported model folder: ``config.json`` is a JSON object, the weights
  are a readable safetensors file (never a pickle), ``jointdit.json`` parses.
- :func:`verify_checkpoint_folder` — a training checkpoint: ``trainer_state.json`` parses and has a
  step, ``model.safetensors`` is readable, and every pickle-based file Accelerate will ``torch.load``
  (``optimizer.bin``, ``scheduler.bin``, ``random_states_*.pkl``) references only the globals a
  ``weights_only`` load allows (tensors, numpy arrays, RNG state). A crafted pickle is refused by
  name, and its code never runs: :func:`torch.serialization.get_unsafe_globals_in_checkpoint` reads
  the pickle's opcodes without executing them.
- :func:`safe_torch_load` — ``torch.load(weights_only=True)`` with Accelerate's RNG-state allowlist.

Every failure is a :class:`~jointdit.errors.CheckpointError` naming the file and what to do.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from jointdit.errors import CheckpointError

PICKLE_SUFFIXES = (".bin", ".pkl", ".pt", ".pth", ".ckpt")
MODEL_CONFIG = "config.json"
MODEL_WEIGHTS = "diffusion_pytorch_model.safetensors"
EXPORT_META = "jointdit.json"
STATE_FILE = "trainer_state.json"
CHECKPOINT_WEIGHTS = "model.safetensors"


def _allowed_globals() -> set[str]:
    """Qualified names a weights_only load accepts beyond tensors: Accelerate's list (numpy RNG state)."""
    names = {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "builtins.set"}
    try:
        from accelerate.utils.other import TORCH_SAFE_GLOBALS

        names |= {f"{g.__module__}.{g.__qualname__}" for g in TORCH_SAFE_GLOBALS}
    except ImportError:  # pragma: no cover - accelerate is a dependency
        pass
    return names


def unsafe_globals(path: Path) -> list[str]:
    """Globals the pickle in ``path`` would import that a ``weights_only`` load does not allow.

    Reads opcodes only; nothing is executed. A file that is not a ``torch.save`` archive (a raw
    pickle) cannot be checked this way and is reported as ``["<not a torch.save archive>"]``.
    """
    import torch

    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # noqa: BLE001 - raw pickles, truncated archives
        return ["<not a torch.save archive>"]
    allowed = _allowed_globals()
    return [name for name in found if name not in allowed]


def check_pickles(folder: Path) -> None:
    """Refuse any pickle-based file in ``folder`` (recursively) that would import more than plain data."""
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file() and path.suffix in PICKLE_SUFFIXES:
            bad = unsafe_globals(path)
            if bad:
                raise CheckpointError(
                    f"{path} would unpickle arbitrary objects ({', '.join(bad[:5])}); refusing to load it, "
                    f"since a crafted pickle can run code",
                    hint="only load checkpoints you made (this trainer writes tensors, numpy RNG state and JSON); "
                         "delete the file or the folder if you did not put it there")


def safe_torch_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load`` that only rebuilds tensors and plain containers (Accelerate's ``load``)."""
    import pickle

    from accelerate.utils import load

    try:
        return load(str(path), map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as err:
        raise CheckpointError(f"{path} holds objects a weights-only load refuses ({str(err).splitlines()[0]})",
                              hint="load only checkpoints written by this trainer") from err


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing ({what})", hint="the folder is incomplete: use another "
                              "checkpoint, or re-export / re-train") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({what}): {err}",
                              hint="the file is corrupt or truncated: use another checkpoint") from None


def check_safetensors(path: Path, what: str) -> list[str]:
    """The tensor names in a safetensors file, reading its header only; a truncated file is refused."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise CheckpointError(f"{path} is missing ({what})", hint="the folder is incomplete: use another "
                              "checkpoint (checkpoints/step_NNNNNN) or re-export the model")
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())  # opening checks the header's byte ranges against the file size
    except Exception as err:  # noqa: BLE001 - SafetensorError, OSError
        raise CheckpointError(f"{path} is not a readable safetensors file ({what}): {err}",
                              hint="it is corrupt or truncated: use another checkpoint or re-export") from None
    return keys


def verify_model_folder(path: str | os.PathLike) -> Path:
    """An exported model folder that is safe and complete to load (see module docstring)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"model folder {folder} does not exist",
                              hint="point it at <run>/export/last (or export/best) of a training run")
    config = read_json(folder / MODEL_CONFIG, "the model config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{folder / MODEL_CONFIG} is not a JSON object", hint="re-export the model")
    if not (folder / MODEL_WEIGHTS).exists():
        pickled = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickled:
            raise CheckpointError(f"{folder} holds pickled weights ({', '.join(pickled)}) and no {MODEL_WEIGHTS}; "
                                  f"pickles are never loaded", hint="convert them to safetensors with a tool you "
                                                                   "trust, or re-export with this trainer")
    check_safetensors(folder / MODEL_WEIGHTS, "the model weights")
    if (folder / EXPORT_META).exists():
        read_json(folder / EXPORT_META, "the codec and latent settings")
    check_pickles(folder)
    return folder


def verify_checkpoint_folder(path: str | os.PathLike) -> dict[str, Any]:
    """A training checkpoint that is safe and complete to resume from; returns its trainer state."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist",
                              hint="point checkpoint.resume at a checkpoints/step_NNNNNN folder, or use auto")
    state = read_json(folder / STATE_FILE, "the trainer state")
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{folder / STATE_FILE} has no 'step'", hint="use another checkpoint")
    check_safetensors(folder / CHECKPOINT_WEIGHTS, "the model weights")
    check_pickles(folder)
    return state


# ----------------------------------------------------------------------------------------------
# Latent cache shards: a checksum per shard in the index
# ----------------------------------------------------------------------------------------------

SHARD_SHA_KEY = "shard_sha256"  # in every index row: the sha256 of the row's shard file


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def shard_problem(path: Path, expected_sha256: str | None) -> str | None:
    """What is wrong with a cache shard (missing, truncated, checksum mismatch), or None."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        return "missing"
    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except Exception as err:  # noqa: BLE001 - SafetensorError
        return f"truncated or not a safetensors file ({str(err).splitlines()[0]})"
    if expected_sha256 and file_sha256(path) != expected_sha256:
        return "corrupt (its sha256 differs from the one in the index)"
    return None


def damaged_shards(cache_dir: Path, rows: list[dict]) -> dict[str, str]:
    """``{shard name: problem}`` for the shards the index rows name."""
    expected: dict[str, str | None] = {}
    for row in rows:
        expected.setdefault(row["shard"], row.get(SHARD_SHA_KEY))
    found = {}
    for name, sha in sorted(expected.items()):
        problem = shard_problem(Path(cache_dir) / name, sha)
        if problem:
            found[name] = problem
    return found


def cache_rebuild_command(cache_dir: Path, split: str) -> str:
    """The ``python -m jointdit.cache`` line that re-runs ``split`` of this cache (which repairs damaged shards)."""
    try:
        config = json.loads((Path(cache_dir) / "meta.json").read_text()).get("config", {})
    except (OSError, ValueError):
        config = {}
    data, codec = config.get("data") or {}, config.get("codec") or {}
    parts = ["python -m jointdit.cache", f"data={data.get('name', '<data>')}", f"codec={codec.get('name', '<codec>')}",
             f"split={split}"]
    for key, value in data.items():  # the data settings the cache was built with (meta.json must match)
        if key != "name" and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            parts.append(f"data.{key}={value}")
    parts.append(f"out_dir={cache_dir}")
    return " ".join(parts)
