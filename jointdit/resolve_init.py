"""``stage.init_from``: which Stage A model a Stage B run starts from — never random weights by accident.

- ``auto`` (Stage B's default): the newest Stage A export (``export/last`` or ``export/best``) with the
  same model architecture and latent geometry as this run, found under ``outputs/`` and ``multirun/``
  of ``paths.root_dir`` or through the MLflow experiment (runs tagged ``stage=a``, whose
  ``paths.output_dir`` param names the folder). None found: :class:`InitFromError`, before any data or
  model work, with the Stage A command that makes one.
- a folder: an exported model folder or a ``checkpoints/step_NNNNNN`` folder;
- an MLflow run id (32 hex digits, or ``runs:/<id>``): that run's export.

"Same architecture" compares the model fields (``hidden_size``, ``depth``, ``num_heads``, patch sizes,
...); "same latent geometry" compares the codec settings that change what a latent holds and the
clip size, fps and sample rate. A mismatch is listed key by key (``model.depth: 2 → 4``), never as a
state-dict key dump; :func:`config_differences` does the same for a resume with a changed model.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf

from jointdit.config import to_plain
from jointdit.errors import InitFromError, InitFromMissingError

log = logging.getLogger(__name__)

EXPORT_META = "jointdit.json"
EXPORT_NAMES = ("last", "best")
# Model fields that define the weights' shapes and the function; the in-channels, latent rates and CLIP
# widths are filled from the data and compared as latent geometry instead.
ARCH_KEYS = ("hidden_size", "depth", "num_heads", "mlp_ratio", "video_patch_size", "audio_patch_size", "qk_norm",
             "rope_theta", "rope_time_scale", "rope_space_theta", "prediction")
DATA_KEYS = ("size", "fps", "sample_rate")
_RUNTIME_CODEC_KEYS = {"device", "encode_batch", "decode_batch", "decode_chunk", "decode_overlap",
                       "griffin_lim_iters", "griffin_lim_momentum", "seed"}
_RUN_ID = re.compile(r"^(?:runs:/)?([0-9a-f]{32})/?$")


@dataclass
class InitSource:
    """Where the starting weights come from, for the run's tags and console line."""

    path: Path
    how: str                      # "auto", "path" or "mlflow"
    run_id: str | None = None
    notes: list[str] = field(default_factory=list)

    def tags(self) -> dict[str, str]:
        tags = {"init_from": str(self.path), "init_from.how": self.how}
        if self.run_id:
            tags["init_from.run_id"] = self.run_id
        return tags

    def describe(self) -> str:
        run = f" (MLflow run {self.run_id})" if self.run_id else ""
        return f"stage.init_from={self.how}: starting from {self.path}{run}"


# ----------------------------------------------------------------------------------------------
# What a run expects, what an export holds, and how they differ
# ----------------------------------------------------------------------------------------------


def _strip_runtime(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _strip_runtime(v) for k, v in tree.items() if k not in _RUNTIME_CODEC_KEYS}
    return tree


