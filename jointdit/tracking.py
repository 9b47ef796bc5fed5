"""MLflow: one run per job, one parent run per Hydra sweep (opened by a callback), never fatal.

The tracking URI comes from ``logger.tracking_uri`` (an absolute sqlite URI by default; MLflow ≥ 3.13
refuses file stores), the experiment is ``logger.experiment_name`` (the primary config's name). If
MLflow cannot be reached, a warning is printed once and training carries on without it.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

PARENT_ENV = "JOINTDIT_MLFLOW_PARENT_RUN_ID"
SWEPT_ENV = "JOINTDIT_SWEPT_KEYS"
PARENT_FILE = "mlflow_parent_run_id"
MAX_PARAM_CHARS = 6000  # MLflow 3's limit on one param value


def flatten(cfg: DictConfig | dict, prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1e-3}}`` -> ``{"optim.lr": 1e-3}``; lists become their string form.

    A value that cannot be resolved here (``${hydra:...}`` outside a Hydra app) is kept as its
    interpolation text instead of failing the whole config.
    """
    if isinstance(cfg, DictConfig):
        raw = flatten(OmegaConf.to_container(cfg, resolve=False))
        return {key: _resolve_leaf(cfg, key, value) for key, value in raw.items()}
    flat: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _resolve_leaf(cfg: DictConfig, key: str, raw: Any) -> Any:
    try:
        value = OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
    except Exception:  # noqa: BLE001 - any resolver failure: keep the text
        return raw
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _experiment_id(client, name: str, lock_dir: Path | None) -> str:
    """Get or create the experiment; parallel jobs on one sqlite store race here, so take a file lock."""
    from filelock import FileLock

    lock_path = (lock_dir or Path.home()) / ".jointdit-mlflow.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_path), timeout=60):
        experiment = client.get_experiment_by_name(name)
        return experiment.experiment_id if experiment else client.create_experiment(name)


def _check_server(uri: str, timeout: float) -> None:
    """Fail fast on an unreachable tracking server: MLflow's own retries take minutes to give up."""
    import urllib.request

    with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
        if response.status != 200:
            raise ConnectionError(f"{uri}/health answered {response.status}")


def _lock_dir(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:///") else None


class Tracker:
    """A run in MLflow, logged through ``MlflowClient`` so no global active run leaks between jobs."""

    def __init__(self, logger_cfg: DictConfig | None, run_name: str | None = None,
                 parent_run_id: str | None = None, tags: dict[str, str] | None = None):
        self.client = None
        self.run_id: str | None = None
        self._warned = False
        if logger_cfg is None or logger_cfg.get("name", "none") == "none":
            return
        self._guard(self._start, logger_cfg, run_name, parent_run_id, tags or {})

    @property
    def active(self) -> bool:
        return self.run_id is not None

    def _start(self, logger_cfg, run_name, parent_run_id, tags) -> None:
        from mlflow.tracking import MlflowClient

        uri = str(logger_cfg.tracking_uri)
        if uri.startswith(("http://", "https://")):
            _check_server(uri, float(logger_cfg.get("connect_timeout", 5)))
        client = MlflowClient(tracking_uri=uri)
        experiment_id = _experiment_id(client, str(logger_cfg.experiment_name), _lock_dir(uri))
        parent_run_id = parent_run_id or os.environ.get(PARENT_ENV)
        if parent_run_id:
            tags = {**tags, "mlflow.parentRunId": parent_run_id}
        run = client.create_run(experiment_id, run_name=run_name or logger_cfg.get("run_name"), tags=tags)
        self.client, self.run_id = client, run.info.run_id

    def _guard(self, fn, *args, **kwargs):
        """Call ``fn``; on any MLflow failure warn once and switch tracking off."""
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - tracking must never stop training
            if not self._warned:
                warnings.warn(f"MLflow is unavailable, carrying on without tracking: {err}", stacklevel=3)
                self._warned = True
            self.client, self.run_id = None, None
            return None

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.active:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v) if len(str(v)) <= MAX_PARAM_CHARS else str(v)[: MAX_PARAM_CHARS - 3] + "...")
                 for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow's batch limit
            self._guard(self.client.log_batch, self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and math.isfinite(float(v))]
        if items:
            self._guard(self.client.log_batch, self.run_id, metrics=items)

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            if self.active:
                self._guard(self.client.set_tag, self.run_id, key, str(value))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self.active and Path(path).exists():
            method = self.client.log_artifacts if Path(path).is_dir() else self.client.log_artifact
            self._guard(method, self.run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        if self.active:
            self._guard(self.client.set_terminated, self.run_id, status)
        self.client, self.run_id = None, None


def swept_keys(overrides: list[str]) -> list[str]:
    """Keys a sweep varies: ``optim.lr=1e-4,3e-4`` or ``x=range(1,3)`` / ``choice(…)`` / ``interval(…)``."""
    keys = []
    for override in overrides:
        key, _, value = override.partition("=")
        if "," in value or value.startswith(("range(", "choice(", "interval(", "glob(")):
            keys.append(key.lstrip("+~"))
    return keys


def job_run_name(default: str = "run") -> str:
    """A sweep job is named by the values it sweeps (``optim.lr=0.001``); a single run by ``default``."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
    except ValueError:  # not inside a Hydra app
        return default
    swept = set(filter(None, os.environ.get(SWEPT_ENV, "").split(",")))
    chosen = [o for o in hydra_cfg.overrides.task if o.partition("=")[0].lstrip("+~") in swept]
    return ",".join(chosen) or hydra_cfg.job.override_dirname or default


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra < 1.1
    Callback = object


class MlflowSweepCallback(Callback):
    """Opens one MLflow parent run per multirun; every job's run becomes its child.

    The parent's id reaches the jobs through ``JOINTDIT_MLFLOW_PARENT_RUN_ID`` (inherited by launcher
    processes) and a file in the sweep folder.
    """

    def __init__(self) -> None:
        self.tracker: Tracker | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        logger_cfg = config.get("logger")
        if logger_cfg is None or logger_cfg.get("name", "none") == "none":
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        self.tracker = Tracker(logger_cfg, run_name=f"sweep {sweep_dir.name}", tags={"jointdit.sweep_dir": str(sweep_dir)})
        os.environ[SWEPT_ENV] = ",".join(swept_keys(list(config.hydra.overrides.task)))
        if self.tracker.active:
            os.environ[PARENT_ENV] = self.tracker.run_id
            sweep_dir.mkdir(parents=True, exist_ok=True)
            (sweep_dir / PARENT_FILE).write_text(self.tracker.run_id)
            self.tracker.log_params({"sweep.overrides": " ".join(config.hydra.overrides.task)})

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.tracker is not None:
            sweep_dir = Path(config.hydra.sweep.dir)
            self.tracker.log_artifact(sweep_dir / "multirun.yaml")
            self.tracker.end()
        os.environ.pop(PARENT_ENV, None)
        os.environ.pop(SWEPT_ENV, None)
        self.tracker = None
