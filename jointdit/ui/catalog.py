"""The model picker's catalogue: exported model folders on disk and models logged to MLflow runs.

An *exported model folder* is what the trainer writes (``export/last``, ``export/best``, …): a
``config.json`` + safetensors weights + ``jointdit.json``. On disk they are found under ``outputs/`` and
``multirun/`` (``<run dir>/export/<name>``); the run's ``metrics.json`` gives the validation loss at the
exported step. In MLflow, a run whose artifacts hold ``model/jointdit.json`` (``logger.log_model=true``)
is listed with its run name, step and last ``val_loss``; choosing it downloads the folder once into
``cache_dir`` (atomically), and the app loads it from there like any other folder.

Nothing here unpickles anything: only JSON is read.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

EXPORT_META = "jointdit.json"
MAX_MLFLOW_RUNS = 500


@dataclass(frozen=True)
class ModelEntry:
    key: str                    # a local folder path, or "mlflow:<run_id>"
    source: str                 # "outputs" | "multirun" | "mlflow" | "given"
    run_name: str
    export: str                 # "last" | "best" | "model" | folder name
    step: int | None = None
    val_loss: float | None = None
    path: str | None = None     # local folder (None for an MLflow model not downloaded yet)
    run_id: str | None = None   # MLflow run id

    @property
    def label(self) -> str:
        step = f"step {self.step}" if self.step is not None else "step ?"
        val = f"val loss {self.val_loss:.4f}" if self.val_loss is not None else "no val loss"
        return f"[{self.source}] {self.run_name} · {self.export} · {step} · {val}"


def is_model_folder(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    return (folder / "config.json").is_file() and (folder / EXPORT_META).is_file()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _val_loss_at(run_dir: Path, step: int | None) -> float | None:
    """The validation loss logged at ``step`` in the run's ``metrics.json`` (else the best one)."""
    metrics = _read_json(run_dir / "metrics.json")
    history = metrics.get("history") or []
    at = [h["val_loss"] for h in history if "val_loss" in h and h.get("step") == step]
    if at:
        return float(at[-1])
    best = (metrics.get("final") or {}).get("val/loss")
    return None if best is None else float(best)


def local_entry(folder: str | os.PathLike, source: str = "given", root: str | os.PathLike | None = None) -> ModelEntry:
    """A catalogue entry for one exported model folder (its run = the folder above ``export/``)."""
    folder = Path(folder).expanduser().resolve()
    meta = _read_json(folder / EXPORT_META)
    step = meta.get("step")
    step = int(step) if step is not None else None
    run_dir = folder.parent.parent if folder.parent.name == "export" else folder.parent
    try:
        run_name = str(run_dir.relative_to(Path(root).resolve())) if root else str(run_dir)
    except ValueError:
        run_name = str(run_dir)
    return ModelEntry(key=str(folder), source=source, run_name=run_name, export=folder.name, step=step,
                      val_loss=_val_loss_at(run_dir, step), path=str(folder))


def scan_folders(root: str | os.PathLike) -> list[ModelEntry]:
    """Exported model folders under ``<root>/outputs`` and ``<root>/multirun``, newest run first."""
    root = Path(root).expanduser().resolve()
    found: list[tuple[float, ModelEntry]] = []
    for source in ("outputs", "multirun"):
        base = root / source
        if not base.is_dir():
            continue
        for meta in base.rglob(EXPORT_META):
            folder = meta.parent
            rel = folder.relative_to(base).parts
            if any(part.startswith(".") for part in rel) or not is_model_folder(folder):
                continue  # temp folders of an export in progress, or half-written ones
            found.append((meta.stat().st_mtime, local_entry(folder, source, root)))
    found.sort(key=lambda item: (-item[0], item[1].key))
    return [entry for _, entry in found]


def _client(tracking_uri: str | None):
    """An MlflowClient, or None when there is nothing to ask (a sqlite file that does not exist yet —
    asking would create it)."""
    if not tracking_uri:
        return None
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))   # sqlite:////abs/x.db -> /abs/x.db
        if not db.is_file():
            return None
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def scan_mlflow(tracking_uri: str | None) -> list[ModelEntry]:
    """Runs whose artifacts hold ``model/jointdit.json``, newest first (at most ``MAX_MLFLOW_RUNS``)."""
    client = _client(tracking_uri)
    if client is None:
        return []
    entries: list[ModelEntry] = []
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    runs = client.search_runs(experiments, max_results=MAX_MLFLOW_RUNS, order_by=["attributes.start_time DESC"])
    for run in runs:
        try:
            names = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "model")}
        except Exception:  # noqa: BLE001 - an unreachable artifact store hides that run only
            continue
        if EXPORT_META not in names:
            continue
        history = client.get_metric_history(run.info.run_id, "loss")
        step = max((m.step for m in history), default=None)
        val = run.data.metrics.get("val_loss")
        entries.append(ModelEntry(key=f"mlflow:{run.info.run_id}", source="mlflow",
                                  run_name=run.info.run_name or run.info.run_id, export="model", step=step,
                                  val_loss=None if val is None else float(val), run_id=run.info.run_id))
    return entries


def catalog(root: str | os.PathLike, tracking_uri: str | None, extra: list[str] | None = None) -> list[ModelEntry]:
    """Every model the picker offers: ``extra`` folders first (e.g. the ``checkpoint=`` given), then
    folders on disk, then MLflow models."""
    entries: list[ModelEntry] = []
    for folder in extra or []:
        if folder and is_model_folder(folder):
            entries.append(local_entry(folder, "given", root))
    seen = {e.key for e in entries}
    for entry in scan_folders(root) + scan_mlflow(tracking_uri):
        if entry.key not in seen:
            entries.append(entry)
            seen.add(entry.key)
    return entries


def materialize(entry: ModelEntry, tracking_uri: str | None, cache_dir: str | os.PathLike) -> Path:
    """A local folder for ``entry``: its own path, or the MLflow model downloaded once into
    ``cache_dir/<run_id>`` (downloaded to a temp name, then renamed)."""
    if entry.path:
        return Path(entry.path)
    if not entry.run_id:
        raise ValueError(f"{entry.key}: neither a folder nor an MLflow run")
    final = Path(cache_dir).expanduser() / entry.run_id
    if is_model_folder(final):
        return final
    client = _client(tracking_uri)
    if client is None:
        raise FileNotFoundError(f"the MLflow store {tracking_uri} is gone; cannot fetch run {entry.run_id}")
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        client.download_artifacts(entry.run_id, "model", str(tmp))
        if not is_model_folder(tmp / "model"):
            raise FileNotFoundError(f"MLflow run {entry.run_id}'s 'model' artifact is not an exported model folder")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp / "model", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
