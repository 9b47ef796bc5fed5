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
    deadline = time.time() + 60
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
