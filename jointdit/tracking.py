"""MLflow: one run per job, one parent run per Hydra sweep (opened by a callback), never fatal.

The tracking URI comes from ``logger.tracking_uri`` (an absolute sqlite URI by default; MLflow ≥ 3.13
refuses file stores), the experiment is ``logger.experiment_name`` (the primary config's name). If
MLflow cannot be reached, a warning is printed once and training carries on without it.
"""

from __future__ import annotations

import json
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
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",  # an int: MLflow refuses "0.5"
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
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


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # MLflow's UI then opens the experiment on runs and charts, not GenAI


def artifact_location(logger_cfg: DictConfig, uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: ``logger.artifact_location`` (``<paths.root_dir>/mlruns`` by
    default) as a ``file://`` URI for a local store. MLflow's own default for a sqlite store is ``./mlruns`` of
    whatever the current directory is, so runs started from two folders would scatter their artifacts. An
    http(s) server decides its artifact store itself (``--artifacts-destination``): None there."""
    location = logger_cfg.get("artifact_location")
    if not location or uri.startswith(("http://", "https://")):
        return None
    if "://" in str(location):  # s3://..., file://... as given
        return str(location)
    return Path(str(location)).expanduser().resolve().as_uri()


def _experiment_id(client, name: str, lock_dir: Path | None, artifacts: str | None = None) -> str:
    """Get or create the experiment as a model-training one (artifacts under ``artifacts`` when given);
    parallel jobs on one sqlite store race here, so take a file lock. An existing experiment keeps the
    artifact location it was created with (MLflow cannot move it)."""
    from filelock import FileLock

    lock_path = (lock_dir or Path.home()) / ".jointdit-mlflow.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_path), timeout=60):
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            return client.create_experiment(name, artifact_location=artifacts,
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        if EXPERIMENT_KIND_TAG not in experiment.tags:  # made before this tag existed
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return experiment.experiment_id


def _check_server(uri: str, timeout: float) -> None:
    """Fail fast on an unreachable tracking server: MLflow's own retries take minutes to give up."""
    import urllib.request

    with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
        if response.status != 200:
            raise ConnectionError(f"{uri}/health answered {response.status}")


def _lock_dir(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:///") else None


def _store_lock(lock_dir: Path | None):
    """Held while a client first touches the store: jobs starting together on a new mlflow.db would
    otherwise all run its schema migration, and all but one lose their run (issue 15)."""
    from filelock import FileLock

    path = (lock_dir or Path.home()) / ".jointdit-mlflow-store.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path), timeout=120)


class Tracker:
    """A run in MLflow, logged through ``MlflowClient`` so no global active run leaks between jobs."""

    def __init__(self, logger_cfg: DictConfig | None, run_name: str | None = None,
                 parent_run_id: str | None = None, tags: dict[str, str] | None = None):
        self.client = None
        self.run_id: str | None = None
        self.tracking_uri: str | None = None
        self._warned = False
        self._monitor = None
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
            for key, value in HTTP_LIMITS.items():  # a server that answers /health but fails its API: seconds, not
                os.environ.setdefault(key, value)   # MLflow's 7 retries with backoff (minutes); user settings win
        with _store_lock(_lock_dir(uri)):  # a fresh sqlite store is created and migrated by the client's first use
            client = MlflowClient(tracking_uri=uri)
            experiment_id = _experiment_id(client, str(logger_cfg.experiment_name), _lock_dir(uri),
                                           artifact_location(logger_cfg, uri))
        parent_run_id = parent_run_id or os.environ.get(PARENT_ENV)
        if parent_run_id:
            tags = {**tags, "mlflow.parentRunId": parent_run_id}
        run = client.create_run(experiment_id, run_name=run_name or logger_cfg.get("run_name"), tags=tags)
        self.client, self.run_id, self.tracking_uri = client, run.info.run_id, uri

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

    def start_system_metrics(self, interval: float = 10.0) -> None:
        """MLflow's system metrics (CPU/GPU utilisation and memory, ``system/*``) every ``interval`` s."""
        if not self.active or self._monitor is not None:
            return

        def start():
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval, samples_before_logging=1,
                                           tracking_uri=self.tracking_uri)
            monitor.start()
            self._monitor = monitor

        self._guard(start)

    def end(self, status: str = "FINISHED") -> None:
        if self._monitor is not None:
            monitor, self._monitor = self._monitor, None
            try:
                monitor.finish()
            except Exception:  # noqa: BLE001 - the run is ending anyway
                pass
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


NAME_NOISE = ("hydra.", "paths.", "logger.", "experiment", "hparams_search")  # not part of a run's name


def _hydra_cfg():
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get()
    except ValueError:  # not inside a Hydra app
        return None


def _experiment_choice(hydra_cfg) -> str | None:
    choice = hydra_cfg.runtime.choices.get("experiment") if hydra_cfg is not None else None
    return None if choice in (None, "null") else str(choice)


def job_run_name(default: str = "run") -> str:
    """The run name: the experiment preset plus the overrides, e.g. ``demo stage=b,vram=48gb``.

    A sweep job names only the values the sweep varies (``optim.lr=0.001``), so its siblings differ at a
    glance; bookkeeping overrides (``hydra.*``, ``paths.*``, ``logger.*``) are left out. Outside Hydra: ``default``.
    """
    hydra_cfg = _hydra_cfg()
    if hydra_cfg is None:
        return default
    overrides = [o for o in hydra_cfg.overrides.task if not o.lstrip("+~").startswith(NAME_NOISE)]
    swept = set(filter(None, os.environ.get(SWEPT_ENV, "").split(",")))
    if swept:
        overrides = [o for o in overrides if o.partition("=")[0].lstrip("+~") in swept]
    parts = [p for p in (_experiment_choice(hydra_cfg), ",".join(overrides)) if p]
    return " ".join(parts) or default


def sweep_run_name(config: DictConfig, default: str = "sweep") -> str:
    """A sweep's parent run name: the experiment preset plus the sweep's grid, e.g.
    ``sweep_lr_guidance optim.lr=3e-4,1e-3 guidance.w_v=1.0,2.0`` — the command-line overrides (bookkeeping
    ones left out, as in :func:`job_run_name`) and the preset's ``hydra.sweeper.params`` not overridden there."""
    hydra_cfg = config.hydra
    overrides = [o for o in hydra_cfg.overrides.task if not o.lstrip("+~").startswith(NAME_NOISE)]
    given = {o.partition("=")[0].lstrip("+~") for o in overrides}
    preset = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
    overrides += [f"{key}={value}" for key, value in preset.items() if str(key) not in given]
    parts = [p for p in (_experiment_choice(hydra_cfg), " ".join(overrides)) if p]
    return " ".join(parts) or default


def _git(*args: str) -> str | None:
    import subprocess

    from jointdit.config import CONFIG_DIR

    try:
        out = subprocess.run(["git", "-C", str(CONFIG_DIR.parent), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def run_tags(cfg: DictConfig, source: str = "jointdit.train", hydra_cfg: DictConfig | None = None) -> dict[str, str]:
    """Who ran what: source, git commit and dirty flag, user, host, the Hydra overrides, the experiment
    preset, the config's ``tags`` (each as a tag of its own, and all in ``jointdit.tags``), and the task mix.
    ``hydra_cfg``: the ``hydra`` node to read overrides and choices from (default: the running job's)."""
    import getpass
    import socket

    tags = {"mlflow.source.name": source, "mlflow.source.type": "LOCAL", "host": socket.gethostname()}
    try:
        tags["mlflow.user"] = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        pass
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        status = _git("status", "--porcelain", "--untracked-files=no")
        tags["git.dirty"] = str(bool(status)).lower() if status is not None else "unknown"
        branch = _git("rev-parse", "--abbrev-ref", "HEAD")
        if branch:
            tags["mlflow.source.git.branch"] = branch
    hydra_cfg = hydra_cfg if hydra_cfg is not None else _hydra_cfg()
    if hydra_cfg is not None:
        tags["hydra.overrides"] = " ".join(hydra_cfg.overrides.task)
        tags["experiment"] = _experiment_choice(hydra_cfg) or "none"
    user_tags = [str(t) for t in (cfg.get("tags") or [])]
    if user_tags:
        tags["jointdit.tags"] = ",".join(user_tags)
        tags.update({t: "true" for t in user_tags if t not in tags})
    for key in ("stage.name", "model.preset", "data.name", "codec.name"):
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None:
            tags[key.split(".")[0]] = str(value)
    mix = OmegaConf.select(cfg, "objective.tasks", default=None)
    if mix:
        probs = {k: float(v) for k, v in OmegaConf.to_container(mix, resolve=True).items()}
        total = sum(probs.values()) or 1.0
        tags["task_mix"] = ",".join(f"{k}={v / total:.3g}" for k, v in probs.items() if v > 0)
    return tags


def run_params(cfg: DictConfig, model_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The resolved config, flattened; ``model.*`` values left ``null`` in the config (the preset's or the
    data's choice) are the values the built model actually has. Keys still ``None`` are not logged."""
    params = flatten(cfg)
    for key, value in (model_config or {}).items():
        name = f"model.{key}"
        if params.get(name, "missing") is None and value is not None:
            params[name] = list(value) if isinstance(value, tuple) else value
    return {k: v for k, v in params.items() if v is not None}


def dataset_digest(cache_dir: str | os.PathLike) -> str:
    """sha256 of the cache's index and meta files (first 16 hex digits): the same cache, the same digest."""
    import hashlib

    digest = hashlib.sha256()
    for name in ("index.jsonl", "meta.json"):
        path = Path(cache_dir) / name
        if path.exists():
            digest.update(name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def log_dataset(tracker: "Tracker", cfg: DictConfig, cache_dir: str | os.PathLike, counts: dict[str, int],
                shapes: dict[str, Any] | None = None) -> None:
    """``mlflow.log_input`` for the latent cache: its path (source), data set and codec names, clip
    counts per split and a content hash (digest); shown in the run's "Datasets used"."""
    if not tracker.active:
        return
    from mlflow.entities import Dataset, DatasetInput, InputTag

    profile = {"clips": counts, "codec": str(OmegaConf.select(cfg, "codec.name", default="")),
               "data": str(OmegaConf.select(cfg, "data.name", default=""))}
    schema = {"latent": shapes} if shapes else None
    dataset = Dataset(name=f"{profile['data']}-{profile['codec']}", digest=dataset_digest(cache_dir),
                      source_type="local", source=json.dumps({"uri": str(cache_dir)}),
                      schema=json.dumps(schema, default=str) if schema else None, profile=json.dumps(profile))
    entry = DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "train")])
    tracker._guard(tracker.client.log_inputs, tracker.run_id, datasets=[entry])


def log_model(tracker: "Tracker", folder: str | os.PathLike, register_as: str | None = None) -> str | None:
    """The exported model folder as the run's ``model`` artifact; with ``register_as``, also a new version of
    that registered model (MLflow's model registry). Returns the version, if one was made."""
    if not tracker.active or not Path(folder).is_dir():
        return None
    tracker.log_artifact(folder, "model")
    if not register_as:
        return None

    def register() -> str:
        from mlflow.exceptions import MlflowException

        try:
            tracker.client.create_registered_model(register_as)
        except MlflowException as err:
            if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
                raise
        run = tracker.client.get_run(tracker.run_id)
        version = tracker.client.create_model_version(register_as, f"{run.info.artifact_uri}/model", tracker.run_id)
        return str(version.version)

    return tracker._guard(register)


def open_run(cfg: DictConfig, is_main_process: bool = True, source: str = "jointdit.train") -> "Tracker":
    """The job's MLflow run (rank 0 only; other ranks get an inactive tracker): named by
    :func:`job_run_name`, tagged by :func:`run_tags`, with system metrics when ``logger.system_metrics``."""
    logger_cfg = cfg.get("logger") if is_main_process else None
    if logger_cfg is None or logger_cfg.get("name", "none") == "none":
        return Tracker(None)
    name = logger_cfg.get("run_name") or job_run_name(str(cfg.get("task_name", "run")))
    tracker = Tracker(logger_cfg, run_name=name, tags=run_tags(cfg, source))
    if logger_cfg.get("system_metrics", True):
        tracker.start_system_metrics(float(logger_cfg.get("system_metrics_interval", 10)))
    return tracker


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra < 1.1
    Callback = object


class MlflowSweepCallback(Callback):
    """Opens one MLflow parent run per multirun; every job's run becomes its child. The parent is named by
    :func:`sweep_run_name` and tagged like a job (:func:`run_tags`: source, git, user, host, overrides, config tags).

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
        tags = {**run_tags(config, hydra_cfg=config.hydra), "jointdit.sweep_dir": str(sweep_dir)}  # as its jobs have
        self.tracker = Tracker(logger_cfg, run_name=logger_cfg.get("run_name") or sweep_run_name(config), tags=tags)
        preset_params = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
        swept = swept_keys(list(config.hydra.overrides.task)) + [str(k) for k in preset_params]  # + a preset's sweep
        os.environ[SWEPT_ENV] = ",".join(dict.fromkeys(swept))
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
