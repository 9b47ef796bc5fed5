"""FSDP (conf/accelerate/fsdp.yaml) over gloo: two real CPU processes started by `accelerate launch`, a tiny
JointDiT trained by tests/fsdp_worker.py through jointdit.checkpoints' sharding-aware helpers.

Oracle: the same steps in ONE process on the whole batch (the mean of two equal halves' losses is the whole
batch's loss, so sharded training must land on the same weights up to float rounding); measured on the 2-core
CPU: max |FSDP export − oracle| = 5.3e-6 while training moved weights by up to 1.9e-2 (tolerance 5e-5).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

import fsdp_worker as worker
from helpers import PYTHON, REPO

ACCELERATE = str(Path(PYTHON).with_name("accelerate"))
HALF = 2  # steps before the checkpoint; the export is taken after 2 * HALF
ATOL = 5e-5


def _launch(recipe: str, out: Path) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOINTDIT_", "ACCELERATE_", "FSDP_", "RANK",
                                                                    "WORLD_SIZE", "MASTER_"))}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [ACCELERATE, "launch", "--config_file", str(REPO / "conf" / "accelerate" / f"{recipe}.yaml"),
           "--num_processes", "2", str(REPO / "tests" / "fsdp_worker.py"), str(out), "--steps", str(HALF)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=out.parent, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def oracle() -> dict:
    """Single-process training on the whole batch: raw weights and EMA shadow at HALF, EMA export at 2 * HALF,
    the loss of every step."""
    model = worker.build_model()
    optimizer, scheduler = worker.make_optimizer(model, 2 * HALF)
    ema = worker.make_ema(model)
    snapshots = {"init": {k: v.clone() for k, v in model.state_dict().items()}, "losses": [], "grad_norms": []}
    for step in range(2 * HALF):
        loss = worker.loss_of(model, worker.batch(step))
        loss.backward()
        snapshots["losses"].append(float(loss.detach()))
        snapshots["grad_norms"].append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), worker.CLIP)))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step([p for p in model.parameters() if p.requires_grad])
        if step + 1 == HALF:
            snapshots["raw_half"] = {k: v.clone() for k, v in model.state_dict().items()}
            snapshots["ema_half"] = {f"shadow.{i}": p.clone() for i, p in enumerate(ema.shadow_params)}
    ema.copy_to([p for p in model.parameters() if p.requires_grad])
    snapshots["export"] = {k: v.clone() for k, v in model.state_dict().items()}
    return snapshots


def _max_diff(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> float:
    assert set(ours) == set(theirs) and all(ours[k].shape == theirs[k].shape for k in ours)
    return max(float((ours[k] - theirs[k]).abs().max()) for k in ours)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("fsdp") / "run"
    return out, _launch("fsdp", out)


def test_fsdp_really_shards_over_two_cpu_processes(fsdp_run):
    _, reports = fsdp_run
    assert [r["distributed_type"] for r in reports] == ["DistributedType.FSDP"] * 2 and reports[0]["world"] == 2
    assert reports[0]["model_class"] == "FSDPJointDiT"  # fully_shard, not DDP
    full = reports[0]["full_numel"]
    assert all(r["dtensor_params"] > 0 for r in reports)
    assert sum(r["local_numel"] for r in reports) == full and max(r["local_numel"] for r in reports) < 0.6 * full


def test_an_fsdp_export_loads_as_a_plain_model_with_the_single_process_weights(fsdp_run, oracle):
    from jointdit.checkpoints import load_model
    from jointdit.safeload import verify_model_folder

    out, reports = fsdp_run
    halves = [(a + b) / 2 for a, b in zip(reports[0]["losses"], reports[1]["losses"])]
    assert halves == pytest.approx(oracle["losses"], rel=1e-5)  # each rank trained on its half of the batch
    for report in reports:  # the whole model's gradient norm on every rank (what the non-finite guard reads)
        assert report["grad_norms"] == pytest.approx(oracle["grad_norms"], rel=1e-4)
    export = load_model(verify_model_folder(out / "export")).state_dict()  # no FSDP involved in loading
    fresh = worker.build_model().state_dict()
    assert {k: v.shape for k, v in export.items()} == {k: v.shape for k, v in fresh.items()}  # full, not shards
    assert json.loads((out / "export" / "config.json").read_text())["_class_name"] == "JointDiT"  # not FSDPJointDiT
    moved = _max_diff(oracle["export"], oracle["init"])
    assert moved > 100 * ATOL  # the oracle is not trivially the initial weights
    assert _max_diff(export, oracle["export"]) < ATOL  # the EMA weights, gathered from both ranks' shards
    frozen = [k for k in export if k.startswith(worker.FROZEN_PREFIXES)]
    assert frozen and all(torch.equal(export[k], oracle["init"][k]) for k in frozen)


def test_an_fsdp_checkpoint_verifies_loads_and_resumes_exactly(fsdp_run, oracle):
    from safetensors.torch import load_file

    from jointdit.checkpoints import load_model
    from jointdit.safeload import verify_checkpoint_folder

    out, reports = fsdp_run
    folder = out / "checkpoints" / f"step_{HALF:06d}"
    assert verify_checkpoint_folder(folder)["step"] == HALF  # safetensors weights, only weights-only pickles
    assert _max_diff(load_model(folder).state_dict(), oracle["raw_half"]) < ATOL  # the full raw weights
    assert _max_diff(load_file(str(folder / "ema.safetensors")), oracle["ema_half"]) < ATOL  # full EMA shadow
    for report in reports:  # model, optimizer, LR schedule and EMA restored: the second half replays exactly
        assert report["resumed_losses"] == report["losses"][HALF:]
    straight = load_model(out / "export").state_dict()
    resumed = load_model(out / "export_resumed").state_dict()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.slow  # a second 2-process launch: about 40 s on a quiet 2-core machine
def test_fsdp_and_ddp_exports_load_the_same(fsdp_run, tmp_path):
    from jointdit.checkpoints import load_model

    out, _ = fsdp_run
    ddp_reports = _launch("ddp", tmp_path / "ddp")
    assert [r["distributed_type"] for r in ddp_reports] == ["DistributedType.MULTI_CPU"] * 2
    fsdp_model, ddp_model = load_model(out / "export"), load_model(tmp_path / "ddp" / "export")
    configs = [json.loads((folder / "config.json").read_text()) for folder in (out / "export", tmp_path / "ddp" / "export")]
    assert type(fsdp_model) is type(ddp_model) and configs[0] == configs[1]
    assert _max_diff(fsdp_model.state_dict(), ddp_model.state_dict()) < ATOL