def _norm(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_norm(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def expected_arch(model_cfg: Any) -> dict[str, Any]:
    """The architecture fields this run's ``model`` config builds (preset plus overrides)."""
    from jointdit.models.jointdit import full_config, model_config

    fields = {k: v for k, v in (to_plain(model_cfg) or {}).items() if not str(k).startswith("_")}
    config = full_config(model_config(fields.pop("preset", "small"), **fields))
    return {key: _norm(config.get(key)) for key in ARCH_KEYS}


def expected_geometry(cfg: DictConfig) -> dict[str, Any]:
    data = to_plain(cfg.data) or {}
    geometry = {f"data.{k}": _norm(data.get(k)) for k in DATA_KEYS}
    geometry.update(_flat("codec", _strip_runtime(to_plain(cfg.codec) or {})))
    return geometry


def _flat(prefix: str, tree: Any) -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flat(f"{prefix}.{key}", value))
        return out
    return {prefix: _norm(tree)}


def export_arch(folder: Path) -> dict[str, Any]:
    config = json.loads((folder / "config.json").read_text())
    return {key: _norm(config.get(key)) for key in ARCH_KEYS}


def export_geometry(meta: dict[str, Any]) -> dict[str, Any]:
    data = meta.get("data") or {}
    geometry = {f"data.{k}": _norm(data.get(k)) for k in DATA_KEYS}
    geometry.update(_flat("codec", _strip_runtime(meta.get("codec") or {})))
    return geometry


def config_differences(theirs: dict[str, Any], ours: dict[str, Any], prefix: str = "") -> list[str]:
    """``["model.depth: 2 → 4", ...]`` — keys whose value differs (``theirs`` is the saved side)."""
    lines = []
    for key in sorted(set(theirs) | set(ours)):
        a, b = _norm(theirs.get(key, "<absent>")), _norm(ours.get(key, "<absent>"))
        if a != b:
            lines.append(f"{prefix}{key}: {a} → {b}")
    return lines


def differences(folder: Path, cfg: DictConfig) -> list[str]:
    """How the export in ``folder`` differs from what ``cfg`` would build (empty: it fits)."""
    lines = config_differences(export_arch(folder), expected_arch(cfg.model), prefix="model.")
    meta_file = folder / EXPORT_META
    if meta_file.exists():
        lines += config_differences(export_geometry(json.loads(meta_file.read_text())), expected_geometry(cfg))
    return lines


# ----------------------------------------------------------------------------------------------
# Finding Stage A exports
# ----------------------------------------------------------------------------------------------


def find_exports(roots: Iterable[Path], stage: str = "a") -> list[Path]:
    """``export/last|best`` folders of ``stage`` runs under ``roots`` (Hydra's run/sweep folder depths)."""
    found = set()
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        for depth in range(0, 4):
            for name in EXPORT_NAMES:
                pattern = "*/" * depth + f"export/{name}/{EXPORT_META}"
                for meta in root.glob(pattern):
                    try:
                        if json.loads(meta.read_text()).get("stage") == stage:
                            found.add(meta.parent)
                    except (OSError, ValueError):
                        continue  # an unreadable export is not a candidate
    return sorted(found, key=_mtime)


def _mtime(folder: Path) -> float:
    try:
        return (folder / EXPORT_META).stat().st_mtime
    except OSError:
        return 0.0


def _mlflow_client(cfg: DictConfig):
    logger_cfg = cfg.get("logger")
    if logger_cfg is None or logger_cfg.get("name", "none") == "none":
        return None
    uri = str(logger_cfg.tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return None  # no store yet: nothing to find (and do not create one)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def mlflow_exports(cfg: DictConfig, stage: str = "a") -> dict[Path, str]:
    """``{export folder: run id}`` for finished ``stage`` runs of this experiment whose folder exists."""
    try:
        client = _mlflow_client(cfg)
        if client is None:
            return {}
        experiment = client.get_experiment_by_name(str(cfg.logger.experiment_name))
        if experiment is None:
            return {}
        runs = client.search_runs([experiment.experiment_id], f"tags.stage = '{stage}' and attributes.status = 'FINISHED'",
                                  max_results=200, order_by=["attributes.start_time DESC"])
    except Exception as err:  # noqa: BLE001 - a broken store must not stop the filesystem search
        log.warning("stage.init_from=auto: could not search MLflow (%s); using the output folders only", err)
        return {}
    found = {}
    for run in runs:
        folder = run.data.params.get("paths.output_dir")
        for name in EXPORT_NAMES:
            if folder and (Path(folder) / "export" / name / EXPORT_META).exists():
                found[Path(folder) / "export" / name] = run.info.run_id
    return found


def mlflow_run_export(cfg: DictConfig, run_id: str) -> Path:
    """The export folder of MLflow run ``run_id`` (its output folder, or its logged ``model`` artifact)."""
    try:
        client = _mlflow_client(cfg)
        run = client.get_run(run_id) if client is not None else None
    except Exception as err:  # noqa: BLE001
        raise InitFromError(f"stage.init_from={run_id}: MLflow run not found ({str(err).splitlines()[0]})",
                            hint="use a run id from the MLflow UI of this experiment, or a model folder path") from None
    if run is None:
        raise InitFromError(f"stage.init_from={run_id}: no MLflow store at {cfg.logger.get('tracking_uri')}",
                            hint="set logger.tracking_uri, or give the model folder path instead")
    folder = run.data.params.get("paths.output_dir")
    for name in EXPORT_NAMES:
        if folder and (Path(folder) / "export" / name / "config.json").exists():
            return Path(folder) / "export" / name
    artifact = run.info.artifact_uri.removeprefix("file://") + "/model"
    if (Path(artifact) / "config.json").exists():
        return Path(artifact)
    raise InitFromError(f"stage.init_from={run_id}: MLflow run {run_id} has no exported model on this machine "
                        f"(looked in {folder}/export and its 'model' artifact)",
                        hint="give the model folder path instead, or rerun it with checkpoint.export=true")


def stage_a_command(cfg: DictConfig) -> str:
    """The command that trains a matching Stage A model: this command's overrides, minus the stage."""
    overrides: list[str] = []
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            overrides = [o for o in HydraConfig.get().overrides.task
                         if not o.lstrip("+~").split("=", 1)[0].split(".")[0] in ("stage", "checkpoint", "hydra")]
    except Exception:  # noqa: BLE001 - outside a Hydra app
        pass
    if not overrides:
        overrides = [f"model={cfg.model.get('preset', 'tiny')}", f"data={cfg.data.name}", f"codec={cfg.codec.name}"]
    return " ".join(["python -m jointdit.train", "stage=a", *overrides])


def resolve_init_from(cfg: DictConfig) -> InitSource | None:
    """Resolve ``cfg.stage.init_from`` (see the module docstring); None when the stage starts from scratch."""
    if "init_from" not in cfg.stage:
        return None
    value = "auto" if OmegaConf.is_missing(cfg.stage, "init_from") else cfg.stage.init_from
    if value in (None, "", False):
        return None
    value = str(value)
    if value == "auto":
        return _auto(cfg)
    path = Path(value).expanduser()
    if path.exists():
        source = InitSource(path=path, how="path")
    else:
        match = _RUN_ID.match(value)
        if match is None:
            raise InitFromMissingError(f"stage.init_from={value}: no such folder (neither an exported model folder nor a "
                                f"checkpoint), and not an MLflow run id",
                                hint="give an exported model folder (<run>/export/last), a checkpoints/step_NNNNNN "
                                     "folder, an MLflow run id, or auto")
        source = InitSource(path=mlflow_run_export(cfg, match.group(1)), how="mlflow", run_id=match.group(1))
    if (source.path / "config.json").exists():
        diff = differences(source.path, cfg)
        if diff:
            raise InitFromError(f"the Stage A model at {source.path} does not fit this model: " + "; ".join(diff),
                                hint="use the same model and codec/data settings as the Stage A run, or another "
                                     "stage.init_from")
    return source


def _auto(cfg: DictConfig) -> InitSource:
    root = Path(str(cfg.paths.root_dir))
    roots = [Path(str(cfg.paths.get("log_dir", root / "outputs"))), root / "multirun"]
    on_disk = find_exports(roots)
    from_mlflow = mlflow_exports(cfg)
    candidates = sorted(set(on_disk) | set(from_mlflow), key=_mtime, reverse=True)
    rejected = []
    for folder in candidates:
        try:
            diff = differences(folder, cfg)
        except (OSError, ValueError) as err:
            rejected.append(f"{folder}: unreadable ({err})")
            continue
        if not diff:
            return InitSource(path=folder, how="auto", run_id=from_mlflow.get(folder))
        rejected.append(f"{folder}: " + "; ".join(diff[:4]) + (" ..." if len(diff) > 4 else ""))
    where = ", ".join(str(r) for r in roots)
    uri = cfg.logger.get("tracking_uri") if cfg.get("logger") is not None else None
    where += f" and MLflow ({uri})" if uri and cfg.logger.get("name") != "none" else ""
    detail = ("; Stage A exports found but not matching this run's model/latent geometry: " + " | ".join(rejected[:3])
              if rejected else "")
    raise InitFromError(
        f"stage=b starts from a Stage A model, and stage.init_from=auto found none with this model and latent "
        f"geometry (looked in {where}){detail}",
        hint=f"train Stage A first: `{stage_a_command(cfg)}`, then rerun; or set stage.init_from=<model folder or "
             f"MLflow run id>")


def prepare_init_from(cfg: DictConfig) -> InitSource | None:
    """Resolve ``stage.init_from`` in place (``auto``/run id → the folder) and say which model was taken."""
    from omegaconf import open_dict

    source = resolve_init_from(cfg)
    if source is not None:
        with open_dict(cfg):
            cfg.stage.init_from = str(source.path)
        log.info(source.describe())
        print(source.describe(), flush=True)
    return source
