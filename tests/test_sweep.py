"""Sweeps through Hydra's submitit launcher (its local executor stands in for SLURM): one MLflow parent run,
one child per job, each job in its own process."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from helpers import run_module

TINY = ["data.num_clips=8", "data.size=32", "data.seconds=1.0", "data.val_fraction=0.25", "model.hidden_size=64",
        "model.depth=2", "model.num_heads=2", "vram.micro_batch_size=2", "batch_size=2", "max_steps=1",
        "checkpoint.every=100", "sample_every=-1", "logger.system_metrics=false"]


@pytest.mark.slow  # two training processes: about 40 s on a quiet 2-core machine
def test_submitit_sweep_gives_one_parent_and_a_child_per_job(tmp_path):
    result = run_module("jointdit.train", "-m", "hydra/launcher=local", *TINY, "optim.lr=1e-3,3e-4",
                        env={"JOINTDIT_ROOT": str(tmp_path)}, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("train").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2, [r.info.run_name for r in runs]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert sorted(c.info.run_name for c in children) == ["optim.lr=0.0003", "optim.lr=0.001"]
    assert all(r.info.status == "FINISHED" for r in runs)
    # submitit ran each job in a process of its own, with its logs under the sweep folder
    sweep = next((tmp_path / "multirun").glob("*/*"))
    assert len(list(sweep.glob(".submitit/*/*_log.out"))) == 2
    assert sorted(p.parent.name for p in sweep.glob("*/metrics.json")) == ["0", "1"]


SLURM_TASK = {"SUBMITIT_EXECUTOR": "slurm", "SUBMITIT_FOLDER": "/tmp/submitit", "SLURM_JOB_ID": "4242",
              "SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_JOB_NUM_NODES": "2",
              "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[01-02]"}
SHOW_ENV = """
import os, json
from jointdit.launch import export_submitit_env
done = export_submitit_env()
print(json.dumps({"done": done, **{k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}}))
"""


def _exported(extra: dict[str, str]) -> dict:
    import json
    import os
    import subprocess

    from helpers import PYTHON, REPO

    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_", "RANK", "WORLD_SIZE",
                                                                    "LOCAL_RANK", "MASTER_"))}
    env.update(PYTHONPATH=str(REPO), **extra)
    result = subprocess.run([PYTHON, "-c", SHOW_ENV], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_slurm_task_becomes_an_accelerate_rank():
    """The 4th task of a 2-node x 2-task job (hydra/launcher=slurm): SLURM's variables, read by submitit,
    become the torch.distributed variables Accelerate reads."""
    got = _exported(SLURM_TASK)
    assert got["done"] is True
    assert (got["RANK"], got["WORLD_SIZE"], got["LOCAL_RANK"], got["MASTER_ADDR"]) == ("3", "4", "1", "gpu01")
    assert 20000 <= int(got["MASTER_PORT"]) <= 60000  # derived from the job id: the same on every task


def test_no_export_inside_accelerate_launch_or_for_a_single_task():
    assert _exported({**SLURM_TASK, "RANK": "0"})["done"] is False       # accelerate launch/torchrun set it
    assert _exported({**SLURM_TASK, "SLURM_NTASKS": "1"})["done"] is False
    assert _exported({})["done"] is False and _exported({})["RANK"] is None


@pytest.fixture
def multirun_config(tmp_path, monkeypatch):
    """The config a multirun's callbacks receive (composed in MULTIRUN mode by Hydra itself), its MLflow
    store under tmp_path."""
    import os

    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    from jointdit.config import CONFIG_DIR

    for key in list(os.environ):
        if key.startswith("JOINTDIT_"):
            monkeypatch.delenv(key)

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return GlobalHydra.instance().hydra.compose_config(
                "train", [*overrides, f"paths.root_dir={tmp_path}", f"hydra.sweep.dir={tmp_path}/sweep",
                          "logger.system_metrics=false"],
                run_mode=RunMode.MULTIRUN, with_log_configuration=False)

    return _compose


@pytest.mark.parametrize("overrides, name", [
    (["experiment=demo", "optim.lr=1e-3,3e-4", "model=tiny,small", "max_steps=3"],
     "demo optim.lr=1e-3,3e-4 model=tiny,small max_steps=3"),
    (["experiment=sweep_lr_guidance", "tags=[study]"],  # the grid comes from the preset's sweeper params
     "sweep_lr_guidance tags=[study] optim.lr=3e-4,1e-3 guidance.w_v=1.0,2.0"),
])
def test_the_sweep_parent_run_has_the_identity_of_its_jobs(tmp_path, multirun_config, overrides, name):
    """The parent run opened by the Hydra callback: named by preset + grid, tagged like a job run."""
    import socket
    import subprocess
    from pathlib import Path

    from jointdit.tracking import MlflowSweepCallback

    config = multirun_config(*overrides)
    callback = MlflowSweepCallback()
    callback.on_multirun_start(config)
    run_id = callback.tracker.run_id
    callback.on_multirun_end(config)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(run_id)
    assert run.info.run_name == name and run.info.status == "FINISHED"
    tags = run.data.tags
    head = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert tags["mlflow.source.git.commit"] == head.stdout.strip() and tags["git.dirty"] in ("true", "false")
    assert tags["mlflow.source.name"] == "jointdit.train" and tags["host"] == socket.gethostname()
    assert tags["mlflow.user"] and tags["experiment"] == overrides[0].partition("=")[2]
    assert tags["hydra.overrides"].startswith(" ".join(overrides))
    expected_tags = ["study"] if "tags=[study]" in overrides else ["demo"]
    assert set(expected_tags) <= set(tags["jointdit.tags"].split(",")) and all(tags[t] == "true" for t in expected_tags)
    assert tags["task_mix"].startswith("joint=") and tags["jointdit.sweep_dir"] == str(tmp_path / "sweep")
