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
