"""MLflow over HTTP: a real `mlflow server` on loopback, and an unreachable one that must not stop training."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from helpers import run_module

SMALL = ["data.num_clips=8", "data.size=32", "data.seconds=1.0", "data.val_fraction=0.25", "model.hidden_size=64",
         "model.depth=2", "model.num_heads=2", "vram.micro_batch_size=2", "batch_size=2", "max_steps=2",
         "checkpoint.every=100", "sample_every=-1"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    store = tmp_path / "server"
    store.mkdir()
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri", f"sqlite:///{store}/mlflow.db",
         "--artifacts-destination", str(store / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=store, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180  # about 9 s when the machine is quiet; far more when it is not
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=1):
                break
        except OSError:
            assert proc.poll() is None and time.time() < deadline, "mlflow server did not start"
            time.sleep(0.3)
    yield uri
    os.killpg(proc.pid, 15)
    proc.wait(timeout=30)


def test_training_logs_to_a_real_mlflow_server(tmp_path, mlflow_server):
    result = run_module("jointdit.train", *SMALL, f"logger.tracking_uri={mlflow_server}",
                        f"hydra.run.dir={tmp_path / 'run'}", env={"JOINTDIT_ROOT": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("train").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert "loss_video" in runs[0].data.metrics and runs[0].data.params["model.preset"] == "tiny"
    assert "loss_curve.png" in {a.path for a in client.list_artifacts(runs[0].info.run_id)}


def test_an_unreachable_server_warns_once_and_training_carries_on(tmp_path):
    started = time.time()
    result = run_module("jointdit.train", *SMALL, f"logger.tracking_uri=http://127.0.0.1:{_free_port()}",
                        f"hydra.run.dir={tmp_path / 'run'}", env={"JOINTDIT_ROOT": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("MLflow is unavailable, carrying on without tracking") == 1
    assert (tmp_path / "run" / "export" / "last" / "config.json").exists()
    assert time.time() - started < 120  # MLflow's own retries alone would take about 4 minutes


# ----------------------------------------------------------------------------------------------
# Run identity, against a real sqlite store
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """An initialised MLflow sqlite file: creating the tables takes seconds, copying the file does not."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def hydra_job(tmp_path, monkeypatch, empty_store):
    """A composed train config with Hydra's runtime config set, as inside `python -m jointdit.train ...`;
    its MLflow store (tmp_path/mlflow.db) starts empty."""
    import shutil

    shutil.copy(empty_store, tmp_path / "mlflow.db")
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from jointdit.config import CONFIG_DIR

    for key in list(os.environ):
        if key.startswith("JOINTDIT_"):
            monkeypatch.delenv(key)

    def _job(*overrides: str):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("train", overrides=[*overrides, f"paths.root_dir={tmp_path}"], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        return cfg

    yield _job
    HydraConfig.instance().cfg = None


def _run(tmp_path, run_id):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    return client, client.get_run(run_id)


def test_run_is_named_by_preset_and_overrides_and_tagged_with_its_origin(tmp_path, hydra_job):
    from jointdit.tracking import open_run

    cfg = hydra_job("experiment=demo", "stage=b", "vram=48gb", "tags=[demo,lr-study]", "logger.system_metrics=false")
    tracker = open_run(cfg)
    run_id = tracker.run_id
    tracker.end()
    client, run = _run(tmp_path, run_id)
    assert run.info.run_name == "demo stage=b,vram=48gb,tags=[demo,lr-study]"
    tags = run.data.tags
    head = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert tags["mlflow.source.git.commit"] == head.stdout.strip()
    assert tags["git.dirty"] in ("true", "false") and tags["mlflow.source.name"] == "jointdit.train"
    assert tags["mlflow.user"] and tags["host"] == socket.gethostname()
    assert tags["hydra.overrides"].startswith("experiment=demo stage=b vram=48gb")
    assert tags["jointdit.tags"] == "demo,lr-study" and tags["demo"] == "true" and tags["lr-study"] == "true"
    assert tags["experiment"] == "demo" and tags["stage"] == "b"
    assert tags["task_mix"] == "joint=0.55,a2v=0.15,v2a=0.15,i2sv=0.15"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # UI opens on runs, not GenAI


def test_an_existing_experiment_gets_the_training_kind(tmp_path, hydra_job):
    from jointdit.tracking import open_run

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    client.create_experiment("train")
    tracker = open_run(hydra_job("logger.system_metrics=false"))
    run_id = tracker.run_id
    tracker.end()
    assert client.get_experiment_by_name("train").tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_run(run_id).info.run_name == "train"  # no overrides: the task name


def test_params_have_the_models_real_values_not_none(tmp_path, hydra_job):
    from jointdit.models import build_model
    from jointdit.tracking import flatten, run_params

    cfg = hydra_job()
    raw = flatten(cfg)
    unset = sorted(k for k, v in raw.items() if k.startswith("model.") and v is None)
    assert len(unset) >= 17  # what used to be logged as "None"
    model = build_model("tiny", video_in_channels=12, audio_in_channels=1, video_latent_fps=8.0, audio_latent_fps=100.0)
    params = run_params(cfg, dict(model.config))
    assert not [k for k, v in params.items() if v is None]
    for key in unset:
        value = model.config[key.removeprefix("model.")]
        if value is None:  # the model itself leaves it unset (rope_time_scale): not logged at all
            assert key not in params
        else:
            assert params[key] == (list(value) if isinstance(value, tuple) else value), key
    assert params["model.video_in_channels"] == 12 and params["model.hidden_size"] == model.config["hidden_size"]


def test_dataset_model_registry_and_system_metrics_reach_mlflow(tmp_path, hydra_job):
    import hashlib

    from jointdit.tracking import log_dataset, log_model, open_run

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "index.jsonl").write_text('{"id": "a"}\n{"id": "b"}\n')
    (cache / "meta.json").write_text('{"codec": "pixel_mel"}')
    model_dir = tmp_path / "export"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    cfg = hydra_job("logger.system_metrics_interval=0.2", "logger.register_model=jointdit-demo")
    tracker = open_run(cfg)
    log_dataset(tracker, cfg, cache, {"train": 2, "val": 0}, {"video_shape": [4, 12, 8, 8]})
    assert log_model(tracker, model_dir, "jointdit-demo") == "1"
    run_id, deadline = tracker.run_id, time.time() + 30
    while not any(k.startswith("system/") for k in _run(tmp_path, run_id)[1].data.metrics):
        assert time.time() < deadline, "no system metric logged within 30 s at a 0.2 s interval"
        time.sleep(0.2)
    tracker.end()
    client, run = _run(tmp_path, run_id)
    (entry,) = run.inputs.dataset_inputs
    expected = hashlib.sha256(b"index.jsonl" + (cache / "index.jsonl").read_bytes()
                              + b"meta.json" + (cache / "meta.json").read_bytes()).hexdigest()[:16]
    assert entry.dataset.digest == expected and entry.dataset.name == "synthetic-pixel_mel"
    assert str(cache) in entry.dataset.source and '"train": 2' in entry.dataset.profile
    assert "model/config.json" in {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    (version,) = client.search_model_versions("name='jointdit-demo'")
    assert version.run_id == run.info.run_id
    assert any(key.startswith("system/cpu_utilization") for key in run.data.metrics), run.data.metrics.keys()


def test_a_training_run_is_identified_and_logs_window_means(tmp_path):
    """One real run: its name, dataset input, model artifact, None-free params, losses averaged over each
    log window (oracle: the per-step history in metrics.json), and one train.log line per log step."""
    import json
    import re

    run_dir = tmp_path / "run"
    result = run_module("jointdit.train", *SMALL, "max_steps=4", "log_every=2", "logger.system_metrics=false",
                        "tags=[smoke]", f"hydra.run.dir={run_dir}", env={"JOINTDIT_ROOT": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("train").experiment_id])
    assert run.info.run_name.startswith("data.num_clips=8,data.size=32") and "hydra.run.dir" not in run.info.run_name
    assert run.data.tags["smoke"] == "true" and "mlflow.source.git.commit" in run.data.tags
    assert "None" not in run.data.params.values() and run.data.params["model.hidden_size"] == "64"
    assert run.data.params["model.depth"] == "2" and "model.video_in_channels" in run.data.params
    (entry,) = run.inputs.dataset_inputs
    assert '"train": 6' in entry.dataset.profile and entry.dataset.name == "synthetic-pixel_mel"
    assert "model/config.json" in {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    steps = [h["loss"] for h in json.loads((run_dir / "metrics.json").read_text())["history"]]
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert logged == pytest.approx({2: (steps[0] + steps[1]) / 2, 4: (steps[2] + steps[3]) / 2}, rel=1e-6)
    assert "loss_ema" in run.data.metrics
    lines = re.findall(r"step (\d+)/4 \| loss ([0-9.]+) \| loss_ema", (run_dir / "train.log").read_text())
    assert [int(s) for s, _ in lines] == [2, 4]
    assert float(lines[0][1]) == pytest.approx(logged[2], abs=1e-4)


def test_artifacts_go_under_the_configured_root_whatever_the_current_folder(tmp_path, hydra_job, monkeypatch):
    """MLflow's default for a sqlite store is ./mlruns of the current folder; a run started elsewhere must
    still keep its artifacts beside its mlflow.db (``logger.artifact_location``: ``<paths.root_dir>/mlruns``)."""
    from jointdit.tracking import open_run

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    note = tmp_path / "note.txt"
    note.write_text("logged from another folder")
    tracker = open_run(hydra_job("logger.system_metrics=false"))
    tracker.log_artifact(note)
    run_id = tracker.run_id
    tracker.end()
    client, run = _run(tmp_path, run_id)
    (stored,) = (tmp_path / "mlruns").rglob("note.txt")  # on disk, where the root is, not where we stood
    assert stored.read_text() == "logged from another folder"
    assert not (elsewhere / "mlruns").exists()
    assert client.get_experiment(run.info.experiment_id).artifact_location == (tmp_path / "mlruns").as_uri()
